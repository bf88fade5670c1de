"""Benchmark one sweep (timeouts, redispatch, deadlines, stuck, alerts).

    SAGA_DEMO=1 DATABASE_URL=postgres://.../saga_load \\
        python manage.py bench_sweeps --runs 5

Run it on a large database (``generate_load --instances 1000000``). Prints the
median and worst time of a sweep and its query count; note that a sweep
changes the data, a batch at a time: on a fresh ``generate_load`` database it
re-sends work nobody claimed, holds instances past their deadline, flags
stuck instances and opens their alerts. Each kind of work has one turn per
sweep, then more while ``SAGA_SWEEP_SECONDS`` last; ``cut_short`` counts the
kinds that still had rows due when the time ran out. The messages a sweep
would send are counted and dropped, so the figures are the sweep's own work.
The URLconf is loaded before the first sweep, as in a process that has run
before: the first ``reverse()`` of a process imports every view (about 2 s
here), which is not the sweep's work.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import connection
from django.urls import get_resolver

from workflows_app.bench.support import discarding_broker
from workflows_app.engine.sweeps import sweep_all
from workflows_app.models import WorkflowInstance


class QueryCounter:
    def __init__(self) -> None:
        self.count = 0

    def __call__(
        self, execute: Any, sql: str, params: Any, many: bool, context: Any
    ) -> Any:
        self.count += 1
        return execute(sql, params, many, context)


class Command(BaseCommand):
    help = "Time the sweeper on the current database (sends nothing to a broker)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--runs", type=int, default=5)
        parser.add_argument(
            "--batch",
            type=int,
            default=None,
            help="rows per part and sweep (default SAGA_SWEEP_BATCH)",
        )

    def handle(self, *args: Any, **opts: Any) -> None:
        if opts["batch"] is not None and opts["batch"] < 1:
            raise CommandError("--batch: give a positive number.")
        total = WorkflowInstance.objects.count()
        batch = opts["batch"] or settings.SAGA_SWEEP_BATCH
        self.stdout.write(
            f"{total} instances, {connection.vendor}; at most {batch} rows per "
            f"kind, {settings.SAGA_SWEEP_SECONDS} s per sweep"
        )
        get_resolver().reverse_dict  # noqa: B018 (imports the views)
        times, queries = [], []
        for run in range(1, opts["runs"] + 1):
            # Messages the sweep sends (re-sends, retries after timeouts) are
            # counted and dropped: the figure is the sweep's database work.
            # Counted by a wrapper: CaptureQueriesContext keeps only the last
            # 9,000 queries and then reports 0 for a long sweep.
            counter = QueryCounter()
            with discarding_broker() as sent, connection.execute_wrapper(counter):
                started = time.perf_counter()
                counts = sweep_all(opts["batch"])
                elapsed = time.perf_counter() - started
            times.append(elapsed)
            queries.append(counter.count)
            done = ", ".join(f"{part} {n}" for part, n in counts.items())
            self.stdout.write(
                f"sweep {run}: {elapsed * 1000:7.1f} ms, {counter.count} queries; "
                f"{done}; messages dropped {sum(sent.values())}"
            )
        self.stdout.write(
            f"median {statistics.median(times) * 1000:.1f} ms, "
            f"max {max(times) * 1000:.1f} ms, median queries "
            f"{statistics.median(queries):.0f}"
        )
