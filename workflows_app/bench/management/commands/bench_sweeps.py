"""Benchmark one sweep (timeouts, redispatch, deadlines, stuck, alerts).

    SAGA_DEMO=1 DATABASE_URL=postgres://.../saga_load \\
        python manage.py bench_sweeps --runs 5

Run it on a large database (``generate_load --instances 1000000``). Prints the
median and worst time of a sweep and its query count; note that a sweep
changes the data, a batch at a time: on a fresh ``generate_load`` database it
re-sends work nobody claimed, holds instances past their deadline, flags
stuck instances and opens their alerts. The messages a sweep would send are
counted and dropped, so the figures are the sweep's own work.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

from django.core.management.base import BaseCommand, CommandParser
from django.db import connection
from django.test.utils import CaptureQueriesContext

from workflows_app.bench.support import discarding_broker
from workflows_app.engine.sweeps import sweep_all
from workflows_app.models import WorkflowInstance


class Command(BaseCommand):
    help = "Time the sweeper on the current database (sends nothing to a broker)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--runs", type=int, default=5)

    def handle(self, *args: Any, **opts: Any) -> None:
        total = WorkflowInstance.objects.count()
        self.stdout.write(f"{total} instances, {connection.vendor}")
        times, queries = [], []
        for run in range(1, opts["runs"] + 1):
            # Messages the sweep sends (re-sends, retries after timeouts) are
            # counted and dropped: the figure is the sweep's database work.
            with (
                discarding_broker() as sent,
                CaptureQueriesContext(connection) as captured,
            ):
                started = time.perf_counter()
                counts = sweep_all()
                elapsed = time.perf_counter() - started
            times.append(elapsed)
            queries.append(len(captured.captured_queries))
            self.stdout.write(
                f"sweep {run}: {elapsed * 1000:7.1f} ms, "
                f"{len(captured.captured_queries)} queries, {counts}, "
                f"messages dropped {sum(sent.values())}"
            )
        self.stdout.write(
            f"median {statistics.median(times) * 1000:.1f} ms, "
            f"max {max(times) * 1000:.1f} ms, median queries "
            f"{statistics.median(queries):.0f}"
        )
