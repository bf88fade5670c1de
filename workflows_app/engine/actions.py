"""The catalogue of operator actions: the one place that names them.

Pages, templates, approvals, bulk jobs, the operator API and the command line
read this module: which actions exist, what each is called and explains,
which instance transition and permission gate it, whether it targets the
blocking step, whether a workflow may put it under four eyes, and why it is
not possible right now. ``engine.operate.act`` is the one way to do an action by
name. The rules themselves (transition conditions, permissions,
four eyes, version fences) are enforced inside the commands.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

from django_fsm import can_proceed, has_transition_perm

from workflows_app.engine import four_eyes
from workflows_app.engine.blocking import blocking_step, restart_points
from workflows_app.engine.commands import operator, repair, waits
from workflows_app.engine.errors import InvalidInput
from workflows_app.models import (
    AttentionKind,
    StepExecution,
    StepState,
    WorkflowInstance,
)

APP = "workflows_app"


@dataclasses.dataclass(frozen=True)
class OperatorAction:
    name: str
    label: str
    explains: str
    # The instance transition that gates it ("" for data repairs).
    transition: str
    permission: str
    # What it does, given the open unit of work (engine.commands.operator).
    body: Callable[..., Any]
    targets_step: bool = False
    danger: bool = False
    # What ``data`` may carry, by key, and the command argument it becomes.
    data_keys: tuple[tuple[str, str], ...] = ()
    # Acts on a waiting step of this kind ("timer", "human"), not on a hold.
    step_kind: str = ""
    # Checked before a second operator is asked (the arguments must be right).
    precheck: Callable[..., None] | None = None

    @functools.cached_property
    def command(self) -> Callable[..., Any]:
        """The body in a durable transaction of its own."""
        return operator.durable(self.name, self.body)


CATALOGUE: dict[str, OperatorAction] = {
    action.name: action
    for action in [
        OperatorAction(
            "retry_step",
            "Retry step now",
            "Run the failed step again now, with a fresh budget of attempts.",
            "retry_step",
            f"{APP}.retry_step",
            operator.retry_step,
            targets_step=True,
        ),
        OperatorAction(
            "resume",
            "Resume",
            "Accept that the deadline passed and let the workflow continue.",
            "resume",
            f"{APP}.resume_instance",
            operator.resume,
        ),
        OperatorAction(
            "mark_step_done",
            "Mark step done by hand",
            "Record that a person did this step outside the system; the "
            "workflow continues with the next step.",
            "mark_step_done",
            f"{APP}.mark_step_done",
            operator.mark_step_done,
            targets_step=True,
            data_keys=(("output", "output"),),
        ),
        OperatorAction(
            "retry_compensation",
            "Retry compensation",
            "Run the failed compensation again, then continue undoing.",
            "retry_compensation",
            f"{APP}.retry_compensation",
            operator.retry_compensation,
        ),
        OperatorAction(
            "restart_from_step",
            "Restart from an earlier step",
            "Undo the steps from the chosen one up to the failed one (newest "
            "first, where they have a compensation), then run them again as a "
            "new run with new idempotency keys.",
            "restart_from_step",
            f"{APP}.restart_instance",
            operator.restart_from_step,
            targets_step=True,
            danger=True,
        ),
        OperatorAction(
            "compensate",
            "Compensate",
            "Undo the steps that took effect, newest first. Cannot be reversed.",
            "compensate",
            f"{APP}.compensate_instance",
            operator.compensate,
            danger=True,
        ),
        OperatorAction(
            "cancel",
            "Cancel",
            "Stop the workflow: if nothing ran it ends at once, otherwise the "
            "steps done are undone.",
            "cancel",
            f"{APP}.cancel_instance",
            operator.cancel,
            danger=True,
        ),
        OperatorAction(
            "close_as_failed",
            "Close as failed",
            "End the workflow as failed without undoing anything: a person "
            "takes it from here.",
            "close_as_failed",
            f"{APP}.close_instance",
            operator.close_as_failed,
            danger=True,
        ),
        OperatorAction(
            "repair_input",
            "Correct the input",
            "Replace the instance's input (what later attempts receive); the "
            "next retry of a step that already called runs as a new run.",
            "",
            repair.PERMISSION,
            repair.repair_input,
            data_keys=(("input", "new_input"),),
        ),
        OperatorAction(
            "repair_output",
            "Correct a step's output",
            "Replace a finished step's recorded output (what later steps read).",
            "",
            repair.PERMISSION,
            repair.repair_output,
            targets_step=True,
            data_keys=(("output", "new_output"),),
        ),
        OperatorAction(
            "wake_timer",
            "Wake the timer now",
            "End the wait of the timer now; the workflow goes on with the next step.",
            "",
            f"{APP}.operate_timer",
            waits.wake_timer,
            targets_step=True,
            step_kind="timer",
            precheck=waits.precheck_timer,
        ),
        OperatorAction(
            "extend_timer",
            "Extend the timer",
            "Let the timer wait longer: until a later time, or some seconds more.",
            "",
            f"{APP}.operate_timer",
            waits.extend_timer,
            targets_step=True,
            step_kind="timer",
            data_keys=(("until", "until"), ("by_seconds", "by_seconds")),
            precheck=waits.precheck_timer,
        ),
        OperatorAction(
            "complete_human_step",
            "Complete the step",
            "Do the step that waits for a person: its form's data becomes the "
            "step's output (or reject it: the step fails for good).",
            "",
            waits.HUMAN_PERMISSION,
            waits.complete_human_step,
            targets_step=True,
            step_kind="human",
            data_keys=(("output", "output"), ("reject", "reject")),
            precheck=waits.precheck_completion,
        ),
    ]
}
# The state-changing actions, in the order pages show them.
TRANSITIONS = [a for a in CATALOGUE.values() if a.transition]
# What ``why_not`` reads of a held instance besides its steps and the user:
# instances alike in these get the same answer, so a failure group asks once
# per kind of instance in it instead of once per instance.
AVAILABILITY_COLUMNS = ("state", "attention_kind", "pivot_passed", "definition_id")


@dataclasses.dataclass(frozen=True)
class Availability:
    action: OperatorAction
    allowed: bool
    why_not: str
    needs_approval: bool


def why_not(
    action: OperatorAction,
    instance: WorkflowInstance,
    user: Any | None,
    steps: Sequence[StepExecution],
) -> str:
    """Why ``user`` cannot do ``action`` on ``instance`` now ("" if they can);
    with ``user`` None, why nobody can (permissions are not asked)."""
    if user is not None and not user.has_perm(action.permission):
        return f"you are not allowed to {action.label.lower()}"
    if not action.transition:
        if instance.is_terminal:
            return f"the instance is {instance.state}: its data can no longer change"
        if action.step_kind:
            return _waiting_reason(action.step_kind, steps)
        return ""
    bound = getattr(instance, action.transition)
    if not can_proceed(bound):
        return _state_reason(action, instance)
    if user is not None and not has_transition_perm(bound, user):
        return f"you are not allowed to {action.label.lower()}"
    blocked = blocking_step(steps)
    if action.targets_step and blocked is None:
        return "no failed or unknown step blocks this instance"
    if action.name == "restart_from_step" and not restart_points(steps, blocked):
        return "no step up to the blocked one is a restart point"
    return ""


def _waiting_reason(kind: str, steps: Sequence[StepExecution]) -> str:
    waiting = [
        s
        for s in steps
        if s.step_definition.kind == kind and s.state == StepState.WAITING
    ]
    if waiting:
        return ""
    return "no timer is waiting" if kind == "timer" else "no step waits for a person"


def _state_reason(action: OperatorAction, instance: WorkflowInstance) -> str:
    state = instance.state
    if instance.is_terminal:
        return f"the instance is {state}: nothing changes any more"
    if state != WorkflowInstance.State.NEEDS_ATTENTION and action.name != "cancel":
        return f"the instance is {state}, not held"
    kind = instance.attention_kind
    if action.name in {"compensate", "cancel", "restart_from_step"}:
        if kind == AttentionKind.COMPENSATION_FAILED:
            return "a compensation failed: retry it instead"
        if instance.pivot_passed:
            return "the pivot may have applied: nothing before it is undone"
        if action.name == "restart_from_step":
            return "only a failed or unknown step can be restarted from"
    if action.name == "resume":
        return "only an instance held for its deadline is resumed"
    if action.name == "retry_compensation":
        return "no compensation failed"
    if instance.definition.mode == "observed":
        return "an observed workflow runs nothing: only close it"
    return f"not while held for: {instance.get_attention_kind_display()}"


def availability(
    instance: WorkflowInstance,
    user: Any,
    steps: Sequence[StepExecution] | None = None,
    guarded: set[str] | None = None,
) -> list[Availability]:
    """Every catalogued action with whether ``user`` may do it now, why not,
    and whether it would go to a second operator first (``guarded``: the
    workflow's four-eyes actions, when the caller has read them already)."""
    if steps is None:
        steps = list(
            instance.steps.select_related("step_definition").order_by("position")
        )
    policy = guarded
    if policy is None:
        policy = set(four_eyes.approval_policy(instance).approval_actions or [])
    return [
        Availability(
            action,
            allowed=not (reason := why_not(action, instance, user, steps)),
            why_not=reason,
            needs_approval=four_eyes.gate(action.name) in policy,
        )
        for action in CATALOGUE.values()
    ]


def possible_now(
    instance: WorkflowInstance, steps: Sequence[StepExecution]
) -> list[OperatorAction]:
    """The state-changing actions ``instance`` allows now, whoever asks: what
    the alert mail advises (each reader's permissions apply on the page)."""
    return [a for a in TRANSITIONS if not why_not(a, instance, None, steps)]


def command_arguments(
    action: OperatorAction, *, step_id: int | None, data: dict[str, Any] | None
) -> dict[str, Any]:
    """The command's own arguments from an action's generic ``step`` and
    ``data`` (what the API, the command line and approvals carry)."""
    kwargs: dict[str, Any] = {}
    data = dict(data or {})
    allowed = dict(action.data_keys)
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise InvalidInput(
            f"{action.name} takes no {', '.join(unknown)} in its data"
            + (f" (it takes {', '.join(sorted(allowed))})" if allowed else "")
        )
    for key, argument in action.data_keys:
        if key in data:
            kwargs[argument] = data[key]
    if action.targets_step:
        if step_id is None and action.name in {"restart_from_step", "repair_output"}:
            raise InvalidInput(f"{action.name} needs the step")
        kwargs["step_id"] = step_id
    elif step_id is not None:
        raise InvalidInput(f"{action.name} takes no step")
    if action.name == "repair_input" and "new_input" not in kwargs:
        raise InvalidInput("repair_input needs data.input, the new input")
    if action.name == "repair_output" and "new_output" not in kwargs:
        raise InvalidInput("repair_output needs data.output, the new output")
    return kwargs


__all__ = [
    "CATALOGUE",
    "TRANSITIONS",
    "Availability",
    "AVAILABILITY_COLUMNS",
    "OperatorAction",
    "availability",
    "blocking_step",
    "command_arguments",
    "possible_now",
    "restart_points",
    "why_not",
]
