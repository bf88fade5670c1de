"""Observed (choreographed) workflows reconstructed from events."""

from __future__ import annotations

from datetime import timedelta

import pytest

from tests.support import advance_clock, make_definition, user_in
from workflows_app.engine import commands
from workflows_app.engine.actors import Actor
from workflows_app.engine.errors import TransitionRejected
from workflows_app.engine.sweeps import sweep_all
from workflows_app.models import TransitionLog, WorkflowInstance

pytestmark = pytest.mark.django_db(transaction=True)
SERVICES = Actor.event("bus")
MILESTONES = [
    {"name": "placed", "awaits_event": "order.placed"},
    {
        "name": "paid",
        "awaits_event": "payment.captured",
        "failure_event": "payment.failed",
    },
    {"name": "shipped", "awaits_event": "order.shipped"},
]


@pytest.fixture
def checkout():
    return make_definition(
        "checkout",
        [
            {**m, "action": "", "compensation": "", "timeout": timedelta(minutes=5)}
            for m in MILESTONES
        ],
        mode="observed",
    )


def emit(event_id, event_type, key="order-1", **payload):
    return commands.event_ingest(
        event_id,
        event_type=event_type,
        correlation_key=key,
        payload=payload,
        actor=SERVICES,
    )


def the_instance(key="order-1"):
    return WorkflowInstance.objects.get(business_key=key)


def flags(instance):
    return list(
        TransitionLog.objects.filter(
            instance=instance, transition="event_flagged"
        ).values_list("data__flag", flat=True)
    )


def test_events_in_order_complete_the_instance(checkout):
    emit("e1", "order.placed", amount=10)
    instance = the_instance()
    assert instance.state == "running"
    assert [s.state for s in instance.steps.order_by("position")] == [
        "succeeded",
        "waiting",
        "pending",
    ]
    emit("e2", "payment.captured")
    emit("e3", "order.shipped", carrier="ups")
    instance.refresh_from_db()
    assert instance.state == "completed"
    assert instance.outputs["shipped"] == {"carrier": "ups"}
    assert flags(instance) == []


def test_out_of_order_events_are_kept_and_flagged(checkout):
    emit("e3", "order.shipped")
    instance = the_instance()
    assert instance.state == "running"
    assert flags(instance) == ["out_of_order"]
    emit("e1", "order.placed")
    emit("e2", "payment.captured")
    instance.refresh_from_db()
    assert instance.state == "completed"
    emit("e4", "order.shipped")  # after the end: recorded, changes nothing
    instance.refresh_from_db()
    assert instance.state == "completed"
    assert flags(instance) == ["out_of_order", "after_end"]


def test_missing_milestone_makes_it_stuck_with_the_reason(checkout):
    emit("e1", "order.placed")
    instance = the_instance()
    advance_clock(instance, 600)
    sweep_all()
    instance.refresh_from_db()
    assert instance.stuck
    assert instance.stuck_reason.startswith("payment.captured was not reported within")
    assert instance.state == "running"
    emit("e2", "payment.captured")  # late, but it happened
    instance.refresh_from_db()
    assert not instance.stuck


def test_failure_event_holds_for_a_person(checkout):
    emit("e1", "order.placed")
    emit("e2", "payment.failed", reason="card declined")
    instance = the_instance()
    assert (instance.state, instance.attention_kind) == (
        "needs_attention",
        "step_failed",
    )
    operator = user_in("operator")
    with pytest.raises(TransitionRejected):
        commands.instance_retry_step(instance.id, user=operator, reason="retry?")
    commands.instance_close_as_failed(
        instance.id, user=operator, reason="refunded by hand"
    )
    instance.refresh_from_db()
    assert instance.state == "failed"


def test_unknown_events_and_replays(checkout):
    emit("e1", "order.placed")
    result = emit("x1", "warehouse.restocked")
    instance = the_instance()
    assert result.response["flagged"] == [str(instance.id)]
    assert flags(instance) == ["unknown"]
    rows = TransitionLog.objects.count()
    assert emit("e1", "order.placed").replay
    assert TransitionLog.objects.count() == rows
    assert WorkflowInstance.objects.count() == 1
