"""What blocks an instance: the one definition every caller uses.

``blocking_step`` is the step forward progress waits on (what retry, mark
done and a restart act on). ``holding`` says what holds a held instance now:
that step's action, the compensation that failed, or the workflow's deadline,
never both, and ``holding_steps`` is the same rule as a query (failure groups
and the list's group filter count with it).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from django.db.models import Case, CharField, Exists, OuterRef, Q, QuerySet, Value, When

from workflows_app.engine.planning import stage_keys
from workflows_app.models import (
    AttentionKind,
    CompensationState,
    InstanceState,
    StepExecution,
    StepState,
    WorkflowInstance,
)

BLOCKING = frozenset({StepState.FAILED, StepState.UNKNOWN})
# Holds where forward progress waits on a failed or unknown step.
FORWARD_HOLDS = frozenset(
    {
        AttentionKind.STEP_FAILED,
        AttentionKind.STEP_UNKNOWN,
        AttentionKind.AFTER_PIVOT,
        AttentionKind.PIVOT_UNCERTAIN,
    }
)
ACTION, COMPENSATION, DEADLINE = "action", "compensation", "deadline"
HELD_BY = (ACTION, COMPENSATION, DEADLINE)


def blocking_step(steps: Sequence[StepExecution]) -> StepExecution | None:
    """The step that stops forward progress: what retry, mark done and a
    restart act on (the first failed or unknown one)."""
    return next((s for s in steps if s.state in BLOCKING), None)


def blocking_branches(steps: Sequence[StepExecution]) -> list[StepExecution]:
    """Every failed or unknown branch of the stage that stops forward
    progress (the blocking step's stage): retry and mark done act on any of
    them, one branch at a time; the first is ``blocking_step``."""
    first = blocking_step(steps)
    if first is None:
        return []
    stage = stage_keys(steps)
    return [
        s
        for s in steps
        if s.state in BLOCKING and stage[s.position] == stage[first.position]
    ]


@dataclasses.dataclass(frozen=True)
class Hold:
    held_by: str  # ACTION, COMPENSATION or DEADLINE
    step: StepExecution | None  # None for the workflow's deadline


def holding(instance: WorkflowInstance, steps: Sequence[StepExecution]) -> Hold | None:
    """What holds ``instance`` for a person now (None when it is not held).

    A step that failed on the way forward stays failed while its instance
    compensates; once a compensation fails, that compensation holds the
    instance, not the older failure."""
    if instance.state != InstanceState.NEEDS_ATTENTION:
        return None
    kind = instance.attention_kind
    if kind == AttentionKind.COMPENSATION_FAILED:
        # Compensations run newest first and hold at the first failure.
        failed = [s for s in steps if s.compensation_state == CompensationState.FAILED]
        return Hold(COMPENSATION, failed[-1]) if failed else None
    if kind in FORWARD_HOLDS:
        step = blocking_step(steps)
        return Hold(ACTION, step) if step else None
    if kind == AttentionKind.DEADLINE:
        return Hold(DEADLINE, None)
    return None


def holding_steps() -> QuerySet[StepExecution]:
    """``holding`` as a query: per held instance, the step that holds it
    (none for a deadline hold), annotated with ``held_by``. PostgreSQL runs
    it from the held instances (``instance_state_progress``) to their few
    steps."""
    same = {"instance": OuterRef("instance")}
    earlier_blocking = StepExecution.objects.filter(
        **same, position__lt=OuterRef("position"), state__in=BLOCKING
    )
    later_failed_compensation = StepExecution.objects.filter(
        **same,
        position__gt=OuterRef("position"),
        compensation_state=CompensationState.FAILED,
    )
    by_action = Q(
        instance__attention_kind__in=FORWARD_HOLDS, state__in=BLOCKING
    ) & ~Exists(earlier_blocking)
    by_compensation = Q(
        instance__attention_kind=AttentionKind.COMPENSATION_FAILED,
        compensation_state=CompensationState.FAILED,
    ) & ~Exists(later_failed_compensation)
    return (
        StepExecution.objects.filter(instance__state=InstanceState.NEEDS_ATTENTION)
        .filter(by_action | by_compensation)
        .annotate(held_by=held_by_expression())
    )


def held_by_expression() -> Any:
    return Case(
        When(
            instance__attention_kind=AttentionKind.COMPENSATION_FAILED,
            then=Value(COMPENSATION),
        ),
        default=Value(ACTION),
        output_field=CharField(),
    )


def deadline_holds() -> QuerySet[WorkflowInstance]:
    """Instances held for their workflow's deadline: no step holds them."""
    return WorkflowInstance.objects.filter(
        state=InstanceState.NEEDS_ATTENTION, attention_kind=AttentionKind.DEADLINE
    )


def restart_points(
    steps: Sequence[StepExecution], blocked: StepExecution | None
) -> list[StepExecution]:
    """The steps an instance may restart from: restart points of its pinned
    definition, at or before the step that blocks it."""
    if blocked is None:
        return []
    return [
        s
        for s in steps
        if s.step_definition.restart_point and s.position <= blocked.position
    ]
