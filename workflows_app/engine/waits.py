"""Steps the engine does itself: timers and steps that wait for a person.

Neither calls a participant, so neither has an attempt, an idempotency key
or anything to undo. A timer keeps its wake time on the step row
(``wake_at``) and the sweeper wakes it; a step for a person waits in the
inbox until someone completes it, and its time rule (the step's timeout)
flags the instance stuck when nobody does.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from workflows_app.engine import stuck
from workflows_app.engine.transitions import Change
from workflows_app.models import StepDefinition, StepExecution, StepState

TIMER = StepDefinition.Kind.TIMER
HUMAN = StepDefinition.Kind.HUMAN


class BadWakeTime(ValueError):
    """The timer's ``until`` does not name a time in the input."""


def wake_time(definition: StepDefinition, data: Any, now: datetime) -> datetime:
    """When a timer starting ``now`` wakes: after its duration, or at the
    time found in the input at its path (ISO 8601; without a zone, UTC)."""
    if definition.wait_for is not None:
        return now + definition.wait_for
    path = definition.wait_until
    value: Any = {"input": data}
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            raise BadWakeTime(f"the input has no {path}: the timer has no time")
        value = value[part]
    if not isinstance(value, str):
        raise BadWakeTime(f"{path} is {value!r}, not a date and time (ISO 8601)")
    try:
        at = datetime.fromisoformat(value)
    except ValueError:
        raise BadWakeTime(
            f"{path} is {value[:100]!r}, not a date and time (ISO 8601)"
        ) from None
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)


def moment_in_words(moment: datetime) -> str:
    """A time as people read it in a timeline or a message: to the second, in
    UTC as the pages show times (the data beside it keeps the ISO value)."""
    return f"{moment.astimezone(UTC):%Y-%m-%d %H:%M:%S} UTC"


def begin(change: Change, step: StepExecution) -> None:
    """Start the wait of a scheduled timer or step for a person. A timer
    whose time cannot be read fails for good at once (nothing was done, so
    nothing to undo); an operator may correct the input and retry it."""
    definition = step.step_definition
    if definition.kind == TIMER:
        try:
            wake_at = wake_time(definition, change.instance.input, change.now)
        except BadWakeTime as exc:
            change.fire(
                step,
                "refuse_wait",
                str(exc),
                reason=str(exc),
                data={"permanent": True},
            )
            return
        change.fire(
            step,
            "begin_wait",
            wake_at,
            None,
            reason=f"wakes at {moment_in_words(wake_at)}",
            data={"wake_at": wake_at.isoformat()},
        )
    else:
        deadline = change.now + definition.timeout
        change.fire(
            step,
            "begin_wait",
            None,
            deadline,
            reason="waits for a person (in the inbox)",
            data={"due_at": deadline.isoformat()},
        )


def waiting(change: Change, kind: str) -> list[StepExecution]:
    return [
        s
        for s in change.steps
        if s.state == StepState.WAITING and s.step_definition.kind == kind
    ]


def settle_stuck_clock(change: Change) -> None:
    """A long wait is not "no progress": while a timer waits, the instance
    counts as stuck only if it did not move by ``stuck_after`` past the wake
    time (the sweeper failed to wake it); while a step waits for a person,
    only that step's own time rule applies."""
    instance = change.instance
    if instance.state != "running" or instance.stuck_check_at is None:
        return
    human = waiting(change, HUMAN)
    timers = [s.wake_at for s in waiting(change, TIMER) if s.wake_at is not None]
    if human:
        instance.stuck_check_at = None
    elif timers:
        later = max(timers) + instance.definition.stuck_after
        instance.stuck_check_at = max(instance.stuck_check_at, later)
    else:
        return
    change.mark_instance()


def wake_output(
    now: datetime, *, early: bool, wake_at: datetime | None
) -> dict[str, Any]:
    out: dict[str, Any] = {"woke_at": now.isoformat()}
    if early and wake_at is not None:
        out["early_by_seconds"] = round(
            max(timedelta(0), wake_at - now).total_seconds()
        )
    return out


def on_timeout(definition: StepDefinition) -> str:
    """What the step's time running out leads to, in words (the definition
    page): a timer has no time limit of its own, a step for a person turns
    overdue but keeps waiting, an activity's attempt is retried or held."""
    if definition.kind == TIMER:
        return "nothing: a timer wakes at its time"
    if definition.kind == HUMAN:
        return "overdue: the instance alerts; the step keeps waiting in the inbox"
    if definition.retry_on_timeout:
        return "retried automatically"
    return "held for a person"


def wait_in_words(definition: StepDefinition) -> str:
    """What a timer or a step for a person waits for ("" for an activity)."""
    if definition.kind == TIMER:
        if definition.wait_for is not None:
            return f"timer: waits {stuck.span_in_words(definition.wait_for)}"
        return f"timer: waits until {definition.wait_until}"
    if definition.kind == HUMAN:
        return "waits for a person (inbox)"
    return ""
