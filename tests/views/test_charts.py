"""The overview's activity charts and a definition's step map: the figures
come from real instances, the hourly rollup agrees with counting live, and
the pages show them as SVG with their numbers written out."""

from __future__ import annotations

import math
import os
import re
from datetime import timedelta
from pathlib import Path

import pytest
from django.core.cache import cache
from django.urls import reverse

from tests.views import test_browser
from tests.views.conftest import completed, held, logged_in
from workflows_app import activity
from workflows_app.engine.locking import db_now
from workflows_app.models import (
    ActivityHour,
    ActivityRollup,
    TransitionLog,
    WorkflowInstance,
)

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def no_cached_charts():
    cache.clear()


def test_quantile_reads_the_bucket_bound():
    bounds = activity.DURATION_BOUNDS
    buckets = [0] * (len(bounds) + 1)
    assert activity.quantile(buckets, 0.5) is None
    buckets[2] = 9  # nine at most 0.5 s
    buckets[5] = 1  # one at most 5 s
    assert activity.quantile(buckets, 0.5) == bounds[2]
    assert activity.quantile(buckets, 0.9) == bounds[2]
    assert activity.quantile(buckets, 0.95) == bounds[5]
    buckets[-1] = 100  # beyond the last bound
    assert activity.quantile(buckets, 0.95) == math.inf


def totals(data: activity.Activity) -> dict[str, int]:
    return {m: sum(v for _, v in data.series(m)) for m in activity.MEASURES}


def test_counts_live_and_rolled_up_agree(broker, wf):
    for n in range(3):
        completed(broker, f"done-{n}")
    held(broker, "held-1")
    window = activity.WINDOWS["24h"]
    live = activity.activity(window, db_now())
    expected = {"started": 4, "completed": 3, "compensated": 0, "held": 1}
    assert totals(live) == expected
    assert live.per_definition["wf"].completed == 3
    [(key, count, p50, p95)] = live.percentiles()
    assert (key, count) == ("wf", 3)
    assert p50 is not None and p50 <= p95

    # Three hours later the hour is over: the sweeper rolls it up once, and
    # the chart then reads the rollup, not the instances.
    shift = timedelta(hours=3)
    WorkflowInstance.objects.update(
        accepted_at=db_now() - shift,
        finished_at=None,
    )
    for instance in WorkflowInstance.objects.filter(state="completed"):
        WorkflowInstance.objects.filter(pk=instance.pk).update(
            finished_at=instance.accepted_at + timedelta(seconds=1)
        )
    TransitionLog.objects.update(created_at=db_now() - shift)
    ActivityRollup.objects.update_or_create(
        pk=1, defaults={"rolled_until": activity.hour_of(db_now() - timedelta(hours=6))}
    )
    assert activity.roll_up(db_now()) >= 5
    assert activity.roll_up(db_now()) == 0  # nothing new: each hour once
    [row] = ActivityHour.objects.all()
    assert (row.started, row.completed, row.held) == (4, 3, 1)
    rolled = activity.activity(window, db_now())
    assert totals(rolled) == expected
    # The chart read the rollup, not the instances: a changed row shows.
    ActivityHour.objects.update(started=40)
    assert totals(activity.activity(window, db_now()))["started"] == 40
    assert rolled.percentiles()[0][2] == 1  # 1 s each: "at most 1 s"


def test_step_places_count_where_each_instance_is(broker, wf):
    held(broker, "held-1")
    held(broker, "held-2")
    completed(broker, "done-1")
    places = activity.step_places("wf")
    assert places["two"]["held"] == 2
    assert sum(p["held"] for p in places.values()) == 2
    assert all(p["running"] == 0 for p in places.values())


def test_overview_and_definition_pages_show_the_charts(broker, wf, viewer):
    completed(broker, "done-1")
    held(broker, "held-<b>")
    client = logged_in(viewer)
    page = client.get(reverse("overview")).content.decode()
    assert 'aria-label="Started: 2 in all' in page
    assert 'aria-label="Held (moved to needs attention): 1 in all' in page
    assert re.search(
        r'<th scope="row"><a href="/definitions/wf/">wf</a></th><td>1</td>', page
    )
    week = client.get(reverse("overview") + "?window=7d").content.decode()
    assert "last 7 days, per 6 hours" in week

    page = client.get(reverse("definition_detail", args=["wf"])).content.decode()
    assert 'id="step-map"' in page
    assert re.search(r"held</span> <strong><a [^>]*>1</a>", page)
    part = client.get(
        reverse("definition_detail", args=["wf"]), headers={"HX-Request": "true"}
    ).content.decode()
    assert part.lstrip().startswith('<section class="card" aria-labelledby="map-title"')


# -- in a real browser -------------------------------------------------------------

# The browser tests' fixtures (one Chromium per module, sessions whose
# console errors fail the test), registered here by name.
browser = test_browser.browser
open_session = test_browser.open_session
CHROMIUM = test_browser.CHROMIUM
SCREENSHOTS = Path(os.environ.get("SAGA_DESK_VAR_DIR", "var")) / "screenshots"


@pytest.mark.skipif(
    not os.path.exists(CHROMIUM) and not os.environ.get("CI"),
    reason="needs Debian's chromium (apt-get install chromium)",
)
def test_the_charts_render_in_the_browser(broker, wf, viewer, request):
    open_session = request.getfixturevalue("open_session")
    for n in range(3):
        completed(broker, f"done-{n}")
    held(broker, "held-1")
    page = open_session(viewer)
    chart = page.locator("#activity svg.chart--started")
    chart.wait_for()
    box = chart.bounding_box()
    assert box is not None and box["width"] > 200 and box["height"] > 50
    # One bar per hour, the current hour's as tall as the scale allows.
    assert page.locator("#activity svg.chart--started rect").count() == 24
    heights = page.locator("#activity svg.chart--started rect").evaluate_all(
        "rects => rects.map(r => r.getBBox().height)"
    )
    assert max(heights) > 30 and sorted(heights)[-2] == 0
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.locator("#activity").screenshot(path=SCREENSHOTS / "activity.png")

    page.goto(reverse("definition_detail", args=["wf"]))
    step = page.locator(".step-map__step", has_text="two")
    assert "held 1" in " ".join(step.inner_text().split())
    assert "step-map__step--heat-3" in (step.get_attribute("class") or "")
    page.locator("#step-map").screenshot(path=SCREENSHOTS / "step-map.png")
