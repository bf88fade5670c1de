"""Restart from an earlier step: undo the steps from there (newest first),
then run them again as a new run under new idempotency keys.

Every finished instance here also passes the saga invariant checker, whose
restart rules are proven to fire by breaking a real restart history."""

from __future__ import annotations

import dataclasses
from datetime import timedelta

import pytest
from django.contrib.auth.models import User
from django.core.exceptions import ValidationError

from tests.saga_invariant import Recorded, check_history, check_instance, load
from tests.support import advance_clock, make_definition, start, user_in
from workflows_app.demo.models import ParticipantEffect
from workflows_app.engine import commands
from workflows_app.engine.actors import Actor
from workflows_app.engine.errors import (
    AlreadyChanged,
    InvalidInput,
    NotPermitted,
    TransitionRejected,
)
from workflows_app.engine.sweeps import sweep_all
from workflows_app.models import (
    Attempt,
    StepExecution,
    TransitionLog,
    WorkflowDefinition,
    WorkflowInstance,
)

pytestmark = pytest.mark.django_db(transaction=True)

THREE_STEPS = [
    {"name": "one", "restart_point": True},
    {"name": "two"},
    {"name": "three"},
]


def ledger(instance: WorkflowInstance) -> list[str]:
    """Applied effects in order, with the run their key names."""
    rows = ParticipantEffect.objects.filter(instance_id=instance.id, applied=True)
    return [
        f"{'T' if r.direction == 'action' else 'C'}:{r.step_name}"
        + (
            f"#{r.idempotency_key.rsplit(':', 1)[1]}"
            if r.idempotency_key[-1].isdigit()
            else ""
        )
        for r in rows.order_by("first_applied_at", "id")
    ]


def held(broker, steps=THREE_STEPS, **simulate) -> WorkflowInstance:
    make_definition(steps=steps, failure_policy="hold")
    instance = start(simulate=simulate)
    broker.run()
    instance.refresh_from_db()
    assert instance.state == "needs_attention", instance.state
    return instance


def heal(instance: WorkflowInstance) -> None:
    """The cause is fixed (what a repair of the input does, audited there)."""
    WorkflowInstance.objects.filter(pk=instance.pk).update(input={})


def operator() -> User:
    return User.objects.filter(username="operator").first() or user_in("operator")


def step(instance: WorkflowInstance, name: str) -> StepExecution:
    return StepExecution.objects.get(instance=instance, name=name)


def restart(instance: WorkflowInstance, name: str, **kwargs) -> None:
    instance.refresh_from_db()
    commands.instance_restart_from_step(
        instance.id,
        user=kwargs.pop("user", None) or operator(),
        reason=kwargs.pop("reason", "customer corrected the order"),
        step_id=step(instance, name).id,
        expected_version=kwargs.pop("expected_version", instance.version),
        **kwargs,
    )


def test_restart_undoes_newest_first_then_runs_again_under_new_keys(broker):
    instance = held(broker, three="fail")
    assert ledger(instance) == ["T:one", "T:two"]
    heal(instance)
    restart(instance, "one")
    broker.run()
    instance.refresh_from_db()
    assert instance.state == "completed"
    assert instance.restart_position is None
    # three was declined for good (not undone); C2 and C1 undid run 1, newest
    # first.
    assert ledger(instance) == [
        "T:one",
        "T:two",
        "C:two",
        "C:one",
        "T:one#2",
        "T:two#2",
        "T:three#2",
    ]
    keys = {
        e.idempotency_key
        for e in ParticipantEffect.objects.filter(instance_id=instance.id)
    }
    assert f"{instance.id}:one:action" in keys
    assert f"{instance.id}:one:action:2" in keys
    # Nothing applied under three's key, so its compensation was never called.
    assert f"{instance.id}:three:compensation" not in keys
    one = step(instance, "one")
    assert (one.run, one.state, one.compensation_state) == (2, "succeeded", "none")
    # Attempt numbers keep counting across runs: a message of run 1 stays stale.
    assert list(
        Attempt.objects.filter(step=one, direction="action").values_list(
            "number", flat=True
        )
    ) == [1, 2]
    row = TransitionLog.objects.get(instance=instance, transition="restart_from_step")
    assert row.user.username.startswith("operator")
    assert row.reason == "customer corrected the order"
    assert row.data["step"] == "one"
    # three was declined for good: nothing of it to undo.
    assert row.data["undo"] == ["two", "one"]
    reruns = TransitionLog.objects.filter(instance=instance, transition="rerun")
    assert sorted(r.data["run"] for r in reruns) == [2, 2, 2]
    check_instance(instance, quiescent=True)


def test_restart_from_the_failed_step_leaves_earlier_steps_alone(broker):
    steps = [{"name": "one"}, {"name": "two", "restart_point": True}, {"name": "three"}]
    instance = held(broker, steps=steps, two="fail")
    heal(instance)
    restart(instance, "two")
    broker.run()
    instance.refresh_from_db()
    assert instance.state == "completed"
    assert ledger(instance) == ["T:one", "T:two#2", "T:three"]
    assert [s.run for s in instance.steps.order_by("position")] == [1, 2, 1]
    check_instance(instance, quiescent=True)


def test_a_restarted_run_that_fails_again_compensates_everything(broker):
    instance = held(broker, three="fail")
    restart(instance, "one")  # not healed: three fails again in run 2
    broker.run()
    instance.refresh_from_db()
    assert (instance.state, instance.attention_kind) == (
        "needs_attention",
        "step_failed",
    )
    commands.instance_compensate(
        instance.id,
        user=operator(),
        reason="give up",
        expected_version=instance.version,
    )
    broker.run()
    instance.refresh_from_db()
    assert instance.state == "compensated"
    assert ledger(instance) == [
        "T:one",
        "T:two",
        "C:two",
        "C:one",
        "T:one#2",
        "T:two#2",
        "C:two#2",
        "C:one#2",
    ]
    check_instance(instance, quiescent=True)


def test_a_failed_undo_during_a_restart_holds_and_its_retry_finishes_the_restart(
    broker,
):
    instance = held(broker, one="fail_compensation", three="fail")
    restart(instance, "one")
    broker.run()
    instance.refresh_from_db()
    assert instance.attention_kind == "compensation_failed"
    assert instance.restart_position == 1  # still restarting
    heal(instance)
    commands.instance_retry_compensation(
        instance.id, user=operator(), reason="inventory fixed"
    )
    broker.run()
    instance.refresh_from_db()
    assert instance.state == "completed"
    assert ledger(instance)[-3:] == ["T:one#2", "T:two#2", "T:three#2"]
    check_instance(instance, quiescent=True)


def test_refusals_change_nothing(broker):
    steps = [
        {"name": "one", "restart_point": True},
        {"name": "two"},
        {"name": "three", "restart_point": True},
    ]
    instance = held(broker, steps=steps, two="fail")
    version = instance.version
    staff = operator()
    with pytest.raises(TransitionRejected, match="not a restart point.*allowed: one"):
        restart(instance, "two", user=staff)
    with pytest.raises(TransitionRejected, match="not a restart point"):
        restart(instance, "three", user=staff)  # after the failed step
    with pytest.raises(NotPermitted):
        restart(instance, "one", user=user_in("viewer"))
    with pytest.raises(InvalidInput, match="reason"):
        restart(instance, "one", user=staff, reason=" ")
    with pytest.raises(AlreadyChanged):
        restart(instance, "one", user=staff, expected_version=version - 1)
    with pytest.raises(InvalidInput, match="choose the step"):
        commands.instance_restart_from_step(
            instance.id, user=staff, reason="x", step_id=None
        )
    instance.refresh_from_db()
    assert (instance.state, instance.version) == ("needs_attention", version)
    assert not TransitionLog.objects.filter(transition="restart_from_step").exists()


def test_no_restart_once_the_pivot_was_passed(broker):
    steps = [
        {"name": "one", "restart_point": True},
        {"name": "two", "is_pivot": True},
        {"name": "three"},
    ]
    instance = held(broker, steps=steps, three="fail")
    assert instance.attention_kind == "after_pivot"
    with pytest.raises(TransitionRejected, match="not allowed"):
        restart(instance, "one")


def test_restart_points_must_come_before_the_pivot():
    with pytest.raises(ValidationError, match="restart point must come before"):
        make_definition(
            steps=[{"name": "one", "is_pivot": True, "restart_point": True}]
        )
    assert not WorkflowDefinition.objects.filter(status="published").exists()


def test_no_restart_point_before_a_step_awaiting_an_event():
    """Events carry no run: a late event of an undone run must never be able
    to complete the new run, so such a step is never re-run."""
    steps = [
        {"name": "one", "restart_point": True},
        {"name": "two", "awaits_event": "two.done"},
        {"name": "three", "is_pivot": True},
    ]
    with pytest.raises(ValidationError, match="re-run two, which awaits an event"):
        make_definition("a", steps=steps)
    # After the pivot the event step is never re-run: allowed.
    steps[1:] = [{"name": "three", "is_pivot": True}, steps[1]]
    make_definition("b", steps=steps)


def test_a_step_without_compensation_is_called_again_under_its_old_key(broker):
    """Nothing undoes it, so a new key would make the participant act twice;
    under the old key it answers from its record (one effect, two calls)."""
    steps = [
        {"name": "one", "restart_point": True},
        {"name": "two", "compensation": ""},
        {"name": "three"},
    ]
    instance = held(broker, steps=steps, three="fail")
    heal(instance)
    restart(instance, "one")
    broker.run()
    instance.refresh_from_db()
    assert instance.state == "completed"
    assert ledger(instance) == ["T:one", "T:two", "C:one", "T:one#2", "T:three#2"]
    two = step(instance, "two")
    assert two.run == 1
    effect = ParticipantEffect.objects.get(
        instance_id=instance.id, step_name="two", direction="action"
    )
    assert (effect.idempotency_key, effect.calls) == (f"{instance.id}:two:action", 2)
    check_instance(instance, quiescent=True)


def test_a_passed_deadline_is_accepted_by_the_restart(broker):
    make_definition(
        steps=THREE_STEPS, failure_policy="hold", deadline=timedelta(minutes=5)
    )
    instance = start(simulate={"three": "fail"})
    broker.run()
    heal(instance)
    advance_clock(instance, 600)
    restart(instance, "one")
    row = TransitionLog.objects.get(instance=instance, transition="restart_from_step")
    assert "deadline_accepted" in row.data
    sweep_all()  # would hold it again for the deadline if it were kept
    broker.run()
    instance.refresh_from_db()
    assert (instance.state, instance.deadline_at) == ("completed", None)
    check_instance(instance, quiescent=True)


# -- the checker's restart rules fire -----------------------------------------------


def restarted(broker) -> Recorded:
    instance = held(broker, three="fail")
    heal(instance)
    restart(instance, "one")
    broker.run()
    recorded = load(instance)
    check_history(recorded, quiescent=True)
    return recorded


def violations(recorded: Recorded) -> str:
    with pytest.raises(AssertionError) as caught:
        check_history(recorded, quiescent=True, replay=False)
    return str(caught.value)


def test_checker_catches_a_run_again_that_was_not_undone(broker):
    recorded = restarted(broker)
    # The participant lost the undo of run 1 of step two.
    recorded.ledger = [
        dataclasses.replace(e, applied=False)
        if (e.step_name, e.direction, e.key.endswith(":compensation"))
        == ("two", "compensation", True)
        else e
        for e in recorded.ledger
    ]
    report = violations(recorded)
    assert "step 2 was run again without being undone" in report


def test_checker_catches_forward_work_during_the_undo_and_an_undo_too_early(broker):
    recorded = restarted(broker)
    rows = recorded.rows
    asked = next(i for i, r in enumerate(rows) if r.transition == "restart_from_step")
    back = next(i for i, r in enumerate(rows) if r.transition == "restart")
    # Move the WF_RESTARTED row right after the request: steps are not reset.
    moved = rows[: asked + 1] + [rows[back]] + rows[asked + 1 : back] + rows[back + 1 :]
    recorded.rows = [dataclasses.replace(r, seq=i) for i, r in enumerate(moved, 1)]
    report = violations(recorded)
    assert "restarted while steps are not reset" in report
    assert "S6" in report  # compensations after the instance ran forward again


def test_checker_catches_a_restart_from_a_step_that_is_no_restart_point(broker):
    recorded = restarted(broker)
    recorded.steps = [
        dataclasses.replace(s, restart_point=False) for s in recorded.steps
    ]
    assert "step 1 is not a restart point" in violations(recorded)


def test_checker_catches_an_undo_before_the_restart_point(broker):
    recorded = restarted(broker)
    recorded.rows = [
        dataclasses.replace(r, data={**r.data, "step": "two"})
        if r.transition == "restart_from_step"
        else r
        for r in recorded.rows
    ]
    report = violations(recorded)
    assert "undone by a restart from 2" in report
    assert "before the restart point 2" in report


def test_backoff_counts_from_the_runs_first_attempt(broker_no_inline):
    broker = broker_no_inline
    steps = [
        {
            "name": "one",
            "restart_point": True,
            "backoff_initial": timedelta(seconds=10),
            "backoff_max": timedelta(minutes=5),
        },
        {"name": "two"},
    ]
    instance = held(broker, steps=steps, two="fail")
    heal(instance)
    restart(instance, "one")
    one = step(instance, "one")
    # Deliver the undo messages until step one of run 2 is due.
    while step(instance, "one").state != "scheduled":
        broker.deliver(broker.queue.pop(0))
    worker = Actor.worker("test")
    claim = commands.attempt_claim(instance.id, one.id, "action", actor=worker)
    assert claim is not None and claim.context.attempt == 2  # run 2's first
    assert claim.context.idempotency_key.endswith(":one:action:2")
    commands.attempt_record(
        instance.id,
        one.id,
        "action",
        claim.context.attempt,
        commands.Outcome("failed", error_class="Busy", error_message="try later"),
        actor=worker,
    )
    retry = TransitionLog.objects.get(instance=instance, transition="retry")
    # The run's first failure: the initial backoff, not the second step of it.
    assert retry.data["retry_in_seconds"] == 10.0
