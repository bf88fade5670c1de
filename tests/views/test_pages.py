"""The dashboard's pages through the test client: what each shows, filters,
keyset pages, htmx partials and polling, and a bounded number of queries."""

from __future__ import annotations

import re
import uuid
from datetime import timedelta

import pytest
from django.contrib.auth.models import User
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from tests.support import make_definition, start
from tests.views.conftest import completed, fresh, held, logged_in
from workflows_app import tasks
from workflows_app.engine.sweeps import flag_stuck
from workflows_app.models import TransitionLog, WorkflowInstance
from workflows_app.views.pagination import decode, encode

pytestmark = pytest.mark.django_db(transaction=True)
HTMX = {"HX-Request": "true"}


def detail_url(instance) -> str:
    return reverse("instance_detail", args=[instance.pk])


# -- access -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "/",
        "/instances/",
        "/definitions/",
        "/definitions/wf/",
        "/failures/",
        "/bulk-jobs/",
        "/bulk-jobs/new/",
        # A fixed id: parameters must be the same in every xdist worker.
        "/instances/00000000-0000-4000-8000-000000000001/",
    ],
)
def test_every_page_needs_a_login(client, url):
    response = client.get(url)
    assert response.status_code == 302
    assert response["Location"].startswith("/login/?next=")


def test_expired_session_while_polling_sends_htmx_to_the_login_page(client):
    response = client.get(
        "/", headers={**HTMX, "HX-Current-URL": "http://testserver/instances/?q=x"}
    )
    assert response.status_code == 401
    assert response["HX-Redirect"] == "/login/?next=/instances/%3Fq%3Dx"


def test_an_account_without_a_role_is_refused():
    client = logged_in(User.objects.create_user("nobody", password="pw"))
    response = client.get("/")
    assert response.status_code == 403
    assert b"no dashboard role" in response.content


def test_login_page_logs_in_and_logs_out(client, viewer):
    page = client.get("/login/")
    assert page.status_code == 200
    assert b"Log in to Saga Desk" in page.content
    response = client.post("/login/", {"username": "victor", "password": "pw"})
    assert response.status_code == 302 and response["Location"] == "/"
    assert client.get("/").status_code == 200
    assert client.post("/logout/").status_code == 302
    assert client.get("/").status_code == 302


def test_admin_link_only_for_workflow_admins(viewer):
    from tests.support import user_in

    admin = user_in("workflow admin", "ada")
    admin.is_staff = True
    admin.save(update_fields=["is_staff"])
    assert b"/admin/" in logged_in(admin).get("/").content
    assert b"/admin/" not in logged_in(viewer).get("/").content


# -- overview ---------------------------------------------------------------------


def test_overview_counts_states_and_lists_stuck_and_failures(broker, wf, viewer):
    completed(broker, "done-1")
    completed(broker, "done-2")
    stuck = held(broker, "held-1")
    queued = start("wf", "queued-1")  # accepted: its start message is never delivered
    client = logged_in(viewer)
    response = client.get("/")
    counts = response.context["counts"]
    assert counts.by_state == {"completed": 2, "needs_attention": 1, "accepted": 1}
    # Held (waits on a person) is not stuck (no progress past the time rule).
    assert counts.stuck == 0
    assert response.context["stuck_queue"] == [stuck]
    text = " ".join(re.sub(r"<[^>]+>", " ", response.content.decode()).split())
    assert "held: waits on a person to act" in text
    assert "no progress for longer than its definition's stuck-after time" in text
    # Once the queued one passes its stuck-after, it is stuck: counted apart.
    flag_stuck(timezone.now() + timedelta(hours=1), 100)
    response = client.get("/")
    assert response.context["counts"].stuck == 1
    assert response.context["counts"].by_state["needs_attention"] == 1
    assert set(response.context["stuck_queue"]) == {stuck, fresh(queued)}
    text = " ".join(re.sub(r"<[^>]+>", " ", response.content.decode()).split())
    assert "stuck: no progress for more than 15 minutes" in text
    assert rows(client.get("/instances/?stuck=yes")) == ["queued-1"]
    # Each instance page says which of the two it is, with the rule.
    page = client.get(reverse("instance_detail", args=[queued.pk])).content.decode()
    assert "badge--instance-stuck" in page
    assert "(rule: stuck: no progress for more than 15 minutes)" in page
    page = client.get(reverse("instance_detail", args=[stuck.pk])).content.decode()
    assert "badge--instance-stuck" not in page
    assert "Held for a person for" in page and "not counted as stuck" in page
    assert [i.pk for i in response.context["failures"]] == [stuck.pk]
    html = response.content.decode()
    # Separate badges with text, never colour alone.
    for label in ["accepted", "running", "completed", "compensated", "needs attention"]:
        assert f"</span> {label}</span>" in html
    assert "badge--instance-stuck" in html
    assert "two: step failed" in html or "two" in html
    # The live part refreshes itself and comes back as a partial.
    assert 'hx-trigger="every 5.0s"' in html
    partial = client.get("/", headers=HTMX).content.decode()
    assert partial.lstrip().startswith('<div id="overview-live"')
    assert "<html" not in partial


def test_overview_window_counts_only_recent_finished_instances(broker, wf, viewer):
    old = completed(broker, "old-1")
    completed(broker, "new-1")
    WorkflowInstance.objects.filter(pk=old.pk).update(
        last_progress_at=timezone.now() - timedelta(days=3)
    )
    client = logged_in(viewer)
    assert client.get("/").context["counts"].by_state == {"completed": 1}
    assert client.get("/?window=7d").context["counts"].by_state == {"completed": 2}
    assert client.get("/?window=all").context["counts"].by_state == {"completed": 2}


def test_state_counts_equal_a_plain_count_of_the_rows(wf, broker):
    """The overview's counts (on PostgreSQL one index count per definition
    and state) are what counting the rows gives: every state, two
    definitions and one without instances, finished rows just inside and
    outside each window."""
    from workflows_app.models import ACTIVE_STATES, InstanceState
    from workflows_app.views import queries

    make_definition("other")
    make_definition("empty")
    now = timezone.now()
    ages = [timedelta(hours=1), timedelta(hours=23), timedelta(hours=25)]
    ages += [timedelta(days=6), timedelta(days=8)]
    n = 0
    for key in ("wf", "other"):
        for state in InstanceState:
            for age in ages[: 1 + n % len(ages)]:
                n += 1
                instance = start(key, f"{key}-{n}")
                WorkflowInstance.objects.filter(pk=instance.pk).update(
                    state=state, last_progress_at=now - age
                )
    rows = list(
        WorkflowInstance.objects.values_list(
            "definition_key", "state", "last_progress_at"
        )
    )
    for window in ("24h", "7d", "all"):
        counts = queries.state_counts(queries.WINDOWS[window])
        expected: dict[str, dict[str, int]] = {}
        for key, state, at in rows:
            if state in ACTIVE_STATES or window == "all" or at >= counts.since:
                per_key = expected.setdefault(key, {})
                per_key[state] = per_key.get(state, 0) + 1
        assert counts.by_definition == expected, window
        totals = {s: sum(c.get(s, 0) for c in expected.values()) for s in InstanceState}
        assert counts.by_state == {s: n for s, n in totals.items() if n}, window
        one = queries.state_counts(queries.WINDOWS[window], definition_key="other")
        assert one.by_definition == {"other": expected["other"]}, window


# -- instance list ----------------------------------------------------------------


def rows(response) -> list[str]:
    return [i.business_key for i in response.context["page"].rows]


def test_list_filters_and_search(broker, wf, viewer):
    make_definition("other")
    completed(broker, "done-1")
    held_one = held(broker, "held-1")
    start("other", "queued-1")
    client = logged_in(viewer)
    assert sorted(rows(client.get("/instances/"))) == ["done-1", "held-1", "queued-1"]
    assert rows(client.get("/instances/?state=needs_attention")) == ["held-1"]
    assert sorted(rows(client.get("/instances/?state=active"))) == [
        "held-1",
        "queued-1",
    ]
    assert rows(client.get("/instances/?state=finished")) == ["done-1"]
    assert rows(client.get("/instances/?definition=other")) == ["queued-1"]
    assert rows(client.get("/instances/?stuck=yes")) == []  # held, not stuck
    assert rows(client.get("/instances/?q=held-1")) == ["held-1"]
    assert rows(client.get(f"/instances/?q={held_one.pk}")) == ["held-1"]
    assert rows(client.get("/instances/?q=nope")) == []
    assert rows(client.get("/instances/?idle=1h")) == []
    tomorrow = (timezone.now() + timedelta(days=1)).strftime("%Y-%m-%dT%H:%M")
    assert rows(client.get(f"/instances/?accepted_after={tomorrow}")) == []
    assert len(rows(client.get(f"/instances/?accepted_before={tomorrow}"))) == 3
    # Sorting by last progress, both ways.
    newest = rows(client.get("/instances/?sort=-progress"))
    assert rows(client.get("/instances/?sort=progress")) == newest[::-1]
    # A bad value is reported, not a crash.
    bad = client.get("/instances/?state=bogus")
    assert bad.status_code == 200
    assert "bogus is not one of the available choices" in bad.content.decode()


def test_list_pages_by_keyset_without_counting(broker, wf, viewer, settings):
    for n in range(30):
        start("wf", f"order-{n:02}")  # accepted, cheap: no broker run
    client = logged_in(viewer)
    # A small list is counted exactly, never "About 206 (estimate)".
    small = client.get("/instances/?sort=progress")
    assert small.context["total"] == 30 and small.context["total_exact"] is True
    assert "30 instances" in small.content.decode()
    assert "(estimate)" not in small.content.decode()
    settings.SAGA_EXACT_COUNT_UP_TO = 10  # above the bound: the planner's guess
    first = client.get("/instances/?sort=progress")
    page = first.context["page"]
    assert len(page.rows) == 25 and page.prev_cursor is None
    assert first.context["total_exact"] is False
    assert first.context["total"] >= 11
    second = client.get(f"/instances/?sort=progress&cursor={page.next_cursor}")
    page2 = second.context["page"]
    assert rows(second) == [f"order-{n:02}" for n in range(25, 30)]
    assert page2.next_cursor is None and page2.prev_cursor is not None
    back = client.get(f"/instances/?sort=progress&cursor={page2.prev_cursor}")
    assert rows(back) == rows(first)
    assert back.context["page"].prev_cursor is None
    # The filter state stays in the links.
    assert "sort=progress&amp;cursor=" in second.content.decode()
    # Filtering through htmx returns the results part only.
    partial = client.get(
        "/instances/?sort=progress", headers={**HTMX, "HX-Target": "instance-results"}
    ).content.decode()
    assert partial.lstrip().startswith('<section id="instance-results"')
    if connection.vendor == "postgresql":  # SQLite (small data) counts exactly
        with CaptureQueriesContext(connection) as queries:
            client.get("/instances/?sort=progress")
        sql = [q["sql"].upper() for q in queries.captured_queries]
        # A count, if any (no statistics yet), reads at most the bound's rows.
        counts = [q for q in sql if "COUNT(" in q]
        assert all("LIMIT 11" in q for q in counts), counts
        # With statistics and a large estimate: the planner's guess alone.
        with connection.cursor() as cursor:
            cursor.execute(f"ANALYZE {WorkflowInstance._meta.db_table}")
        with CaptureQueriesContext(connection) as queries:
            analysed = client.get("/instances/?sort=progress")
        assert analysed.context["total_exact"] is False
        assert analysed.context["total"] == 30  # ANALYZE read every row
        sql = [q["sql"].upper() for q in queries.captured_queries]
        assert not any("COUNT(" in q for q in sql)


def test_cursor_round_trip_and_garbage():
    now = timezone.now()
    pk = uuid.uuid4()
    assert decode(encode("n", now, pk)) == ("n", now, pk)
    assert decode("not a cursor") is None
    assert decode("") is None


def test_list_queries_do_not_grow_with_the_rows(broker, wf, operator):
    client = logged_in(operator)
    for n in range(2):
        start("wf", f"a-{n}")
    client.get("/instances/")  # warm the session and permission caches
    with CaptureQueriesContext(connection) as few:
        client.get("/instances/")
    for n in range(20):
        start("wf", f"b-{n}")
    with CaptureQueriesContext(connection) as many:
        client.get("/instances/")
    assert len(few.captured_queries) == len(many.captured_queries) <= 8


# -- instance page ----------------------------------------------------------------


def test_detail_shows_state_steps_timeline_and_io(broker, wf, viewer):
    instance = start("wf", "order-7", simulate={"two": "fail_once"}, amount=12)
    broker.run()
    # A late duplicate of step one's message: noted in the timeline, ignored.
    one = instance.steps.get(name="one")
    tasks.run_attempt(str(instance.pk), one.pk, "action")
    instance = fresh(instance)
    response = logged_in(viewer).get(detail_url(instance))
    html = response.content.decode()
    assert response.status_code == 200
    assert "Stopped and waiting for a person" in html  # the meaning in plain words
    assert "order-7" in html and "pinned version" in html.lower()
    assert html.count('<tr id="step-') == 3
    assert "two: step failed" in html or "step failed" in html
    timeline = response.context["history"]
    assert [r.transition for r in timeline][:2] == ["accept", "start"]
    assert "message_ignored" in [r.transition for r in timeline]
    assert "ℹ</span> note" in html
    assert "&quot;amount&quot;: 12" in html  # pretty-printed, escaped JSON
    assert "Open alerts" in html
    # A viewer sees no action.
    assert response.context["actions"] == []
    assert "needs the operator role" in html


def test_detail_actions_follow_the_fsm_and_the_user(broker, wf, operator, viewer):
    instance = held(broker)
    names = [
        a.name
        for a, _ in logged_in(operator).get(detail_url(instance)).context["actions"]
    ]
    assert names == [
        "retry_step",
        "mark_step_done",
        "compensate",
        "cancel",
        "close_as_failed",
    ]
    done = completed(broker)
    assert logged_in(operator).get(detail_url(done)).context["actions"] == []


def test_detail_queries_do_not_grow_with_steps_or_history(broker, operator):
    make_definition("wf", failure_policy="hold")
    small = start("wf", "small")
    big_def = make_definition(
        "big", steps=[{"name": f"s{n}"} for n in range(12)], failure_policy="hold"
    )
    assert big_def.steps.count() == 12
    big = start("big", "big", simulate={"s5": "fail_once", "s6": "fail_once"})
    broker.run()
    client = logged_in(operator)
    client.get(detail_url(small))
    with CaptureQueriesContext(connection) as few:
        client.get(detail_url(small))
    with CaptureQueriesContext(connection) as many:
        client.get(detail_url(big))
    assert TransitionLog.objects.filter(instance=big).count() > 30
    assert len(few.captured_queries) == len(many.captured_queries) <= 12


def test_polling_answers_nothing_new_cheaply_and_stops_when_finished(
    broker, wf, viewer
):
    instance = start("wf", "order-1")
    client = logged_in(viewer)
    token = client.get(detail_url(instance)).context["token"]
    url = f"{detail_url(instance)}?since={token}"
    assert client.get(url, headers=HTMX).status_code == 204
    broker.run()  # the instance completes
    changed = client.get(url, headers=HTMX)
    assert changed.status_code == 200
    html = changed.content.decode()
    assert html.lstrip().startswith('<div id="instance-live"')
    assert "hx-trigger" not in html.split(">", 1)[0]  # finished: no more polling
    instance = fresh(instance)
    newest = TransitionLog.objects.filter(instance=instance).latest("id")
    final = f"{instance.version}-{newest.pk}"
    stop = client.get(f"{detail_url(instance)}?since={final}", headers=HTMX)
    assert stop.status_code == 286  # htmx: stop polling


# -- definitions ------------------------------------------------------------------


def test_definition_page_shows_steps_versions_and_health(broker, viewer):
    v1 = make_definition("wf", failure_policy="hold")
    v1.new_draft()
    completed_one = start("wf", "ok-1")
    start("wf", "bad-1", simulate={"two": "fail"})
    broker.run()
    now = timezone.now()
    WorkflowInstance.objects.filter(pk=completed_one.pk).update(
        accepted_at=now - timedelta(seconds=90), finished_at=now - timedelta(seconds=30)
    )
    client = logged_in(viewer)
    response = client.get("/definitions/wf/")
    assert response.status_code == 200
    assert [v.version for v in response.context["versions"]] == [2, 1]
    assert response.context["definition"].version == 1  # newest published
    health = response.context["health"]
    assert health.finished == 1 and health.went_wrong == 0
    assert health.median_duration == timedelta(seconds=60)
    html = response.content.decode()
    assert "1 min" in html and "retried automatically" not in html
    assert client.get("/definitions/wf/?version=2").context["definition"].version == 2
    assert client.get("/definitions/wf/?version=9").status_code == 404
    assert client.get("/definitions/nope/").status_code == 404
    listing = client.get("/definitions/")
    assert [r["definition"].key for r in listing.context["rows"]] == ["wf"]
