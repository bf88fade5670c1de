"""Running attempts: claim before the external call, record after it.

The activity itself runs between :func:`attempt_claim` and
:func:`attempt_record`, outside any transaction. Both commands lock the
instance row first, so every writer of an instance is serialised, and both
fence on the attempt number: a duplicate, late or stale message changes
nothing and is only noted in the timeline.
"""

from __future__ import annotations

import copy
import dataclasses
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import connection, transaction

from workflows_app.activities.base import ActivityContext, Claim, InlineBudget, Outcome
from workflows_app.engine import planning, progress, stuck
from workflows_app.engine.actors import Actor
from workflows_app.engine.commands import waits
from workflows_app.engine.errors import AlreadyChanged, TransitionRejected
from workflows_app.engine.rows import NotInOneMessage
from workflows_app.engine.transitions import Change
from workflows_app.engine.waits import moment_in_words
from workflows_app.models import (
    TERMINAL_STATES,
    Alert,
    Attempt,
    CompensationState,
    InstanceState,
    StepExecution,
    StepState,
    StuckKind,
)
from workflows_app.monitoring import metrics

ACTION = Attempt.Direction.ACTION
COMPENSATION = Attempt.Direction.COMPENSATION


def _claimable(change: Change, step: StepExecution, direction: str) -> str | None:
    """Why the work cannot be claimed now, or None if it can."""
    instance = change.instance
    if step.step_definition.kind != "activity":
        return "a timer or a step for a person is never run by a worker"
    if direction == ACTION:
        if instance.state != InstanceState.RUNNING:
            return f"instance is {instance.state}"
        if step.state not in {StepState.SCHEDULED, StepState.RETRYING}:
            return f"action is {step.state}"
    else:
        if instance.state != InstanceState.COMPENSATING:
            return f"instance is {instance.state}"
        if step.compensation_state not in {
            CompensationState.PENDING,
            CompensationState.RETRYING,
        }:
            return f"compensation is {step.compensation_state}"
    if step.next_attempt_at is not None and step.next_attempt_at > change.now:
        return f"next attempt is not due before {step.next_attempt_at.isoformat()}"
    return None


@transaction.atomic(durable=True)
def attempt_claim(
    instance_id: Any, step_id: int, direction: str, *, task_id: str = "", actor: Actor
) -> Claim | None:
    """Claim the next attempt of a step (committed as running) or do nothing.

    Returns what the worker needs to call the activity, or None when the
    message is a duplicate or arrived for work that is no longer claimable."""
    change = Change.open(instance_id, actor)
    step = change.step(step_id=step_id)
    why_not = _claimable(change, step, direction)
    if why_not is not None:
        change.note(
            "message_ignored",
            step=step,
            reason=f"{direction} message ignored: {why_not}",
            data={"task_id": task_id, "direction": direction},
        )
        change.save(last=True)
        return None
    return _save_claiming(change, _claim(change, step, direction, task_id))


def _save_claiming(change: Change, claim: Claim | None) -> Claim | None:
    """Save the change as its transaction's last write; the claim, if any,
    carries what the worker may keep for the step after it (engine.held)."""
    if claim is None:
        change.save(last=True)
        return None
    kept = change.save(last=True, keep=claim.context.task_token)
    return dataclasses.replace(claim, held=kept)


def _claim(change: Change, step: StepExecution, direction: str, task_id: str) -> Claim:
    """Start the next attempt: the caller's transaction commits it as running
    before the activity is called."""
    definition = step.step_definition
    data = {"worker": change.actor.label, "task_id": task_id}
    if direction == ACTION:
        change.fire(step, "begin_attempt", data={"attempt": step.attempt + 1, **data})
        number, activity = step.attempt, definition.action
        config = definition.action_config
        if definition.is_pivot or any(
            s.step_definition.is_pivot and s.position < step.position
            for s in change.steps
        ):
            change.instance.pivot_passed = True
    else:
        change.fire(
            step,
            "begin_compensation_attempt",
            data={"attempt": step.compensation_attempt + 1, **data},
        )
        number, activity = step.compensation_attempt, definition.compensation
        config = definition.compensation_config
    step.deadline_at = change.now + definition.timeout
    attempt = Attempt(
        step=step,
        direction=direction,
        number=number,
        run=step.run,
        started_at=change.now,
        worker_host=change.actor.label[:200],
        task_id=task_id[:200],
    )
    change.insert(attempt)
    instance = change.instance
    return Claim(
        instance_id=str(instance.id),
        step_id=step.id,
        timeout=definition.timeout,
        activity=activity,
        context=ActivityContext(
            instance_id=str(instance.id),
            business_key=instance.business_key,
            definition_key=instance.definition_key,
            # Copies: the worker may keep the instance for its next step
            # (engine.held), which the activity must not change.
            input=copy.deepcopy(instance.input),
            outputs=copy.deepcopy(instance.outputs),
            step_name=step.name,
            # An attempt's direction is "action" or "compensation" (its choices).
            direction=direction,  # type: ignore[arg-type]
            attempt=number,
            idempotency_key=step.idempotency_key(direction),
            deadline=step.deadline_at,
            task_token=str(attempt.task_token),
            config=config,
            run=step.run,
        ),
    )


def _continue_inline(
    change: Change, fits: InlineBudget | None, task_id: str
) -> Claim | None:
    """Claim the next due attempt in this transaction instead of sending it
    through the broker, when the worker has time left to run it."""
    if fits is None:
        return None
    work = change.take_dispatch(
        lambda step, direction, delay: not delay and fits(step.step_definition.timeout)
    )
    if work is None:
        return None
    step, direction = work
    return _claim(change, step, direction, task_id)


def _live(step: StepExecution, direction: str) -> bool:
    if direction == ACTION:
        return step.state in {StepState.RUNNING, StepState.WAITING}
    return bool(step.compensation_state == CompensationState.RUNNING)


def _backoff(step: StepExecution) -> planning.Backoff:
    d = step.step_definition
    return planning.Backoff(
        d.backoff_initial, d.backoff_multiplier, d.backoff_max, d.backoff_jitter
    )


@transaction.atomic(durable=True)
def attempt_record(
    instance_id: Any,
    step_id: int,
    direction: str,
    number: int,
    outcome: Outcome,
    *,
    actor: Actor,
    source: str = "worker",
) -> bool:
    """Record the outcome of attempt ``number`` and advance the instance.

    Returns False (and only notes it) when the attempt is no longer the live
    one: a late result after a timeout, a duplicate callback, a stale worker."""
    change = Change.open(instance_id, actor)
    return record_outcome(change, step_id, direction, number, outcome, source=source)


def attempt_record_and_continue(
    claim: Claim,
    outcome: Outcome,
    *,
    actor: Actor,
    fits: InlineBudget,
    task_id: str = "",
) -> Claim | None:
    """The worker's path: record the outcome, advance, and if the next thing
    to do is an attempt due now, claim it in the same transaction (one commit
    and no broker round trip per step). From what the worker kept of its
    last transaction where it can (one round trip, engine.held), else
    under the lock, read again."""
    way = "read"
    if claim.held is not None:
        try:
            next_claim = _record_kept(
                claim, outcome, actor=actor, fits=fits, task_id=task_id
            )
        except (AlreadyChanged, TransitionRejected):
            way = "changed"  # rolled back: the rows changed meanwhile
        except (NotInOneMessage, _NeedsRead):
            way = "needs_read"  # rolled back before anything was sent
        else:
            metrics.worker_recorded("kept")
            return next_claim
    metrics.worker_recorded(way)
    return _record_locked(claim, outcome, actor=actor, fits=fits, task_id=task_id)


@transaction.atomic(durable=True)
def _record_locked(
    claim: Claim, outcome: Outcome, *, actor: Actor, fits: InlineBudget, task_id: str
) -> Claim | None:
    change = Change.open(claim.instance_id, actor)
    if not _record(change, claim, outcome):
        change.save(last=True)
        return None
    return _save_claiming(change, _continue_inline(change, fits, task_id))


@transaction.atomic(durable=True)
def _record_kept(
    claim: Claim, outcome: Outcome, *, actor: Actor, fits: InlineBudget, task_id: str
) -> Claim | None:
    """As _record_locked, deciding from what the worker kept. Whatever needs
    a statement before the write (a late or stale outcome, an alert to
    end...) raises _NeedsRead before anything is sent."""
    change = Change.resume(claim.held, actor)
    with connection.execute_wrapper(_refuse_statements):
        if not _record(change, claim, outcome):
            raise _NeedsRead("the outcome is not the live attempt's")
        next_claim = _continue_inline(change, fits, task_id)
    return _save_claiming(change, next_claim)


class _NeedsRead(Exception):
    """A decision from what the worker kept needed a statement first."""


def _refuse_statements(*args: Any) -> Any:
    raise _NeedsRead("a statement before the resumed change's write")


def _record(change: Change, claim: Claim, outcome: Outcome) -> bool:
    return record_outcome(
        change,
        claim.step_id,
        claim.context.direction,
        claim.context.attempt,
        outcome,
        source="worker",
        save=False,
    )


def record_outcome(
    change: Change,
    step_id: int,
    direction: str,
    number: int,
    outcome: Outcome,
    *,
    source: str,
    save: bool = True,
) -> bool:
    step = change.step(step_id=step_id)
    current = step.attempt if direction == ACTION else step.compensation_attempt
    closed = change.instance.state in TERMINAL_STATES
    if closed and _abandoned(step, direction, number):
        _late_outcome(change, step, direction, number, outcome, source)
        change.save()
        return False
    if closed or number != current or not _live(step, direction):
        change.note(
            "stale_outcome_ignored",
            step=step,
            reason=f"{source} reported {outcome.kind} for {direction} attempt "
            f"{number}; the step is {step.state}/{step.compensation_state} "
            f"at attempt {current}",
            data={
                "attempt": number,
                "outcome": outcome.kind,
                "error": outcome.error[:500],
            },
        )
        change.save()
        return False

    if direction == COMPENSATION and outcome.kind == "waiting":
        # An undo must finish within its attempt: a deferred answer is a
        # (retryable) failure, and the attempt is closed as one.
        outcome = Outcome(
            "failed",
            error_class="CompensationDeferred",
            error_message="a compensation cannot wait for a callback",
        )
    _close_attempt(change, step, direction, number, outcome)
    data = {"attempt": number, "source": source}
    if outcome.error:
        data["error"] = outcome.error[:2000]
    if direction == ACTION:
        _record_action(change, step, outcome, data)
    else:
        _record_compensation(change, step, outcome, data)
    progress.advance(change)
    if save:
        change.save()
    return True


def _abandoned(step: StepExecution, direction: str, number: int) -> bool:
    """Whether this attempt was in flight when the instance was closed."""
    return Attempt.objects.filter(
        step=step,
        direction=direction,
        number=number,
        outcome=Attempt.Outcome.ABANDONED,
    ).exists()


def _late_outcome(
    change: Change,
    step: StepExecution,
    direction: str,
    number: int,
    outcome: Outcome,
    source: str,
) -> None:
    """An attempt fenced by the close reported back: nothing changes state; a
    reported effect opens an alert, since money may have moved after all."""
    instance = change.instance
    change.note(
        "late_outcome_ignored",
        step=step,
        reason=f"{source} reported {outcome.kind} for {direction} attempt {number} "
        f"after the instance was {instance.state}",
        data={
            "attempt": number,
            "direction": direction,
            "outcome": outcome.kind,
            "error": outcome.error[:500],
        },
    )
    if outcome.kind != "succeeded":
        return
    reason = (
        f"{step.name} ({direction}) reported an effect after the instance was "
        f"{instance.state}"
    )
    alert = Alert.objects.filter(
        instance=instance, kind=Alert.Kind.LATE_EFFECT, resolved_at__isnull=True
    ).first()
    if alert is None:
        alert = Alert.objects.create(
            instance=instance,
            definition_key=instance.definition_key,
            kind=Alert.Kind.LATE_EFFECT,
            reason=reason[:300],
            opened_at=change.now,
            next_send_at=change.now + timedelta(seconds=settings.SAGA_ALERT_GATHER),
        )
    change.note(
        "alert_opened",
        step=step,
        reason=reason,
        data={"alert": alert.pk, "kind": alert.kind},
    )


def _close_attempt(
    change: Change, step: StepExecution, direction: str, number: int, outcome: Outcome
) -> None:
    kinds = {
        "succeeded": Attempt.Outcome.SUCCEEDED,
        "waiting": Attempt.Outcome.WAITING,
        "timed_out": Attempt.Outcome.TIMED_OUT,
        "failed": Attempt.Outcome.FAILED_PERMANENT
        if outcome.permanent
        else Attempt.Outcome.FAILED,
    }
    change.update(
        Attempt,
        {
            "outcome": kinds[outcome.kind],
            "finished_at": None if outcome.kind == "waiting" else change.now,
            "error_class": outcome.error_class[:200],
            "error_message": outcome.error_message[:5000],
        },
        step=step.id,
        direction=direction,
        number=number,
    )


def _schedule_retry(
    change: Change,
    step: StepExecution,
    direction: str,
    failed_attempt: int,
    transition: str,
    error: str,
    data: dict[str, Any],
    retry_after: timedelta | None = None,
) -> None:
    delay = planning.retry_delay(_backoff(step), failed_attempt)
    delay = max(delay, retry_after or timedelta(0))
    step.next_attempt_at = change.now + delay
    data = {**data, "retry_in_seconds": round(delay.total_seconds(), 3)}
    held = change.instance.state == InstanceState.NEEDS_ATTENTION
    if held:
        data["parked"] = True  # sent when a person lets the instance run again
    change.fire(step, transition, error, reason=error, data=data)
    if not held:
        change.dispatch_step(step, direction, delay=delay)


def _may_retry_forward(change: Change) -> bool:
    """A held instance keeps its retry budget (the retry waits for Resume);
    one that is compensating or closed does not go forward any more."""
    return change.instance.state in {
        InstanceState.RUNNING,
        InstanceState.NEEDS_ATTENTION,
    }


def _record_action(
    change: Change, step: StepExecution, outcome: Outcome, data: dict[str, Any]
) -> None:
    forward = _may_retry_forward(change)
    awaited = step.step_definition.awaits_event
    if outcome.kind == "succeeded" and awaited and data.get("source") == "worker":
        # The participant accepted the request; the step is done when the
        # awaited event (or a callback) arrives.
        outcome = Outcome(
            "waiting", output={"awaiting": awaited, "ack": outcome.output}
        )
    if outcome.kind == "succeeded":
        change.fire(step, "succeed", outcome.output, data=data)
        step.succeeded_at = change.now
        change.instance.outputs = {**change.instance.outputs, step.name: outcome.output}
    elif outcome.kind == "waiting":
        change.fire(step, "wait", data={**data, "detail": outcome.output})
    elif outcome.kind == "failed":
        retry = forward and planning.should_retry(
            attempt=step.attempt,
            attempts_allowed=step.attempts_allowed,
            permanent=outcome.permanent,
        )
        if retry:
            _schedule_retry(
                change,
                step,
                ACTION,
                _run_attempt(step),
                "retry",
                outcome.error,
                data,
                outcome.retry_after,
            )
        else:
            data["permanent"] = outcome.permanent
            change.fire(
                step,
                "fail",
                outcome.error,
                outcome.permanent,
                reason=outcome.error,
                data=data,
            )
            if outcome.permanent and step.step_definition.is_pivot:
                # Declined for good: the pivot did not apply, so the point of
                # no return was not passed after all.
                change.instance.pivot_passed = False
    else:  # timed out: the effect may or may not have happened
        change.fire(step, "time_out", outcome.error, reason=outcome.error, data=data)
        definition = step.step_definition
        if (
            forward
            and definition.retry_on_timeout
            and step.attempt < step.attempts_allowed
        ):
            _schedule_retry(
                change,
                step,
                ACTION,
                _run_attempt(step),
                "retry",
                outcome.error,
                data,
                outcome.retry_after,
            )


def _run_attempt(step: StepExecution) -> int:
    """The attempt's number within the step's current run: backoff grows
    from the run's first attempt, not from every attempt ever made."""
    return step.attempt - step.run_base_attempt


def _record_compensation(
    change: Change, step: StepExecution, outcome: Outcome, data: dict[str, Any]
) -> None:
    if outcome.kind == "succeeded":
        change.fire(step, "compensation_succeed", data=data)
        step.compensated_at = change.now
        return
    error = outcome.error or "a compensation cannot wait for a callback"
    # A compensation must be safe to repeat, so a timeout is retried like an error.
    retry = planning.should_retry(
        attempt=step.compensation_attempt,
        attempts_allowed=step.compensation_attempts_allowed,
        permanent=outcome.permanent,
    )
    if retry:
        _schedule_retry(
            change,
            step,
            COMPENSATION,
            step.compensation_attempt - step.run_base_compensation_attempt,
            "compensation_retry",
            error,
            data,
            outcome.retry_after,
        )
    else:
        change.fire(step, "compensation_fail", error, reason=error, data=data)


@transaction.atomic(durable=True)
def instance_advance(
    instance_id: Any,
    *,
    actor: Actor,
    fits: InlineBudget | None = None,
    task_id: str = "",
) -> Claim | None:
    """Apply whatever the planner decides next (start, schedule, finish...);
    with ``fits``, claim the first attempt due now for the calling worker."""
    change = Change.open(instance_id, actor)
    progress.advance(change)
    return _save_claiming(change, _continue_inline(change, fits, task_id))


@transaction.atomic(durable=True)
def attempt_time_out(
    instance_id: Any, step_id: int, seen_deadline: datetime, *, actor: Actor
) -> bool:
    """Time out the live attempt of a step whose deadline passed (sweeper)."""
    change = Change.open(instance_id, actor)
    step = change.step(step_id=step_id)
    if step.deadline_at is None or step.deadline_at > change.now:
        return False  # someone recorded an outcome or a new attempt meanwhile
    if change.instance.state in TERMINAL_STATES:
        # Closed: nothing to time out any more (the close fenced the attempt).
        step.deadline_at = None
        change.mark_step(step)
        change.save()
        return False
    if change.instance.definition.mode == "observed":
        return _milestone_overdue(change, step)
    if step.step_definition.kind == "human" and step.state == StepState.WAITING:
        return waits.human_step_overdue(change, step)
    active_comp = step.compensation_state == CompensationState.RUNNING
    direction = COMPENSATION if active_comp else ACTION
    if not _live(step, direction):
        # A leftover deadline with nothing running: clear it so it is not swept again.
        step.deadline_at = None
        change.mark_step(step)
        change.save()
        return False
    number = step.compensation_attempt if active_comp else step.attempt
    limit = step.step_definition.timeout
    outcome = Outcome(
        "timed_out",
        error_class="Timeout",
        error_message=f"no outcome within {_fmt(limit)} "
        f"(deadline {moment_in_words(seen_deadline)})",
    )
    return record_outcome(change, step_id, direction, number, outcome, source="sweeper")


def _milestone_overdue(change: Change, step: StepExecution) -> bool:
    """An observed milestone did not arrive in time: nothing to retry, so the
    instance is flagged stuck with the reason; a late event still completes it."""
    definition = step.step_definition
    reason = (
        f"{definition.awaits_event} was not reported within "
        f"{_fmt(definition.timeout)} ({step.name})"
    )
    step.deadline_at = None
    change.mark_step(step)
    instance = change.instance
    stuck.mark_stuck(
        instance, change.now, StuckKind.MILESTONE_OVERDUE, reason, new_episode=False
    )
    change.mark_instance()
    change.note("milestone_overdue", step=step, reason=reason)
    change.save()
    return True


def _fmt(delta: timedelta) -> str:
    return f"{delta.total_seconds():g}s"
