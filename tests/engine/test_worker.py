"""The engine on a real Celery worker, beat and Redis broker, on PostgreSQL:
the demo paths, a worker killed mid-activity, duplicate deliveries and a
broker restart."""

from __future__ import annotations

import os
import signal
import tempfile
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.test import override_settings

import tests.worker_activities  # noqa: F401 - the worker's test activities, here too
from tests.celery_processes import celery_processes, wait_for
from tests.chaos.services import RedisServer
from tests.support import LocalBroker, make_definition, start
from workflows_app import tasks
from workflows_app.demo.definitions import load_demo_definitions
from workflows_app.demo.models import ParticipantEffect
from workflows_app.models import (
    Attempt,
    StepExecution,
    TransitionLog,
    WorkflowInstance,
)

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.celery_worker,
    # Instances started by the test process are re-sent after 2 s if lost.
    pytest.mark.usefixtures("short_redispatch"),
]

SETTLED = {"completed", "compensated", "needs_attention", "failed", "cancelled"}


@pytest.fixture
def short_redispatch():
    with override_settings(SAGA_REDISPATCH_AFTER=2):
        yield


@pytest.fixture(autouse=True)
def empty_broker():
    from workflows_app.celery import app

    with app.connection_for_write() as conn:
        conn.default_channel.client.flushdb()


def settle(*instances: WorkflowInstance, timeout: float = 60) -> None:
    ids = [i.id for i in instances]

    def all_settled() -> bool:
        states = WorkflowInstance.objects.filter(pk__in=ids).values_list(
            "state", flat=True
        )
        return all(s in SETTLED for s in states)

    wait_for(all_settled, timeout, f"{len(ids)} instances to settle")
    for instance in instances:
        instance.refresh_from_db()


def word(instance: WorkflowInstance) -> list[str]:
    """The applied effects in the order the participants applied them."""
    rows = ParticipantEffect.objects.filter(instance_id=instance.id, applied=True)
    return [
        f"{'T' if r.direction == 'action' else 'C'}:{r.step_name}"
        for r in rows.order_by("first_applied_at", "id")
    ]


def in_stages(effects: list[str]) -> list[Any]:
    """An order's word with its parallel stage (reserve and charge, in either
    order) as a set."""
    stage = {"T:reserve_inventory", "T:charge_payment"}
    first = frozenset(e for e in effects[:2] if e in stage)
    return [first, *effects[len(first) :]]


def test_demo_paths_end_where_the_design_promises():
    load_demo_definitions()
    order = "order-fulfilment"
    happy = start(order, "o-happy")
    failed = start(order, "o-fail", simulate={"charge_payment": "fail"})
    flaky = start(order, "o-flaky", simulate={"reserve_inventory": "fail_once"})
    lost = start(order, "o-lost", simulate={"charge_payment": "lose_confirmation"})
    hung_safe = start(order, "o-hung-retry", simulate={"reserve_inventory": "timeout"})
    hung_unsafe = start(order, "o-hung-hold", simulate={"charge_payment": "timeout"})
    stuck_undo = start(
        order,
        "o-comp-fails",
        simulate={"reserve_inventory": "fail_compensation", "charge_payment": "fail"},
    )
    trip = start("trip-booking", "t-1", simulate={"book_flight": "fail"})
    with celery_processes():
        settle(happy, failed, flaky, lost, hung_safe, hung_unsafe, stuck_undo, trip)

    steps = [
        "reserve_inventory",
        "charge_payment",
        "create_shipment",
        "notify_customer",
    ]
    assert happy.state == "completed"
    assert in_stages(word(happy)) == in_stages([f"T:{s}" for s in steps])

    # fail -> compensated; the declined charge never applied, so it is not
    # undone at all (not_needed) and only the reservation is released.
    assert failed.state == "compensated"
    assert word(failed) == ["T:reserve_inventory", "C:reserve_inventory"]
    comp_order = list(
        TransitionLog.objects.filter(instance=failed, transition="compensation_succeed")
        .order_by("id")
        .values_list("step__name", flat=True)
    )
    assert comp_order == ["reserve_inventory"]
    charge = failed.steps.get(name="charge_payment")
    assert charge.compensation_state == "not_needed"

    assert flaky.state == "completed"
    assert flaky.steps.get(name="reserve_inventory").attempt == 2

    # lose_confirmation -> completed, the effect performed exactly once.
    assert lost.state == "completed"
    charge = ParticipantEffect.objects.get(
        idempotency_key=f"{lost.id}:charge_payment:action"
    )
    assert (charge.applied, charge.calls) == (True, 2)
    assert in_stages(word(lost)) == in_stages([f"T:{s}" for s in steps])

    # timeout -> unknown, then retried (reserve allows it) or held (payments do not).
    assert hung_safe.state == "completed"
    attempts = Attempt.objects.filter(step__instance=hung_safe, step__position=1)
    assert [a.outcome for a in attempts.order_by("number")] == [
        "timed_out",
        "succeeded",
    ]
    assert hung_unsafe.state == "needs_attention"
    assert hung_unsafe.attention_kind == "step_unknown"
    assert hung_unsafe.steps.get(name="charge_payment").state == "unknown"

    assert stuck_undo.state == "needs_attention"
    assert stuck_undo.attention_kind == "compensation_failed"
    reserve = stuck_undo.steps.get(name="reserve_inventory")
    assert reserve.compensation_state == "failed"
    assert reserve.compensation_attempt == 3

    assert trip.state == "compensated"
    assert word(trip) == [
        "T:book_car",
        "T:book_hotel",
        "C:book_hotel",
        "C:book_car",
    ]


def test_worker_killed_mid_activity_is_recovered_by_the_sweeper():
    pid_file = Path(tempfile.mkdtemp()) / "pid"
    make_definition(
        "fragile",
        [
            {"name": "one"},
            {
                "name": "two",
                "action": "test.die_once",
                "compensation": "test.undo",
                "action_config": {"pid_file": str(pid_file)},
                "timeout": timedelta(seconds=3),
                "retry_on_timeout": True,
            },
            {"name": "three"},
        ],
    )
    instance = start("fragile", "kill-1")
    with celery_processes():
        wait_for(pid_file.exists, 30, "the activity to start")
        os.kill(int(pid_file.read_text()), signal.SIGKILL)
        settle(instance, timeout=60)

    assert instance.state == "completed"
    two = instance.steps.get(name="two")
    outcomes = list(two.attempts.order_by("number").values_list("outcome", flat=True))
    assert outcomes == ["timed_out", "succeeded"]
    # The sweeper, not the dead worker, recorded the timeout.
    timeout_row = TransitionLog.objects.get(step=two, transition="time_out")
    assert timeout_row.actor_label == "system:sweep"
    effect = ParticipantEffect.objects.get(idempotency_key=f"{instance.id}:two:action")
    assert (effect.applied, effect.calls) == (True, 1)


def test_duplicate_deliveries_change_nothing():
    make_definition("dupes")
    instance = start("dupes", "dup-1")
    with celery_processes(beat=False):
        settle(instance)
        steps = list(StepExecution.objects.filter(instance=instance))
        history_before = (
            TransitionLog.objects.filter(instance=instance)
            .exclude(transition="message_ignored")
            .count()
        )
        for step in steps:
            for _ in range(3):
                tasks.run_attempt.apply_async(
                    args=[str(instance.id), step.id, "action"]
                )
                tasks.run_attempt.apply_async(
                    args=[str(instance.id), step.id, "compensation"]
                )
        wait_for(
            lambda: (
                TransitionLog.objects.filter(
                    instance=instance, transition="message_ignored"
                ).count()
                >= 6 * len(steps)
            ),
            30,
            "the duplicates to be delivered",
        )
    instance.refresh_from_db()
    assert instance.state == "completed"
    assert (
        TransitionLog.objects.filter(instance=instance)
        .exclude(transition="message_ignored")
        .count()
        == history_before
    )
    effects = ParticipantEffect.objects.filter(instance_id=instance.id)
    calls = {(e.step_name, e.direction): e.calls for e in effects}
    assert calls == {
        **{(name, "action"): 1 for name in ("one", "two", "three")},
        # The participant's ledger opens the undo row; it was never called.
        **{(name, "compensation"): 0 for name in ("one", "two", "three")},
    }


def test_broker_restart_loses_no_instance():
    make_definition(
        "bursty",
        [
            {"name": n, "timeout": timedelta(seconds=5), "retry_on_timeout": True}
            for n in ("one", "two", "three", "four")
        ],
    )
    # A Redis of this test's own: the shared one is never restarted. The
    # starts' own messages would go to the shared broker, so they are
    # dropped here; the sweeper re-sends them on the private one.
    with LocalBroker():
        instances = [start("bursty", f"b-{n}") for n in range(40)]
    redis = RedisServer()
    try:
        redis.start()
        with celery_processes(broker=redis.url()):
            wait_for(
                lambda: WorkflowInstance.objects.filter(state="completed").count() >= 3,
                60,
                "some instances to finish",
            )
            unfinished = WorkflowInstance.objects.exclude(state="completed").count()
            # Queued and unacknowledged messages are gone with it.
            redis.restart(down_for=1)
            # Lost messages come back by the sweeper's re-sends, each one
            # waiting twice as long as the last (2 s, 4 s, 8 s...): on a
            # loaded machine a few can fall into the outage or the worker's
            # reconnect, so the bound is generous (10 s when the machine is
            # quiet).
            settle(*instances, timeout=180)
    finally:
        redis.stop()
    # Not vacuous: work was still queued when the broker lost everything.
    assert unfinished > 0

    assert {i.state for i in instances} == {"completed"}
    effects = ParticipantEffect.objects.filter(
        instance_id__in=[i.id for i in instances], direction="action"
    )
    assert effects.count() == 40 * 4
    assert set(effects.values_list("applied", flat=True)) == {True}


def test_poison_step_is_stopped_by_the_attempt_cap():
    make_definition(
        "poisoned",
        [
            {"name": "one"},
            {
                "name": "two",
                "action": "test.poison",
                "timeout": timedelta(seconds=2),
                "retry_on_timeout": True,
                "max_attempts": 2,
            },
        ],
    )
    instance = start("poisoned", "p-1")
    with celery_processes():
        settle(instance, timeout=60)
    # Every attempt killed its worker; the database stopped it after two.
    assert instance.state == "compensated"
    two = instance.steps.get(name="two")
    assert (two.state, two.attempt) == ("unknown", 2)
    actions = two.attempts.filter(direction="action")
    assert list(actions.values_list("outcome", flat=True)) == ["timed_out", "timed_out"]
    assert word(instance) == ["T:one", "C:one"]
