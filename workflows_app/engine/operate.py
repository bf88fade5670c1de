"""Doing an operator action by name: now, or through a second operator
where the workflow puts it under four eyes. Pages, the API, bulk jobs and
the command line all come through here."""

from __future__ import annotations

import dataclasses
from typing import Any

from workflows_app.engine import four_eyes
from workflows_app.engine.actions import CATALOGUE, command_arguments
from workflows_app.engine.commands import approvals
from workflows_app.engine.errors import InvalidInput
from workflows_app.models import ApprovalRequest, WorkflowInstance


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What :func:`act` did: the action, or a request for approval."""

    done: bool
    approval: ApprovalRequest | None = None


def act(
    instance_id: Any,
    name: str,
    *,
    user: Any,
    reason: str,
    step_id: int | None = None,
    data: dict[str, Any] | None = None,
    expected_version: int | None = None,
    tags: dict[str, Any] | None = None,
) -> Outcome:
    """Do the action ``name`` now, or, where the workflow puts it under four
    eyes, record a request for a second operator. Raises the engine's errors
    (and ``WorkflowInstance.DoesNotExist``)."""
    action = CATALOGUE.get(name)
    if action is None:
        raise InvalidInput(f"there is no action {name!r}")
    kwargs = command_arguments(action, step_id=step_id, data=data)
    instance = WorkflowInstance.objects.select_related("definition").get(pk=instance_id)
    if four_eyes.needs_approval(instance, name):
        request = approvals.approval_request(
            instance_id,
            action=name,
            user=user,
            reason=reason,
            params=kwargs,
            expected_version=expected_version,
        )
        return Outcome(done=False, approval=request)
    action.command(
        instance_id,
        user=user,
        reason=reason,
        expected_version=expected_version,
        tags=tags,
        **kwargs,
    )
    return Outcome(done=True)
