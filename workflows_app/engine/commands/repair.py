"""Repair: an operator corrects an instance's input or a step's recorded
output, so that a retry can succeed. Not a state transition: a data change,
fenced on the version the operator saw and audited with before, after and
the diff in one timeline row."""

from __future__ import annotations

from typing import Any

from workflows_app.engine.commands.operator import checked_json, durable
from workflows_app.engine.errors import InvalidInput, NotPermitted, TransitionRejected
from workflows_app.engine.json_diff import json_diff
from workflows_app.engine.transitions import Change
from workflows_app.models import StepState
from workflows_app.search_attributes import extract

PERMISSION = "workflows_app.edit_instance_data"
# Steps whose output is recorded (and so can be corrected).
WITH_OUTPUT = {StepState.SUCCEEDED, StepState.SKIPPED}
# Steps that called with the old data and will be called again.
CALLED_AGAIN = {StepState.FAILED, StepState.UNKNOWN}


def _mark_called_steps(change: Change) -> list[str]:
    """Their next call carries other data, so it is a new request: a retry
    runs it as a new run under new idempotency keys."""
    marked = []
    for step in change.steps:
        if step.state in CALLED_AGAIN and step.started and not step.data_repaired:
            step.data_repaired = True
            change.mark_step(step)
            marked.append(step.name)
    return marked


def _check(change: Change, value: Any) -> None:
    if not change.actor.user.has_perm(PERMISSION):
        raise NotPermitted("you are not allowed to edit instance data")
    if change.instance.is_terminal:
        raise TransitionRejected(
            f"the instance is {change.instance.state}: its data can no longer change"
        )
    if not isinstance(value, dict):
        raise InvalidInput("the new value must be a JSON object")
    checked_json(value, "the new value")


def repair_input(
    change: Change, *, reason: str, new_input: Any
) -> list[dict[str, Any]]:
    """Replace the instance's input (what later attempts receive); returns the
    diff. The idempotency fingerprint keeps describing the original request."""
    _check(change, new_input)
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
    return diff


def repair_output(
    change: Change, *, reason: str, step_id: int, new_output: Any
) -> list[dict[str, Any]]:
    """Replace a finished step's recorded output (what later steps read)."""
    _check(change, new_output)
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
    return diff


instance_repair_input = durable("repair_input", repair_input)
step_repair_output = durable("repair_output", repair_output)
