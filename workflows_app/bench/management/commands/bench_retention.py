"""Benchmark the retention purge (archive, then delete) on a loaded database.

    DATABASE_URL=postgres://.../saga_load python manage.py generate_load \\
        --instances 1050000
    DATABASE_URL=postgres://.../saga_load python manage.py bench_retention

Purges every finished instance (or ``--limit`` of them, oldest first) through
the same batches the sweeper and ``manage.py archive`` use, archiving to a
temporary folder unless ``--no-archive``. Prints the purge rate and the
longest batch transaction: every row lock the purge takes is held within one
batch transaction, so that is the bound on how long it blocks anyone. This
deletes the data: run it on a benchmark database.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import connection

from workflows_app.engine import retention
from workflows_app.engine.locking import db_now
from workflows_app.models import TERMINAL_STATES, PurgeRun, WorkflowInstance


class Command(BaseCommand):
    help = "Time the retention purge on the current database (deletes its data)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--batch", type=int, default=None)
        parser.add_argument(
            "--limit", type=int, default=None, help="purge at most this many"
        )
        parser.add_argument(
            "--seconds",
            type=float,
            default=None,
            help="stop after this long (the figures cover what was purged)",
        )
        parser.add_argument("--no-archive", action="store_true")
        parser.add_argument(
            "--archive-dir", default=None, help="default: a temporary folder"
        )

    def handle(self, *args: Any, **opts: Any) -> None:
        if opts["limit"] is not None and opts["limit"] < 1:
            raise CommandError("--limit: give a positive number.")
        total = WorkflowInstance.objects.count()
        finished = WorkflowInstance.objects.filter(state__in=TERMINAL_STATES).count()
        batch = opts["batch"] or settings.SAGA_RETENTION_BATCH
        self.stdout.write(
            f"{total} instances, {finished} finished, {connection.vendor}; "
            f"batches of up to {batch}, {settings.SAGA_RETENTION_BATCH_SECONDS} s "
            "per batch at most"
        )
        with tempfile.TemporaryDirectory(prefix="bench-retention-") as scratch:
            folder = (
                None if opts["no_archive"] else Path(opts["archive_dir"] or scratch)
            )
            deadline = (
                None if opts["seconds"] is None else time.monotonic() + opts["seconds"]
            )
            purged, seconds, took = self._purge(folder, batch, opts["limit"], deadline)
            size = (
                sum(p.stat().st_size for p in folder.rglob("*.jsonl.gz"))
                if folder
                else 0
            )
        rate = purged / took if took else 0.0
        archive = (
            f"archived first, {size / 1e6:.1f} MB gzip" if folder else "no archive"
        )
        self.stdout.write(
            f"purged {purged} instances in {took:.1f} s = {rate:,.0f} instances/s "
            f"({archive})"
        )
        if seconds:
            ordered = sorted(seconds)
            p95 = ordered[int(0.95 * (len(ordered) - 1))]
            self.stdout.write(
                f"batches {len(seconds)}: transaction median "
                f"{statistics.median(seconds) * 1000:.0f} ms, "
                f"p95 {p95 * 1000:.0f} ms, longest {max(seconds) * 1000:.0f} ms "
                "(the longest a row lock was held)"
            )
        self.stdout.write(
            f"left: {WorkflowInstance.objects.count()} instances, "
            f"{WorkflowInstance.objects.filter(state__in=TERMINAL_STATES).count()} "
            "finished"
        )

    def _purge(
        self,
        folder: Path | None,
        batch: int,
        limit: int | None,
        deadline: float | None,
    ) -> tuple[int, list[float], float]:
        seconds: list[float] = []
        purged = 0
        started = time.perf_counter()
        for target in retention.command_targets(db_now()):
            path = (
                retention.archive_path(folder, target.key, per_run=True)
                if folder
                else None
            )
            outcome = retention.run(
                target,
                actor=(PurgeRun.Actor.COMMAND, "bench_retention"),
                archive_file=path,
                batch=batch,
                deadline=deadline,
                on_batch=lambda n, s: self._progress(seconds, n, s, started),
                limit=None if limit is None else limit - purged,
            )
            purged += outcome.instances
            if not outcome.finished:
                break
        return purged, seconds, time.perf_counter() - started

    def _progress(
        self, seconds: list[float], count: int, took: float, started: float
    ) -> None:
        seconds.append(took)
        self._done = getattr(self, "_done", 0) + count
        # A line per 50,000 instances, so a long run shows it is moving.
        if self._done // 50_000 != (self._done - count) // 50_000:
            elapsed = time.perf_counter() - started
            self.stdout.write(
                f"  {self._done:>9,} purged  ({self._done / elapsed:,.0f}/s, "
                f"longest batch so far {max(seconds) * 1000:.0f} ms)"
            )
