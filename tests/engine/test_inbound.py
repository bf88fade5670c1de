"""Waiting steps completed by callbacks (task token) and by events."""

from __future__ import annotations

from datetime import timedelta

import pytest

import tests.worker_activities  # noqa: F401 - registers test.accept_later
from tests.support import advance_clock, make_definition, start
from workflows_app.engine import commands
from workflows_app.engine.actors import Actor
from workflows_app.engine.errors import InvalidInput
from workflows_app.engine.sweeps import sweep_all
from workflows_app.models import Attempt, InboundMessage, TransitionLog

pytestmark = pytest.mark.django_db(transaction=True)
PAYMENTS = Actor.api("payments")


def waiting_instance(broker, **step):
    make_definition(
        steps=[
            {"name": "one"},
            {"name": "two", "action": "test.accept_later", **step},
            {"name": "three"},
        ]
    )
    instance = start()
    broker.run()
    instance.refresh_from_db()
    assert instance.steps.get(name="two").state == "waiting"
    return instance


def token(instance):
    return str(
        Attempt.objects.get(step__instance=instance, step__name="two").task_token
    )


def test_callback_completes_a_waiting_step_once(broker):
    instance = waiting_instance(broker)
    first = commands.callback_report(
        token(instance),
        message_id="cb-1",
        succeeded=True,
        output={"charge": "ch_1"},
        actor=PAYMENTS,
    )
    broker.run()
    assert first.response["accepted"] and not first.replay
    instance.refresh_from_db()
    assert instance.state == "completed"
    assert instance.outputs["two"] == {"charge": "ch_1"}
    rows = TransitionLog.objects.count()
    again = commands.callback_report(
        token(instance),
        message_id="cb-1",
        succeeded=False,
        error="ignored",
        actor=PAYMENTS,
    )
    assert again.replay and again.response == first.response
    assert TransitionLog.objects.count() == rows  # a replay changes nothing


def test_callback_failure_retries_then_compensates(broker):
    instance = waiting_instance(broker, max_attempts=1)
    commands.callback_report(
        token(instance),
        message_id="cb-1",
        succeeded=False,
        error="card declined",
        permanent=True,
        actor=PAYMENTS,
    )
    broker.run()
    instance.refresh_from_db()
    assert instance.state == "compensated"


def test_stale_callback_after_timeout_changes_nothing(broker):
    instance = waiting_instance(broker, timeout=timedelta(seconds=5))
    stale = token(instance)
    advance_clock(instance, 60)
    sweep_all()
    instance.refresh_from_db()
    assert instance.state == "needs_attention"  # unknown, held for a person
    result = commands.callback_report(
        stale, message_id="late", succeeded=True, actor=PAYMENTS
    )
    assert result.response["accepted"] is False
    instance.refresh_from_db()
    assert instance.state == "needs_attention"
    assert TransitionLog.objects.filter(transition="stale_outcome_ignored").exists()


def test_unknown_token_and_bad_ids_are_refused(broker):
    waiting_instance(broker)
    unknown = commands.callback_report(
        "00000000-0000-0000-0000-000000000000",
        message_id="x",
        succeeded=True,
        actor=PAYMENTS,
    )
    assert unknown.response == {"accepted": False, "reason": "unknown task token"}
    count = InboundMessage.objects.count()
    with pytest.raises(InvalidInput):
        commands.callback_report(
            "not-a-token", message_id="y", succeeded=True, actor=PAYMENTS
        )
    with pytest.raises(InvalidInput):
        commands.callback_report(
            token_or_blank(), message_id="", succeeded=True, actor=PAYMENTS
        )
    assert InboundMessage.objects.count() == count


def token_or_blank():
    return "00000000-0000-0000-0000-000000000000"


def test_awaited_event_completes_the_step(broker):
    make_definition(
        steps=[
            {"name": "one"},
            {"name": "two", "awaits_event": "payment.captured"},
            {"name": "three"},
        ]
    )
    instance = start(business_key="order-9")
    broker.run()
    instance.refresh_from_db()
    assert instance.steps.get(name="two").state == "waiting"
    other = commands.event_ingest(
        "e-0",
        event_type="payment.captured",
        correlation_key="order-other",
        actor=PAYMENTS,
    )
    assert other.response["completed"] == []
    done = commands.event_ingest(
        "e-1",
        event_type="payment.captured",
        correlation_key="order-9",
        payload={"amount": 5},
        actor=PAYMENTS,
    )
    assert len(done.response["completed"]) == 1
    broker.run()
    instance.refresh_from_db()
    assert instance.state == "completed"
    assert instance.outputs["two"] == {"amount": 5}
    replay = commands.event_ingest(
        "e-1", event_type="payment.captured", correlation_key="order-9", actor=PAYMENTS
    )
    assert replay.replay


def test_callback_and_event_ids_are_separate_spaces(broker):
    instance = waiting_instance(broker)
    commands.event_ingest(
        "same-id", event_type="nobody.cares", correlation_key="x", actor=PAYMENTS
    )
    result = commands.callback_report(
        token(instance), message_id="same-id", succeeded=True, actor=PAYMENTS
    )
    assert not result.replay and result.response["accepted"]
