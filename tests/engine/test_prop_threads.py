"""Operator, worker and sweeper at once, on real threads against PostgreSQL.

The fault machine (``test_saga_property.py``) runs one command at a time;
here the commands race. Each example holds an instance on its workflow
deadline while a worker's attempt is in flight (claimed, not recorded), then
releases, behind one barrier, an operator (close as failed, resume,
compensate, cancel, retry the step), maybe a second operator on the same
version, the worker (it calls the participant and reports success, a
failure, a permanent failure, or loses the reply) and the sweeper (which may
find the attempt past its timeout too). Each thread has its own database
connection and closes it when done. Afterwards the saga invariant must hold
with the replay equality (S1-S12), the instance is driven to its end and the
terminal guarantee checked; an effect reported after a close must have
raised a ``late_effect`` alert.

``SAGA_PROPERTY_EXAMPLES`` (default 800) sets the examples: a tenth of it.
The run prints (and keeps in ``$SAGA_DESK_VAR_DIR``) which interleavings it
saw.
"""

from __future__ import annotations

import collections
import os
import threading
import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from django.db import connection
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.engine.test_saga_property import report
from tests.saga_invariant import check_instance
from tests.support import LocalBroker, advance_clock, make_definition, user_in
from workflows_app.demo.activities import perform_action
from workflows_app.engine import commands, sweeps
from workflows_app.engine.actors import Actor
from workflows_app.engine.errors import InvalidInput, NotPermitted, TransitionRejected
from workflows_app.models import (
    TERMINAL_STATES,
    Alert,
    AttentionKind,
    InstanceState,
    TransitionLog,
    WorkflowInstance,
)

EXAMPLES = max(1, int(os.environ.get("SAGA_PROPERTY_EXAMPLES", "800")) // 10)
WORKER = Actor.worker("race-worker")
# Refusals an operator may get when another thread won; anything else a
# thread raises fails the example (a deadlock, a lost lock, a crash).
REFUSED = (TransitionRejected, NotPermitted, InvalidInput)
OPERATOR_ACTIONS = ("close_as_failed", "resume", "compensate", "cancel", "retry_step")
SECOND_OPERATOR = (None, "close_as_failed", "resume", "acknowledge_alert", "cancel")
WORKER_REPORTS = ("succeeded", "failed", "permanent", "lost")
STATS: collections.Counter[str] = collections.Counter()


def race(*work: Callable[[], str]) -> list[str]:
    """Run ``work`` on threads released together; each returns what it did.
    Every thread closes its own database connection when done."""
    barrier = threading.Barrier(len(work))
    results: list[str] = ["(did not finish)"] * len(work)
    errors: list[BaseException] = []

    def run(index: int, fn: Callable[[], str]) -> None:
        try:
            barrier.wait(timeout=30)
            results[index] = fn()
        except REFUSED as refused:
            results[index] = f"refused ({type(refused).__name__})"
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            connection.close()

    threads = [
        threading.Thread(target=run, args=(i, fn), daemon=True)
        for i, fn in enumerate(work)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "a thread hung (a deadlock?)"
    if errors:
        raise errors[0]
    return results


def operator(action: str | None, instance_id: Any, user: Any, version: int) -> str:
    if action is None:
        return "idle"
    reason = f"{action} in a race"
    if action == "acknowledge_alert":
        alert = Alert.objects.filter(
            instance_id=instance_id, resolved_at__isnull=True
        ).first()
        if alert is None:
            return "no alert"
        commands.alert_acknowledge(alert.pk, user=user, reason=reason)
        return "applied"
    getattr(commands, f"instance_{action}")(
        instance_id, user=user, reason=reason, expected_version=version
    )
    return "applied"


def worker(claim: commands.Claim, reports: str) -> str:
    """The worker calls the participant (the demo ledger) and reports."""
    ctx = claim.context
    if reports == "permanent":
        outcome = commands.Outcome("failed", error_message="declined", permanent=True)
    elif reports == "failed":
        outcome = commands.Outcome("failed", error_message="unavailable")
    else:
        output = perform_action(ctx, "generic")
        if reports == "lost":
            return "applied-reply-lost"
        outcome = commands.Outcome("succeeded", output=output)
    recorded = commands.attempt_record(
        claim.instance_id,
        claim.step_id,
        "action",
        ctx.attempt,
        outcome,
        actor=WORKER,
    )
    return "recorded" if recorded else "ignored"


def sweeper() -> str:
    done = sweeps.sweep_all()
    return f"timeouts={done['timeouts']}"


def held_in_flight(
    broker: LocalBroker, steps: int, pivot: bool
) -> tuple[WorkflowInstance, commands.Claim]:
    """Held on its deadline while the first step's attempt is in flight."""
    key = f"race-{uuid.uuid4().hex[:12]}"
    make_definition(
        key,
        steps=[
            {"name": f"s{i}", "max_attempts": 2, "is_pivot": pivot and i == 1}
            for i in range(1, steps + 1)
        ],
        failure_policy="hold",
        deadline=timedelta(seconds=1),
    )
    instance = commands.instance_start(
        key, business_key=key, input={}, actor=Actor.api("race")
    ).instance
    broker.deliver(broker.queue.pop(0))  # the start: step one is scheduled
    broker.queue.clear()  # its message: the claim below takes the work
    step = instance.steps.get(position=1)
    claim = commands.attempt_claim(instance.id, step.id, "action", actor=WORKER)
    assert claim is not None
    advance_clock(instance, 2)  # past the deadline, not the step's timeout
    sweeps.sweep_all()
    instance.refresh_from_db()
    assert instance.state == InstanceState.NEEDS_ATTENTION
    assert instance.attention_kind == AttentionKind.DEADLINE
    return instance, claim


def drive_to_the_end(broker: LocalBroker, instance: WorkflowInstance, user: Any) -> str:
    """Deliver, let time pass and sweep; an operator moves a held instance
    on (resume, retry, retry the compensation, else close it)."""
    for _ in range(6):
        broker.run()
        advance_clock(instance, 3600)
        sweeps.sweep_all()
        broker.queue[:] = [m for m in broker.queue if m.args[0] == str(instance.id)]
        broker.run()
        instance.refresh_from_db()
        if instance.state in TERMINAL_STATES:
            return instance.state
        if instance.state != InstanceState.NEEDS_ATTENTION:
            continue
        for action in ("resume", "retry_compensation", "retry_step", "close_as_failed"):
            try:
                operator(action, instance.id, user, instance.version)
                break
            except REFUSED:
                continue
    raise AssertionError(f"L3: still {instance.state} after six rounds")


RACES = st.fixed_dictionaries(
    {
        "operator": st.sampled_from(OPERATOR_ACTIONS),
        "second": st.sampled_from(SECOND_OPERATOR),
        "worker": st.sampled_from(WORKER_REPORTS),
        # Past the step's timeout too: the sweeper times the attempt out.
        "timeout": st.booleans(),
        "steps": st.integers(1, 2),
        "pivot": st.booleans(),
    }
)


@pytest.mark.django_db(transaction=True)
def test_operator_worker_and_sweeper_race(capsys):
    users = (user_in("operator", "race_op_a"), user_in("operator", "race_op_b"))
    STATS.clear()

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(plan=RACES)
    def run(plan: dict[str, Any]) -> None:
        with LocalBroker(inline=False) as broker:
            one_race(broker, plan, users)

    try:
        run()
    finally:
        report("threads", STATS, capsys)
    if EXAMPLES >= 50:
        missing = [
            what
            for what in (
                "interleaving: operator applied",
                "interleaving: worker recorded",
                "interleaving: worker ignored",
                "closed, then the effect was reported: late_effect alert",
            )
            if not STATS[what]
        ]
        assert not missing, f"never exercised: {missing}"


def one_race(broker: LocalBroker, plan: dict[str, Any], users: Any) -> None:
    STATS["examples"] += 1
    instance, claim = held_in_flight(broker, plan["steps"], plan["pivot"])
    if plan["timeout"]:
        advance_clock(instance, 10)
    version = instance.version
    first, second = users
    results = race(
        lambda: operator(plan["operator"], instance.id, first, version),
        lambda: operator(plan["second"], instance.id, second, version),
        lambda: worker(claim, plan["worker"]),
        sweeper,
    )
    who = ("operator", "second operator", "worker", "sweeper")
    for name, result in zip(who, results, strict=True):
        STATS[f"interleaving: {name} {result.split(' ')[0]}"] += 1
    STATS[f"race: {plan['operator']} / {plan['second']} / {plan['worker']}"] += 1
    # Every thread is done: the persisted columns must equal the replay.
    check_instance(instance, quiescent=False, replay=True)
    instance.refresh_from_db()
    STATS[f"after the race: {instance.state}"] += 1
    late = TransitionLog.objects.filter(
        instance_id=instance.id,
        transition="late_outcome_ignored",
        data__outcome="succeeded",
    ).exists()
    if late:
        assert Alert.objects.filter(
            instance_id=instance.id, kind=Alert.Kind.LATE_EFFECT
        ).exists(), "an effect reported after the close raised no alert"
        STATS["closed, then the effect was reported: late_effect alert"] += 1
    state = drive_to_the_end(broker, instance, first)
    STATS[f"final: {state}"] += 1
    check_instance(instance, quiescent=True)
