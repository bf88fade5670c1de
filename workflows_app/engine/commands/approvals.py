"""Four-eyes approval: request, then a different operator approves (the
action is done then, as the requester, fenced on the version the requester
saw) or rejects. Requests expire; every step is in the instance timeline."""

from __future__ import annotations

from typing import Any

from django.db import transaction
from django_fsm import can_proceed, has_transition_perm

from workflows_app.engine import actions
from workflows_app.engine.actors import Actor
from workflows_app.engine.commands import bulk, operator, repair
from workflows_app.engine.errors import (
    AlreadyChanged,
    EngineError,
    InvalidInput,
    NotPermitted,
    TransitionRejected,
)
from workflows_app.engine.four_eyes import Approval, approval_policy, needs_approval
from workflows_app.engine.locking import db_now, lock_instance
from workflows_app.engine.transitions import Change
from workflows_app.models import ApprovalRequest

APPROVE_PERMISSION = "workflows_app.approve_request"
BULK = "bulk_job"


def _may_request(
    change: Change, action: str, user: Any, params: dict[str, Any]
) -> None:
    """The requester must be allowed to do the action now, as if doing it."""
    spec = actions.CATALOGUE[action]
    if not spec.transition:
        if not user.has_perm(spec.permission):
            what = spec.label.lower()
            if spec.permission == repair.PERMISSION:
                what = "edit instance data"
            raise NotPermitted(f"you are not allowed to {what}")
        if spec.precheck is not None:
            spec.precheck(change, params)
        return
    bound = getattr(change.instance, action)
    if not can_proceed(bound):
        raise TransitionRejected(
            f"{action.replace('_', ' ')} is not allowed while the instance is "
            f"{change.instance.state}"
        )
    if not has_transition_perm(bound, user):
        raise NotPermitted(f"you are not allowed to {action.replace('_', ' ')}")


@transaction.atomic(durable=True)
def approval_request(
    instance_id: Any,
    *,
    action: str,
    user: Any,
    reason: str,
    params: dict[str, Any] | None = None,
    expected_version: int | None = None,
) -> ApprovalRequest:
    """Hold an operator action for a second operator's approval."""
    if action not in actions.CATALOGUE:
        raise InvalidInput(f"{action!r} is not an action that can be approved")
    if not isinstance(reason, str) or not reason.strip():
        raise InvalidInput("a reason is required")
    # The request stores the reason and parameters now, before the action's
    # own checks run: the same guard as the action (a NUL was a 500).
    operator.checked_text(reason, "the reason")
    operator.checked_json(params or {}, "the parameters")
    change = Change.open(instance_id, Actor.operator(user))
    change.check_version(expected_version)
    _may_request(change, action, user, params or {})
    if ApprovalRequest.objects.filter(
        instance_id=instance_id, action=action, status=ApprovalRequest.Status.PENDING
    ).exists():
        raise AlreadyChanged("this action is already waiting for approval")
    definition = approval_policy(change.instance)
    request = ApprovalRequest.objects.create(
        instance=change.instance,
        action=action,
        params=params or {},
        seen_version=change.instance.version,
        reason=reason.strip(),
        requested_by=user,
        expires_at=change.now + definition.approval_expires_after,
    )
    change.note(
        "approval_requested",
        reason=reason,
        data={"approval": request.pk, "action": action, "params": params or {}},
    )
    change.save()
    return request


def _execute(request: ApprovalRequest) -> None:
    """Do the approved action as the requester (no transaction of its own:
    it commits, or not, with the decision)."""
    if request.action == BULK:
        assert request.bulk_job_id is not None  # a bulk request names its job
        bulk.confirm_approved(request.bulk_job_id, user=request.requested_by)
        return
    action = actions.CATALOGUE[request.action]
    operator.perform(
        action.name,
        action.body,
        request.instance_id,
        user=request.requested_by,
        reason=request.reason,
        expected_version=request.seen_version,
        tags={"approval": request.pk},
        approval=Approval.of_request(request),
        **request.params,
    )


@transaction.atomic(durable=True)
def approval_decide(
    request_id: int, *, user: Any, approve: bool, note: str = ""
) -> ApprovalRequest:
    """Approve (and do) or reject another operator's request."""
    _lock_instance_of(request_id)
    request = (
        ApprovalRequest.objects.select_for_update(of=("self",))
        .select_related("requested_by")
        .get(pk=request_id)
    )
    if request.status != ApprovalRequest.Status.PENDING:
        raise AlreadyChanged(f"this request is already {request.get_status_display()}")
    if not user.has_perm(APPROVE_PERMISSION):
        raise NotPermitted("you are not allowed to approve requests")
    if user.pk == request.requested_by_id:
        raise NotPermitted("a second operator must decide: this is your own request")
    now = db_now()
    if request.expires_at <= now:
        _close(request, "expire", Actor.system("approvals"), now)
        return request
    request.decided_by, request.decided_at = user, now
    request.decision_note = note.strip()[:2000]
    if not approve:
        _close(request, "reject", Actor.operator(user), now)
        return request
    try:
        with transaction.atomic():  # a savepoint: a refused action undoes itself
            _execute(request)
    except EngineError as exc:
        request.fail(str(exc))
        _close(request, None, Actor.operator(user), now, what="approval_failed")
    else:
        _close(request, "approve", Actor.operator(user), now)
    return request


def _close(
    request: ApprovalRequest,
    transition: str | None,
    actor: Actor,
    now: Any,
    what: str = "",
) -> None:
    """Fire the request's transition, save it and note it where it belongs."""
    if transition is not None:
        getattr(request, transition)()
    if transition == "expire":
        request.decided_at = now
    request.save(
        update_fields=["status", "decided_by", "decided_at", "decision_note", "outcome"]
    )
    name = (
        what
        or {
            "approve": "approval_approved",
            "reject": "approval_rejected",
            "expire": "approval_expired",
        }[transition or ""]
    )
    if request.instance_id is None:
        assert request.bulk_job_id is not None  # on an instance or on a bulk job
        bulk.note_on_job(request.bulk_job_id, actor.user, name, request.decision_note)
        return
    change = Change.open(request.instance_id, actor)
    change.note(
        name,
        reason=request.decision_note or request.outcome,
        data={
            "approval": request.pk,
            "action": request.action,
            "requested_by": request.requested_by.get_username(),
        },
    )
    change.save()


def _lock_instance_of(request_id: int) -> None:
    """One lock order everywhere: the instance row before the request's row
    (a new request locks the instance, then inserts)."""
    instance_id = (
        ApprovalRequest.objects.filter(pk=request_id)
        .values_list("instance_id", flat=True)
        .get()
    )
    if instance_id is not None:
        lock_instance(instance_id)


def expire_approvals(now: Any, batch: int) -> int:
    """Requests nobody decided in time (run by the sweeper)."""
    due = ApprovalRequest.objects.filter(
        status=ApprovalRequest.Status.PENDING, expires_at__lte=now
    ).values_list("pk", flat=True)[:batch]
    expired = 0
    for pk in list(due):
        with transaction.atomic():
            _lock_instance_of(pk)
            request = (
                ApprovalRequest.objects.select_for_update(
                    skip_locked=True, of=("self",)
                )
                .filter(pk=pk, status=ApprovalRequest.Status.PENDING)
                .select_related("requested_by")
                .first()
            )
            if request is None:
                continue
            _close(request, "expire", Actor.system("sweep"), now)
            expired += 1
    return expired


__all__ = [
    "approval_decide",
    "approval_policy",
    "approval_request",
    "expire_approvals",
    "needs_approval",
]
