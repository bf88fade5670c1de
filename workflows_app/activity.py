"""What happened per hour: instances started, completed, compensated and
held, and how long accepted-to-completed took, per definition.

Hours that are over are rolled up by the sweeper into ``ActivityHour``
(each hour once, from three indexed range scans); the charts read those rows
and count only the hours not rolled up yet (the current one) live. Durations
are kept as counts per bucket, so percentiles over any window merge hours
exactly to the bucket: a p95 reads "at most 2.5 s", never a made-up figure.
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta

from django.db import transaction
from django.db.models import (
    Case,
    Count,
    DurationField,
    ExpressionWrapper,
    F,
    Q,
    Value,
    When,
)
from django.db.models.functions import TruncHour

from workflows_app.models import (
    ActivityHour,
    ActivityRollup,
    AttentionKind,
    CompensationState,
    InstanceState,
    StepExecution,
    StepState,
    TransitionLog,
    WorkflowInstance,
)
from workflows_app.models.runtime import ACTIVE_STEP

HOUR = timedelta(hours=1)
# An hour is final this long after it ends (a transaction that started in
# it may commit a little later).
GRACE = timedelta(minutes=5)
# How far back the rollup goes (the charts show at most 7 days).
KEEP = timedelta(days=8)
# At most this much is counted live on a page: the hours before it come from
# the rollup, or show as not summarised yet (right after a deployment, until
# the sweeper has caught up), never as a scan of days of instances.
LIVE_AT_MOST = 2 * HOUR
# Upper bounds, in seconds, of the duration buckets; one more bucket above.
DURATION_BOUNDS: tuple[float, ...] = (
    0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 4 * 3600, 86400,
)  # fmt: skip
MEASURES = ("started", "completed", "compensated", "held")


@dataclasses.dataclass
class Counts:
    started: int = 0
    completed: int = 0
    compensated: int = 0
    held: int = 0
    durations: list[int] = dataclasses.field(
        default_factory=lambda: [0] * (len(DURATION_BOUNDS) + 1)
    )

    def add(self, other: Counts) -> None:
        for name in MEASURES:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        merged = other.durations + [0] * (len(self.durations) - len(other.durations))
        self.durations = [a + b for a, b in zip(self.durations, merged, strict=False)]


def hour_of(moment: datetime) -> datetime:
    return moment.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


DURATION = ExpressionWrapper(
    F("finished_at") - F("accepted_at"), output_field=DurationField()
)


def _duration_bucket() -> Case:
    """The bucket of the ``duration`` annotation."""
    return Case(
        *[
            When(duration__lte=timedelta(seconds=bound), then=Value(i))
            for i, bound in enumerate(DURATION_BOUNDS)
        ],
        default=Value(len(DURATION_BOUNDS)),
    )


def count_hours(start: datetime, end: datetime) -> dict[tuple[datetime, str], Counts]:
    """Live counts per (hour, definition) for ``start <= t < end``."""
    found: dict[tuple[datetime, str], Counts] = defaultdict(Counts)
    hour = TruncHour
    started = (
        WorkflowInstance.objects.order_by()
        .filter(accepted_at__gte=start, accepted_at__lt=end)
        .annotate(h=hour("accepted_at", tzinfo=UTC))
        .values_list("h", "definition_key")
        .annotate(n=Count("*"))
    )
    for h, key, n in started:
        found[h, key].started += n
    finished = (
        WorkflowInstance.objects.order_by()
        .filter(
            finished_at__gte=start,
            finished_at__lt=end,
            state__in=[InstanceState.COMPLETED, InstanceState.COMPENSATED],
        )
        .annotate(h=hour("finished_at", tzinfo=UTC), duration=DURATION)
        .annotate(bucket=_duration_bucket())
        .values_list("h", "definition_key", "state", "bucket")
        .annotate(n=Count("*"))
    )
    for h, key, state, bucket, n in finished:
        counts = found[h, key]
        if state == InstanceState.COMPENSATED:
            counts.compensated += n
        else:
            counts.completed += n
            counts.durations[bucket] += n
    held = (
        TransitionLog.objects.order_by()
        .filter(
            created_at__gte=start,
            created_at__lt=end,
            field="state",
            target=InstanceState.NEEDS_ATTENTION,
        )
        .annotate(h=hour("created_at", tzinfo=UTC))
        .values_list("h", "instance__definition_key")
        .annotate(n=Count("*"))
    )
    for h, key, n in held:
        found[h, key].held += n
    return dict(found)


def roll_up(now: datetime, max_hours: int = 6) -> int:
    """Write the hours that are over and not rolled up yet (at most
    ``max_hours`` per call, oldest first); returns how many. Two sweepers
    never do the same hour: the one that cannot lock the state row skips."""
    last_final = hour_of(now - GRACE)  # hours before this one are final
    with transaction.atomic():
        ActivityRollup.objects.get_or_create(pk=1)
        state = (
            ActivityRollup.objects.select_for_update(skip_locked=True)
            .filter(pk=1)
            .first()
        )
        if state is None:
            return 0
        start = max(state.rolled_until or hour_of(now - KEEP), hour_of(now - KEEP))
        end = min(last_final, start + max_hours * HOUR)
        if end <= start:
            return 0
        rows = [
            ActivityHour(
                hour=h,
                definition_key=key,
                **{m: getattr(c, m) for m in MEASURES},
                durations=c.durations,
            )
            for (h, key), c in count_hours(start, end).items()
        ]
        ActivityHour.objects.bulk_create(
            rows,
            update_conflicts=True,
            unique_fields=["hour", "definition_key"],
            update_fields=[*MEASURES, "durations"],
        )
        ActivityHour.objects.filter(hour__lt=hour_of(now - KEEP)).delete()
        state.rolled_until = end
        state.save(update_fields=["rolled_until"])
        return int((end - start) / HOUR)


# -- reading, for the charts ------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Window:
    name: str
    label: str
    length: timedelta
    interval: timedelta


WINDOWS = {
    "24h": Window("24h", "last 24 hours, per hour", timedelta(hours=24), HOUR),
    "7d": Window("7d", "last 7 days, per 6 hours", timedelta(days=7), 6 * HOUR),
}


@dataclasses.dataclass
class Activity:
    window: Window
    intervals: list[datetime]  # start of each interval, oldest first
    totals: list[Counts]  # per interval, every definition together
    per_definition: dict[str, Counts]  # the whole window
    live_from: datetime  # counted live from here (not rolled up yet)
    # Hours the sweeper has not summarised yet (shown as gaps, not zeros).
    missing_from: datetime | None = None
    missing_until: datetime | None = None

    def series(self, measure: str) -> list[tuple[datetime, int]]:
        return [
            (i, getattr(c, measure))
            for i, c in zip(self.intervals, self.totals, strict=True)
        ]

    def percentiles(self) -> list[tuple[str, int, float | None, float | None]]:
        """(definition, completed, p50 and p95 upper bounds in seconds)."""
        return [
            (key, c.completed, quantile(c.durations, 0.5), quantile(c.durations, 0.95))
            for key, c in sorted(self.per_definition.items())
        ]


def quantile(buckets: list[int], q: float) -> float | None:
    """The upper bound of the bucket holding the q-quantile (inf above the
    last bound); None without data."""
    total = sum(buckets)
    if not total:
        return None
    rank = math.ceil(q * total)
    seen = 0
    for i, n in enumerate(buckets):
        seen += n
        if seen >= rank:
            return DURATION_BOUNDS[i] if i < len(DURATION_BOUNDS) else math.inf
    return math.inf


def activity(window: Window, now: datetime) -> Activity:
    """Per interval of ``window`` up to ``now``: rolled-up hours, plus the
    hours after the rollup counted live."""
    first = hour_of(now - window.length + HOUR)
    step = int(window.interval / HOUR)
    # Interval boundaries aligned to UTC multiples of the interval.
    epoch = datetime(2000, 1, 1, tzinfo=UTC)
    first -= ((first - epoch) // HOUR % step) * HOUR
    intervals = []
    moment = first
    while moment <= hour_of(now):
        intervals.append(moment)
        moment += window.interval
    state = ActivityRollup.objects.filter(pk=1).first()
    rolled_until = state.rolled_until if state and state.rolled_until else first
    live_from = max(rolled_until, first, hour_of(now) - LIVE_AT_MOST + HOUR)
    missing_from = max(rolled_until, first)
    missing = (missing_from, live_from) if missing_from < live_from else (None, None)
    hours: Iterable[tuple[datetime, str, Counts]] = [
        (
            row.hour,
            row.definition_key,
            Counts(
                **{m: getattr(row, m) for m in MEASURES},
                durations=list(row.durations),
            ),
        )
        for row in ActivityHour.objects.filter(hour__gte=first, hour__lt=live_from)
    ]
    live = count_hours(live_from, now + HOUR)
    totals = [Counts() for _ in intervals]
    per_definition: dict[str, Counts] = defaultdict(Counts)
    for h, key, counts in [*hours, *((h, k, c) for (h, k), c in live.items())]:
        index = int((h - first) / window.interval)
        if 0 <= index < len(totals):
            totals[index].add(counts)
            per_definition[key].add(counts)
    return Activity(
        window, intervals, totals, dict(per_definition), live_from, *missing
    )


# -- where the unfinished instances of a definition are now ----------------------

STEP_PLACES = ("running", "waiting", "held", "undoing")


def _place() -> Case:
    """Where a step row puts its instance: at work on it, waiting on it (a
    callback or event), held by it (what a person must look at), or undoing
    it. Other rows (done, not reached) put it nowhere."""
    instance = "instance__state"
    compensation_hold = Q(instance__attention_kind=AttentionKind.COMPENSATION_FAILED)
    return Case(
        When(
            Q(**{instance: InstanceState.RUNNING})
            & Q(state__in=[StepState.SCHEDULED, StepState.RUNNING, StepState.RETRYING]),
            then=Value("running"),
        ),
        When(
            Q(**{instance: InstanceState.RUNNING}) & Q(state=StepState.WAITING),
            then=Value("waiting"),
        ),
        When(
            Q(**{instance: InstanceState.NEEDS_ATTENTION})
            & compensation_hold
            & Q(compensation_state=CompensationState.FAILED),
            then=Value("held"),
        ),
        When(
            Q(**{instance: InstanceState.NEEDS_ATTENTION})
            & ~compensation_hold
            & Q(state__in=[StepState.FAILED, StepState.UNKNOWN]),
            then=Value("held"),
        ),
        When(
            Q(**{instance: InstanceState.COMPENSATING})
            & Q(
                compensation_state__in=[
                    CompensationState.PENDING,
                    CompensationState.RUNNING,
                    CompensationState.RETRYING,
                ]
            ),
            then=Value("undoing"),
        ),
        default=Value(""),
    )


def step_places(definition_key: str) -> dict[str, dict[str, int]]:
    """Per step name: how many unfinished instances are running, waiting,
    held or undoing there now (every version of the definition)."""
    rows = (
        StepExecution.objects.order_by()
        .filter(
            instance__definition_key=definition_key,
            instance__state__in=[
                InstanceState.RUNNING,
                InstanceState.NEEDS_ATTENTION,
                InstanceState.COMPENSATING,
            ],
        )
        # The partial index step_exec_active_covering: a few thousand rows,
        # not millions, read from the index alone.
        .filter(ACTIVE_STEP)
        .annotate(place=_place())
        .exclude(place="")
        .values_list("name", "place")
        .annotate(n=Count("*"))
    )
    found: dict[str, dict[str, int]] = defaultdict(
        lambda: dict.fromkeys(STEP_PLACES, 0)
    )
    for name, place, n in rows:
        found[name][place] += n
    return dict(found)
