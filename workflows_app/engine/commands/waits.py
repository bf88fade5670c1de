"""Commands on timers and steps that wait for a person.

The sweeper wakes due timers (:func:`timer_wake`); operators wake a timer
early or extend it, and complete (or reject) a step for a person, through
the action catalogue (the bodies below take the open unit of work, so four
eyes, the version fence and the audit come with it); they claim and release
inbox items with :func:`step_claim` / :func:`step_unclaim`.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from django.db import transaction

from workflows_app.engine import progress, stuck, waits
from workflows_app.engine.actors import Actor
from workflows_app.engine.commands.operator import checked_json, checked_text
from workflows_app.engine.errors import (
    AlreadyChanged,
    InvalidInput,
    NotPermitted,
    TransitionRejected,
)
from workflows_app.engine.human_form import clean_submission
from workflows_app.engine.transitions import Change
from workflows_app.models import TERMINAL_STATES, StepExecution, StepState, StuckKind

HUMAN_PERMISSION = "workflows_app.complete_human_step"
# An extension further than this is a typo, not a plan.
MAX_EXTENSION = timedelta(days=3660)


def _claimer(step: StepExecution) -> str:
    """Who claimed the step (the row may have lost its user meanwhile)."""
    user = step.claimed_by
    return user.get_username() if user is not None else "someone"


def waiting_step(change: Change, step_id: int | None, kind: str) -> StepExecution:
    """The timer (or step for a person) of this instance that waits now.

    A closed instance refuses; a step that no longer waits was done by
    someone else meanwhile (a second completion is a conflict, not a no-op)."""
    instance = change.instance
    if instance.state in TERMINAL_STATES:
        raise TransitionRejected(
            f"the instance is {instance.state}: nothing changes any more"
        )
    what = "timer" if kind == waits.TIMER else "step for a person"
    candidates = [
        s
        for s in change.steps
        if s.step_definition.kind == kind and (step_id is None or s.id == step_id)
    ]
    if not candidates:
        raise TransitionRejected(f"this instance has no such {what}")
    live = [s for s in candidates if s.state == StepState.WAITING]
    if not live:
        step = candidates[0]
        raise AlreadyChanged(
            f"{step.name} no longer waits (it is {step.state}): someone acted "
            "on it meanwhile"
        )
    return live[0]


# -- timers ---------------------------------------------------------------------


@transaction.atomic(durable=True)
def timer_wake(
    instance_id: Any, step_id: int, seen_wake_at: datetime, *, actor: Actor
) -> bool:
    """Wake a timer whose time came (the sweeper), then move on."""
    change = Change.open(instance_id, actor)
    step = change.step(step_id=step_id)
    if change.instance.state in TERMINAL_STATES:
        # Never reached (a close fences the timer); never wake a closed one.
        if step.wake_at is not None:
            step.wake_at = None
            change.mark_step(step)
            change.save()
        return False
    if (
        step.state != StepState.WAITING
        or step.wake_at is None
        or step.wake_at > change.now
    ):
        return False  # woken early, extended or fenced meanwhile
    output = waits.wake_output(change.now, early=False, wake_at=step.wake_at)
    change.fire(
        step,
        "wake",
        output,
        reason=f"the timer's time came ({waits.moment_in_words(seen_wake_at)})",
        data={"wake_at": seen_wake_at.isoformat()},
    )
    change.instance.outputs = {**change.instance.outputs, step.name: output}
    progress.advance(change)
    change.save()
    return True


def precheck_timer(change: Change, params: dict[str, Any]) -> None:
    """Before asking a second operator: a timer must be waiting."""
    waiting_step(change, params.get("step_id"), waits.TIMER)


def wake_timer(change: Change, *, reason: str, step_id: int | None = None) -> None:
    """End a timer's wait now; the workflow goes on with the next step."""
    step = waiting_step(change, step_id, waits.TIMER)
    output = waits.wake_output(change.now, early=True, wake_at=step.wake_at)
    change.fire(
        step,
        "wake_early",
        output,
        reason=reason,
        check_user=True,
        data={"wake_at_was": step.wake_at.isoformat() if step.wake_at else None},
    )
    change.instance.outputs = {**change.instance.outputs, step.name: output}
    progress.advance(change)


def _new_wake_time(current: datetime, until: Any, by_seconds: Any) -> datetime:
    """The later wake time an operator asks for: ``until`` a date and time
    (ISO 8601, UTC without a zone) or ``by_seconds`` more."""
    if (until is None) == (by_seconds is None):
        raise InvalidInput("give either until (a date and time) or by_seconds")
    if by_seconds is not None:
        if isinstance(by_seconds, bool) or not isinstance(by_seconds, int | float):
            raise InvalidInput("by_seconds must be a number of seconds")
        if not 0 < by_seconds <= MAX_EXTENSION.total_seconds():
            raise InvalidInput("by_seconds must be positive (at most ten years)")
        return current + timedelta(seconds=by_seconds)
    if not isinstance(until, str):
        raise InvalidInput("until must be a date and time (ISO 8601)")
    try:
        at = datetime.fromisoformat(until)
    except ValueError:
        raise InvalidInput(f"until {until[:60]!r} is not a date and time") from None
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)


def extend_timer(
    change: Change,
    *,
    reason: str,
    step_id: int | None = None,
    until: Any = None,
    by_seconds: Any = None,
) -> None:
    """Let a timer wait longer: until a later time, or by some seconds more."""
    if not change.actor.user.has_perm("workflows_app.operate_timer"):
        raise NotPermitted("you are not allowed to extend a timer")
    step = waiting_step(change, step_id, waits.TIMER)
    assert step.wake_at is not None
    wake_at = _new_wake_time(step.wake_at, until, by_seconds)
    if wake_at <= step.wake_at:
        raise InvalidInput(
            f"the timer already wakes at {waits.moment_in_words(step.wake_at)}: "
            "extend it to a later time (or wake it now)"
        )
    if wake_at - change.now > MAX_EXTENSION:
        raise InvalidInput("a timer waits at most ten years")
    change.note(
        "timer_extended",
        step=step,
        reason=reason,
        data={"from": step.wake_at.isoformat(), "to": wake_at.isoformat()},
    )
    step.wake_at = wake_at
    change.mark_step(step)
    # An operator changed what the instance waits for: a version of its own,
    # so someone acting on what they saw before gets "changed meanwhile".
    change.mark_instance()
    waits.settle_stuck_clock(change)


# -- steps for a person -----------------------------------------------------------


def complete_human_step(
    change: Change,
    *,
    reason: str,
    step_id: int | None = None,
    output: Any = None,
    reject: Any = False,
) -> None:
    """Complete a step that waits for a person with the data of its form (it
    becomes the step's output); or reject it, which fails it for good so the
    workflow's failure policy applies."""
    if not change.actor.user.has_perm(HUMAN_PERMISSION):
        raise NotPermitted("you are not allowed to complete steps for a person")
    step = waiting_step(change, step_id, waits.HUMAN)
    claimed = step.claimed_by_id
    if claimed is not None and claimed != change.actor.user.pk:
        raise TransitionRejected(
            f"{step.name} is claimed by {_claimer(step)}: they "
            "complete it, or release it first"
        )
    if not isinstance(reject, bool):
        raise InvalidInput("reject must be true or false")
    data = {"claimed_by": _claimer(step) if claimed else None}
    if reject:
        change.fire(
            step,
            "reject_task",
            f"Rejected by {change.actor.label}: {reason}",
            reason=reason,
            check_user=True,
            data={**data, "permanent": True},
        )
    else:
        cleaned = check_submission(step, output)
        change.fire(
            step,
            "complete_task",
            cleaned,
            reason=reason,
            check_user=True,
            data={**data, "output": cleaned},
        )
        step.succeeded_at = change.now
        change.instance.outputs = {**change.instance.outputs, step.name: cleaned}
    progress.advance(change)


def check_submission(step: StepExecution, output: Any) -> dict[str, Any]:
    """The form data, typed, or InvalidInput naming every wrong field."""
    checked_json(output, "the form data")
    cleaned, errors = clean_submission(step.step_definition.form_fields, output or {})
    if errors:
        raise InvalidInput(
            "; ".join(
                f"{name}: {text}" if name else text for name, text in errors.items()
            )
        )
    return cleaned


def precheck_completion(change: Change, params: dict[str, Any]) -> None:
    """Before asking a second operator: the form must be right already."""
    if params.get("reject"):
        return
    step = waiting_step(change, params.get("step_id"), waits.HUMAN)
    check_submission(step, params.get("output"))


def _claim_change(
    instance_id: Any, step_id: int, user: Any, expected_version: int | None
) -> tuple[Change, StepExecution]:
    if not user.has_perm(HUMAN_PERMISSION):
        raise NotPermitted("you are not allowed to work on steps for a person")
    change = Change.open(instance_id, Actor.operator(user))
    change.check_version(expected_version)
    return change, waiting_step(change, step_id, waits.HUMAN)


@transaction.atomic(durable=True)
def step_claim(
    instance_id: Any, step_id: int, *, user: Any, expected_version: int | None = None
) -> None:
    """Take a step for a person from the inbox: others see it is yours."""
    change, step = _claim_change(instance_id, step_id, user, expected_version)
    if step.claimed_by_id == user.pk:
        return  # already yours: nothing to do
    if step.claimed_by_id is not None:
        raise AlreadyChanged(f"{step.name} was claimed by {_claimer(step)} meanwhile")
    step.claimed_by, step.claimed_at = user, change.now
    change.mark_step(step)
    change.note("step_claimed", step=step, data={"user": user.get_username()})
    change.save()


@transaction.atomic(durable=True)
def step_unclaim(
    instance_id: Any,
    step_id: int,
    *,
    user: Any,
    reason: str = "",
    expected_version: int | None = None,
) -> None:
    """Give a claimed step back to the inbox. Releasing someone else's claim
    (they are away) needs a reason, kept in the timeline."""
    change, step = _claim_change(instance_id, step_id, user, expected_version)
    if step.claimed_by_id is None:
        raise AlreadyChanged(f"{step.name} is not claimed (any more)")
    other = step.claimed_by_id != user.pk
    if other and not reason.strip():
        raise InvalidInput(
            f"{step.name} is claimed by {_claimer(step)}: give a reason to release it"
        )
    if reason:
        checked_text(reason, "the reason")
    data = {"user": user.get_username(), "was": _claimer(step)}
    step.claimed_by, step.claimed_at = None, None
    change.mark_step(step)
    change.note("step_unclaimed", step=step, reason=reason, data=data)
    change.save()


def human_step_overdue(change: Change, step: StepExecution) -> bool:
    """Nobody did the step within its time rule: the instance is flagged
    stuck (and alerts like any stuck one); the step still waits."""
    limit = step.step_definition.timeout
    reason = (
        f"{step.name} waits for a person for longer than {stuck.span_in_words(limit)}"
    )
    step.deadline_at = None
    change.mark_step(step)
    instance = change.instance
    if not instance.stuck:  # already alerting: one alert per episode
        stuck.mark_stuck(instance, change.now, StuckKind.HUMAN_STEP_OVERDUE, reason)
        change.mark_instance()
    change.note("human_step_overdue", step=step, reason=reason)
    change.save()
    return True
