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

A sweep shares ``SAGA_SWEEP_SECONDS`` between the kinds of work (1-5, the
alerts and the activity roll-up; the purge has a clock of its own): each
kind works in small turns, every kind has one turn per sweep whatever the
time, then more round robin while time is left (``work_due``). A backlog
of one kind never starves another, and a sweep stays short however large
the backlog.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import connection, transaction
from django.db.models import Case, CharField, F, Func, Q, QuerySet, Value, When
from django.db.models.functions import Concat

from workflows_app import activity, alerts
from workflows_app.engine import commands, dispatch, progress, retention, stuck
from workflows_app.engine import rows as engine_rows
from workflows_app.engine.actors import Actor
from workflows_app.engine.commands import approvals, waits
from workflows_app.engine.errors import EngineError
from workflows_app.engine.locking import db_now
from workflows_app.engine.transitions import Change
from workflows_app.engine.waits import moment_in_words
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


def _claim(
    model: Any, claims: list[tuple[Any, datetime, datetime | None, bool]]
) -> set[Any]:
    """Compare-and-set ``redispatch_at`` of many rows: each claim is (id, the
    value read, the new value, whether its re-send counter goes up). Returns
    the ids won, as text. On PostgreSQL one ``UPDATE ... FROM (VALUES ...)`` for the
    whole batch (the rows are already locked by ``_pick``); elsewhere one
    UPDATE per row."""
    if not claims:
        return set()
    counts = hasattr(model, "redispatches")
    if connection.vendor != "postgresql":
        won = set()
        for pk, seen, new, claimable in claims:
            values: dict[str, Any] = {"redispatch_at": new}
            if counts:
                values["redispatches"] = F("redispatches") + 1 if claimable else 0
            if model.objects.filter(pk=pk, redispatch_at=seen).update(**values):
                won.add(str(pk))
        return won
    qn = connection.ops.quote_name
    table = qn(model._meta.db_table)
    pk_type = "uuid" if model is WorkflowInstance else "bigint"
    rows = ", ".join(["(%s, %s::timestamptz, %s::timestamptz, %s)"] * len(claims))
    counter = (
        ", redispatches = CASE WHEN v.up THEN t.redispatches + 1 ELSE 0 END"
        if counts
        else ""
    )
    sql = (
        f"UPDATE {table} AS t SET redispatch_at = v.new{counter} "
        f"FROM (VALUES {rows}) AS v(id, seen, new, up) "
        f"WHERE t.id = v.id::{pk_type} AND t.redispatch_at = v.seen "
        "RETURNING t.id"
    )
    params = [value for claim in claims for value in claim]
    params = [str(v) if isinstance(v, uuid.UUID) else v for v in params]
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return {str(row[0]) for row in cursor.fetchall()}


def _lease() -> timedelta:
    return timedelta(seconds=settings.SAGA_REDISPATCH_AFTER)


# A part's turn returns (rows acted on, rows picked): a turn that picked as
# many rows as it was allowed may have left more due.
Turn = tuple[int, int]


def redispatch_steps(now: datetime, batch: int) -> int:
    return _redispatch_steps(now, batch)[0]


def _redispatch_steps(now: datetime, batch: int) -> Turn:
    sent = []
    with transaction.atomic():
        due = StepExecution.objects.filter(redispatch_at__lte=now).order_by(
            "redispatch_at"
        )
        rows = _pick(
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
        )
        claims = []
        for row in rows:
            # Only work the instance's state lets run: a held or closed
            # instance's work is parked (resume sends it again), not re-sent.
            comp = row["instance__state"] == InstanceState.COMPENSATING and row[
                "compensation_state"
            ] in {CompensationState.PENDING, CompensationState.RETRYING}
            claimable = comp or (
                row["instance__state"] == InstanceState.RUNNING
                and row["state"] in {StepState.SCHEDULED, StepState.RETRYING}
            )
            row["comp"], row["claimable"] = comp, claimable
            # Each re-send of the same work waits twice as long (capped).
            backoff = _lease() * 2 ** min(
                row["redispatches"] + 1, MAX_BACKOFF_DOUBLINGS
            )
            claims.append(
                (
                    row["id"],
                    row["redispatch_at"],
                    now + backoff if claimable else None,
                    claimable,
                )
            )
        won = _claim(StepExecution, claims)
        for row in rows:
            if str(row["id"]) in won and row["claimable"]:
                wait = max(timedelta(0), (row["next_attempt_at"] or now) - now)
                sent.append(
                    dispatch.attempt_sender(
                        row["instance_id"],
                        row["id"],
                        "compensation" if row["comp"] else "action",
                        row["step_definition__timeout"],
                        wait,
                    )
                )
    for send in sent:
        _send(send)
    return len(sent), len(rows)


def redispatch_instances(now: datetime, batch: int) -> int:
    return _redispatch_instances(now, batch)[0]


def _redispatch_instances(now: datetime, batch: int) -> Turn:
    sent = []
    with transaction.atomic():
        due = WorkflowInstance.objects.filter(redispatch_at__lte=now).order_by(
            "redispatch_at"
        )
        rows = _pick(due, ["id", "redispatch_at", "state"], batch)
        accepted = {row["id"] for row in rows if row["state"] == InstanceState.ACCEPTED}
        won = _claim(
            WorkflowInstance,
            [
                (
                    row["id"],
                    row["redispatch_at"],
                    now + _lease() if row["id"] in accepted else None,
                    False,
                )
                for row in rows
            ],
        )
        sent += [
            dispatch.advance_sender(row["id"])
            for row in rows
            if str(row["id"]) in won and row["id"] in accepted
        ]
    for send in sent:
        _send(send)
    return len(sent), len(rows)


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
) -> Turn:
    """Pick a batch of steps whose ``field`` time came (committed before
    acting, so no row stays locked), then act on each in its own transaction
    (one failing does not stop the others)."""
    due = StepExecution.objects.filter(**{f"{field}__lte": now}).order_by(field)
    with transaction.atomic():
        rows = _pick(due, ["id", "instance_id", field], batch)
    done = 0
    for row in rows:
        try:
            done += act(row["instance_id"], row["id"], row[field], actor=ACTOR)
        except EngineError:
            log.exception("could not %s step %s", what, row["id"])
    return done, len(rows)


def time_out_attempts(now: datetime, batch: int) -> int:
    return _time_out_attempts(now, batch)[0]


def _time_out_attempts(now: datetime, batch: int) -> Turn:
    return _each_due("deadline_at", now, batch, commands.attempt_time_out, "time out")


def wake_timers(now: datetime, batch: int) -> int:
    """Wake the timers whose time came, each in its own transaction."""
    return _wake_timers(now, batch)[0]


def _wake_timers(now: datetime, batch: int) -> Turn:
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
    # In words, as pages and mail show it; the ISO value stays in the data.
    reason = f"the workflow deadline {moment_in_words(instance.deadline_at)} passed"
    change.fire(
        instance,
        "hold",
        AttentionKind.DEADLINE,
        reason,
        reason=reason,
        data={"deadline_at": instance.deadline_at.isoformat()},
    )
    stuck.mark_held(instance, change.now, reason)
    progress.park_work(change)
    change.save()
    return True


def _deadlines_due(now: datetime) -> QuerySet[WorkflowInstance]:
    return WorkflowInstance.objects.filter(
        state=InstanceState.RUNNING, deadline_at__lte=now
    ).order_by("deadline_at")


def enforce_deadlines(now: datetime, batch: int) -> int:
    return _enforce_deadlines(now, batch)[0]


def _enforce_deadlines(now: datetime, batch: int) -> Turn:
    with transaction.atomic():
        rows = _pick(_deadlines_due(now), ["id"], batch)
    return sum(instance_enforce_deadline(row["id"]) for row in rows), len(rows)


def flag_stuck(now: datetime, batch: int) -> int:
    return _flag_stuck(now, batch)[0]


def _flag_stuck(now: datetime, batch: int) -> Turn:
    """Flag instances that made no progress within their definition's stuck-after.

    One UPDATE for the whole batch: its WHERE repeats the due condition, so an
    instance that made progress since the read is left alone."""
    due = Q(stuck=False, stuck_check_at__lte=now, state__in=ACTIVE_STATES)
    with transaction.atomic():
        # Picked on instance_stuck_check in its order alone: only unfinished
        # instances have a stuck_check_at (a transition to a terminal state
        # clears it), and naming the states too made PostgreSQL sort every
        # due row (23,000 at 1M instances: 0.3-0.9 s) for 500 of them. The
        # UPDATE below repeats the whole condition.
        rows = _pick(
            WorkflowInstance.objects.filter(
                stuck=False, stuck_check_at__lte=now
            ).order_by("stuck_check_at"),
            ["id", "last_progress_at", "state"],
            batch,
        )
        if not rows:
            return 0, 0
        seen = {row["id"]: row for row in rows}
        # The readable reason, per row, in the same statement (PostgreSQL).
        reason: Concat | Value = Concat(
            Value("no progress since "),
            Func(
                F("last_progress_at"),
                template="to_char(%(expressions)s AT TIME ZONE 'UTC', "
                "'YYYY-MM-DD HH24:MI:SS')",
                output_field=CharField(),
            ),
            Value(" UTC while "),
            F("state"),
            output_field=CharField(),
        )
        if connection.vendor != "postgresql":
            reason = Value("no progress")  # replaced per row below
        WorkflowInstance.objects.filter(due, pk__in=seen).update(
            stuck=True,
            stuck_kind=StuckKind.NO_PROGRESS,
            stuck_reason=reason,
            stuck_since=now,
            alert_due=True,
        )
        flagged = list(
            WorkflowInstance.objects.filter(
                pk__in=seen, stuck=True, stuck_since=now, stuck_kind="no_progress"
            ).values_list("id", flat=True)
        )
        reasons = {
            pk: f"no progress since {seen[pk]['last_progress_at']:%Y-%m-%d %H:%M:%S} "
            f"UTC while {seen[pk]['state']}"
            for pk in flagged
        }
        if connection.vendor != "postgresql":
            WorkflowInstance.objects.filter(
                pk__in=flagged, stuck_reason="no progress"
            ).update(
                stuck_reason=Case(
                    *(When(pk=pk, then=Value(t[:300])) for pk, t in reasons.items()),
                    default=F("stuck_reason"),
                )
            )
        engine_rows.insert(
            engine_rows.new(
                TransitionLog,
                {},
                instance_id=pk,
                transition="flag_stuck",
                reason=text,
                actor_kind=ActorKind.SYSTEM,
                actor_label=ACTOR.label,
            )
            for pk, text in reasons.items()
        )
    return len(flagged), len(rows)


class Budget:
    """How long one sweep may work through due rows (``SAGA_SWEEP_SECONDS``):
    a backlog is worked off over several short sweeps instead of making one
    sweep take seconds. Rows not reached stay due (picking them claimed
    nothing) and the next sweep takes them."""

    clock = staticmethod(time.monotonic)  # a test gives it a clock of its own

    def __init__(self, seconds: float | None = None) -> None:
        seconds = settings.SAGA_SWEEP_SECONDS if seconds is None else seconds
        self.until = self.clock() + seconds

    def spent(self) -> bool:
        return self.clock() >= self.until

    def left(self) -> float:
        return self.until - self.clock()


@dataclass
class Part:
    """One kind of sweeper work, done in turns of at most ``size`` rows (one
    pick and its writes each), at most ``cap`` (``SAGA_SWEEP_BATCH``) rows per
    sweep."""

    name: str
    turn: Callable[[datetime, int], Turn]
    size: int
    cap: int | None = None
    done: int = 0
    more: bool = True  # its last turn was full: more may be due
    row_seconds: float = 0.0  # its last turn's time per row picked


def _by_count(act: Callable[[datetime, int], int]) -> Callable[[datetime, int], Turn]:
    """A turn for work that counts only what it did (a full turn: more due)."""

    def turn(now: datetime, limit: int) -> Turn:
        done = act(now, limit)
        return done, done

    return turn


def _roll_up(now: datetime, hours: int) -> int:
    return activity.roll_up(now, max_hours=hours)


def _parts() -> list[Part]:
    """Every kind of work, in the order of a sweep's first round (flagging
    before alerts, so a newly stuck instance gets its alert in the same
    sweep). A turn of set-based work (one statement for the whole turn's
    rows) takes ``SAGA_SWEEP_CHUNK`` rows; of work done one instance at a
    time (an engine command each, about 10 ms) ``SAGA_SWEEP_MIN_ACTS``; of
    the activity chart's roll-up one hour (about 40 ms at 1,000,000
    instances)."""
    each = max(1, settings.SAGA_SWEEP_MIN_ACTS)
    chunk = max(1, settings.SAGA_SWEEP_CHUNK)
    return [
        Part("timeouts", _time_out_attempts, each),
        Part("timers", _wake_timers, each),
        Part("redispatched_steps", _redispatch_steps, chunk),
        Part("redispatched_instances", _redispatch_instances, chunk),
        Part("redispatched_bulk_jobs", _by_count(redispatch_bulk_jobs), chunk),
        Part("deadlines", _enforce_deadlines, each),
        Part("stuck", _flag_stuck, chunk),
        Part("approvals_expired", _by_count(approvals.expire_approvals), each),
        Part("alerts_resolved", _by_count(alerts.resolve_alerts), chunk),
        Part("alerts_opened", _by_count(alerts.open_alerts), chunk),
        # At most 6 hours per sweep, as before turns (a week's catch-up on a
        # new database is spread over many sweeps).
        Part("activity_hours", _by_count(_roll_up), 1, cap=6),
    ]


# Where the extra turns of this process's next sweep start: after the part
# that had the last one, so that time running out in the middle of a round
# does not cut the same kinds short sweep after sweep.
_next_extra_turn = 0


def _take_turn(
    part: Part, now: datetime, batch: int, left: float | None = None
) -> None:
    cap = batch if part.cap is None else min(part.cap, batch)
    limit = min(part.size, cap - part.done)
    if left is not None and part.row_seconds:
        # An extra turn takes the rows the time ``left`` allows at its last
        # turn's pace (at least one): a sweep ends about a row after its
        # budget, not a whole turn (ten deadline holds, 70-140 ms at 1M).
        limit = min(limit, max(1, int(left / part.row_seconds)))
    started = Budget.clock()
    done, picked = part.turn(now, limit)
    part.row_seconds = (Budget.clock() - started) / max(1, picked)
    part.done += done
    part.more = picked >= limit and part.done < cap


def work_due(now: datetime, batch: int, budget: Budget) -> dict[str, int]:
    """Share the sweep's time between the kinds of work: a first round in
    which every kind has a turn whatever the time (so a permanent backlog in
    one kind never starves another), then more turns, round robin among the
    kinds that have more due, each no larger than the time left allows,
    until ``budget`` is spent or ``batch`` rows of each are done. Returns the
    rows done per kind, and in ``cut_short`` how many kinds still had rows
    due when the time ran out (left for the next sweep)."""
    global _next_extra_turn
    parts = _parts()
    for part in parts:
        _take_turn(part, now, batch)
    turn = _next_extra_turn
    while not budget.spent() and any(part.more for part in parts):
        part = parts[turn % len(parts)]
        turn += 1
        if part.more:
            _take_turn(part, now, batch, budget.left())
    _next_extra_turn = turn % len(parts)
    return {
        **{part.name: part.done for part in parts},
        "cut_short": sum(part.more for part in parts),
    }


@metrics.timed_sweep
def sweep_all(batch: int | None = None) -> dict[str, int]:
    size = batch or settings.SAGA_SWEEP_BATCH
    now = db_now()
    return {
        **work_due(now, size, Budget()),
        # Last, on a clock of its own (SAGA_RETENTION_SWEEP_SECONDS): the
        # essential work above never waits behind a purge.
        "purged": retention.sweep(now),
    }
