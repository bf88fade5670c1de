"""Counters and histograms incremented in the process where the event happens.

Under gunicorn and Celery prefork every process writes its own values into
memory-mapped files under ``PROMETHEUS_MULTIPROC_DIR`` (set by settings before
prometheus-client is first imported); a scrape merges the files of all
processes of the machine. Recording is a dictionary update in a mapped file:
no query, no socket, safe on the engine's hot path.

Transitions are counted from the history rows a :class:`Change` wrote, once
its transaction has committed (a rolled-back change counts nothing), so the
figures agree with the audited timeline.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any, ParamSpec

from prometheus_client import Counter, Gauge, Histogram, values

from workflows_app.models import TERMINAL_STATES

P = ParamSpec("P")

# prometheus-client chooses where values live when it is first imported;
# settings has put PROMETHEUS_MULTIPROC_DIR into the environment by now (the
# models are loaded), so correct a choice made before settings were read.
if (
    os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    and values.ValueClass is values.MutexValue
):
    values.ValueClass = values.get_value_class()

# Accept-to-finish: a no-op saga takes tens of milliseconds, one waiting on
# people or long backoffs takes days.
DURATION_BUCKETS = (
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
    120,
    300,
    600,
    1800,
    3600,
    3 * 3600,
    12 * 3600,
    86400,
    3 * 86400,
    7 * 86400,
)
SWEEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
BATCH_BUCKETS = (0, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000)

ACCEPTED = Counter(
    "saga_instances_accepted",
    "Workflow instances accepted (durably recorded, not yet started).",
    ["definition"],
)
TRANSITIONS = Counter(
    "saga_transitions",
    "State transitions written to the audited history, by the entity they "
    "moved (instance, step, compensation), transition name and target state.",
    ["definition", "entity", "transition", "target", "actor"],
)
NOTES = Counter(
    "saga_timeline_notes",
    "History rows that changed no state (ignored duplicates, late outcomes, "
    "alerts opened and resolved).",
    ["definition", "note"],
)
ATTEMPTS_STARTED = Counter(
    "saga_attempts_started",
    "Attempts claimed (action or compensation) before the participant is called.",
    ["definition", "direction"],
)
ATTEMPTS = Counter(
    "saga_attempts",
    "Attempt outcomes: succeeded, waiting (for a callback or event), failed "
    "(retried later), failed_final (not retried: attempts used up, or the "
    "instance no longer goes forward), failed_permanent, timed_out, abandoned "
    "(the instance was closed as failed while the attempt was in flight).",
    ["definition", "direction", "outcome"],
)
WORKER_RECORDS = Counter(
    "saga_worker_records",
    "Outcomes a worker recorded for the attempt it claimed, by the way it "
    "wrote them: kept (one round trip, deciding from what it kept of its "
    "last transaction), changed (the rows had changed meanwhile, so it "
    "recorded under the lock after all), needs_read (the decision needed a "
    "read first: under the lock), read (under the lock: nothing was kept).",
    ["way"],
)
FINISHED = Counter(
    "saga_instances_finished",
    "Instances that reached a terminal state.",
    ["definition", "state"],
)
DURATION = Histogram(
    "saga_instance_duration_seconds",
    "Accept-to-finish time of instances, observed when they reach a terminal state.",
    ["definition", "state"],
    buckets=DURATION_BUCKETS,
)
SWEEP_SECONDS = Histogram(
    "saga_sweep_duration_seconds",
    "Wall time of one sweeper run (all its parts).",
    buckets=SWEEP_BUCKETS,
)
SWEEP_BATCH = Histogram(
    "saga_sweep_batch_size",
    "Rows one sweeper run handled, per part (timeouts, redispatched steps, ...).",
    ["part"],
    buckets=BATCH_BUCKETS,
)
SWEEP_FAILURES = Counter(
    "saga_sweep_failures", "Sweeper runs that raised an error.", []
)
# The newest across processes: a sweeper that stopped shows as a growing gap.
SWEEP_LAST = Gauge(
    "saga_sweep_last_success_timestamp_seconds",
    "Unix time of the last sweeper run that finished without an error.",
    [],
    multiprocess_mode="max",
)
ALERT_DELIVERY_FAILED = Counter(
    "saga_alert_deliveries_failed",
    "Alert deliveries that failed (each is retried with backoff).",
    ["channel"],
)

# Step transitions that end an action attempt, and what the attempt's outcome
# was; a "retry" out of ``unknown`` schedules the next try of an attempt
# already counted as timed out, so it is not listed.
_ACTION_OUTCOMES = {
    ("succeed", "running"): "succeeded",
    ("succeed", "waiting"): "succeeded",
    ("wait", "running"): "waiting",
    ("retry", "running"): "failed",
    ("retry", "waiting"): "failed",
    ("time_out", "running"): "timed_out",
    ("time_out", "waiting"): "timed_out",
}
_CLAIMS = {"begin_attempt": "action", "begin_compensation_attempt": "compensation"}
_COMPENSATION_OUTCOMES = {
    "compensation_succeed": "succeeded",
    "compensation_retry": "failed",
    "compensation_fail": "failed_final",
}


@functools.lru_cache(maxsize=8192)
def _child(metric: Any, *labels: str) -> Any:
    """``metric.labels(...)``, remembered: the label check and the registry
    lock are paid once per series, not on every transition."""
    return metric.labels(*labels)


def _entity(row: Any) -> str:
    if row.field == "compensation_state":
        return "compensation"
    return "step" if row.step_id else "instance"


def _attempt_outcome(row: Any) -> tuple[str, str] | None:
    """(direction, outcome) when this history row ends an attempt."""
    if row.field == "compensation_state":
        outcome = _COMPENSATION_OUTCOMES.get(row.transition)
        return ("compensation", outcome) if outcome else None
    if not row.step_id or row.field != "state":
        return None
    if row.transition == "fail" and row.source in {"running", "waiting"}:
        permanent = (row.data or {}).get("permanent")
        return "action", "failed_permanent" if permanent else "failed_final"
    if row.transition == "time_out" and (row.data or {}).get("abandoned"):
        # Closing an instance as failed fences its attempt in flight.
        return "action", "abandoned"
    outcome = _ACTION_OUTCOMES.get((row.transition, row.source))
    return ("action", outcome) if outcome else None


def record_rows(
    definition: str,
    rows: Iterable[Any],
    *,
    state: str,
    accepted_at: datetime | None,
    finished_at: datetime | None,
) -> None:
    """Count the committed history rows of one instance (``TransitionLog``
    objects, unsaved or saved); observe its duration if it just finished."""
    finished = False
    for row in rows:
        if not row.field:
            _child(NOTES, definition, row.transition).inc()
            continue
        if row.transition == "accept":
            _child(ACCEPTED, definition).inc()
            continue
        entity = _entity(row)
        _child(
            TRANSITIONS, definition, entity, row.transition, row.target, row.actor_kind
        ).inc()
        if claimed := _CLAIMS.get(row.transition):
            _child(ATTEMPTS_STARTED, definition, claimed).inc()
        elif ended := _attempt_outcome(row):
            _child(ATTEMPTS, definition, *ended).inc()
        if entity == "instance" and row.target in TERMINAL_STATES:
            finished = True
    if finished and state in TERMINAL_STATES:
        _child(FINISHED, definition, state).inc()
        if accepted_at is not None and finished_at is not None:
            took = (finished_at - accepted_at).total_seconds()
            _child(DURATION, definition, state).observe(max(0.0, took))


def recorder(instance: Any, rows: list[Any]) -> Callable[[], None]:
    """An on-commit callback that counts ``rows``; the instance's values are
    read now, since the same object may change again before the commit."""
    return functools.partial(
        record_rows,
        instance.definition_key,
        rows,
        state=instance.state,
        accepted_at=instance.accepted_at,
        finished_at=instance.finished_at,
    )


def timed_sweep(
    sweep: Callable[P, dict[str, int]],
) -> Callable[P, dict[str, int]]:
    """Time a sweeper run and record how many rows each of its parts handled."""

    @functools.wraps(sweep)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> dict[str, int]:
        started = time.perf_counter()
        try:
            result = sweep(*args, **kwargs)
        except BaseException:
            SWEEP_FAILURES.inc()
            raise
        finally:
            SWEEP_SECONDS.observe(time.perf_counter() - started)
        for part, count in result.items():
            SWEEP_BATCH.labels(part).observe(count)
        SWEEP_LAST.set(time.time())
        return result

    return wrapper


def worker_recorded(way: str) -> None:
    _child(WORKER_RECORDS, way).inc()


def alert_delivery_failed(channel: str, count: int = 1) -> None:
    """A delivery attempt failed (``count`` alerts rode on it, e.g. a digest)."""
    ALERT_DELIVERY_FAILED.labels(channel).inc(count)
