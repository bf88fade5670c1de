"""What the command line reports, as plain dicts: ``--json`` prints them as
they are and ``cli.text`` lays the same dicts out for people, so both say
the same thing."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

from django.db.models import Count

from workflows_app.engine import actions
from workflows_app.engine.blocking import BLOCKING, blocking_step
from workflows_app.models import (
    ApprovalRequest,
    BulkJob,
    StepExecution,
    TransitionLog,
    WorkflowInstance,
)
from workflows_app.templatetags.saga import meaning


class EveryPermission:
    """Stands for "an operator allowed to do everything" when ``show`` is
    asked without ``--user``: the actions then say only what the instance's
    state allows."""

    is_active = True

    def has_perm(self, perm: str, obj: Any = None) -> bool:
        return True


def instance_summary(instance: WorkflowInstance, blocked: str | None) -> dict[str, Any]:
    return {
        "id": str(instance.pk),
        "definition": instance.definition_key,
        "definition_version": instance.definition.version,
        "business_key": instance.business_key,
        "state": instance.state,
        "version": instance.version,
        "attention_kind": instance.attention_kind,
        "attention_reason": instance.attention_reason,
        "stuck": instance.stuck,
        "stuck_kind": instance.stuck_kind,
        "stuck_reason": instance.stuck_reason,
        "stuck_since": instance.stuck_since,
        "blocked_step": blocked,
        "accepted_at": instance.accepted_at,
        "last_progress_at": instance.last_progress_at,
    }


def blocked_steps(ids: Sequence[Any]) -> dict[Any, str]:
    """Per instance, the name of the step that blocks it (one query)."""
    per_instance: dict[Any, list[StepExecution]] = defaultdict(list)
    rows = (
        StepExecution.objects.filter(instance_id__in=ids, state__in=BLOCKING)
        # django-fsm reads both state fields when it builds a row.
        .only("instance_id", "position", "name", "state", "compensation_state")
        .order_by("instance_id", "position")
    )
    for row in rows:
        per_instance[row.instance_id].append(row)
    found = {pk: blocking_step(steps) for pk, steps in per_instance.items()}
    return {pk: step.name for pk, step in found.items() if step is not None}


def listing(rows: Iterable[WorkflowInstance], more: bool) -> dict[str, Any]:
    rows = list(rows)
    blocked = blocked_steps([r.pk for r in rows])
    return {
        "instances": [instance_summary(r, blocked.get(r.pk)) for r in rows],
        "more": more,
    }


def _step(step: StepExecution, blocked: StepExecution | None) -> dict[str, Any]:
    return {
        "position": step.position,
        "name": step.name,
        "state": step.state,
        "compensation_state": step.compensation_state,
        "attempt": step.attempt,
        "attempts_allowed": step.attempts_allowed,
        "compensation_attempt": step.compensation_attempt,
        "run": step.run,
        "blocking": blocked is not None and step.pk == blocked.pk,
        "data_repaired": step.data_repaired,
        "last_error": step.last_error,
        "attempts": [
            {
                "number": a.number,
                "direction": a.direction,
                "run": a.run,
                "outcome": a.outcome,
                "started_at": a.started_at,
                "finished_at": a.finished_at,
                "error": f"{a.error_class}: {a.error_message}"
                if a.error_class
                else a.error_message,
            }
            for a in sorted(step.attempts.all(), key=lambda a: (a.started_at, a.pk))
        ],
    }


def availability(
    instance: WorkflowInstance, user: Any, steps: Sequence[StepExecution]
) -> list[dict[str, Any]]:
    """Each catalogued action: allowed now for ``user``, why not, four eyes."""
    return [
        {
            "name": a.action.name,
            "label": a.action.label,
            "allowed": a.allowed,
            "why_not": a.why_not,
            "needs_approval": a.needs_approval,
            "targets_step": a.action.targets_step,
            "data_keys": [key for key, _ in a.action.data_keys],
            "explains": a.action.explains,
        }
        for a in actions.availability(instance, user, steps)
    ]


def timeline(instance: WorkflowInstance, limit: int) -> dict[str, Any]:
    rows = list(
        TransitionLog.objects.filter(instance=instance)
        .select_related("user", "step")
        .order_by("-id")[:limit]
    )[::-1]
    return {
        "total": TransitionLog.objects.filter(instance=instance).count(),
        "rows": [
            {
                "id": r.pk,
                "at": r.created_at,
                "step": r.step.name if r.step is not None else "",
                "transition": r.transition,
                "source": r.source,
                "target": r.target,
                "actor": r.user.get_username() if r.user is not None else r.actor_label,
                "actor_kind": r.actor_kind,
                "reason": r.reason,
            }
            for r in rows
        ],
    }


def approvals(instance: WorkflowInstance) -> list[dict[str, Any]]:
    pending = ApprovalRequest.objects.filter(
        instance=instance, status=ApprovalRequest.Status.PENDING
    ).select_related("requested_by")
    return [approval(r) for r in pending.order_by("requested_at")]


def approval(request: ApprovalRequest) -> dict[str, Any]:
    return {
        "id": request.pk,
        "action": request.action,
        "status": request.status,
        "requested_by": request.requested_by.get_username(),
        "requested_at": request.requested_at,
        "expires_at": request.expires_at,
        "reason": request.reason,
        "bulk_job": request.bulk_job_id,
    }


def show(instance: WorkflowInstance, user: Any, history: int) -> dict[str, Any]:
    """Everything a runbook needs to decide on one instance."""
    steps = list(
        instance.steps.select_related("step_definition")
        .prefetch_related("attempts")
        .order_by("position")
    )
    blocked = blocking_step(steps)
    document = instance_summary(instance, blocked.name if blocked else None)
    document.update(
        meaning=meaning(instance.state),
        pivot_passed=instance.pivot_passed,
        restart_position=instance.restart_position,
        started_at=instance.started_at,
        finished_at=instance.finished_at,
        deadline_at=instance.deadline_at,
        steps=[_step(s, blocked) for s in steps],
        actions_for=user.get_username() if hasattr(user, "get_username") else None,
        actions=availability(instance, user, steps),
        approvals=approvals(instance),
        timeline=timeline(instance, history),
    )
    return document


def bulk_job(job: BulkJob, items_shown: int | None) -> dict[str, Any]:
    """A job's preview (what it does or skips, per plan and per instance)
    and where it stands."""
    plans = job.items.order_by().values_list("plan", "command").annotate(n=Count("id"))
    acting = sorted(((p, n) for p, c, n in plans if c), key=lambda r: -r[1])
    skipped = sorted(((p, n) for p, c, n in plans if not c), key=lambda r: -r[1])
    items = job.items.select_related("instance").order_by("id")
    total = job.items.count()
    if items_shown is not None:
        items = items[:items_shown]
    pending = job.approval_requests.filter(status=ApprovalRequest.Status.PENDING)
    request = pending.select_related("requested_by").first()
    return {
        "job": {
            "id": job.pk,
            "status": job.status,
            "action": job.action,
            "reason": job.reason,
            "description": job.description,
            "rate": job.rate,
            "created_by": job.created_by.get_username(),
        },
        "counts": {
            "acting": sum(n for _, n in acting),
            "skipped": sum(n for _, n in skipped),
        },
        "acting": [{"plan": p, "count": n} for p, n in acting],
        "skipped": [{"plan": p, "count": n} for p, n in skipped],
        "items": [
            {
                "instance": str(item.instance_id),
                "business_key": item.instance.business_key,
                "seen_version": item.seen_version,
                "acts": bool(item.command),
                "plan": item.plan,
                "outcome": item.outcome,
            }
            for item in items
        ],
        "items_total": total,
        "approval": approval(request) if request is not None else None,
    }
