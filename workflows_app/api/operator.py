"""Operator actions and four-eyes approvals over the API, as the ``operate``
token's user.

Every action goes through the engine's catalogue (``engine.actions`` says
what is possible and why not, ``engine.operate.act`` does it or asks a second
operator); the engine checks the permissions, the transition, the version
fence and four eyes. This module only translates HTTP to those calls and
their answers back.
"""

from __future__ import annotations

import uuid
from typing import Any

from django.http import HttpRequest
from ninja import Field, Query, Router, Schema, Status

from workflows_app.api import instances
from workflows_app.api.auth import OPERATE, request_token, token_user
from workflows_app.api.errors import ApiError
from workflows_app.api.schemas import (
    ActIn,
    ActionsOut,
    ApprovalOut,
    ApprovalPage,
    CompleteStepIn,
    DecisionIn,
    InstanceOut,
    Key,
    errors,
)
from workflows_app.engine import actions, operate
from workflows_app.engine.commands import approvals
from workflows_app.engine.errors import AlreadyChanged
from workflows_app.models import (
    ApprovalRequest,
    StepExecution,
    WorkflowInstance,
)
from workflows_app.models.operations import ApprovalStatus

router = Router()

# Ids in paths are bigint columns: a larger number names no row (and would
# make PostgreSQL raise instead of finding nothing).
MAX_ID = 2**63 - 1


def _unknown_instance(instance_id: Any) -> ApiError:
    return ApiError(404, "unknown_instance", f"no instance {instance_id}")


def _step_id(instance_id: uuid.UUID, name: str | None) -> int | None:
    """The API names steps (as the status does); the engine takes ids."""
    if name is None:
        return None
    pk = (
        StepExecution.objects.filter(instance_id=instance_id, name=name)
        .values_list("pk", flat=True)
        .first()
    )
    if pk is None:
        if not WorkflowInstance.objects.filter(pk=instance_id).exists():
            raise _unknown_instance(instance_id)
        raise ApiError(422, "invalid_input", f"this instance has no step {name!r}")
    return pk


@router.get(
    "/instances/{uuid:instance_id}/actions",
    auth=OPERATE,
    response={200: ActionsOut, **errors(401, 403, 404)},
    url_name="instance_actions",
    summary="What the token's user can do to an instance",
    description="Scope `operate`. Every operator action with whether the "
    "token's user may do it now, why not, and whether it needs a second "
    "operator's approval.",
)
def instance_actions(request: HttpRequest, instance_id: uuid.UUID) -> dict[str, Any]:
    instance = (
        WorkflowInstance.objects.select_related("definition")
        .filter(pk=instance_id)
        .first()
    )
    if instance is None:
        raise _unknown_instance(instance_id)
    steps = list(instance.steps.select_related("step_definition").order_by("position"))
    blocked = actions.blocking_step(steps)
    available = actions.availability(instance, token_user(request), steps)
    return {
        "instance": instance.pk,
        "status": instance.state,
        "version": instance.version,
        "blocked_step": blocked.name if blocked is not None else None,
        "actions": [
            {
                "name": a.action.name,
                "label": a.action.label,
                "explains": a.action.explains,
                "allowed": a.allowed,
                "why_not": a.why_not,
                "needs_approval": a.needs_approval,
                "targets_step": a.action.targets_step,
                "danger": a.action.danger,
                "data_keys": [key for key, _ in a.action.data_keys],
            }
            for a in available
        ],
    }


@router.post(
    "/instances/{uuid:instance_id}/actions/{name}",
    auth=OPERATE,
    response={
        200: InstanceOut,
        202: ApprovalOut,
        **errors(400, 401, 403, 404, 409, 413, 415, 422),
    },
    url_name="instance_act",
    summary="Do an operator action",
    description="Scope `operate`, as the token's user (the timeline names "
    "them). 200: done, with the instance's status now. 202: the workflow "
    "puts this action under four eyes; a request waits for a second "
    "operator (`POST /approvals/{id}/approve`) and nothing changed yet. "
    "409 `already_changed`: the instance changed since `expected_version`; "
    "409 `transition_not_allowed`: not possible in its state now. 403: the "
    "user lacks the permission. 404: no such instance or action.",
)
def instance_act(
    request: HttpRequest, instance_id: uuid.UUID, name: str, payload: ActIn
) -> Status[dict[str, Any]]:
    if name not in actions.CATALOGUE:
        raise ApiError(404, "unknown_action", f"there is no action {name!r}")
    token = request_token(request)
    try:
        outcome = operate.act(
            instance_id,
            name,
            user=token.user,
            reason=payload.reason,
            step_id=_step_id(instance_id, payload.step),
            data=payload.data,
            expected_version=payload.expected_version,
            # The timeline says which token the person acted through.
            tags={"api_token": token.name},
        )
    except WorkflowInstance.DoesNotExist:
        raise _unknown_instance(instance_id) from None
    if outcome.approval is not None:
        return Status(202, approval_body(outcome.approval, token.user))
    # The same body as GET /instances/{id} (ninja leaves the view callable).
    return Status(200, instances.instance_status(request, instance_id))


@router.post(
    "/instances/{uuid:instance_id}/steps/{step}/complete",
    auth=OPERATE,
    response={
        200: InstanceOut,
        202: ApprovalOut,
        **errors(400, 401, 403, 404, 409, 413, 415, 422),
    },
    url_name="instance_step_complete",
    summary="Complete a step that waits for a person",
    description="Scope `operate`, as the token's user (needs the permission "
    "to complete steps for a person). `output` holds the values of the "
    "step's form, checked against the fields its definition declares (422 "
    "`invalid_input` names each wrong field); they become the step's output. "
    "`reject: true` fails the step for good instead. 200: done, with the "
    "instance's status now. 202: the workflow puts this under four eyes; a "
    "request waits for a second operator. 409 `already_changed`: the step "
    "was completed meanwhile (a second completion) or the instance changed "
    "since `expected_version`; 409 `transition_not_allowed`: the instance is "
    "closed, or another operator claimed the step. 403: not permitted.",
)
def instance_step_complete(
    request: HttpRequest, instance_id: uuid.UUID, step: str, payload: CompleteStepIn
) -> Status[dict[str, Any]]:
    if not 0 < len(step) <= 100 or "\x00" in step:
        raise ApiError(422, "invalid_input", "the step name is not one a step has")
    data: dict[str, Any] = {"output": payload.output}
    if payload.reject:
        data = {"reject": True}
    body = ActIn(
        reason=payload.reason,
        step=step,
        data=data,
        expected_version=payload.expected_version,
    )
    return instance_act(request, instance_id, "complete_human_step", body)


# -- approvals ------------------------------------------------------------------


def approval_body(request: ApprovalRequest, requested_by: Any = None) -> dict[str, Any]:
    """An approval request as the API shows it (``requested_by``: the user
    when the caller has it at hand, saving a query)."""
    requester = requested_by or request.requested_by
    return {
        "id": request.pk,
        "action": request.action,
        "status": request.status,
        "instance": request.instance_id,
        "bulk_job": request.bulk_job_id,
        "reason": request.reason,
        "params": request.params,
        "requested_by": requester.get_username(),
        "requested_at": request.requested_at,
        "expires_at": request.expires_at,
        "decided_by": request.decided_by.get_username()
        if request.decided_by is not None
        else None,
        "decided_at": request.decided_at,
        "decision_note": request.decision_note,
        "outcome": request.outcome,
    }


class ApprovalFilters(Schema):
    status: ApprovalStatus | None = Field(
        None, description="pending: the requests waiting for a decision."
    )
    cursor: Key | None = Field(None, description="next_cursor of the last page.")
    limit: int = Field(50, ge=1, le=200)


def _cursor(value: str | None) -> int | None:
    if value is None:
        return None
    if not value.isdigit() or int(value) > MAX_ID:
        raise ApiError(400, "invalid_cursor", "the cursor is not one this API returned")
    return int(value)


@router.get(
    "/approvals",
    auth=OPERATE,
    response={200: ApprovalPage, **errors(400, 401, 403, 422)},
    url_name="approval_list",
    summary="List approval requests",
    description="Scope `operate`. Newest first; `?status=pending` for the "
    "requests waiting for a second operator.",
)
def approval_list(
    request: HttpRequest, filters: Query[ApprovalFilters]
) -> dict[str, Any]:
    qs = ApprovalRequest.objects.select_related("requested_by", "decided_by")
    if filters.status is not None:
        qs = qs.filter(status=filters.status)
    after = _cursor(filters.cursor)
    if after is not None:
        qs = qs.filter(pk__lt=after)
    rows = list(qs.order_by("-pk")[: filters.limit + 1])
    more = len(rows) > filters.limit
    rows = rows[: filters.limit]
    return {
        "items": [approval_body(row) for row in rows],
        "next_cursor": str(rows[-1].pk) if more else None,
    }


def _decide(
    request: HttpRequest,
    approval_id: int,
    payload: DecisionIn | None,
    *,
    approve: bool,
) -> dict[str, Any]:
    if (
        approval_id > MAX_ID
        or not ApprovalRequest.objects.filter(pk=approval_id).exists()
    ):
        raise ApiError(404, "unknown_approval", f"no approval request {approval_id}")
    decided = approvals.approval_decide(
        approval_id,
        user=token_user(request),
        approve=approve,
        note=payload.note if payload is not None else "",
    )
    if decided.status == ApprovalRequest.Status.EXPIRED:
        raise AlreadyChanged("this request expired before anyone decided it")
    decided.refresh_from_db()
    return approval_body(decided)


DECISION_DOC = (
    "Scope `operate`: the token's user must hold the approve permission "
    "and must not be the requester (403 otherwise). 409: already decided "
    "or expired."
)


@router.post(
    "/approvals/{int:approval_id}/approve",
    auth=OPERATE,
    response={200: ApprovalOut, **errors(400, 401, 403, 404, 409, 413, 415, 422)},
    url_name="approval_approve",
    summary="Approve another operator's request (the action is done now)",
    description=f"{DECISION_DOC} The answer's `status` is `approved` (done) "
    "or `failed` (approved, but the instance changed meanwhile or the "
    "action is no longer possible: `outcome` says why).",
)
def approval_approve(
    request: HttpRequest, approval_id: int, payload: DecisionIn | None = None
) -> dict[str, Any]:
    return _decide(request, approval_id, payload, approve=True)


@router.post(
    "/approvals/{int:approval_id}/reject",
    auth=OPERATE,
    response={200: ApprovalOut, **errors(400, 401, 403, 404, 409, 413, 415, 422)},
    url_name="approval_reject",
    summary="Reject another operator's request (nothing is done)",
    description=DECISION_DOC,
)
def approval_reject(
    request: HttpRequest, approval_id: int, payload: DecisionIn | None = None
) -> dict[str, Any]:
    return _decide(request, approval_id, payload, approve=False)
