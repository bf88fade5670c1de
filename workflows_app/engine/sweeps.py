"""The periodic sweeper: the reason a lost message, a killed worker or a
broker restart delays a workflow but never strands it.

Each sweep compares bookkeeping columns with the database clock and claims
each due row before acting on it, so several sweepers (one beat per site, or
an operator running ``manage.py run_sweeps`` by hand) never do the same work
twice:

1. ``redispatch``: claimable work nobody claimed (lost message, long backoff),
   claimed by compare-and-set on ``redispatch_at``, then re-sent.
2. ``timeouts``: attempts past their deadline become ``unknown`` (or are
   retried) through the same command a worker's result goes through.
3. ``deadlines``: running instances past the workflow deadline are held.
4. ``stuck``: instances that made no progress within ``stuck_after`` are
   flagged, with a reason, until they move again.
5. ``timers``: timer steps whose ``wake_at`` passed are woken (the database
   keeps the time; no broker countdown is ever relied on).
6. ``purged``: finished instances past their definition's retention period
   are archived and deleted (``workflows_app.engine.retention``).

On PostgreSQL every batch is picked with ``FOR UPDATE SKIP LOCKED`` so that
sweepers share the work instead of queueing behind each other or a worker.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import connection, transaction
from django.db.models import Case, F, Q, QuerySet, Value, When

from workflows_app import activity, alerts
from workflows_app.engine import commands, dispatch, progress, retention, stuck
from workflows_app.engine.actors import Actor
from workflows_app.engine.commands import approvals, waits
from workflows_app.engine.errors import EngineError
from workflows_app.engine.locking import db_now
from workflows_app.engine.transitions import Change
from workflows_app.models import (
    ACTIVE_STATES,
    ActorKind,
    AttentionKind,
    BulkJob,
    CompensationState,
    InstanceState,
    StepExecution,
    StepState,
    StuckKind,
    TransitionLog,
    WorkflowInstance,
)
from workflows_app.monitoring import metrics

log = logging.getLogger(__name__)
ACTOR = Actor.system("sweep")
# Re-sends of unclaimed work wait SAGA_REDISPATCH_AFTER, then twice as long
# each time, up to 2**5 times as long (16 minutes at the default 30 s).
MAX_BACKOFF_DOUBLINGS = 5


def _pick(qs: QuerySet[Any], fields: list[str], batch: int) -> list[dict[str, Any]]:
    """Read one batch of due rows, skipping rows another transaction holds."""
    if connection.features.has_select_for_update_skip_locked:
        qs = qs.select_for_update(skip_locked=True, of=("self",))
    return list(qs.values(*fields)[:batch])


def _lease() -> timedelta:
    return timedelta(seconds=settings.SAGA_REDISPATCH_AFTER)


def redispatch_steps(now: datetime, batch: int) -> int:
    sent = []
    with transaction.atomic():
        due = StepExecution.objects.filter(redispatch_at__lte=now).order_by(
            "redispatch_at"
        )
        for row in _pick(
            due,
            [
                "id",
                "instance_id",
                "redispatch_at",
                "redispatches",
                "next_attempt_at",
                "state",
                "compensation_state",
                "instance__state",
                "step_definition__timeout",
            ],
            batch,
        ):
            # Only work the instance's state lets run: a held or closed
            # instance's work is parked (resume sends it again), not re-sent.
            comp = row["instance__state"] == InstanceState.COMPENSATING and row[
                "compensation_state"
            ] in {CompensationState.PENDING, CompensationState.RETRYING}
            claimable = comp or (
                row["instance__state"] == InstanceState.RUNNING
                and row["state"] in {StepState.SCHEDULED, StepState.RETRYING}
            )
            # Each re-send of the same work waits twice as long (capped).
            backoff = _lease() * 2 ** min(
                row["redispatches"] + 1, MAX_BACKOFF_DOUBLINGS
            )
            won = StepExecution.objects.filter(
                pk=row["id"], redispatch_at=row["redispatch_at"]
            ).update(
                redispatch_at=now + backoff if claimable else None,
                redispatches=F("redispatches") + 1 if claimable else 0,
            )
            if won and claimable:
                wait = max(timedelta(0), (row["next_attempt_at"] or now) - now)
                sent.append(
                    dispatch.attempt_sender(
                        row["instance_id"],
                        row["id"],
                        "compensation" if comp else "action",
                        row["step_definition__timeout"],
                        wait,
                    )
                )
    for send in sent:
        _send(send)
    return len(sent)


def redispatch_instances(now: datetime, batch: int) -> int:
    sent = []
    with transaction.atomic():
        due = WorkflowInstance.objects.filter(redispatch_at__lte=now).order_by(
            "redispatch_at"
        )
        for row in _pick(due, ["id", "redispatch_at", "state"], batch):
            accepted = row["state"] == InstanceState.ACCEPTED
            won = WorkflowInstance.objects.filter(
                pk=row["id"], redispatch_at=row["redispatch_at"]
            ).update(redispatch_at=now + _lease() if accepted else None)
            if won and accepted:
                sent.append(dispatch.advance_sender(row["id"]))
    for send in sent:
        _send(send)
    return len(sent)


def redispatch_bulk_jobs(now: datetime, batch: int) -> int:
    """Queued or running bulk jobs that no runner holds (a lost message, a
    killed worker whose lease ran out) are sent again."""
    due = (
        BulkJob.objects.filter(
            status__in=[BulkJob.Status.QUEUED, BulkJob.Status.RUNNING]
        )
        .filter(Q(redispatch_at__isnull=True) | Q(redispatch_at__lte=now))
        .filter(Q(lease_until__isnull=True) | Q(lease_until__lt=now))
    )
    sent = []
    for row in due.values("id", "redispatch_at")[:batch]:
        won = BulkJob.objects.filter(
            pk=row["id"], redispatch_at=row["redispatch_at"]
        ).update(redispatch_at=now + _lease())
        if won:
            sent.append(dispatch.bulk_job_sender(row["id"]))
    for send in sent:
        _send(send)
    return len(sent)


def _send(send: Any) -> None:
    try:
        send()
    except Exception:
        # The broker is down: the lease expires and the next sweep tries again.
        log.exception("sweeper could not reach the broker")


def _each_due(
    field: str, now: datetime, batch: int, act: Callable[..., int], what: str
) -> int:
    """Claim a batch of steps whose ``field`` time came, then act on each in
    its own transaction (one failing does not stop the others)."""
    due = StepExecution.objects.filter(**{f"{field}__lte": now}).order_by(field)
    with transaction.atomic():
        rows = _pick(due, ["id", "instance_id", field], batch)
    done = 0
    for row in rows:
        try:
            done += act(row["instance_id"], row["id"], row[field], actor=ACTOR)
        except EngineError:
            log.exception("could not %s step %s", what, row["id"])
    return done


def time_out_attempts(now: datetime, batch: int) -> int:
    return _each_due("deadline_at", now, batch, commands.attempt_time_out, "time out")


def wake_timers(now: datetime, batch: int) -> int:
    """Wake the timers whose time came, each in its own transaction."""
    return _each_due("wake_at", now, batch, waits.timer_wake, "wake the timer of")


@transaction.atomic(durable=True)
def instance_enforce_deadline(instance_id: Any) -> bool:
    change = Change.open(instance_id, ACTOR)
    instance = change.instance
    if (
        instance.state != InstanceState.RUNNING
        or instance.deadline_at is None
        or instance.deadline_at > change.now
    ):
        return False
    reason = f"the workflow deadline {instance.deadline_at.isoformat()} passed"
    change.fire(instance, "hold", AttentionKind.DEADLINE, reason, reason=reason)
    stuck.mark_held(instance, change.now, reason)
    progress.park_work(change)
    change.save()
    return True


def enforce_deadlines(now: datetime, batch: int) -> int:
    due = WorkflowInstance.objects.filter(
        state=InstanceState.RUNNING, deadline_at__lte=now
    ).order_by("deadline_at")
    with transaction.atomic():
        ids = [row["id"] for row in _pick(due, ["id"], batch)]
    return sum(instance_enforce_deadline(pk) for pk in ids)


def flag_stuck(now: datetime, batch: int) -> int:
    """Flag instances that made no progress within their definition's stuck-after.

    One UPDATE for the whole batch: its WHERE repeats the due condition, so an
    instance that made progress since the read is left alone."""
    due = Q(stuck=False, stuck_check_at__lte=now, state__in=ACTIVE_STATES)
    with transaction.atomic():
        rows = _pick(
            WorkflowInstance.objects.filter(due).order_by("stuck_check_at"),
            ["id", "last_progress_at", "state"],
            batch,
        )
        if not rows:
            return 0
        seen = {row["id"]: row for row in rows}
        WorkflowInstance.objects.filter(due, pk__in=seen).update(
            stuck=True,
            stuck_kind=StuckKind.NO_PROGRESS,
            stuck_reason="no progress",
            stuck_since=now,
            alert_due=True,
        )
        flagged = list(
            WorkflowInstance.objects.filter(
                pk__in=seen, stuck=True, stuck_since=now, stuck_reason="no progress"
            ).values_list("id", flat=True)
        )
        reasons = {
            pk: f"no progress since {seen[pk]['last_progress_at']:%Y-%m-%d %H:%M:%S} "
            f"UTC while {seen[pk]['state']}"
            for pk in flagged
        }
        # The readable reason, per row, in one statement.
        WorkflowInstance.objects.filter(
            pk__in=flagged, stuck_reason="no progress"
        ).update(
            stuck_reason=Case(
                *(When(pk=pk, then=Value(text[:300])) for pk, text in reasons.items()),
                default=F("stuck_reason"),
            )
        )
        TransitionLog.objects.bulk_create(
            TransitionLog(
                instance_id=pk,
                transition="flag_stuck",
                reason=text,
                actor_kind=ActorKind.SYSTEM,
                actor_label=ACTOR.label,
            )
            for pk, text in reasons.items()
        )
    return len(flagged)


@metrics.timed_sweep
def sweep_all(batch: int | None = None) -> dict[str, int]:
    size = batch or settings.SAGA_SWEEP_BATCH
    now = db_now()
    return {
        "timeouts": time_out_attempts(now, size),
        "timers": wake_timers(now, size),
        "redispatched_steps": redispatch_steps(now, size),
        "redispatched_instances": redispatch_instances(now, size),
        "redispatched_bulk_jobs": redispatch_bulk_jobs(now, size),
        "deadlines": enforce_deadlines(now, size),
        "stuck": flag_stuck(now, size),
        "approvals_expired": approvals.expire_approvals(now, size),
        # After flagging, so a newly stuck instance gets its alert this sweep.
        **alerts.sync_alerts(now, size),
        "activity_hours": activity.roll_up(now),
        # Last: the essential work above never waits behind a purge.
        "purged": retention.sweep(now),
    }
