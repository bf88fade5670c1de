"""Repair: an operator corrects an instance's input or a step's recorded
output, so that a retry can succeed. Not a state transition: a data change,
fenced on the version the operator saw and audited with before, after and
the diff in one timeline row."""

from __future__ import annotations

from typing import Any

from django.db import transaction

from workflows_app.engine.commands.operator import _open, checked_json
from workflows_app.engine.errors import InvalidInput, NotPermitted, TransitionRejected
from workflows_app.engine.four_eyes import Approval
from workflows_app.engine.json_diff import json_diff
from workflows_app.models import StepState
from workflows_app.search_attributes import extract

PERMISSION = "workflows_app.edit_instance_data"
# Steps whose output is recorded (and so can be corrected).
WITH_OUTPUT = {StepState.SUCCEEDED, StepState.SKIPPED}
# Steps that called with the old data and will be called again.
CALLED_AGAIN = {StepState.FAILED, StepState.UNKNOWN}


def _mark_called_steps(change: Any) -> list[str]:
    """Their next call carries other data, so it is a new request: a retry
    runs it as a new run under new idempotency keys."""
    marked = []
    for step in change.steps:
        if step.state in CALLED_AGAIN and step.started and not step.data_repaired:
            step.data_repaired = True
            change.mark_step(step)
            marked.append(step.name)
    return marked


def _check(change: Any, user: Any, value: Any) -> None:
    if not user.has_perm(PERMISSION):
        raise NotPermitted("you are not allowed to edit instance data")
    if change.instance.is_terminal:
        raise TransitionRejected(
            f"the instance is {change.instance.state}: its data can no longer change"
        )
    if not isinstance(value, dict):
        raise InvalidInput("the new value must be a JSON object")
    checked_json(value, "the new value")


@transaction.atomic(durable=True)
def instance_repair_input(
    instance_id: Any,
    *,
    user: Any,
    reason: str,
    new_input: Any,
    expected_version: int | None = None,
    tags: dict[str, Any] | None = None,
    approval: Approval | None = None,
) -> list[dict[str, Any]]:
    """Replace the instance's input (what later attempts receive); returns the
    diff. The idempotency fingerprint keeps describing the original request."""
    change = _open(
        instance_id,
        user,
        reason,
        expected_version,
        tags,
        action="repair_input",
        approval=approval,
    )
    _check(change, user, new_input)
    before = change.instance.input
    diff = json_diff(before, new_input)
    if not diff:
        raise InvalidInput("the new input is the same as the current one")
    change.instance.input = new_input
    # Search finds the instance by its corrected values.
    change.instance.search_attributes = extract(
        change.instance.definition.search_attributes, new_input
    )
    change.mark_instance("input", "search_attributes")
    change.note(
        "input_repaired",
        reason=reason,
        data={
            "diff": diff,
            "before": before,
            "after": new_input,
            "new_run_for": _mark_called_steps(change),
        },
    )
    change.save()
    return diff


@transaction.atomic(durable=True)
def step_repair_output(
    instance_id: Any,
    *,
    step_id: int,
    user: Any,
    reason: str,
    new_output: Any,
    expected_version: int | None = None,
    tags: dict[str, Any] | None = None,
    approval: Approval | None = None,
) -> list[dict[str, Any]]:
    """Replace a finished step's recorded output (what later steps read)."""
    change = _open(
        instance_id,
        user,
        reason,
        expected_version,
        tags,
        action="repair_output",
        approval=approval,
    )
    _check(change, user, new_output)
    step = change.step(step_id=step_id)
    if step.state not in WITH_OUTPUT:
        raise TransitionRejected(
            f"{step.name} is {step.state}: only a finished step has an output"
        )
    before = step.output
    diff = json_diff(before, new_output)
    if not diff:
        raise InvalidInput("the new output is the same as the current one")
    step.output = new_output
    change.mark_step(step)
    change.instance.outputs = {**change.instance.outputs, step.name: new_output}
    change.mark_instance()
    change.note(
        "output_repaired",
        step=step,
        reason=reason,
        data={
            "diff": diff,
            "before": before,
            "after": new_output,
            "new_run_for": _mark_called_steps(change),
        },
    )
    change.save()
    return diff
