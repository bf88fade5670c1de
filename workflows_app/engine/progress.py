"""Applying planning decisions to a locked instance (shared by all commands)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from workflows_app.engine import stuck, waits
from workflows_app.engine.planning import (
    Decision,
    InstanceView,
    Move,
    StepView,
    decide,
    stage_keys,
)
from workflows_app.engine.transitions import Change


def view_of(change: Change) -> InstanceView:
    return instance_view(change.instance, change.steps)


def instance_view(instance: Any, steps: Sequence[Any]) -> InstanceView:
    """The planner's snapshot of an instance and its steps (by position)."""
    pivot = next((s.position for s in steps if s.step_definition.is_pivot), None)
    stage = stage_keys(steps)
    return InstanceView(
        state=instance.state,
        failure_policy=instance.definition.failure_policy,
        pivot_position=pivot,
        observed=instance.definition.mode == "observed",
        restart_position=instance.restart_position,
        steps=[
            StepView(
                position=s.position,
                state=s.state,
                compensation_state=s.compensation_state,
                attempt=s.attempt - s.run_base_attempt,
                attempts_allowed=s.attempts_allowed - s.run_base_attempt,
                has_compensation=bool(s.step_definition.compensation),
                retry_on_timeout=s.step_definition.retry_on_timeout,
                failed_permanently=s.last_failure_permanent,
                kind=s.step_definition.kind,
                stage=stage[s.position],
            )
            for s in steps
        ],
    )


def advance(change: Change) -> None:
    """Apply decisions until the planner says IDLE.

    Every decision changes a state, so the loop ends; the bound only guards
    against a planner bug turning into an endless transaction."""
    _send_parked_work(change)
    for _ in range(4 * len(change.steps) + 8):
        decision = decide(view_of(change))
        if decision.move is Move.IDLE:
            waits.settle_stuck_clock(change)
            return
        _apply(change, decision)
    raise RuntimeError(f"planner did not settle for instance {change.instance.id}")


def _send_parked_work(change: Change) -> None:
    """Work parked while the instance could not run it (held: the sweeper
    stops re-sending it) is sent again once the instance runs it again."""
    state = change.instance.state
    if state == "running":
        parked = [
            (s, "action")
            for s in change.steps
            if s.state in {"scheduled", "retrying"}
            and s.redispatch_at is None
            # Timers and steps for a person are never sent to a worker.
            and s.step_definition.kind == "activity"
        ]
    elif state == "compensating":
        parked = [
            (s, "compensation")
            for s in change.steps
            if s.compensation_state in {"pending", "retrying"}
            and s.redispatch_at is None
        ]
    else:
        return
    for step, direction in parked:
        due = step.next_attempt_at
        wait = due - change.now if due is not None and due > change.now else None
        change.dispatch_step(step, direction, delay=wait)


def park_work(change: Change) -> None:
    """The instance is held: its scheduled work waits (the sweeper does not
    re-send it) until a person lets it run again."""
    for step in change.steps:
        if step.redispatch_at is not None and (
            step.state in {"scheduled", "retrying"}
            or step.compensation_state in {"pending", "retrying"}
        ):
            step.redispatch_at = None
            change.mark_step(step)


def _apply(change: Change, decision: Decision) -> None:
    instance = change.instance
    move = decision.move
    step = (
        change.step(position=decision.position)
        if decision.position is not None
        else None
    )
    if move is Move.START:
        change.fire(instance, "start")
        instance.started_at = change.now
        instance.redispatch_at = None
    elif move is Move.SCHEDULE:
        assert step is not None
        change.fire(step, "schedule")
        if step.step_definition.kind == "activity":
            change.dispatch_step(step, "action")
    elif move is Move.COMPLETE:
        change.fire(instance, "complete")
    elif move is Move.BEGIN_COMPENSATION:
        assert step is not None
        change.fire(
            instance,
            "begin_compensation",
            reason=f"{step.name} failed for good: {step.last_error}"[:2000],
        )
    elif move is Move.HOLD:
        assert step is not None
        reason = f"{step.name}: {decision.reason}"
        change.fire(
            instance,
            "hold",
            decision.attention_kind,
            reason,
            reason=step.last_error or decision.reason,
        )
        stuck.mark_held(instance, change.now, reason)
        park_work(change)
    elif move is Move.UNSCHEDULE:
        assert step is not None
        change.fire(step, "unschedule", reason="the instance stopped moving forward")
    elif move is Move.ABANDON_RETRY:
        assert step is not None
        change.fire(step, "abandon_retry", reason="the instance stopped moving forward")
    elif move is Move.SKIP_COMPENSATION:
        assert step is not None
        change.fire(step, "skip_compensation", reason=decision.reason)
    elif move is Move.COMPENSATE:
        assert step is not None
        step.compensation_attempts_allowed = (
            step.compensation_attempt + step.step_definition.max_attempts
        )
        change.fire(step, "require_compensation")
        change.dispatch_step(step, "compensation")
    elif move is Move.EXPECT:
        assert step is not None
        change.fire(
            step, "expect", reason=f"waiting for {step.step_definition.awaits_event}"
        )
        step.deadline_at = change.now + step.step_definition.timeout
    elif move is Move.FINISH_COMPENSATION:
        change.fire(instance, "finish_compensation")
    elif move is Move.BEGIN_WAIT:
        assert step is not None
        waits.begin(change, step)
    elif move is Move.STOP_WAITING:
        assert step is not None
        change.fire(step, "stop_waiting", reason=decision.reason)
    elif move is Move.RESTART:
        assert decision.position is not None
        _restart(change, decision.position)
    else:  # pragma: no cover - exhaustive over Move
        raise AssertionError(move)


def _restart(change: Change, position: int) -> None:
    """Every step from ``position`` on runs again: with a compensation (its
    earlier run is undone by now) as a new run with new idempotency keys,
    without one under its old keys. Old outputs stay in the timeline only."""
    instance = change.instance
    outputs = dict(instance.outputs)
    for step in change.steps:
        if step.position < position:
            continue
        if step.state != "pending":
            new_keys = bool(step.step_definition.compensation)
            change.fire(
                step,
                "rerun",
                step.step_definition.max_attempts,
                new_keys,
                reason="restarted from an earlier step",
                data={"run": step.run + new_keys, "previous_output": step.output},
            )
            outputs.pop(step.name, None)
        if step.compensation_state != "none":
            change.fire(step, "reopen_compensation")
    instance.outputs = outputs
    first = change.step(position=position)
    change.fire(instance, "restart", reason=f"running again from {first.name}")
    # Earlier branches of the restarted stage kept their scheduled work or
    # pending retry (parked while held): it goes out again now.
    _send_parked_work(change)
