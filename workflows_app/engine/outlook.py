"""What a page may say about each step of an instance, asked of the planner:
whether a never-run step will still run, whether a step can still be
undone, and how many attempts its current budget has used.

Templates show these answers; they never re-derive them from raw states.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from workflows_app.engine import planning
from workflows_app.engine.progress import instance_view
from workflows_app.models import (
    TERMINAL_STATES,
    AttentionKind,
    InstanceState,
    StepState,
)


@dataclasses.dataclass(frozen=True)
class Budget:
    """Attempts of the step's current budget. Every grant (the start, an
    operator's retry, a restart) is the definition's ``max_attempts`` on top
    of the attempts made so far; ``earlier`` counts those made before it."""

    used: int
    allowed: int
    earlier: int


@dataclasses.dataclass(frozen=True)
class StepOutlook:
    # The step state to show: "not_run" for a step that never ran and never
    # will (see ``_no_more_runs``); otherwise the recorded state.
    state: str
    # Shown while the compensation is "none": "undo ready", or why not.
    undo: str
    action_budget: Budget
    compensation_budget: Budget


def _budget(attempt: int, allowed: int, size: int) -> Budget:
    base = max(allowed - size, 0)
    return Budget(used=max(attempt - base, 0), allowed=size, earlier=base)


def _undo(view: planning.InstanceView, step: planning.StepView, finished: bool) -> str:
    if not step.has_compensation:
        return "no undo"
    if not step.started:
        return "never ran: nothing to undo"
    if finished:
        return "not undone (finished)"
    if planning.needs_compensation(view, step):
        return "undo ready"
    return f"no undo: {planning.why_no_compensation(view, step)}"


def _no_more_runs(instance: Any) -> bool:
    """Whether a step that never ran never will: the instance has finished,
    or it is on its way back (compensating, or held because an undo failed)
    with no restart to run the steps again."""
    if instance.state in TERMINAL_STATES:
        return True
    backwards = instance.state == InstanceState.COMPENSATING or (
        instance.state == InstanceState.NEEDS_ATTENTION
        and instance.attention_kind == AttentionKind.COMPENSATION_FAILED
    )
    return backwards and instance.restart_position is None


def step_outlooks(instance: Any, steps: Sequence[Any]) -> dict[Any, StepOutlook]:
    """Per step id, what the instance page says about it (``steps`` ordered
    by position, with their step definitions loaded)."""
    view = instance_view(instance, steps)
    finished = instance.state in TERMINAL_STATES
    no_more_runs = _no_more_runs(instance)
    outlooks = {}
    for step, step_view in zip(steps, view.steps, strict=True):
        size = step.step_definition.max_attempts
        never_ran = step.state == StepState.PENDING and not step_view.started
        outlooks[step.id] = StepOutlook(
            state="not_run" if no_more_runs and never_ran else step.state,
            undo=_undo(view, step_view, finished),
            action_budget=_budget(step.attempt, step.attempts_allowed, size),
            compensation_budget=_budget(
                step.compensation_attempt, step.compensation_attempts_allowed, size
            ),
        )
    return outlooks


def deadline_outlook(instance: Any, now: Any) -> str:
    """What a passed workflow deadline means for a held instance, or "".

    The sweeper enforces a deadline only while the instance runs, so a hold
    is not escalated again by it; but an action that lets it run on with
    the deadline still set (retry, mark done) is held for it at the next
    sweep, if it has not finished by then. *Resume* (of a deadline hold)
    and *Restart from a step* accept the passed deadline and clear it;
    compensating is not held by it. Once cleared, that is what is said:
    a bare "no deadline" would read as a workflow without one."""
    if (
        instance.deadline_at is None
        and instance.state not in TERMINAL_STATES
        and instance.definition.deadline
    ):
        # Set when accepted; only Resume and Restart clear it, once passed.
        return (
            "none any more: it passed and was accepted (Resume or Restart "
            "from a step), so nothing holds it for a deadline again."
        )
    if (
        instance.state != InstanceState.NEEDS_ATTENTION
        or instance.deadline_at is None
        or instance.deadline_at > now
    ):
        return ""
    if instance.attention_kind == AttentionKind.DEADLINE:
        return (
            "passed: that is why it is held. Resume accepts it and goes on "
            "without a deadline."
        )
    if instance.attention_kind == AttentionKind.COMPENSATION_FAILED:
        # It can only go on undoing (or be closed): nothing runs forward.
        return (
            "passed while it is held: nothing enforces it while a person "
            "decides, and undoing is not held by it: Retry compensation goes "
            "on undoing."
        )
    # "At the next sweep", not "at once": an instance whose remaining steps
    # finish before the sweeper looks (seconds) completes without the hold.
    return (
        "passed while it is held: nothing enforces it while a person decides. "
        "If it runs on (retry, mark done), the next sweep holds it for the "
        "deadline unless it has finished by then; Resume then goes on without "
        "one. Restart from a step accepts it; compensating is not held by it."
    )
