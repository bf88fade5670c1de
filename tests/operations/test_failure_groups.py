"""Failure groups: a burst of one cause is one group; its link lists exactly
its instances; operators mark a group as known."""

from __future__ import annotations

import re

import pytest
from django.http import QueryDict
from django.test import Client

from tests.operations.conftest import finished, held
from tests.operations.held_population import SCENARIOS, make_definitions, make_held
from workflows_app.failure_groups import failure_groups
from workflows_app.filters import InstanceFilter
from workflows_app.models import (
    BulkJob,
    KnownFailure,
    StepExecution,
    WorkflowInstance,
)

pytestmark = pytest.mark.django_db(transaction=True)


def test_an_outage_burst_is_one_group(broker, wf):
    for n in range(6):
        held(broker, f"ORD-{100 + n}", outage=str(500 + n % 3))
    held(broker, "ORD-900", outage="503", reserve="fail")  # another step
    finished(broker, "ORD-1")

    groups = failure_groups()

    assert [(g.step_name, g.count) for g in groups] == [("charge", 6), ("reserve", 1)]
    burst = groups[0]
    assert burst.definition_key == "orders"
    assert burst.held_by == "action"
    assert burst.signature == "ActivityError: payments returned <n> for order <q>"
    assert burst.sample_error.startswith("ActivityError: payments returned 50")
    assert burst.first_seen <= burst.last_seen
    assert burst.sample_instance_id is not None


def test_a_retried_instance_leaves_its_group(broker, wf, operator):
    from workflows_app.engine.commands import instance_retry_step

    first = held(broker, "ORD-1")
    held(broker, "ORD-2")
    instance_retry_step(first.pk, user=operator, reason="gateway is back")
    broker.run()
    assert [(g.step_name, g.count) for g in failure_groups()] == [("charge", 1)]


def test_group_link_lists_its_instances(broker, wf, operator):
    for key in ("ORD-1", "ORD-2"):
        held(broker, key)
    held(broker, "ORD-3", reserve="fail")
    group = next(g for g in failure_groups() if g.step_name == "charge")
    client = Client()
    client.force_login(operator)
    page = client.get(f"/instances/?{group.query}").content.decode()
    rows = results(page)
    assert "ORD-1" in rows and "ORD-2" in rows
    assert "ORD-3" not in rows
    assert "Failure group: held at" in page


def test_failure_page_and_known_mark(broker, wf, operator):
    for key in ("ORD-1", "ORD-2"):
        held(broker, key)
    group = failure_groups()[0]
    client = Client()
    client.force_login(operator)
    page = client.get("/failures/").content.decode()
    assert "2 instances" in page and "payments returned &lt;n&gt;" in page

    mark = {
        "definition_key": group.definition_key,
        "step_name": group.step_name,
        "signature": group.signature,
        "note": "gateway outage <INC-42>",
    }
    assert client.post("/failures/mark/", mark).status_code == 302
    known = KnownFailure.objects.get()
    assert known.marked_by == operator and known.note == "gateway outage <INC-42>"
    page = client.get("/failures/").content.decode()
    assert "gateway outage &lt;INC-42&gt;" in page  # escaped
    assert "2 instances" not in client.get("/failures/?known=hide").content.decode()

    # A note is required to mark; forgetting needs none.
    assert client.post("/failures/mark/", {**mark, "note": ""}).status_code == 302
    assert KnownFailure.objects.get().note == "gateway outage <INC-42>"
    client.post("/failures/mark/", {**mark, "note": "", "forget": "1"})
    assert not KnownFailure.objects.exists()


def test_viewer_cannot_mark(broker, wf):
    from tests.support import user_in

    held(broker, "ORD-1")
    group = failure_groups()[0]
    client = Client()
    client.force_login(user_in("viewer", "vera"))
    assert client.get("/failures/").status_code == 200
    response = client.post(
        "/failures/mark/",
        {
            "definition_key": group.definition_key,
            "step_name": group.step_name,
            "signature": group.signature,
            "note": "mine",
        },
    )
    assert response.status_code == 403
    assert not KnownFailure.objects.exists()


# -- what holds an instance now, and what a group offers (issues 14 and 15) ----


def group_rows(page: str) -> dict[tuple[str, str], str]:
    """The failure page's rows by (step, held by)."""
    rows = re.findall(
        r'<tr class="failure-group" data-step="([^"]*)" data-held-by="([^"]*)">'
        r"(.*?)</tr>",
        page,
        re.S,
    )
    return {(step, held_by): html for step, held_by, html in rows}


def results(page: str) -> str:
    """The page without its forms: the search form's hint names an example
    key from the data too."""
    return re.sub(r"<form\b.*?</form>", "", page, flags=re.DOTALL)


@pytest.fixture
def population(broker):
    make_definitions()
    by_name = {s.name: s for s in SCENARIOS}
    made = {}
    for n, name in enumerate(
        [
            "pivot declined, undo of reserve fails",
            "pivot declined, undo of reserve fails",
            "ship fails",
            "pivot declined",
            "deadline while waiting",  # past the pivot
            "deadline before the pivot",  # compensate acts on this one only
        ]
    ):
        made.setdefault(name, []).append(make_held(broker, by_name[name], f"ORD-{n}"))
    return made


def test_each_held_instance_in_its_one_group_with_what_it_allows(population, operator):
    groups = failure_groups(user=operator)
    undo = [g for g in groups if g.definition_key == "undo_orders"]
    # charge failed first, but reserve's compensation holds them now.
    assert [(g.step_name, g.held_by, g.count) for g in undo] == [
        ("reserve", "compensation", 2)
    ]
    assert (
        undo[0].signature == "ActivityError: groups cannot undo the request right now"
    )
    assert undo[0].sample_error == undo[0].signature
    assert undo[0].offers == {"retry": 2}  # a compensation failed: no compensate
    assert (
        sum(g.count for g in groups)
        == WorkflowInstance.objects.filter(state="needs_attention").count()
    )

    # The page offers what the catalogue allows on some of a group's instances.
    client = Client()
    client.force_login(operator)
    rows = group_rows(client.get("/failures/").content.decode())
    assert set(rows) == {
        ("reserve", "compensation"),
        ("ship", "action"),
        ("charge", "action"),
        ("", "deadline"),
    }
    # Past the pivot: retry only (its compensate preview would act on nothing).
    assert "Retry all…" in rows["ship", "action"]
    assert "Compensate all…" not in rows["ship", "action"]
    # The pivot declined for good: nothing applied, both are possible.
    assert "Retry all…" in rows["charge", "action"]
    assert "Compensate all…" in rows["charge", "action"]
    # A failed compensation is retried, never compensated again.
    assert "Retry all…" in rows["reserve", "compensation"]
    assert "Compensate all…" not in rows["reserve", "compensation"]
    assert "compensation</span>" in rows["reserve", "compensation"]
    # Deadline holds: nothing to retry; compensate acts on the one before
    # the pivot, and the page says so.
    deadline = rows["", "deadline"]
    assert "workflow deadline" in deadline and "Retry all…" not in deadline
    assert "Compensate all…" in deadline and "acts on 1 of 2" in deadline

    # A viewer gets no bulk action at all.
    from tests.support import user_in

    viewer = Client()
    viewer.force_login(user_in("viewer", "vera"))
    page = viewer.get("/failures/").content.decode()
    assert "Retry all…" not in page and "Compensate all…" not in page

    # Each group's link lists exactly its instances.
    for group in groups:
        page = client.get(f"/instances/?{group.query}").content.decode()
        listed = set(re.findall(r"\bORD-\d\b", results(page)))
        expected = set(
            InstanceFilter(
                QueryDict(group.query), queryset=WorkflowInstance.objects.all()
            ).qs.values_list("business_key", flat=True)
        )
        assert listed == expected and len(expected) == group.count, group
        if group.held_by == "deadline":
            assert "held for the workflow deadline" in page
    # Odd group filters: never a 500; a deadline hold has no step.
    assert client.get("/instances/?held_by=bogus").status_code in (200, 400)
    page = client.get("/instances/?held_by=deadline&failed_step=ship")
    assert not re.findall(r"\bORD-\d\b", results(page.content.decode()))

    # The deadline group (no step) can be marked as known like any other.
    deadline = next(g for g in groups if g.held_by == "deadline")
    mark = {
        "definition_key": deadline.definition_key,
        "step_name": "",
        "signature": deadline.signature,
        "note": "carrier outage, INC-9",
    }
    assert client.post("/failures/mark/", mark).status_code == 302
    [known] = [g.known for g in failure_groups() if g.held_by == "deadline"]
    assert known is not None and known.note == "carrier outage, INC-9"


def test_retry_all_of_a_compensation_group_previews_that_compensation(
    population, operator
):
    """The walk a person takes: the group's button, the form, the preview."""
    client = Client()
    client.force_login(operator)
    row = group_rows(client.get("/failures/").content.decode())[
        "reserve", "compensation"
    ]
    link = re.search(r'href="([^"]*)">Retry all…', row).group(1).replace("&amp;", "&")
    form = client.get(link)
    assert form.status_code == 200
    query = re.search(r'name="query" value="([^"]*)"', form.content.decode())
    response = client.post(
        "/bulk-jobs/new/",
        {
            "query": query.group(1).replace("&amp;", "&"),
            "action": "retry",
            "reason": "inventory is back",
            "rate": "0",
        },
    )
    assert response.status_code == 302, response.content.decode()[:2000]
    job = BulkJob.objects.get()
    plans = sorted(job.items.values_list("plan", flat=True))
    assert plans == ["retry the compensation of reserve"] * 2
    preview = client.get(response["Location"]).content.decode()
    assert preview.count("retry the compensation of reserve") >= 2
    assert "retry charge" not in preview


def test_worker_and_sweeper_timeouts_of_a_step_are_one_group(broker, operator):
    make_definitions()
    by_name = {s.name: s for s in SCENARIOS}
    make_held(broker, by_name["ship interrupted by the worker"], "ORD-1")
    make_held(broker, by_name["ship never answers (short timeout)"], "ORD-2")
    errors = sorted(
        StepExecution.objects.filter(name="ship").values_list("last_error", flat=True)
    )
    # Two different texts, the sweeper's with its raw deadline...
    assert errors[0].startswith("Timeout: no outcome within 0.3s (deadline 20")
    assert errors[1] == "Timeout: no outcome within 0.3s (interrupted in the worker)"
    # ...one group, whose sample keeps the raw text.
    [group] = failure_groups(user=operator)
    assert (group.step_name, group.count) == ("ship", 2)
    assert group.signature == "Timeout: no outcome within <duration>"
    assert group.sample_error in errors
    assert group.offers == {"retry": 2}  # past the pivot: no compensate
