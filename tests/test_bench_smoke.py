"""Every benchmark command runs on a freshly migrated PostgreSQL database and
prints its figures (at a tiny size; the figures' values are not checked).
Two tests only: each transactional test's flush costs seconds.

``generate_load``'s rows are also checked against the engine: each instance
is at rest as the planner sees it (nothing left to decide), and a step
declined for good is never compensated.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from io import StringIO

import pytest
from django.conf import settings
from django.core.management import call_command
from django.db import connection, transaction

from workflows_app.bench.private_postgres import PrivatePostgres, postgres_bin
from workflows_app.bench.support import child_env
from workflows_app.engine.actors import Actor
from workflows_app.engine.planning import Move, decide
from workflows_app.engine.progress import view_of
from workflows_app.engine.transitions import Change
from workflows_app.models import (
    TERMINAL_STATES,
    Attempt,
    StepExecution,
    WorkflowInstance,
)

pytestmark = pytest.mark.django_db(transaction=True)

NUMBER = r"[\d.,]+"


def run(command: str, **options: object) -> str:
    out = StringIO()
    call_command(command, stdout=out, **options)
    return out.getvalue()


def figure(pattern: str, output: str) -> re.Match[str]:
    match = re.search(pattern, output, re.MULTILINE)
    assert match, f"no line matching {pattern!r} in:\n{output}"
    return match


def first_loads_on_a_private_copy() -> str:
    """``bench_dashboard --first-load-after-restart`` in a child process on
    a private cluster that holds a dump of the test database."""
    db = connection.settings_dict
    server = PrivatePostgres()
    try:
        server.start("saga_copy")
        env = {**os.environ, "PGPASSWORD": db.get("PASSWORD") or ""}
        dump = subprocess.run(
            [
                postgres_bin("pg_dump"),
                *("-h", db["HOST"] or "127.0.0.1", "-p", str(db["PORT"] or 5432)),
                *("-U", db["USER"] or "postgres", "--no-owner", db["NAME"]),
            ],
            env=env,
            check=True,
            capture_output=True,
        )
        subprocess.run(
            [
                postgres_bin("psql"),
                *("-q", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1"),
                *("-p", str(server.port), "-U", "postgres", "saga_copy"),
            ],
            input=dump.stdout,
            check=True,
            capture_output=True,
        )
        done = subprocess.run(
            [
                sys.executable,
                "manage.py",
                "bench_dashboard",
                "--first-load-after-restart",
                *("--pgdata", str(server.data), "--repeats", "1"),
            ],
            cwd=settings.BASE_DIR,
            env=child_env(DATABASE_URL=server.url("saga_copy")),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout
    finally:
        server.stop()


def test_generate_load_then_the_in_process_benchmarks() -> None:
    out = run("generate_load", instances=300, batch=150, days=2)
    figure(r"^\s+300 instances\s+\(" + NUMBER + r"/s\)$", out)
    figure(r"^done: 300 instances, about 3,000 history rows in \d+ s", out)

    assert WorkflowInstance.objects.count() == 300
    steps = StepExecution.objects.all()
    # Every claimed attempt has its Attempt row.
    claimed = sum(s.attempt + s.compensation_attempt for s in steps)
    assert Attempt.objects.count() == claimed > 300
    # A step declined for good applied nothing: nothing to undo.
    assert steps.filter(last_failure_permanent=True).exists()
    assert (
        not steps.filter(last_failure_permanent=True)
        .exclude(compensation_state__in=["none", "not_needed"])
        .exists()
    )
    states = set(WorkflowInstance.objects.values_list("state", flat=True))
    assert {"completed", "compensated"} <= states
    # At rest as the engine's planner sees them: a few instances of each state.
    actor = Actor.system("smoke test")
    sample = [
        (pk, state)
        for state in states
        for pk in WorkflowInstance.objects.filter(state=state).values_list(
            "id", flat=True
        )[:6]
    ]
    for pk, state in sample:
        with transaction.atomic():
            decision = decide(view_of(Change.open(pk, actor)))
        expected = Move.START if state == "accepted" else Move.IDLE
        assert decision.move is expected, (state, decision)

    out = run("bench_dashboard", runs=1, warmup=0)
    figure(r"^300 instances; 1 runs per page \(\+0 warm-up\)$", out)
    for page in (
        "overview",
        "list: definition, page 2",
        "instance detail",
        "search: key prefix, any case",
        "search: short id (8 chars)",
        "search: attribute name:value",
    ):
        row = figure(
            rf"^{re.escape(page)}\s+({NUMBER})\s+({NUMBER})\s+({NUMBER})"
            r"\s+(\d+)$",
            out,
        )
        assert int(row[4]) > 0  # queries

    out = run("bench_sweeps", runs=2)
    figure(
        rf"^300 instances, postgresql; at most 500 rows per kind, {NUMBER} s "
        "per sweep$",
        out,
    )
    first = figure(
        r"^sweep 1: +" + NUMBER + r" ms, (\d+) queries; (.*); "
        r"messages dropped (\d+)$",
        out,
    )
    assert int(first[1]) > 0
    for part in ("deadlines", "stuck", "alerts_opened", "cut_short"):
        assert re.search(rf"\b{part} \d+", first[2]), (part, first[2])
    figure(rf"^median {NUMBER} ms, max {NUMBER} ms, median queries \d+$", out)

    out = run("bench_bulk", instances=12)
    figure(r"^12 held instances in " + NUMBER + " s$", out)
    figure(r"^plan \(dry run\) of 12: " + NUMBER + " s$", out)
    row = figure(
        r"^run: (\d+) done in " + NUMBER + r" s = \d+ items/s; per item "
        rf"median {NUMBER} ms, p95 {NUMBER} ms$",
        out,
    )
    assert int(row[1]) == 12

    # The first load after a restart, on a private PostgreSQL holding a copy
    # of this database: the command restarts only a server nobody else uses.
    out = first_loads_on_a_private_copy()
    figure(
        r"^\d+ instances; first request of each page after a restart of "
        rf"PostgreSQL, 1 restarts per page; load average {NUMBER}$",
        out,
    )
    for page in ("overview", "list: stuck, oldest first", "definition page"):
        figure(rf"^{re.escape(page)}\s+{NUMBER}\s+{NUMBER}$", out)

    # Last: it deletes every finished instance (archived to a temporary folder).
    finished = WorkflowInstance.objects.filter(state__in=TERMINAL_STATES).count()
    out = run("bench_retention", batch=40)
    figure(
        rf"^\d+ instances, {finished} finished, postgresql; batches of up to 40",
        out,
    )
    row = figure(
        rf"^purged (\d+) instances in {NUMBER} s = {NUMBER} instances/s "
        rf"\(archived first, {NUMBER} MB gzip\)$",
        out,
    )
    assert int(row[1]) == finished > 200
    figure(
        r"^batches \d+: transaction median \d+ ms, p95 \d+ ms, longest \d+ ms",
        out,
    )
    figure(r"^left: \d+ instances, 0 finished$", out)


@pytest.mark.celery_worker
def test_benchmarks_with_real_worker_and_server_processes() -> None:
    # On a private PostgreSQL of its own (pg_stat_statements preloaded).
    out = run(
        "bench_engine",
        workflows=4,
        steps=2,
        workers=1,
        rounds=2,
        single_runs=1,
        compensating_workflows=2,
    )
    figure(r"^workload: 4 workflows x 2 no-op steps, 1 worker processes", out)
    # Its own queue was this process's only while it ran: later tests' workers
    # and messages use the usual one again.
    from workflows_app.celery import app

    assert "SAGA_CELERY_QUEUE" not in os.environ
    assert app.conf.task_default_queue == "celery"
    figure(r"PostgreSQL private 127\.0\.0\.1:\d+$", out)
    rates = rf"{NUMBER} workflows/s +{NUMBER} steps/s +p50 +{NUMBER} ms"
    rates += rf" +p95 +{NUMBER} ms +single workflow \(idle, median\) +{NUMBER} ms"
    per_workflow = (
        rf"^\s+per workflow: ({NUMBER}) transactions, ({NUMBER}) statements "
        rf"\(SELECT {NUMBER}, INSERT ({NUMBER}), UPDATE ({NUMBER}), DELETE "
        rf"{NUMBER}, WITH {NUMBER}, BEGIN/COMMIT/SAVEPOINT {NUMBER}, other "
        rf"{NUMBER}; and the server's own foreign-key checks {NUMBER}\), "
        rf"({NUMBER}) new sessions; CPU ms per workflow: worker ({NUMBER}), "
        rf"database ({NUMBER})(?:, broker {NUMBER})?, client {NUMBER}, total "
        rf"{NUMBER} \(all \d+ CPUs on this alone: {NUMBER} workflows/s\); "
        rf"machine: steal \d+ %, idle \d+ %$"
    )
    saga = figure(rf"^\s*saga desk: +{rates}\n{per_workflow}", out)
    chain = figure(rf"^\s*bare celery chain: +{rates}\n{per_workflow}", out)
    # The chain's counts are its own: per workflow one INSERT to start it,
    # then per task one UPDATE + one INSERT in one transaction; the
    # driver's polling is not counted (autovacuum's few transactions are).
    # Its connections persist: the only new sessions are the driver's and
    # one reconnect per worker process.
    assert 1 + 2 <= float(chain[1]) <= 1 + 2 + 1
    assert float(chain[3]) == pytest.approx(1 + 2, abs=0.01)
    assert float(chain[4]) == pytest.approx(2, abs=0.01)
    assert float(chain[5]) <= 2 / 4
    assert float(saga[1]) > float(chain[1]) and float(saga[2]) > float(chain[2])
    # Where the time went, from /proc: the worker's pool and the database
    # server did work (the broker's and the client's may round to nothing).
    assert float(saga[6]) > 0 and float(saga[7]) > 0 and float(chain[6]) > 0
    # The second round runs the chain first, so that a drift of the
    # machine's speed does not always fall on the same system.
    first, second = out.split("round 2/2")
    assert first.index("saga desk:") < first.index("bare celery chain:")
    assert second.index("bare celery chain:") < second.index("saga desk:")
    figure(
        rf"^ratio to the bare chain \(median of 2 rounds\): throughput {NUMBER} "
        rf"\({NUMBER} {NUMBER}\), single workflow latency {NUMBER}x "
        rf"\({NUMBER} {NUMBER}\)$",
        out,
    )
    undo = out[out.index("compensating path: 2 workflows x 5 steps") :]
    figure(rf"^\s*saga desk: +{rates}\n{per_workflow}", undo)

    # memory://: the started instances stay queued nowhere (no worker runs).
    out = run(
        "bench_api", requests=6, concurrency=2, workers=1, steps=2, broker="memory://"
    )
    figure(r"^gunicorn: 1 sync workers on 127\.0\.0\.1:\d+; client: 2 threads", out)
    for kind in ("start", "event", "status read"):
        row = figure(
            rf"^\s*{kind}: +{NUMBER} req/s +p50 +{NUMBER} ms +p95 +{NUMBER} ms"
            rf" +p99 +{NUMBER} ms +mean +{NUMBER} ms +errors (\d+)",
            out,
        )
        assert row[1] == "0", out
