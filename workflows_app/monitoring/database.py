"""Gauges read from the database at scrape time, cached for a few seconds.

What is true of the whole site (how many instances are in each state, how
old the oldest unclaimed work is, how far a bulk job got) is read from the
database, the one source of truth, instead of being tracked by processes that
come and go. Every query is one indexed aggregate:

- instances by definition and state: ``GROUP BY`` on the
  ``(definition_key, state, last_progress_at)`` index (index-only), over the
  unfinished and the recently finished ones only (see ``counts``);
- held and stuck: the ``state`` index and the partial ``stuck`` indexes;
- queue lag: the partial ``redispatch_at`` index, which holds exactly the
  work that was sent and not claimed yet;
- alerts and bulk jobs: partial indexes over the open ones.

The result is cached per process for ``SAGA_METRICS_CACHE_SECONDS``, so
scrapes from several Prometheus servers (or a dashboard refreshing) cost one
round of queries per interval and process.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta

from django.conf import settings
from django.db import Error as DatabaseError
from django.db.models import (
    Count,
    DateTimeField,
    DurationField,
    ExpressionWrapper,
    F,
    Min,
    Q,
    Value,
)
from django.db.models.functions import Coalesce, Least, Power
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from workflows_app.engine.locking import db_now
from workflows_app.engine.sweeps import MAX_BACKOFF_DOUBLINGS
from workflows_app.models import (
    Alert,
    BulkJob,
    BulkJobItem,
    CompensationState,
    InstanceState,
    StepExecution,
    StepState,
    WebhookDelivery,
    WorkflowInstance,
)
from workflows_app.monitoring.counts import InstanceCounts

log = logging.getLogger(__name__)
# Remembers the finished instances' base count between scrapes; used under
# the collector's lock.
_COUNTS = InstanceCounts()
ACTIVE_JOB_STATES = [
    BulkJob.Status.QUEUED,
    BulkJob.Status.RUNNING,
    BulkJob.Status.PAUSED,
]


def _instances(now: datetime) -> Iterator[GaugeMetricFamily]:
    by_state = GaugeMetricFamily(
        "saga_instances",
        "Workflow instances by definition and state (all time).",
        labels=["definition", "state"],
    )
    for (key, state), n in _COUNTS.read(now).items():
        by_state.add_metric([key, state], n)
    yield by_state

    held = GaugeMetricFamily(
        "saga_instances_held",
        "Instances waiting on a person (needs_attention), by why they wait.",
        labels=["definition", "kind"],
    )
    rows = (
        WorkflowInstance.objects.order_by()
        .filter(state=InstanceState.NEEDS_ATTENTION)
        .values_list("definition_key", "attention_kind")
        .annotate(n=Count("*"))
    )
    for key, kind, n in rows:
        held.add_metric([key, kind or "unknown"], n)
    yield held

    stuck = GaugeMetricFamily(
        "saga_instances_stuck",
        "Unfinished instances flagged stuck (no progress in time, or held).",
        labels=["definition"],
    )
    rows = (
        WorkflowInstance.objects.order_by()
        .filter(stuck=True)
        .values_list("definition_key")
        .annotate(n=Count("*"))
    )
    for key, n in rows:
        stuck.add_metric([key], n)
    yield stuck

    oldest = WorkflowInstance.objects.filter(stuck=True).aggregate(
        at=Min("stuck_since")
    )["at"]
    yield GaugeMetricFamily(
        "saga_stuck_oldest_age_seconds",
        "How long the longest-stuck instance has been stuck (0 when none).",
        value=_seconds_since(now, oldest),
    )


def _queue_lag(now: datetime) -> Iterator[GaugeMetricFamily]:
    """Work that is due and not claimed: the sign of too few workers or a
    broker that lost messages (until the sweeper re-sends them)."""
    lease = timedelta(seconds=settings.SAGA_REDISPATCH_AFTER)
    # When the work was last sent: the sweeper's n-th re-send set
    # redispatch_at that lease times 2**n later (capped, see sweeps).
    waits = Value(lease) * Power(2, Least(F("redispatches"), MAX_BACKOFF_DOUBLINGS))
    sent_at = ExpressionWrapper(
        F("redispatch_at") - ExpressionWrapper(waits, output_field=DurationField()),
        output_field=DateTimeField(),
    )
    # A retry is due at next_attempt_at; a first attempt since it was sent.
    due_at = Coalesce("next_attempt_at", sent_at)
    claimable = Q(
        state__in=[StepState.SCHEDULED, StepState.RETRYING],
        instance__state=InstanceState.RUNNING,
    ) | Q(
        compensation_state__in=[CompensationState.PENDING, CompensationState.RETRYING],
        instance__state=InstanceState.COMPENSATING,
    )
    steps = (
        StepExecution.objects.order_by()
        .filter(redispatch_at__isnull=False)
        .filter(claimable)
        .annotate(due_at=due_at)
        .filter(due_at__lte=now)
        .aggregate(n=Count("id"), oldest=Min("due_at"))
    )
    # An accepted instance is due at once; its last progress is its acceptance.
    starts = WorkflowInstance.objects.filter(state=InstanceState.ACCEPTED).aggregate(
        n=Count("*"), oldest=Min("last_progress_at")
    )
    lag = GaugeMetricFamily(
        "saga_queue_lag_seconds",
        "Age of the oldest work that is due but not claimed by a worker: an "
        "attempt (first try or retry) or the start of an accepted instance.",
        labels=["work"],
    )
    due = GaugeMetricFamily(
        "saga_queue_due",
        "Work that is due but not claimed by a worker.",
        labels=["work"],
    )
    for work, row in (("attempt", steps), ("start", starts)):
        lag.add_metric([work], _seconds_since(now, row["oldest"]))
        due.add_metric([work], row["n"])
    yield lag
    yield due


def _alerts(now: datetime) -> Iterator[GaugeMetricFamily]:
    open_alerts = GaugeMetricFamily(
        "saga_alerts_open", "Alerts not resolved yet, by kind.", labels=["kind"]
    )
    failing = GaugeMetricFamily(
        "saga_alerts_undelivered",
        "Open alerts whose last delivery attempt failed (retried with backoff).",
        labels=["kind"],
    )
    rows = (
        Alert.objects.order_by()
        .filter(resolved_at__isnull=True)
        .values_list("kind")
        .annotate(n=Count("*"), failed=Count("id", filter=~Q(last_send_error="")))
    )
    for kind, n, failed in rows:
        open_alerts.add_metric([kind], n)
        failing.add_metric([kind], failed)
    yield open_alerts
    yield failing
    webhooks = GaugeMetricFamily(
        "saga_webhooks_failing",
        "Webhook deliveries not accepted yet after at least one try "
        "(retried with backoff), by event.",
        labels=["event"],
    )
    for event, n in (
        WebhookDelivery.objects.order_by()
        .filter(delivered_at__isnull=True, attempts__gt=0)
        .values_list("event")
        .annotate(n=Count("*"))
    ):
        webhooks.add_metric([event], n)
    yield webhooks


def _bulk_jobs(now: datetime) -> Iterator[GaugeMetricFamily]:
    jobs = GaugeMetricFamily(
        "saga_bulk_jobs", "Bulk jobs by status.", labels=["status"]
    )
    for status, n in (
        BulkJob.objects.order_by().values_list("status").annotate(n=Count("*"))
    ):
        jobs.add_metric([status], n)
    yield jobs
    items = GaugeMetricFamily(
        "saga_bulk_job_items",
        "Items of unfinished bulk jobs (queued, running, paused) by outcome; "
        "pending items are the work left (always reported, 0 when none).",
        # Not "job": Prometheus reserves that label for the scrape job.
        labels=["bulk_job", "action", "status", "outcome"],
    )
    rows = (
        BulkJobItem.objects.order_by()
        .filter(job__status__in=ACTIVE_JOB_STATES)
        .values_list("job_id", "job__action", "job__status", "outcome")
        .annotate(n=Count("*"))
    )
    pending: dict[tuple[str, str, str], int] = {}
    for job, action, status, outcome, n in rows:
        key = (str(job), action, status)
        if outcome == BulkJobItem.Outcome.PENDING:
            pending[key] = n
        else:
            pending.setdefault(key, 0)
            items.add_metric([*key, outcome], n)
    for key, n in pending.items():
        items.add_metric([*key, BulkJobItem.Outcome.PENDING], n)
    yield items


def _seconds_since(now: datetime, since: datetime | None) -> float:
    return max(0.0, (now - since).total_seconds()) if since else 0.0


def read_all() -> list[GaugeMetricFamily]:
    """Every database gauge, read now (one short query each); ages are
    measured on the database clock, like every deadline."""
    now = db_now()
    families: list[GaugeMetricFamily] = []
    for part in (_instances, _queue_lag, _alerts, _bulk_jobs):
        families.extend(part(now))
    return families


class DatabaseCollector(Collector):
    """Yields the database gauges, cached; a database that does not answer
    gives ``saga_metrics_database_up 0`` instead of failing the scrape, so the
    process counters still arrive."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cached: list[GaugeMetricFamily] = []
        self._read_at = float("-inf")
        self._took = 0.0

    def collect(self) -> Iterator[GaugeMetricFamily]:
        with self._lock:  # one reader per process; the others use its result
            up = True
            ttl = settings.SAGA_METRICS_CACHE_SECONDS
            if time.monotonic() - self._read_at >= ttl:
                started = time.perf_counter()
                try:
                    self._cached = read_all()
                    self._read_at = time.monotonic()
                except DatabaseError:
                    log.exception("metrics: the database gauges could not be read")
                    self._cached, up = [], False
                self._took = time.perf_counter() - started
            families = list(self._cached)
        yield from families
        yield GaugeMetricFamily(
            "saga_metrics_database_up",
            "Whether the database gauges could be read at this scrape.",
            value=1 if up else 0,
        )
        yield GaugeMetricFamily(
            "saga_metrics_database_seconds",
            "Time the last read of the database gauges took.",
            value=self._took,
        )


_collector: DatabaseCollector | None = None


def collector() -> DatabaseCollector:
    """The process's collector (its cache lives as long as the process)."""
    global _collector
    if _collector is None:
        _collector = DatabaseCollector()
    return _collector
