"""Failure groups: a burst of one cause is one group; its link lists exactly
its instances; operators mark a group as known."""

from __future__ import annotations

import pytest
from django.test import Client

from tests.operations.conftest import finished, held
from workflows_app.failure_groups import failure_groups
from workflows_app.models import KnownFailure

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
    assert burst.direction == "action"
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
    assert "ORD-1" in page and "ORD-2" in page
    assert "ORD-3" not in page
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
