"""Waiting steps complete from task-token callbacks and from events posted
over HTTP; a replayed callback or event is acknowledged and changes nothing."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.api.helpers import (
    event_definition,
    state_snapshot,
    task_token,
    waiting_definition,
)
from workflows_app.models import InboundMessage, TransitionLog

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def waiting(api, transport):
    waiting_definition("wf")
    started = api.start("wf", business_key="o-1", idempotency_key="k")
    transport.run()
    assert api.status(started.id)["steps"][1]["state"] == "waiting"
    return started.id


def test_a_callback_completes_the_waiting_step(api, transport, waiting):
    answer = api.report_callback(
        task_token(waiting), message_id="cb-1", succeeded=True, output={"ref": 7}
    )
    assert answer == {
        "accepted": True,
        "replay": False,
        "instance": waiting,
        "step": "two",
        "reason": "",
    }
    transport.run()
    status = api.status(waiting)
    assert status["status"] == "completed"
    row = TransitionLog.objects.get(step__name="two", transition="succeed")
    assert (row.actor_kind, row.actor_label) == ("api", "checkout-service")
    assert row.data["source"] == "callback"


def test_a_replayed_callback_changes_nothing(api, transport, waiting):
    token = task_token(waiting)
    first = api.report_callback(token, message_id="cb-1", succeeded=True)
    transport.run()
    before = state_snapshot()
    # The same id again, even with another body: the first answer, no effect.
    for body in [{"succeeded": True}, {"succeeded": False, "error": "late"}]:
        again = api.report_callback(token, message_id="cb-1", **body)
        assert again == {**first, "replay": True}
    assert transport.queue == []
    assert state_snapshot() == before


def test_a_failed_callback_fails_the_step(api, transport, waiting):
    api.report_callback(
        task_token(waiting),
        message_id="cb-1",
        succeeded=False,
        error="card declined",
        permanent=True,
    )
    transport.run()
    status = api.status(waiting)
    assert status["status"] == "compensated"
    assert status["steps"][1]["state"] == "failed"
    assert TransitionLog.objects.get(step__name="two", transition="fail").reason == (
        "ReportedFailure: card declined"
    )


def test_a_late_callback_is_noted_and_changes_nothing(api, transport, waiting):
    token = task_token(waiting)
    api.report_callback(token, message_id="cb-1", succeeded=True)
    transport.run()
    before = state_snapshot()
    late = api.report_callback(token, message_id="cb-2", succeeded=False)
    assert late["accepted"] is False and late["replay"] is False
    assert "no longer waiting" in late["reason"]
    after = state_snapshot()
    # Only the note in the timeline and the message's id are new.
    assert after["TransitionLog"] == before["TransitionLog"] + 1
    assert after["InboundMessage"] == before["InboundMessage"] + 1
    for key in ("instances", "steps", "attempts"):
        assert after[key] == before[key]
    note = TransitionLog.objects.latest("id")
    assert (note.transition, note.field) == ("stale_outcome_ignored", "")


def test_an_event_completes_the_step_that_awaits_it(api, transport):
    event_definition("ev", "payment.captured")
    started = api.start("ev", business_key="order-9", idempotency_key="k")
    transport.run()
    assert api.status(started.id)["steps"][1]["state"] == "waiting"

    other = api.post_event(
        "e-0", type="payment.captured", correlation_key="order-other"
    )
    assert other == {"accepted": True, "replay": False, "completed": []}
    wrong_type = api.post_event("e-1", type="refund.done", correlation_key="order-9")
    assert wrong_type["completed"] == []

    done = api.post_event(
        "e-2",
        type="payment.captured",
        correlation_key="order-9",
        payload={"amount": 5},
    )
    assert [c["instance"] for c in done["completed"]] == [started.id]
    transport.run()
    assert api.status(started.id)["status"] == "completed"
    row = TransitionLog.objects.get(step__name="two", transition="succeed")
    assert (row.actor_kind, row.actor_label) == ("event", "checkout-service")

    before = state_snapshot()
    replay = api.post_event(
        "e-2", type="payment.captured", correlation_key="order-9", payload={}
    )
    assert replay == {**done, "replay": True}
    assert transport.queue == []
    assert state_snapshot() == before
    assert InboundMessage.objects.filter(message_id="e-2").count() == 1


def test_concurrent_copies_of_a_callback_take_effect_once(api, transport, waiting):
    token = task_token(waiting)
    gate = threading.Barrier(10)

    def report(_):
        gate.wait()
        return api.report_callback(token, message_id="cb-1", succeeded=True)

    with ThreadPoolExecutor(max_workers=10) as pool:
        answers = list(pool.map(report, range(10)))
    assert sorted(a["replay"] for a in answers) == [False] + [True] * 9
    assert all(a["accepted"] for a in answers)
    assert (
        TransitionLog.objects.filter(step__name="two", transition="succeed").count()
        == 1
    )
    assert InboundMessage.objects.filter(message_id="cb-1").count() == 1
    transport.run()
    assert api.status(waiting)["status"] == "completed"
