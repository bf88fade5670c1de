"""Bulk jobs: plan (the dry run), confirm, pause, resume, cancel, and work.

1. ``bulk_job_plan`` writes a draft job with one item per selected instance,
   each saying what would happen (or why nothing will), fenced on the
   instance version seen then. The preview page shows exactly these items.
2. ``bulk_job_confirm`` queues it (a second confirm is a no-op) and sends it
   to a worker after commit.
3. ``bulk_job_work`` (the Celery task) holds a lease on the job and runs one
   engine command per pending item, at the job's rate. Before each item it
   checks the job is still running under its lease, so pause and cancel take
   effect at once. Each item's command commits together with its recorded
   outcome, so a worker killed mid-way leaves every item either done or
   untouched; its lease expires, the sweeper re-sends the job and the next
   runner goes on with the pending items.
"""

from __future__ import annotations

import time
import uuid
from collections import defaultdict
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models import Count, Q
from django.db.models.functions import Now
from django_fsm import can_proceed

from workflows_app.engine import actions, dispatch
from workflows_app.engine.blocking import COMPENSATION, holding_steps
from workflows_app.engine.bulk_plan import plan_item
from workflows_app.engine.commands import operator
from workflows_app.engine.errors import (
    AlreadyChanged,
    EngineError,
    InvalidInput,
    NotPermitted,
    TransitionRejected,
)
from workflows_app.engine.four_eyes import Approval
from workflows_app.engine.locking import db_now
from workflows_app.models import (
    ApprovalRequest,
    BulkJob,
    BulkJobItem,
    WorkflowDefinition,
    WorkflowInstance,
)

PERMISSIONS: dict[str, tuple[str, ...]] = {
    BulkJob.Action.RETRY: (
        "workflows_app.retry_step",
        "workflows_app.retry_compensation",
    ),
    BulkJob.Action.COMPENSATE: ("workflows_app.compensate_instance",),
}
PLAN_CHUNK = 2000
# Seconds between a runner's checks that the job still runs under its lease.
CHECK_EVERY = 0.25
INSTANCE_COLUMNS = (
    # django-fsm reads the state on init; the plan reads the rest.
    "id",
    "state",
    "version",
    "attention_kind",
    "pivot_passed",
    "restart_position",
    "definition_key",
    "business_key",
    "definition__mode",
)


def may_run(user: Any, action: str) -> bool:
    return any(user.has_perm(p) for p in PERMISSIONS.get(action, ()))


def _what_holds(ids: list[Any]) -> tuple[dict[Any, str], dict[Any, list[str]]]:
    """Per held instance, what holds it now (engine.blocking's one rule): the
    step whose action failed, or the step whose compensation failed."""
    blocked: dict[Any, str] = {}
    compensations: dict[Any, list[str]] = defaultdict(list)
    rows = (
        holding_steps()
        .filter(instance_id__in=ids)
        # ``held_by`` is holding_steps()'s annotation.
        .values_list("instance_id", "name", "held_by")  # type: ignore[misc]
    )
    for instance_id, name, held_by in rows:
        if held_by == COMPENSATION:
            compensations[instance_id].append(name)
        else:
            blocked.setdefault(instance_id, name)
    return blocked, compensations


@transaction.atomic(durable=True)
def bulk_job_plan(
    instances: Any,
    *,
    action: str,
    reason: str,
    user: Any,
    description: str,
    query: str = "",
    rate: float = 0,
    seen_versions: dict[Any, int] | None = None,
) -> BulkJob:
    """Write the draft job and its items; nothing is done to any instance.

    ``seen_versions`` (a selection in the list) fences each item on the
    version the operator saw: one that changed since is left alone."""
    if action not in PERMISSIONS:
        raise InvalidInput(f"unknown bulk action {action!r}")
    if not may_run(user, action):
        raise NotPermitted(f"you are not allowed to {action} instances")
    if not reason or not reason.strip():
        raise InvalidInput("a reason is required")
    if rate < 0:
        raise InvalidInput("the rate cannot be negative")
    limit = settings.SAGA_BULK_MAX_ITEMS
    ids = list(instances.order_by("pk").values_list("pk", flat=True)[: limit + 1])
    if not ids:
        raise InvalidInput("no instance matches this selection")
    if len(ids) > limit:
        raise InvalidInput(f"more than {limit} instances match; narrow the selection")
    job = BulkJob.objects.create(
        action=action,
        reason=reason.strip(),
        query=query,
        description=description[:500],
        rate=rate,
        created_by=user,
    )
    for start in range(0, len(ids), PLAN_CHUNK):
        chunk = ids[start : start + PLAN_CHUNK]
        found = (
            WorkflowInstance.objects.filter(pk__in=chunk)
            .select_related("definition")
            .only(*INSTANCE_COLUMNS)
        )
        blocked, compensations = _what_holds(chunk)
        items = []
        for instance in found:
            plan = plan_item(
                action,
                instance,
                user,
                blocked_step=blocked.get(instance.pk, ""),
                failed_compensations=tuple(compensations.get(instance.pk, ())),
            )
            seen = (seen_versions or {}).get(instance.pk, instance.version)
            description, acts = plan.description, plan.acts
            if seen != instance.version:
                description = "changed since you selected it: left alone"
                acts = False
            items.append(
                BulkJobItem(
                    job=job,
                    instance=instance,
                    seen_version=seen,
                    # The catalogue's action name (its transition's name).
                    command=plan.transition,
                    plan=description[:300],
                    outcome=BulkJobItem.Outcome.PENDING
                    if acts
                    else BulkJobItem.Outcome.SKIPPED,
                )
            )
        BulkJobItem.objects.bulk_create(items, batch_size=1000)
    return job


def _locked(job_id: int) -> BulkJob:
    return BulkJob.objects.select_for_update().get(pk=job_id)


def _note(job: BulkJob, user: Any, what: str, reason: str = "") -> None:
    job.log = [
        *job.log,
        {
            "at": db_now().isoformat(),
            "user": user.get_username() if user is not None else "system",
            "what": what,
            "reason": reason,
        },
    ]


def _operate(job_id: int, user: Any, name: str, reason: str = "") -> BulkJob:
    job = _locked(job_id)
    if not may_run(user, job.action):
        raise NotPermitted(f"you are not allowed to {name} this job")
    bound = getattr(job, name)
    if not can_proceed(bound):
        raise TransitionRejected(
            f"the job is {job.get_status_display()}: cannot {name}"
        )
    bound()
    _note(job, user, name, reason)
    fields = ["status", "log", "lease_until", "redispatch_at"]
    if job.status == BulkJob.Status.QUEUED:
        # Sent now; re-sent by the sweeper if nobody picks it up.
        job.redispatch_at = db_now() + timedelta(seconds=settings.SAGA_REDISPATCH_AFTER)
        transaction.on_commit(dispatch.bulk_job_sender(job.pk), robust=True)
    if name == "confirm":
        job.confirmed_at = db_now()
        fields.append("confirmed_at")
    if job.status == BulkJob.Status.CANCELLED:
        job.finished_at = db_now()
        fields.append("finished_at")
        job.items.filter(outcome=BulkJobItem.Outcome.PENDING).update(
            outcome=BulkJobItem.Outcome.CANCELLED, processed_at=Now()
        )
    job.save(update_fields=fields)
    return job


def _approval_window(job: BulkJob) -> timedelta | None:
    """How long an approval may take, when the job acts on more instances of
    some workflow than its current definition allows without approval, or
    does to one an action that workflow puts under four eyes (the engine
    refuses such an item without the job's approval)."""
    acting = (
        job.items.exclude(outcome=BulkJobItem.Outcome.SKIPPED)
        .order_by()
        .values_list("instance__definition_key", "command")
        .annotate(n=Count("id"))
    )
    per_key: dict[str, int] = defaultdict(int)
    commands_per_key: dict[str, set[str]] = defaultdict(set)
    for key, command, n in acting:
        per_key[key] += n
        commands_per_key[key].add(command.removeprefix("instance_"))
    windows = []
    for key, n in per_key.items():
        current = WorkflowDefinition.objects.current(key)
        if current is None:
            continue
        over = current.approval_bulk_over
        guarded = commands_per_key[key] & set(current.approval_actions or [])
        if (over is not None and n > over) or guarded:
            windows.append(current.approval_expires_after)
    return min(windows) if windows else None


def pending_approval(job: BulkJob) -> ApprovalRequest | None:
    return job.approval_requests.filter(status=ApprovalRequest.Status.PENDING).first()


@transaction.atomic(durable=True)
def bulk_job_confirm(job_id: int, *, user: Any) -> BulkJob:
    """Queue a planned job, or ask for a second operator's approval where its
    definitions require one for this many instances. Confirming it again (a
    double click, a re-sent form) changes nothing and returns the job."""
    job = _locked(job_id)
    if job.status != BulkJob.Status.DRAFT:
        return job
    if user.pk != job.created_by_id:
        raise NotPermitted("only the operator who planned this job can start it")
    window = _approval_window(job)
    if window is None:
        return _operate(job_id, user, "confirm")
    if pending_approval(job) is None:
        ApprovalRequest.objects.create(
            bulk_job=job,
            action="bulk_job",
            reason=job.reason,
            requested_by=user,
            expires_at=db_now() + window,
        )
        _note(job, user, "approval requested")
        job.save(update_fields=["log"])
    return job


def confirm_approved(job_id: int, *, user: Any) -> None:
    """Queue a job a second operator approved (in the approval's transaction)."""
    _operate(job_id, user, "confirm")


def note_on_job(job_id: int, user: Any, what: str, reason: str = "") -> None:
    job = _locked(job_id)
    _note(job, user, what.replace("_", " "), reason)
    job.save(update_fields=["log"])


@transaction.atomic(durable=True)
def bulk_job_pause(job_id: int, *, user: Any) -> BulkJob:
    return _operate(job_id, user, "pause")


@transaction.atomic(durable=True)
def bulk_job_resume(job_id: int, *, user: Any) -> BulkJob:
    return _operate(job_id, user, "resume")


@transaction.atomic(durable=True)
def bulk_job_cancel(job_id: int, *, user: Any, reason: str = "") -> BulkJob:
    return _operate(job_id, user, "cancel", reason)


# -- the runner ------------------------------------------------------------------


def _lease() -> timedelta:
    return timedelta(seconds=settings.SAGA_BULK_LEASE)


def _claim_lease(job_id: int, token: str) -> bool:
    free = Q(lease_until__isnull=True) | Q(lease_until__lt=Now())
    return (
        BulkJob.objects.filter(
            free, pk=job_id, status__in=[BulkJob.Status.QUEUED, BulkJob.Status.RUNNING]
        ).update(lease_token=token, lease_until=Now() + _lease(), redispatch_at=None)
        == 1
    )


def _holds(job_id: int, token: str) -> bool:
    """Whether this runner may do the next item: the job is running and the
    lease is still this runner's (renewed as a side effect)."""
    return (
        BulkJob.objects.filter(
            pk=job_id, status=BulkJob.Status.RUNNING, lease_token=token
        ).update(lease_until=Now() + _lease())
        == 1
    )


@transaction.atomic(durable=True)
def _transition(job_id: int, token: str, name: str) -> bool:
    job = _locked(job_id)
    if job.lease_token != token or not can_proceed(getattr(job, name)):
        return False
    getattr(job, name)()
    fields = ["status", "lease_until"]
    if name == "finish":
        job.finished_at = db_now()
        fields.append("finished_at")
    job.save(update_fields=fields)
    return True


def _record(item: BulkJobItem, outcome: str, message: str) -> None:
    BulkJobItem.objects.filter(pk=item.pk, outcome=BulkJobItem.Outcome.PENDING).update(
        outcome=outcome, message=message[:500], processed_at=Now()
    )


def _apply(job: BulkJob, item: BulkJobItem, approval: Approval | None = None) -> None:
    """Run one item's command and record its outcome in the same transaction:
    a runner killed half-way leaves the item pending and the instance
    untouched, so the next runner acts on it exactly once."""
    # Rows planned before the catalogue hold the command's function name.
    action = actions.CATALOGUE[item.command.removeprefix("instance_")]
    try:
        with transaction.atomic(durable=True):
            # Still pending under a lock: a cancel that marked it meanwhile
            # wins, and one that comes now waits for this item to commit.
            still_pending = BulkJobItem.objects.select_for_update().filter(
                pk=item.pk, outcome=BulkJobItem.Outcome.PENDING
            )
            if not still_pending.exists():
                return
            operator.perform(
                action.name,
                action.body,
                item.instance_id,
                user=job.created_by,
                reason=job.reason,
                expected_version=item.seen_version,
                tags={"bulk_job": job.pk},
                approval=approval,
            )
            _record(item, BulkJobItem.Outcome.DONE, f"{item.plan}: done")
    except AlreadyChanged:
        _record(item, BulkJobItem.Outcome.CHANGED, "changed since the plan: left alone")
    except WorkflowInstance.DoesNotExist:
        _record(item, BulkJobItem.Outcome.REFUSED, "the instance no longer exists")
    except EngineError as exc:
        _record(item, BulkJobItem.Outcome.REFUSED, str(exc))


def bulk_job_work(job_id: int, *, budget: float | None = None) -> str:
    """Work the job's pending items for up to ``budget`` seconds.

    Returns "more" (call again), "finished", "stopped" (paused, cancelled or
    the lease lost) or "busy" (another runner holds the lease)."""
    token = uuid.uuid4().hex
    if not _claim_lease(job_id, token):
        return "busy"
    _transition(job_id, token, "begin")
    job = BulkJob.objects.select_related("created_by").get(pk=job_id)
    # Items under four eyes run only with the job's approval by a second
    # operator; without it the engine refuses them one by one.
    approval = Approval.of_job(job)
    pause = 1 / job.rate if job.rate > 0 else 0
    ends = time.monotonic() + (budget or settings.SAGA_BULK_TASK_BUDGET)
    checked = 0.0
    while time.monotonic() < ends:
        pending = list(
            job.items.filter(outcome=BulkJobItem.Outcome.PENDING).order_by("id")[:50]
        )
        if not pending:
            return "finished" if _transition(job_id, token, "finish") else "stopped"
        for item in pending:
            now = time.monotonic()
            # Pause and cancel take effect within CHECK_EVERY (and at once
            # when the rate leaves time between items).
            if pause or now - checked >= CHECK_EVERY:
                if not _holds(job_id, token):
                    return "stopped"
                checked = now
            _apply(job, item, approval)
            if pause:
                time.sleep(pause)
            if time.monotonic() >= ends:
                break
    # Let the next task take over at once instead of waiting for the lease.
    BulkJob.objects.filter(pk=job_id, lease_token=token).update(lease_until=None)
    return "more"
