"""Benchmark the JSON API behind gunicorn on PostgreSQL.

    SAGA_DEMO=1 DATABASE_URL=postgres://... python manage.py bench_api --workers 2 \\
        --requests 2000 --concurrency 16

Starts gunicorn on 127.0.0.1 (a free port) with N sync workers, then sends a
bounded number of requests from a thread pool over loopback with the
package's client helper: instance starts (each with its own idempotency key),
events (each with its own id), and status reads. Prints requests per second
and p50/p95/p99 latency for each. Instances are queued on the configured
broker (``--broker memory://`` leaves the broker out); nothing runs them
unless a worker is up, which keeps the figures about the API alone.
"""

from __future__ import annotations

import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import connection

from workflows_app.bench.support import child_env
from workflows_app.client import ApiError, ClientError, SagaDeskClient
from workflows_app.models import ApiToken, StepDefinition, WorkflowDefinition

ROOT = Path(settings.BASE_DIR)
MAX_REQUESTS = 100_000


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(pct / 100 * (len(ordered) - 1))))
    return ordered[index]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Command(BaseCommand):
    help = "Benchmark API starts, events and reads per second behind gunicorn."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--workers", type=int, default=2, help="gunicorn workers")
        parser.add_argument("--requests", type=int, default=2000, help="per kind")
        parser.add_argument("--concurrency", type=int, default=16, help="threads")
        parser.add_argument("--steps", type=int, default=3)
        parser.add_argument(
            "--broker", default="", help="broker URL for gunicorn (default: settings)"
        )

    def handle(self, *args: Any, **opts: Any) -> None:
        if connection.vendor != "postgresql":
            raise CommandError("run the benchmark on PostgreSQL (set DATABASE_URL)")
        n = opts["requests"]
        if not 1 <= n <= MAX_REQUESTS:
            raise CommandError(f"--requests must be between 1 and {MAX_REQUESTS}")
        workers, threads = opts["workers"], opts["concurrency"]
        broker = opts["broker"] or settings.CELERY_BROKER_URL
        key = self._definition(opts["steps"])
        token = ApiToken.issue(key, ["start", "read", "report"])[1]
        port = free_port()
        self.stdout.write(
            f"gunicorn: {workers} sync workers on 127.0.0.1:{port}; client: "
            f"{threads} threads, {n} requests per kind; {os.cpu_count()} CPUs; "
            f"PostgreSQL; broker {broker.split('://')[0]}; "
            f"{opts['steps']}-step definition {key}"
        )
        server = self._start_gunicorn(port, workers, broker)
        try:
            client = SagaDeskClient(f"http://127.0.0.1:{port}", token, timeout=60)
            self._run_all(client, key, n, threads)
        finally:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()

    def _run_all(self, client: SagaDeskClient, key: str, n: int, threads: int) -> None:
        run = uuid.uuid4().hex[:8]
        # Warm up every worker's connection and code paths (not measured).
        self._measure(
            threads,
            min(n, 50),
            lambda i: client.start(
                key, business_key=f"warm-{run}-{i}", idempotency_key=f"w{run}-{i}"
            ),
        )
        starts = self._measure(
            threads,
            n,
            lambda i: client.start(
                key,
                business_key=f"b-{run}-{i}",
                idempotency_key=f"{run}-{i}",
                input={"amount": i, "currency": "EUR"},
            ),
        )
        self._report("start", n, starts)
        ids = [r.id for r in starts["results"] if r is not None]
        events = self._measure(
            threads,
            n,
            lambda i: client.post_event(
                f"ev-{run}-{i}",
                type="payment.captured",
                correlation_key=f"b-{run}-{i}",
                payload={"amount": i},
            ),
        )
        self._report("event", n, events)
        if ids:
            reads = self._measure(
                threads, n, lambda i: client.status(ids[i % len(ids)])
            )
            self._report("status read", n, reads)

    def _measure(
        self, threads: int, n: int, call: Callable[[int], Any]
    ) -> dict[str, Any]:
        def timed(i: int) -> tuple[float, str, Any]:
            began = time.perf_counter()
            try:
                result, outcome = call(i), "ok"
            except ApiError as exc:
                result, outcome = None, f"HTTP {exc.status} {exc.code}"
            except ClientError as exc:
                result, outcome = None, type(exc.__cause__ or exc).__name__
            return time.perf_counter() - began, outcome, result

        began = time.perf_counter()
        with ThreadPoolExecutor(max_workers=threads) as pool:
            rows = list(pool.map(timed, range(n)))
        elapsed = time.perf_counter() - began
        return {
            "elapsed": elapsed,
            "latencies": [r[0] for r in rows],
            "outcomes": Counter(r[1] for r in rows),
            "results": [r[2] for r in rows],
        }

    def _report(self, name: str, n: int, result: dict[str, Any]) -> None:
        lat = result["latencies"]
        errors = {k: v for k, v in result["outcomes"].items() if k != "ok"}
        self.stdout.write(
            f"{name:>12}: {n / result['elapsed']:8.1f} req/s  "
            f"p50 {percentile(lat, 50) * 1000:7.1f} ms  "
            f"p95 {percentile(lat, 95) * 1000:7.1f} ms  "
            f"p99 {percentile(lat, 99) * 1000:7.1f} ms  "
            f"mean {statistics.fmean(lat) * 1000:7.1f} ms  "
            f"errors {sum(errors.values())}" + (f" {dict(errors)}" if errors else "")
        )

    def _definition(self, steps: int) -> str:
        key = f"bench-api-{int(time.time())}-{uuid.uuid4().hex[:4]}"
        definition = WorkflowDefinition.objects.create(key=key, title="API benchmark")
        StepDefinition.objects.bulk_create(
            StepDefinition(
                definition=definition,
                position=i,
                name=f"s{i}",
                action="demo.noop",
                timeout=timedelta(seconds=60),
                awaits_event="payment.captured" if i == steps else "",
            )
            for i in range(1, steps + 1)
        )
        definition.publish()
        return key

    def _start_gunicorn(
        self, port: int, workers: int, broker: str
    ) -> subprocess.Popen[bytes]:
        log = Path(tempfile.mkdtemp(prefix="saga-bench-api-")) / "gunicorn.log"
        connection.close()
        env = child_env(CELERY_BROKER_URL=broker, DEBUG="0")
        proc = subprocess.Popen(
            [
                str(Path(sys.executable).with_name("gunicorn")),
                "workflows_app.wsgi:application",
                "--bind",
                f"127.0.0.1:{port}",
                "--workers",
                str(workers),
                "--log-level",
                "warning",
            ],
            cwd=ROOT,
            env=env,
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise CommandError(f"gunicorn exited; see {log}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    return proc
            except OSError:
                time.sleep(0.2)
        proc.kill()
        raise CommandError(f"gunicorn did not start; see {log}")
