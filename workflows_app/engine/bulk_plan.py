"""What a bulk action would do to one instance: the dry run.

Pure over an instance already loaded with its definition: the instance's own
django-fsm transitions (conditions and permissions) decide, so the preview
says exactly what the engine will then allow.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from django_fsm import can_proceed, has_transition_perm

from workflows_app.models import AttentionKind, BulkJob, WorkflowInstance


@dataclasses.dataclass(frozen=True)
class ItemPlan:
    transition: str  # "" when nothing will be done
    description: str

    @property
    def acts(self) -> bool:
        return bool(self.transition)


def catalogue_action(action: str, instance: WorkflowInstance) -> str:
    """The catalogue action (``engine.actions``) a bulk ``action`` does to
    ``instance``: a retry retries what holds it, the step or its compensation."""
    if action == BulkJob.Action.RETRY:
        if instance.attention_kind == AttentionKind.COMPENSATION_FAILED:
            return "retry_compensation"
        return "retry_step"
    return "compensate"


def plan_item(
    action: str,
    instance: WorkflowInstance,
    user: Any,
    *,
    blocked_step: str = "",
    failed_compensations: tuple[str, ...] = (),
) -> ItemPlan:
    transition = catalogue_action(action, instance)
    if transition == "retry_compensation":
        what = f"retry the compensation of {', '.join(failed_compensations)}"
        if instance.restart_position is not None:
            what += " (then its restart runs the steps again)"
    elif transition == "retry_step":
        what = f"retry {blocked_step or 'the blocked step'}"
    else:
        what = "compensate the steps done"
    bound = getattr(instance, transition)
    if not can_proceed(bound):
        return ItemPlan("", _why_not(action, instance))
    if not has_transition_perm(bound, user):
        return ItemPlan("", f"you may not {transition.replace('_', ' ')}")
    return ItemPlan(transition, what)


def _why_not(action: str, instance: WorkflowInstance) -> str:
    state = instance.get_state_display()
    if instance.is_terminal:
        return f"already {state}: nothing to {action}"
    if instance.state != WorkflowInstance.State.NEEDS_ATTENTION:
        return f"{state}, not held: nothing to {action}"
    if action == BulkJob.Action.COMPENSATE and instance.pivot_passed:
        return "past the pivot: it cannot be compensated"
    if action == BulkJob.Action.COMPENSATE:
        return "a compensation failed: retry it instead"
    if instance.attention_kind == AttentionKind.DEADLINE:
        return "held for its deadline: resume it instead"
    return f"held ({instance.get_attention_kind_display()}): cannot {action}"
