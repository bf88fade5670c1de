"""Four eyes, enforced by the engine: an action that a workflow puts under
approval runs only with a second operator's approval, whatever called it
(a page, a selection, a bulk job, the API, a script).

The definition's rules are an operational control, not part of the pinned
execution plan: the newest published version's rules cover every instance of
the key (the pinned version when none is published).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from workflows_app.engine.errors import NotPermitted
from workflows_app.engine.json_diff import json_diff
from workflows_app.models import ApprovalRequest, BulkJob, WorkflowDefinition


class ApprovalRequired(NotPermitted):
    code = "approval_required"


def gate(action: str) -> str:
    """The definition setting that governs ``action`` (both repairs are one)."""
    return "repair" if action.startswith("repair_") else action


def approval_policy(instance: Any) -> WorkflowDefinition:
    current = WorkflowDefinition.objects.current(instance.definition_key)
    return current or instance.definition


def needs_approval(instance: Any, action: str) -> bool:
    return gate(action) in (approval_policy(instance).approval_actions or [])


@dataclasses.dataclass(frozen=True)
class Approval:
    """A second operator's yes, handed to the command that does the action:
    for one instance and action (an approved request) or for every item of
    an approved bulk job."""

    approved_by: str
    request_id: int
    instance_id: Any = None  # None: a bulk job's approval
    action: str = ""

    @classmethod
    def of_request(cls, request: ApprovalRequest) -> Approval:
        """Made by the decision itself, as the request is approved."""
        if (
            request.decided_by is None
            or request.decided_by_id == request.requested_by_id
        ):
            raise NotPermitted("a second operator must approve this request")
        return cls(
            approved_by=request.decided_by.get_username(),
            request_id=request.pk,
            instance_id=request.instance_id,
            action=request.action,
        )

    @classmethod
    def of_job(cls, job: BulkJob) -> Approval | None:
        """The approval of a bulk job by an operator other than its planner."""
        request = (
            job.approval_requests.filter(status=ApprovalRequest.Status.APPROVED)
            .exclude(decided_by=job.created_by_id)
            .select_related("decided_by")
            .first()
        )
        if request is None or request.decided_by is None:
            return None
        return cls(approved_by=request.decided_by.get_username(), request_id=request.pk)

    def covers(self, instance_id: Any, action: str) -> bool:
        if self.instance_id is None:
            return True
        return str(self.instance_id) == str(instance_id) and gate(self.action) == gate(
            action
        )


def require(instance: Any, action: str, approval: Approval | None) -> None:
    """Refuse an action under four eyes that comes without its approval."""
    if not needs_approval(instance, action):
        return
    if approval is None or not approval.covers(instance.pk, action):
        raise ApprovalRequired(
            f"{gate(action).replace('_', ' ')} needs a second operator's approval "
            f"for {instance.definition_key}: ask for it instead"
        )


def stale_because(request: ApprovalRequest, instance: Any) -> str:
    """Why approving a pending request could no longer do its action, or ""
    while it still could. The action is fenced on the instance version the
    requester saw (``approvals._execute``): once the instance moved, the
    approval fails instead of acting on stale intent, and a finished
    instance never moves back."""
    if request.instance_id is None or request.seen_version in (None, instance.version):
        return ""
    if instance.is_terminal:
        return (
            f"the instance has finished ({instance.get_state_display()}) since "
            "it was asked: approving it would fail. Reject it to close it."
        )
    return (
        "the instance changed since it was asked: approving it would fail. "
        "Reject it, and ask again if it is still needed."
    )


def would_write(request: ApprovalRequest, instance: Any) -> list[dict[str, Any]] | None:
    """What a pending data repair would change, path by path, against the
    value the instance holds now (what the approver is asked to approve, the
    same diff the timeline keeps once it is done); None for other actions."""
    params = request.params or {}
    if request.action == "repair_input" and "new_input" in params:
        return json_diff(instance.input, params["new_input"])
    if request.action == "repair_output" and "new_output" in params:
        step = instance.steps.filter(pk=params.get("step_id")).first()
        return json_diff(step.output if step else None, params["new_output"])
    return None
