"""Starting instances over HTTP: 202 + Location, idempotent replays, 409 on a
reused key, and exactly one instance under concurrent identical requests."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.api.helpers import counts
from tests.support import make_definition
from workflows_app.client import ApiError
from workflows_app.models import TransitionLog, WorkflowInstance

pytestmark = pytest.mark.django_db(transaction=True)


def test_start_answers_202_with_location_and_status_url(api, raw):
    make_definition("wf")
    reply = raw(
        "POST",
        "/api/v1/workflows/wf/instances",
        {"business_key": "order-1", "input": {"amount": 42}},
        headers={"Idempotency-Key": "order-1:create"},
    )
    assert reply.status == 202
    body = reply.json
    assert set(body) == {"id", "status", "status_url"}
    assert body["status"] == "accepted"
    assert reply.headers["location"] == body["status_url"]
    assert body["status_url"].endswith(f"/api/v1/instances/{body['id']}")

    instance = WorkflowInstance.objects.get()
    assert str(instance.id) == body["id"]
    assert (instance.state, instance.business_key) == ("accepted", "order-1")
    assert instance.input == {"amount": 42}
    assert instance.idempotency_key == "order-1:create"
    accept = TransitionLog.objects.get(instance=instance)
    assert (accept.actor_kind, accept.actor_label) == ("api", "checkout-service")
    # The status URL is the status endpoint.
    assert api.status(body["id"])["status"] == "accepted"


def test_same_key_and_input_returns_the_same_instance(api, transport):
    make_definition("wf")
    first = api.start("wf", business_key="o-1", input={"a": 1}, idempotency_key="k-1")
    assert first.created and first.status == "accepted"
    transport.run()  # the instance completes meanwhile
    before = counts()
    again = api.start("wf", business_key="o-1", input={"a": 1}, idempotency_key="k-1")
    assert not again.created  # 200, not 202
    assert (again.id, again.status_url) == (first.id, first.status_url)
    assert again.status == "completed"  # the current status of that instance
    # Nothing new but one note in the instance's timeline: the repeat is
    # shown there (when, from whom), and changes no state.
    after = counts()
    assert after.pop("TransitionLog") == before.pop("TransitionLog") + 1
    assert after == before
    note = TransitionLog.objects.order_by("-id").first()
    assert (note.transition, note.field, note.actor_label) == (
        "duplicate_start_ignored",
        "",
        "checkout-service",
    )


def test_same_key_with_other_input_is_a_conflict(api):
    make_definition("wf")
    first = api.start("wf", business_key="o-1", input={"a": 1}, idempotency_key="k")
    before = counts()
    for business_key, data in [("o-1", {"a": 2}), ("o-2", {"a": 1})]:
        with pytest.raises(ApiError) as caught:
            api.start("wf", business_key=business_key, input=data, idempotency_key="k")
        assert caught.value.status == 409
        assert caught.value.code == "idempotency_conflict"
        assert first.id in caught.value.message
    assert counts() == before
    # Keys are per definition: the same key elsewhere is a new instance.
    make_definition("other")
    assert api.start("other", business_key="o-1", idempotency_key="k").created


def test_twenty_concurrent_identical_starts_create_one_instance(api):
    make_definition("wf")
    gate = threading.Barrier(20)

    def start_once(_):
        gate.wait()
        return api.start(
            "wf", business_key="o-1", input={"n": 1}, idempotency_key="same-key"
        )

    with ThreadPoolExecutor(max_workers=20) as pool:
        results = list(pool.map(start_once, range(20)))

    assert len({r.id for r in results}) == 1
    assert sorted(r.created for r in results) == [False] * 19 + [True]
    assert counts() == {
        "WorkflowInstance": 1,
        "StepExecution": 3,
        # The acceptance, and one note per suppressed repeat (no state change).
        "TransitionLog": 20,
        "InboundMessage": 0,
        "Attempt": 0,
    }
    assert (
        TransitionLog.objects.filter(transition="duplicate_start_ignored").count() == 19
    )


def test_a_started_instance_runs_to_completion(api, transport):
    make_definition("wf")
    started = api.start("wf", business_key="o-1", idempotency_key="k")
    transport.run()
    status = api.status(started.id)
    assert status["status"] == "completed"
    assert status["completed_at"] is not None
    assert [(s["name"], s["state"], s["attempts"]) for s in status["steps"]] == [
        ("one", "succeeded", 1),
        ("two", "succeeded", 1),
        ("three", "succeeded", 1),
    ]
