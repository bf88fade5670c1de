"""Benchmark the engine on a real worker against the strongest bare Celery chain.

    SAGA_DEMO=1 CELERY_BROKER_URL=redis://... \\
        python manage.py bench_engine --workflows 1000 --steps 5 --workers 2

By default it starts a private PostgreSQL (initdb into a temporary folder,
``pg_stat_statements`` preloaded), migrates it and runs there, so the
server's counters are the benchmark's alone; ``--current-database`` runs on
``DATABASE_URL`` instead (statements are then counted only if that server
preloads ``pg_stat_statements``).

One worker (``--workers`` prefork processes, the configured broker) runs
both systems:

- Saga Desk: ``--workflows`` workflows of ``--steps`` ``demo.noop`` steps;
- the bare chain (``workflows_app.bench.tasks``): one row per workflow, then
  a chain of ``--steps`` tasks, each one ``UPDATE`` plus one ``INSERT`` in one
  transaction on a persistent connection, ``acks_late`` like the engine's.

``--rounds`` interleaved rounds (engine then chain, chain then engine, and
so on: a drift of the machine's speed falls on both sides) each print
workflows/s, steps/s, p50/p95 start-to-finish latency under load, one
workflow alone (median of ``--single-runs``, after an untimed batch that
gives every worker process its database session again), and per workflow the
transactions (``pg_stat_database`` xact_commit + xact_rollback), statements
by kind (``pg_stat_statements`` calls) and new database sessions. Then the
ratio to the chain, median over the rounds, and the compensating path: 5
steps of which the third fails permanently and the two before it are undone
(no baseline). Times come from the database clock.
"""

from __future__ import annotations

import contextlib
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg2
from celery import chain
from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import connection

from workflows_app.bench import cpu
from workflows_app.bench import tasks as bench_tasks
from workflows_app.bench.private_postgres import PrivatePostgres
from workflows_app.bench.processes import own_group_dying_with_parent, stop_group
from workflows_app.bench.support import child_env
from workflows_app.engine.actors import Actor
from workflows_app.engine.commands import instance_start
from workflows_app.models import StepDefinition, WorkflowDefinition, WorkflowInstance
from workflows_app.models.runtime import TERMINAL_STATES

ROOT = Path(settings.BASE_DIR)
INSTANCES = WorkflowInstance._meta.db_table
TERMINAL = sorted(str(s) for s in TERMINAL_STATES)
STATEMENT_KINDS = ("SELECT", "INSERT", "UPDATE", "DELETE", "WITH")
TRANSACTION_CONTROL = {"BEGIN", "COMMIT", "ROLLBACK", "SAVEPOINT", "RELEASE"}
# A compensating workflow: s3 fails for good, s2 and s1 are undone.
FAILING_STEP = 3
# What each system is called in the output, by its key in the results.
LABELS = {"saga desk": "saga desk", "chain": "bare celery chain"}


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(pct / 100 * (len(ordered) - 1))))
    return ordered[index]


class CpuCounters:
    """CPU milliseconds of the worker (its pool included), the database server,
    the broker and this process (which starts the workflows), where /proc
    shows them: per workflow, they say which part limits throughput. The
    database and broker are whole servers: on shared ones, other sessions'
    work counts too."""

    PARTS = ("worker", "database", "broker", "client")

    def __init__(self, counters: ServerCounters) -> None:
        self.worker: int | None = None
        self.database: int | None = None
        self.broker: int | None = None
        if not cpu.available():
            return
        self.database = cpu.parent_of(counters.conn.get_backend_pid())
        if settings.CELERY_BROKER_URL.startswith("redis://"):
            import redis

            info = redis.Redis.from_url(settings.CELERY_BROKER_URL).info("server")
            self.broker = int(info["process_id"])

    def snapshot(self) -> Counter[str]:
        found: Counter[str] = Counter()
        if not cpu.available():
            return found
        times = os.times()
        found["cpu client"] = round((times.user + times.system) * 1000)
        for kind, ticks in cpu.machine_ticks().items():
            found[f"machine {kind}"] = ticks
        for part in ("worker", "database", "broker"):
            pid = getattr(self, part)
            if pid is not None and cpu.parent_of(pid) is not None:
                found[f"cpu {part}"] = round(cpu.tree_seconds(pid) * 1000)
        return found

    def per_workflow(self, counts: Counter[str], n: int) -> str:
        parts = [(p, counts[f"cpu {p}"]) for p in self.PARTS if f"cpu {p}" in counts]
        total = sum(ms for _, ms in parts)
        if not total:
            return ""
        cores = os.cpu_count() or 1
        each = ", ".join(f"{p} {ms / n:.1f}" for p, ms in parts)
        return (
            f"; CPU ms per workflow: {each}, total {total / n:.1f} (all {cores} "
            f"CPUs on this alone: {cores * 1000 * n / total:.0f} workflows/s)"
            + self._machine(counts)
        )

    @staticmethod
    def _machine(counts: Counter[str]) -> str:
        """The machine's CPU time in the same span: how much of it the
        hypervisor gave to other guests (steal) and how much was idle."""
        ticks = counts["machine all"]
        if ticks <= 0:
            return ""
        steal = 100 * counts["machine steal"] / ticks
        idle = 100 * counts["machine idle"] / ticks
        return f"; machine: steal {steal:.0f} %, idle {idle:.0f} %"


class Observer:
    """The benchmark's own reads of the benchmark database (waiting for
    completion), kept out of the counters: its statements are not tracked
    and its transactions (one per read, autocommit) are counted here and
    subtracted."""

    def __init__(self, track_statements: bool) -> None:
        db = connection.settings_dict
        self.conn = psycopg2.connect(
            dbname=db["NAME"],
            user=db.get("USER") or "postgres",
            password=db.get("PASSWORD") or None,
            host=db.get("HOST") or "127.0.0.1",
            port=db.get("PORT") or 5432,
        )
        self.conn.autocommit = True
        self.transactions = 0
        if track_statements:
            self.fetch("SET pg_stat_statements.track = 'none'")

    def fetch(self, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
        with self.conn.cursor() as cursor:
            cursor.execute(sql, params)
            self.transactions += 1
            return cursor.fetchall() if cursor.description else []

    def close(self) -> None:
        self.conn.close()


class ServerCounters:
    """Snapshots of the server's counters for the benchmark database, read
    from the maintenance database so the reads themselves do not count."""

    def __init__(self, own_server: bool) -> None:
        db = connection.settings_dict
        self.database = db["NAME"]
        self.own_server = own_server
        self.conn = psycopg2.connect(
            dbname="postgres",
            user=db.get("USER") or "postgres",
            password=db.get("PASSWORD") or None,
            host=db.get("HOST") or "127.0.0.1",
            port=db.get("PORT") or 5432,
        )
        self.conn.autocommit = True
        preloaded = self.row("SHOW shared_preload_libraries")[0]
        self.statements = "pg_stat_statements" in preloaded
        if self.statements:
            self.row("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        self.oid = self.row(
            "SELECT oid FROM pg_database WHERE datname = %s", [self.database]
        )[0]

    def row(self, sql: str, params: Any = None) -> tuple[Any, ...]:
        with self.conn.cursor() as cursor:
            cursor.execute(sql, params)
            return (cursor.fetchone() or ()) if cursor.description else ()

    def snapshot(self) -> Counter[str]:
        counts: Counter[str] = Counter()
        row = self.row(
            "SELECT xact_commit + xact_rollback, sessions, tup_inserted, "
            "tup_updated, tup_deleted FROM pg_stat_database WHERE datid = %s",
            [self.oid],
        )
        for name, value in zip(
            ("transactions", "sessions", "inserted", "updated", "deleted"),
            row,
            strict=True,
        ):
            counts[name] = int(value)
        with self.conn.cursor() as cursor:
            if self.statements:
                # The server's own foreign-key checks (RI triggers, run after
                # each statement) show up as statements too: counted apart. A
                # prepared statement's runs are counted under its PREPARE
                # text: by the statement it prepares.
                cursor.execute(
                    "SELECT CASE WHEN query LIKE 'SELECT $2 FROM ONLY %% FOR KEY "
                    "SHARE OF x' THEN 'FOREIGN KEY CHECK' "
                    "ELSE upper(split_part(regexp_replace(ltrim(query), "
                    "'^PREPARE \\S+ AS ', '', 'i'), ' ', 1)) END, sum(calls) "
                    "FROM pg_stat_statements WHERE dbid = %s GROUP BY 1",
                    [self.oid],
                )
                for kind, calls in cursor.fetchall():
                    counts[f"statement {kind}"] = int(calls)
        return counts

    def settle(self, timeout: float = 60) -> None:
        """Get every session's statistics into the counters. A backend sends
        them at exit, or when idle up to 10 s after its last transaction, so
        on our own server the idle sessions are ended (the chain's task
        reconnects once); on a shared one we wait the 10 s instead."""
        connection.close()
        if not self.own_server:
            time.sleep(11)
            return
        deadline = time.monotonic() + timeout
        while True:
            self.row(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datid = %s AND pid <> pg_backend_pid() AND state = 'idle'",
                [self.oid],
            )
            left = self.row(
                "SELECT count(*) FROM pg_stat_activity WHERE datid = %s AND "
                "pid <> pg_backend_pid()",
                [self.oid],
            )[0]
            if left == 0:
                break
            if time.monotonic() > deadline:
                raise CommandError("sessions on the benchmark database stay busy")
            time.sleep(0.05)
        # A backend writes its stats (before_shmem_exit) before it leaves
        # pg_stat_activity (on_shmem_exit): nothing more to wait for.


@contextlib.contextmanager
def own_queue() -> Iterator[str]:
    """A queue of the benchmark's own while it runs: no other worker on this
    broker takes its tasks, and its worker takes nobody else's. The processes
    it starts inherit it; this process sends to it (the router reads the
    default queue on every send). Put back afterwards: the command may run
    inside a longer-lived process (a test run), whose later workers and
    messages must use the usual queue again."""
    from workflows_app.celery import app

    saved_env = os.environ.get("SAGA_CELERY_QUEUE")
    saved_conf = app.conf.task_default_queue
    queue = saved_env or f"saga-bench-{os.getpid()}"
    os.environ["SAGA_CELERY_QUEUE"] = queue
    app.conf.task_default_queue = queue
    try:
        yield queue
    finally:
        app.conf.task_default_queue = saved_conf
        if saved_env is None:
            os.environ.pop("SAGA_CELERY_QUEUE", None)
        else:
            os.environ["SAGA_CELERY_QUEUE"] = saved_env


class Command(BaseCommand):
    help = "Benchmark the engine against a bare Celery chain on a real worker."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--workflows", type=int, default=1000)
        parser.add_argument("--steps", type=int, default=5)
        parser.add_argument("--workers", type=int, default=2)
        parser.add_argument("--rounds", type=int, default=3)
        parser.add_argument("--single-runs", type=int, default=7)
        parser.add_argument(
            "--compensating-workflows",
            type=int,
            default=None,
            help="workflows on the compensating path (default: --workflows; 0 skips)",
        )
        parser.add_argument(
            "--current-database",
            action="store_true",
            help="run on DATABASE_URL instead of a private PostgreSQL",
        )
        parser.add_argument(
            "--top-statements",
            type=int,
            default=0,
            help="at the end, print the N statements the server ran most often",
        )
        # Set by the private-cluster run for its child: the server is ours.
        parser.add_argument("--own-server", action="store_true", help="(internal)")

    def handle(self, *args: Any, **opts: Any) -> None:
        if not settings.CELERY_BROKER_URL.startswith(("redis://", "amqp://")):
            raise CommandError(
                "run the benchmark with Redis or RabbitMQ (CELERY_BROKER_URL)"
            )
        if opts["workflows"] < 1 or opts["steps"] < 1 or opts["rounds"] < 1:
            raise CommandError("--workflows, --steps and --rounds must be at least 1")
        with own_queue():
            if opts["current_database"] or opts["own_server"]:
                if connection.vendor != "postgresql":
                    raise CommandError("run the benchmark on PostgreSQL (DATABASE_URL)")
                Benchmark(self, opts).run()
            else:
                self._on_private_server(opts)

    def _on_private_server(self, opts: dict[str, Any]) -> None:
        server = PrivatePostgres()
        python, manage = sys.executable, str(ROOT / "manage.py")
        try:
            server.start("saga_bench")
            env = child_env(DATABASE_URL=server.url("saga_bench"))
            migrated = subprocess.run(
                [python, manage, "migrate", "-v0"],
                cwd=ROOT,
                env=env,
                capture_output=True,
                text=True,
            )
            if migrated.returncode:
                raise CommandError(f"migrate failed:\n{migrated.stderr[-3000:]}")
            # Not analyzed while empty, as a new installation is not. Plans
            # made from "0 rows" statistics (the foreign-key checks' cached
            # plans above all) scan whole tables until autovacuum analyzes
            # them again: that doubled the first round's database time.
            forwarded = [
                f"--{name.replace('_', '-')}={opts[name]}"
                for name in (
                    "workflows",
                    "steps",
                    "workers",
                    "rounds",
                    "single_runs",
                    "top_statements",
                )
            ]
            if opts["compensating_workflows"] is not None:
                forwarded.append(
                    f"--compensating-workflows={opts['compensating_workflows']}"
                )
            child = subprocess.Popen(
                [python, manage, "bench_engine", "--own-server", *forwarded],
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                preexec_fn=own_group_dying_with_parent,
            )
            try:
                assert child.stdout is not None
                for line in child.stdout:
                    self.stdout.write(line.rstrip("\n"))
                if child.wait():
                    raise CommandError(
                        f"the benchmark failed (exit {child.returncode})"
                    )
            finally:
                # Whatever happened, nothing of it (the child, its worker and
                # the pool) stays on the broker.
                stop_group(child)
        finally:
            server.stop()


class Benchmark:
    def __init__(self, command: Command, opts: dict[str, Any]) -> None:
        self.out = command.stdout
        self.n, self.k, self.w = opts["workflows"], opts["steps"], opts["workers"]
        self.rounds, self.single_runs = opts["rounds"], opts["single_runs"]
        compensating = opts["compensating_workflows"]
        self.compensating = self.n if compensating is None else compensating
        self.counters = ServerCounters(own_server=opts["own_server"])
        self.next_chain = 1
        self.top_statements = opts["top_statements"]
        self.cpu = CpuCounters(self.counters)

    def run(self) -> None:
        db = connection.settings_dict
        self.out.write(
            f"workload: {self.n} workflows x {self.k} no-op steps, {self.w} worker "
            f"processes, {os.cpu_count()} CPUs, load average "
            f"{os.getloadavg()[0]:.1f}, broker "
            f"{settings.CELERY_BROKER_URL.split('://')[0]}, PostgreSQL "
            f"{'private' if self.counters.own_server else 'shared'} "
            f"{db.get('HOST')}:{db.get('PORT')}"
        )
        if not self.counters.own_server:
            self.out.write(
                "transactions and sessions count every session on this database, "
                "not only the benchmark's"
            )
        if not self.counters.statements:
            self.out.write(
                "statements are not counted: the server does not preload "
                "pg_stat_statements (rows inserted/updated/deleted are shown)"
            )
        bench_tasks.create_tables()
        plain = self._definition("bench", compensating=False)
        failing = self._definition("bench-undo", compensating=True)
        worker = self._start_worker()
        self.cpu.worker = worker.pid
        results: dict[str, list[dict[str, Any]]] = {"saga desk": [], "chain": []}
        try:
            self._warm_up(plain.key)
            for r in range(1, self.rounds + 1):
                self.out.write(f"round {r}/{self.rounds}")
                systems = [
                    ("saga desk", lambda: self._engine_round(plain.key, {})),
                    ("chain", self._chain_round),
                ]
                # Every other round the chain goes first, so that a slow
                # drift of the machine (or the database's housekeeping
                # after the round before) does not always fall on one side.
                for key, run in systems if r % 2 else systems[::-1]:
                    results[key].append(self._measure(LABELS[key], run))
            self._ratios(results)
            if self.compensating:
                self._compensating(failing.key)
        finally:
            stop_group(worker, grace=60)
        if self.top_statements and self.counters.statements:
            self._print_top_statements()
        self.out.write(f"load average at the end {os.getloadavg()[0]:.1f}")

    def _print_top_statements(self) -> None:
        with self.counters.conn.cursor() as cursor:
            cursor.execute(
                "SELECT calls, regexp_replace(query, '\\s+', ' ', 'g') "
                "FROM pg_stat_statements WHERE dbid = %s ORDER BY calls DESC LIMIT %s",
                [self.counters.oid, self.top_statements],
            )
            self.out.write("statements run most often (whole run):")
            for calls, query in cursor.fetchall():
                self.out.write(f"{calls:>9}  {query[:300]}")

    # -- setup ----------------------------------------------------------------
    def _definition(self, prefix: str, *, compensating: bool) -> WorkflowDefinition:
        """No-op steps; the compensating one has 5 steps whose first two are
        undone (a no-op compensation) after the third fails for good."""
        definition = WorkflowDefinition.objects.create(
            key=f"{prefix}-{int(time.time())}", title="benchmark"
        )
        count = 5 if compensating else self.k
        steps = []
        for i in range(1, count + 1):
            step = StepDefinition(
                definition=definition,
                position=i,
                name=f"s{i}",
                action="demo.noop",
                timeout=timedelta(seconds=60),
            )
            if compensating and i < FAILING_STEP:
                step.compensation = "demo.noop"
            if compensating and i == FAILING_STEP:
                # Declines at once (input "simulate"), before any write.
                step.action = "demo.step"
            steps.append(step)
        StepDefinition.objects.bulk_create(steps)
        definition.publish()
        return definition

    def _start_worker(self) -> subprocess.Popen[bytes]:
        name = f"bench-{os.getpid()}@{socket.gethostname()}"
        log = Path(tempfile.mkdtemp(prefix="saga-bench-")) / "worker.log"
        connection.close()
        proc = subprocess.Popen(
            [
                str(Path(sys.executable).with_name("celery")),
                *("-A", "workflows_app", "worker", "-P", "prefork"),
                *("-c", str(self.w), "-l", "warning"),
                *("--without-gossip", "--without-mingle", "--without-heartbeat"),
                *("-n", name),
            ],
            cwd=ROOT,
            env=child_env(),
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
            preexec_fn=own_group_dying_with_parent,
        )
        from workflows_app.celery import app

        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if app.control.ping(destination=[name], timeout=0.5):
                return proc
        stop_group(proc, grace=0)
        raise CommandError(f"the worker did not start; see {log}")

    def _warm_up(self, key: str) -> None:
        count = min(20, self.n)
        observer = Observer(self.counters.statements)
        try:
            ids = [self._start(key, f"warm-{i}", {}) for i in range(count)]
            self._wait_engine(observer, ids, "completed")
            first = self._start_chains(count)
            self._wait_chains(observer, first, count)
        finally:
            observer.close()

    # -- measuring ------------------------------------------------------------
    def _measure(self, name: str, run: Any) -> dict[str, Any]:
        result: dict[str, Any] = run()
        self._report(name, self.n, self.k, result)
        return result

    def _counted(self, work: Any) -> tuple[Any, Counter[str]]:
        """Run ``work(observer)`` between two snapshots of the counters."""
        self.counters.settle()
        before = self.counters.snapshot()
        before.update(self.cpu.snapshot())
        observer = Observer(self.counters.statements)
        try:
            value = work(observer)
        finally:
            observer.close()
        self.counters.settle()
        delta = self.counters.snapshot()
        delta.update(self.cpu.snapshot())
        delta.subtract(before)
        delta["transactions"] -= observer.transactions
        delta["sessions"] -= 1
        if self.counters.statements:
            delta["statement SET"] -= 1  # the observer's, before it was off
        return value, delta

    # -- engine ---------------------------------------------------------------
    def _start(self, key: str, business_key: str, data: dict[str, Any]) -> Any:
        return instance_start(
            key, business_key=business_key, input=data, actor=Actor.api("bench")
        ).instance.id

    def _wait_engine(
        self, observer: Observer, ids: list[Any], state: str, timeout: float = 900
    ) -> list[float]:
        deadline = time.monotonic() + timeout
        ids = [str(i) for i in ids]
        while observer.fetch(
            f"SELECT 1 FROM {INSTANCES} WHERE id = ANY(%s::uuid[]) "
            "AND NOT state = ANY(%s) LIMIT 1",
            [ids, TERMINAL],
        ):
            if time.monotonic() > deadline:
                raise CommandError("workflows did not finish in time")
            time.sleep(0.002 if len(ids) == 1 else 0.2)
        rows = observer.fetch(
            f"SELECT state, extract(epoch FROM finished_at - accepted_at) "
            f"FROM {INSTANCES} WHERE id = ANY(%s::uuid[])",
            [ids],
        )
        wrong = Counter(s for s, _ in rows if s != state)
        if wrong:
            raise CommandError(f"expected every workflow {state}, got {dict(wrong)}")
        return [float(seconds) for _, seconds in rows]

    def _engine_round(self, key: str, data: dict[str, Any]) -> dict[str, Any]:
        state = "compensated" if data else "completed"
        observer = Observer(self.counters.statements)
        try:
            # Before one workflow alone is timed, an untimed batch of two per
            # worker process (the chain's round does the same): the counters'
            # settle ends every idle database session, and a worker that has
            # been running has its session, and its prepared statements.
            stamp = time.time_ns()
            self._wait_engine(
                observer,
                [
                    self._start(key, f"warm-{stamp}-{i}", data)
                    for i in range(2 * self.w)
                ],
                state,
            )
            single = statistics.median(
                self._wait_engine(
                    observer, [self._start(key, f"single-{i}", data)], state
                )[0]
                for i in range(self.single_runs)
            )
        finally:
            observer.close()
        count = self.compensating if data else self.n

        def load(observer: Observer) -> dict[str, Any]:
            stamp = time.time_ns()
            ids = [self._start(key, f"load-{stamp}-{i}", data) for i in range(count)]
            latencies = self._wait_engine(observer, ids, state)
            (elapsed,) = observer.fetch(
                "SELECT extract(epoch FROM max(finished_at) - min(accepted_at)) "
                f"FROM {INSTANCES} WHERE id = ANY(%s::uuid[])",
                [[str(i) for i in ids]],
            )[0]
            return {"elapsed": float(elapsed), "latencies": latencies}

        result, counts = self._counted(load)
        return {**result, "single": single, "counts": counts}

    # -- baseline -------------------------------------------------------------
    def _start_chains(self, count: int) -> int:
        """Record ``count`` workflows and send their chains; the first id."""
        first = self.next_chain
        self.next_chain += count
        for wf in range(first, first + count):
            with connection.cursor() as cursor:
                cursor.execute(
                    f"INSERT INTO {bench_tasks.WORKFLOWS} (id) VALUES (%s)", [wf]
                )
            chain(
                *(bench_tasks.baseline_step.si(wf, s) for s in range(1, self.k + 1))
            ).apply_async()
        return first

    def _wait_chains(
        self, observer: Observer, first: int, count: int, timeout: float = 900
    ) -> list[float]:
        last = first + count - 1
        deadline = time.monotonic() + timeout
        while observer.fetch(
            f"SELECT 1 FROM {bench_tasks.WORKFLOWS} WHERE id BETWEEN %s AND %s "
            "AND step < %s LIMIT 1",
            [first, last, self.k],
        ):
            if time.monotonic() > deadline:
                raise CommandError("the baseline chains did not finish in time")
            time.sleep(0.002 if count == 1 else 0.2)
        rows = observer.fetch(
            "SELECT extract(epoch FROM updated_at - accepted_at) "
            f"FROM {bench_tasks.WORKFLOWS} WHERE id BETWEEN %s AND %s",
            [first, last],
        )
        return [float(seconds) for (seconds,) in rows]

    def _chain_round(self) -> dict[str, Any]:
        observer = Observer(self.counters.statements)
        try:
            # Untimed, as in _engine_round: every process's session again.
            self._wait_chains(observer, self._start_chains(2 * self.w), 2 * self.w)
            single = statistics.median(
                self._wait_chains(observer, self._start_chains(1), 1)[0]
                for _ in range(self.single_runs)
            )
        finally:
            observer.close()

        def load(observer: Observer) -> dict[str, Any]:
            first = self._start_chains(self.n)
            latencies = self._wait_chains(observer, first, self.n)
            (elapsed,) = observer.fetch(
                "SELECT extract(epoch FROM max(updated_at) - min(accepted_at)) "
                f"FROM {bench_tasks.WORKFLOWS} WHERE id BETWEEN %s AND %s",
                [first, first + self.n - 1],
            )[0]
            return {"elapsed": float(elapsed), "latencies": latencies}

        result, counts = self._counted(load)
        return {**result, "single": single, "counts": counts}

    # -- compensating path ----------------------------------------------------
    def _compensating(self, key: str) -> None:
        data = {"simulate": {f"s{FAILING_STEP}": "fail"}}
        result = self._engine_round(key, data)
        self.out.write(
            f"compensating path: {self.compensating} workflows x 5 steps, s3 fails "
            "for good, s2 and s1 undone (no baseline)"
        )
        self._report("saga desk", self.compensating, 5, result)

    # -- output ---------------------------------------------------------------
    def _report(
        self,
        name: str,
        n: int,
        k: int,
        result: dict[str, Any],
    ) -> None:
        elapsed, lat = result["elapsed"], result["latencies"]
        self.out.write(
            f"{name:>18}: {n / elapsed:7.1f} workflows/s  "
            f"{n * k / elapsed:8.1f} steps/s  "
            f"p50 {percentile(lat, 50) * 1000:8.1f} ms  "
            f"p95 {percentile(lat, 95) * 1000:8.1f} ms  "
            f"single workflow (idle, median) {result['single'] * 1000:6.1f} ms"
        )
        self.out.write(f"{'':>18}  per workflow: {self._per_workflow(result, n)}")

    def _per_workflow(self, result: dict[str, Any], n: int) -> str:
        counts: Counter[str] = result["counts"]
        text = f"{counts['transactions'] / n:.1f} transactions, "
        if self.counters.statements:
            kinds: Counter[str] = Counter()
            for key, calls in counts.items():
                if key.startswith("statement "):
                    kind = key.removeprefix("statement ")
                    if kind in TRANSACTION_CONTROL:
                        kind = "BEGIN/COMMIT/SAVEPOINT"
                    elif kind not in (*STATEMENT_KINDS, "FOREIGN KEY CHECK"):
                        kind = "other"
                    kinds[kind] += calls
            checks = kinds.pop("FOREIGN KEY CHECK", 0)
            total = sum(kinds.values())
            parts = ", ".join(
                f"{kind} {kinds[kind] / n:.1f}"
                for kind in (*STATEMENT_KINDS, "BEGIN/COMMIT/SAVEPOINT", "other")
            )
            text += (
                f"{total / n:.1f} statements ({parts}; and the server's own "
                f"foreign-key checks {checks / n:.1f}), "
            )
        else:
            text += (
                f"rows inserted {counts['inserted'] / n:.1f}, updated "
                f"{counts['updated'] / n:.1f}, deleted {counts['deleted'] / n:.1f}, "
            )
        text += f"{counts['sessions'] / n:.2f} new sessions"
        return text + self.cpu.per_workflow(counts, n)

    def _ratios(self, results: dict[str, list[dict[str, Any]]]) -> None:
        throughput = [
            c["elapsed"] / e["elapsed"]
            for e, c in zip(results["saga desk"], results["chain"], strict=True)
        ]
        latency = [
            e["single"] / c["single"]
            for e, c in zip(results["saga desk"], results["chain"], strict=True)
        ]
        for key, name in LABELS.items():
            runs = results[key]
            self.out.write(
                f"median of {len(runs)} rounds, {name}: "
                f"{statistics.median(self.n / r['elapsed'] for r in runs):.1f} "
                "workflows/s, single workflow "
                f"{statistics.median(r['single'] for r in runs) * 1000:.1f} ms"
            )
        self.out.write(
            f"ratio to the bare chain (median of {len(throughput)} rounds): "
            f"throughput {statistics.median(throughput):.2f} "
            f"({' '.join(f'{x:.2f}' for x in throughput)}), "
            f"single workflow latency {statistics.median(latency):.2f}x "
            f"({' '.join(f'{x:.2f}' for x in latency)})"
        )
