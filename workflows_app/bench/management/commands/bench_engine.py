"""Benchmark the engine on a real worker: throughput and latency.

    SAGA_DEMO=1 DATABASE_URL=postgres://... CELERY_BROKER_URL=redis://... \\
        python manage.py bench_engine --workflows 1000 --steps 5 --workers 2

Prints workflows/s, steps/s, p50/p95 start-to-finish latency, the latency of
one workflow on an idle system (median of several), and the same figures for
a bare Celery chain of tasks that each write one row (the baseline). All
times come from the database clock (accepted_at -> finished_at).
"""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from celery import chain
from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import connection

from workflows_app.bench import tasks as bench_tasks
from workflows_app.bench.support import child_env
from workflows_app.engine.actors import Actor
from workflows_app.engine.commands import instance_start
from workflows_app.models import StepDefinition, WorkflowDefinition, WorkflowInstance

ROOT = Path(settings.BASE_DIR)


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(pct / 100 * (len(ordered) - 1))))
    return ordered[index]


class Command(BaseCommand):
    help = "Benchmark workflows/s and latency on a real worker (PostgreSQL + Redis)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--workflows", type=int, default=1000)
        parser.add_argument("--steps", type=int, default=5)
        parser.add_argument("--workers", type=int, default=2)
        parser.add_argument("--single-runs", type=int, default=9)
        parser.add_argument("--no-baseline", action="store_true")

    def handle(self, *args: Any, **opts: Any) -> None:
        if connection.vendor != "postgresql":
            raise CommandError("run the benchmark on PostgreSQL (set DATABASE_URL)")
        if not settings.CELERY_BROKER_URL.startswith(("redis://", "amqp://")):
            raise CommandError(
                "run the benchmark with Redis or RabbitMQ (CELERY_BROKER_URL)"
            )
        n, k, w = opts["workflows"], opts["steps"], opts["workers"]
        self.stdout.write(
            f"workload: {n} workflows x {k} no-op steps, {w} worker processes, "
            f"{os.cpu_count()} CPUs, broker {settings.CELERY_BROKER_URL.split('://')[0]}"
        )
        bench_tasks.create_table()
        definition = self._definition(k)
        worker = self._start_worker(w)
        try:
            self._warm_up(definition.key, min(20, n))
            single = self._engine_single(definition.key, opts["single_runs"])
            engine = self._engine_throughput(definition.key, n)
            self._report("saga desk", n, k, engine, single)
            if not opts["no_baseline"]:
                base_single = self._baseline_single(k, opts["single_runs"])
                base = self._baseline_throughput(n, k)
                self._report("bare celery chain", n, k, base, base_single)
        finally:
            worker.send_signal(signal.SIGTERM)
            worker.wait(timeout=30)

    # -- setup ----------------------------------------------------------------
    def _definition(self, steps: int) -> WorkflowDefinition:
        key = f"bench-{int(time.time())}"
        definition = WorkflowDefinition.objects.create(key=key, title="benchmark")
        StepDefinition.objects.bulk_create(
            StepDefinition(
                definition=definition,
                position=i,
                name=f"s{i}",
                action="demo.noop",
                timeout=timedelta(seconds=60),
            )
            for i in range(1, steps + 1)
        )
        definition.publish()
        return definition

    def _start_worker(self, workers: int) -> subprocess.Popen[bytes]:
        log = Path(tempfile.mkdtemp(prefix="saga-bench-")) / "worker.log"
        connection.close()
        proc = subprocess.Popen(
            [
                str(Path(sys.executable).with_name("celery")),
                "-A",
                "workflows_app",
                "worker",
                "-P",
                "prefork",
                "-c",
                str(workers),
                "-l",
                "warning",
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
                "-n",
                f"bench-{os.getpid()}@%h",
            ],
            cwd=ROOT,
            env=child_env(),
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
        )
        from workflows_app.celery import app

        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if app.control.ping(timeout=0.5):
                return proc
        proc.kill()
        raise CommandError(f"the worker did not start; see {log}")

    def _warm_up(self, key: str, count: int) -> None:
        ids = [self._start(key, f"warm-{i}") for i in range(count)]
        self._wait_engine(ids)

    # -- engine ---------------------------------------------------------------
    def _start(self, key: str, business_key: str) -> Any:
        return instance_start(
            key, business_key=business_key, actor=Actor.api("bench")
        ).instance.id

    def _wait_engine(self, ids: list[Any], timeout: float = 600) -> list[float]:
        deadline = time.monotonic() + timeout
        qs = WorkflowInstance.objects.filter(pk__in=ids)
        while qs.exclude(state="completed").exists():
            if time.monotonic() > deadline:
                raise CommandError("workflows did not complete in time")
            time.sleep(0.002 if len(ids) == 1 else 0.2)
        latencies = []
        for accepted, finished in qs.values_list("accepted_at", "finished_at"):
            assert finished is not None  # every one completed
            latencies.append((finished - accepted).total_seconds())
        return latencies

    def _engine_single(self, key: str, runs: int) -> float:
        return statistics.median(
            self._wait_engine([self._start(key, f"single-{i}")])[0] for i in range(runs)
        )

    def _engine_throughput(self, key: str, n: int) -> dict[str, Any]:
        ids = [self._start(key, f"load-{i}") for i in range(n)]
        latencies = self._wait_engine(ids)
        rows = WorkflowInstance.objects.filter(pk__in=ids)
        first = min(rows.values_list("accepted_at", flat=True))
        last = max(f for f in rows.values_list("finished_at", flat=True) if f)
        return {"elapsed": (last - first).total_seconds(), "latencies": latencies}

    # -- baseline -------------------------------------------------------------
    def _chain(self, workflow: int, steps: int) -> None:
        chain(
            *(bench_tasks.baseline_step.si(workflow, s) for s in range(1, steps + 1))
        ).apply_async()

    def _baseline_rows(self, first: int, last: int, steps: int) -> dict[int, list[Any]]:
        with connection.cursor() as cursor:
            cursor.execute(
                f"SELECT workflow, count(*), max(at) FROM {bench_tasks.TABLE} "
                "WHERE workflow BETWEEN %s AND %s GROUP BY workflow",
                [first, last],
            )
            return {wf: [count, at] for wf, count, at in cursor.fetchall()}

    def _wait_baseline(self, first: int, last: int, steps: int) -> dict[int, Any]:
        deadline = time.monotonic() + 600
        while True:
            rows = self._baseline_rows(first, last, steps)
            done = {wf: at for wf, (count, at) in rows.items() if count == steps}
            if len(done) == last - first + 1:
                return done
            if time.monotonic() > deadline:
                raise CommandError("the baseline chains did not finish in time")
            time.sleep(0.002 if first == last else 0.2)

    def _now(self) -> Any:
        with connection.cursor() as cursor:
            cursor.execute("SELECT clock_timestamp()")
            return cursor.fetchone()[0]

    def _baseline_single(self, steps: int, runs: int) -> float:
        results: list[float] = []
        for i in range(runs):
            wf = 10_000_000 + i
            started = self._now()
            self._chain(wf, steps)
            finished = self._wait_baseline(wf, wf, steps)[wf]
            results.append((finished - started).total_seconds())
        return statistics.median(results)

    def _baseline_throughput(self, n: int, steps: int) -> dict[str, Any]:
        started: dict[int, Any] = {}
        for wf in range(1, n + 1):
            started[wf] = self._now()
            self._chain(wf, steps)
        done = self._wait_baseline(1, n, steps)
        latencies = [(done[wf] - started[wf]).total_seconds() for wf in done]
        elapsed = (max(done.values()) - min(started.values())).total_seconds()
        return {"elapsed": elapsed, "latencies": latencies}

    # -- output ---------------------------------------------------------------
    def _report(
        self, name: str, n: int, k: int, result: dict[str, Any], single: float
    ) -> None:
        elapsed, lat = result["elapsed"], result["latencies"]
        self.stdout.write(
            f"{name:>18}: {n / elapsed:7.1f} workflows/s  "
            f"{n * k / elapsed:8.1f} steps/s  "
            f"p50 {percentile(lat, 50) * 1000:8.1f} ms  "
            f"p95 {percentile(lat, 95) * 1000:8.1f} ms  "
            f"single workflow (idle, median) {single * 1000:6.1f} ms"
        )
