"""Read-only selectors for the dashboard, written for millions of instances.

Nothing here counts a whole table on a page view. Counts of unfinished
instances are exact (they are few and indexed by state); finished ones are
counted over a recent window on the ``(state, last_progress_at)`` index; the
size of a filtered list is counted up to a bound (10,000 rows) and is the
planner's estimate (``EXPLAIN``) above it, never an unbounded ``COUNT(*)``.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
from collections import defaultdict
from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.core.exceptions import EmptyResultSet
from django.db import connection
from django.db.models import Aggregate, Count, DurationField, F, Q, QuerySet
from django.utils import timezone

from workflows_app.engine.blocking import BLOCKING, blocking_step, holding
from workflows_app.engine.stuck import STALLED
from workflows_app.models import (
    ACTIVE_STATES,
    TERMINAL_STATES,
    CompensationState,
    InstanceState,
    StepExecution,
    TransitionLog,
    WorkflowDefinition,
    WorkflowInstance,
)

# Display order of the state badges: the unfinished ones first.
ACTIVE_ORDER = ["accepted", "running", "needs_attention", "compensating"]
TERMINAL_ORDER = ["completed", "compensated", "cancelled", "failed"]
FAILURE_STATES = ["needs_attention", "compensating", "compensated", "failed"]
# Columns a list or queue row never shows: keep the JSON blobs out of the rows.
HEAVY = ("input", "outputs", "input_fingerprint", "idempotency_key")
# What the overview's recent failures show of an instance.
FAILURE_COLUMNS = (
    "definition_key",
    "business_key",
    "state",
    "attention_kind",
    "attention_reason",
    "last_progress_at",
    "version",
)

WINDOWS = {"24h": timedelta(hours=24), "7d": timedelta(days=7), "all": None}


@dataclasses.dataclass
class Counts:
    """Instances per state, overall and per definition key."""

    by_state: dict[str, int]
    by_definition: dict[str, dict[str, int]]
    stuck: int
    stuck_by_definition: dict[str, int]
    since: datetime | None


def state_counts(
    window: timedelta | None,
    definition_key: str | None = None,
    keys: list[str] | None = None,
) -> Counts:
    """Exact counts of unfinished instances (and stuck ones), plus finished
    instances whose last progress falls in ``window`` (all time when None).

    Naming every definition key (``keys``, a short list; read here when not
    given) as well as the states turns both into index conditions: see
    ``_per_key_and_state``. The stuck ones are counted from the partial
    index ``instance_stalled``."""
    if definition_key is not None:
        keys = [definition_key]
    elif keys is None:
        keys = list(
            WorkflowDefinition.objects.order_by()
            .values_list("key", flat=True)
            .distinct()
        )
    since = timezone.now() - window if window is not None else None
    by_state: dict[str, int] = defaultdict(int)
    by_definition: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for key, state, n in _per_key_and_state(keys, since):
        if n:
            by_state[state] += n
            by_definition[key][state] += n
    # Stuck without the holds (those are counted as needs attention): the
    # partial index instance_stalled (migration 0027) finds the rows.
    stuck = WorkflowInstance.objects.order_by().filter(STALLED)
    if definition_key is not None:
        stuck = stuck.filter(definition_key=definition_key)
    stuck_rows = stuck.values_list("definition_key").annotate(n=Count("*"))
    stuck_by_definition = dict(stuck_rows)
    return Counts(
        by_state=dict(by_state),
        by_definition={k: dict(v) for k, v in sorted(by_definition.items())},
        stuck=sum(stuck_by_definition.values()),
        stuck_by_definition=stuck_by_definition,
        since=since,
    )


def _per_key_and_state(
    keys: list[str], since: datetime | None
) -> Iterable[tuple[str, str, int]]:
    """(definition key, state, instances) for every unfinished state, and for
    every finished one whose last progress is ``since`` or later.

    On PostgreSQL one statement counts each (key, state) pair by itself, an
    index-only count of one index range: the unfinished ones in
    ``instance_active_covering`` (a partial index of just those rows, about
    45,000 at 1M instances), the finished ones in ``instance_def_state_times``
    (its ``last_progress_at`` range). At 1M instances that is 1.7 and 3.6 ms
    where one ``GROUP BY`` over the same ranges took 3.0 and 6.2 ms (it
    hashes every row); the pairs cost an index descent each (~20 us)."""
    if not keys:
        return []
    if connection.vendor != "postgresql":
        base = WorkflowInstance.objects.order_by().filter(definition_key__in=keys)
        finished = base.filter(state__in=TERMINAL_STATES)
        if since is not None:
            finished = finished.filter(last_progress_at__gte=since)
        return [
            row
            for part in (base.filter(state__in=ACTIVE_STATES), finished)
            for row in part.values_list("definition_key", "state").annotate(
                n=Count("*")
            )
        ]
    active = sorted(str(state) for state in ACTIVE_STATES)
    # The literal list lets the planner prove the partial index's condition.
    active_list = ", ".join(f"'{state}'" for state in active)
    table = connection.ops.quote_name(WorkflowInstance._meta.db_table)
    window = "AND last_progress_at >= %s" if since is not None else ""
    sql = f"""
        SELECT k, s, CASE WHEN s = ANY(%s) THEN (
            SELECT count(*) FROM {table}
            WHERE definition_key = k AND state = s AND state IN ({active_list})
        ) ELSE (
            SELECT count(*) FROM {table}
            WHERE definition_key = k AND state = s {window}
        ) END
        FROM unnest(%s::text[]) AS k CROSS JOIN unnest(%s::text[]) AS s
    """  # table name and state names only: the values are parameters
    params: list[Any] = [active]
    if since is not None:
        params.append(since)
    params += [list(keys), active + sorted(str(s) for s in TERMINAL_STATES)]
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return [(key, state, int(n)) for key, state, n in cursor.fetchall()]


def stuck_queue(limit: int = 25) -> list[WorkflowInstance]:
    """Stuck instances, longest stuck first (partial index ``instance_stuck``)."""
    return list(
        WorkflowInstance.objects.filter(stuck=True)
        .select_related("definition")
        .defer(*HEAVY)
        .order_by("stuck_since", "id")[:limit]
    )


# What the list shows of the step that went wrong. Every FSM field must be
# loaded: django-fsm reads them when the object is made.
_FAILED_STEP_COLUMNS = (
    "instance_id",
    "name",
    "state",
    "compensation_state",
    "last_error",
    "position",
)


def recent_failures(limit: int = 10) -> list[WorkflowInstance]:
    """The latest instances that went wrong: held, compensating or compensated,
    or closed as failed. One indexed top-N per state, merged in one query
    that reads the rows themselves: the columns the list shows (and
    ``version``, which the model reads when it is loaded)."""
    parts = [
        WorkflowInstance.objects.filter(state=state)
        .only(*FAILURE_COLUMNS)
        .order_by("-last_progress_at")[:limit]
        for state in FAILURE_STATES
    ]
    if connection.features.supports_slicing_ordering_in_compound:
        rows = list(parts[0].union(*parts[1:], all=True))
    else:  # SQLite: no LIMIT inside UNION
        rows = [row for part in parts for row in part]
    instances = sorted(rows, key=lambda i: i.last_progress_at, reverse=True)[:limit]
    # Why each went wrong, from one query of their failed steps (actions or
    # undos) in position order: a held instance's step is the one that holds
    # it now (``holding``: its action, or its undo that failed, as on the
    # failure groups and the held queue); any other's its first failed or
    # unknown step. ``holding`` over these rows is the rule ``holding_steps``
    # states as SQL, without that query's two correlated subqueries to build.
    steps_of: dict[Any, list[StepExecution]] = defaultdict(list)
    for step in (
        StepExecution.objects.filter(instance_id__in=[i.pk for i in instances])
        .filter(Q(state__in=BLOCKING) | Q(compensation_state=CompensationState.FAILED))
        .order_by("position")  # the default ordering joins the instances
        .only(*_FAILED_STEP_COLUMNS)
    ):
        steps_of[step.instance_id].append(step)
    for instance in instances:
        steps = steps_of[instance.pk]
        shown = blocking_step(steps)
        hold = holding(instance, steps)
        if hold is not None and hold.step is not None:
            shown = hold.step
            shown.held_by = hold.held_by  # type: ignore[attr-defined]
        # Read by the list template; not a model field.
        instance.failed_step = shown  # type: ignore[attr-defined]
    return instances


def count_or_estimate(qs: QuerySet[Any]) -> tuple[int, bool]:
    """How many rows ``qs`` has, and whether that is exact. The planner's
    estimate when it is above ``SAGA_EXACT_COUNT_UP_TO`` and the table has
    statistics; otherwise a count that stops reading after that many rows
    (so a small or never-analysed table never shows a wrong "about")."""
    if connection.vendor != "postgresql":
        return qs.count(), True  # the embedded SQLite default holds small data
    limit = int(getattr(settings, "SAGA_EXACT_COUNT_UP_TO", 10_000))
    estimate = estimate_count(qs)
    if estimate > limit and _analysed(qs.model._meta.db_table):
        return estimate, False
    counted = qs.order_by().values("pk")[: limit + 1].count()
    if counted <= limit:
        return counted, True
    return max(estimate, counted), False


def _analysed(table: str) -> bool:
    """Whether PostgreSQL has statistics for ``table`` (``reltuples`` is -1
    until the first ANALYZE or autovacuum)."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT reltuples FROM pg_class WHERE oid = %s::regclass", [table]
        )
        row = cursor.fetchone()
    return row is not None and row[0] >= 0


def estimate_count(qs: QuerySet[Any]) -> int:
    """The planner's row estimate for ``qs`` on PostgreSQL (no scan); an exact
    count elsewhere (the embedded SQLite default holds small data)."""
    if connection.vendor != "postgresql":
        return qs.count()
    try:
        sql, params = qs.order_by().values("pk").query.sql_with_params()
    except EmptyResultSet:  # e.g. a search that matched no id: pk IN ()
        return 0
    with connection.cursor() as cursor:
        cursor.execute(f"EXPLAIN (FORMAT JSON) {sql}", params)
        plan = cursor.fetchone()[0]
    if isinstance(plan, str):
        plan = json.loads(plan)
    return int(plan[0]["Plan"]["Plan Rows"])


# -- definitions ---------------------------------------------------------------


class Percentile(Aggregate):
    """PostgreSQL ``percentile_cont(p) WITHIN GROUP (ORDER BY expr)``."""

    function = "PERCENTILE_CONT"
    template = "%(function)s(%(percentile)s) WITHIN GROUP (ORDER BY %(expressions)s)"

    def __init__(self, expression: Any, percentile: float, **extra: Any) -> None:
        super().__init__(expression, percentile=float(percentile), **extra)


@dataclasses.dataclass
class Health:
    window: timedelta
    counts: Counts
    finished: int
    went_wrong: int
    median_duration: timedelta | None

    @property
    def failure_rate(self) -> float | None:
        return self.went_wrong / self.finished if self.finished else None


def definition_health(key: str, window: timedelta = timedelta(days=1)) -> Health:
    """Counts by state, the share of finished instances that did not complete,
    and the median accept-to-finish time of the completed ones, over ``window``."""
    counts = state_counts(window, definition_key=key)
    terminal = {s: counts.by_state.get(s, 0) for s in TERMINAL_ORDER}
    completed = WorkflowInstance.objects.filter(
        definition_key=key,
        state=InstanceState.COMPLETED,
        last_progress_at__gte=counts.since,
        finished_at__isnull=False,
    ).order_by()
    took = F("finished_at") - F("accepted_at")
    if connection.vendor == "postgresql":
        median = completed.aggregate(
            m=Percentile(took, 0.5, output_field=DurationField())
        )["m"]
    else:
        values = list(completed.annotate(took=took).values_list("took", flat=True))
        median = statistics.median(values) if values else None
    return Health(
        window=window,
        counts=counts,
        finished=sum(terminal.values()),
        went_wrong=terminal["compensated"] + terminal["failed"],
        median_duration=median,
    )


def definition_versions(key: str) -> list[WorkflowDefinition]:
    return list(
        WorkflowDefinition.objects.filter(key=key)
        .annotate(step_count=Count("steps"))
        .order_by("-version")
    )


def history_for(instance: WorkflowInstance, limit: int) -> tuple[list[Any], bool]:
    """The newest ``limit`` timeline rows in order, and whether older ones exist."""
    rows = list(
        TransitionLog.objects.filter(instance=instance)
        .select_related("user")
        .order_by("-id")[: limit + 1]
    )
    return rows[:limit][::-1], len(rows) > limit
