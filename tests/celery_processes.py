"""Real Celery worker and beat processes for the tests that claim distribution.

They run the project's own ``celery -A workflows_app`` commands against the
test database (pytest-django's ``test_*`` database, committed data only, so
tests using them are transactional) and a real Redis broker.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from django.conf import settings
from django.db import connection

ROOT = Path(__file__).resolve().parent.parent
CELERY = str(Path(sys.executable).with_name("celery"))


def database_url() -> str:
    db = settings.DATABASES["default"]
    if db["ENGINE"] != "django.db.backends.postgresql":
        raise RuntimeError("worker tests need PostgreSQL (set DATABASE_URL)")
    user = db.get("USER") or "postgres"
    auth = f"{user}:{db['PASSWORD']}@" if db.get("PASSWORD") else f"{user}@"
    host = f"{db.get('HOST') or '127.0.0.1'}:{db.get('PORT') or 5432}"
    return f"postgres://{auth}{host}/{db['NAME']}"


def process_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        DATABASE_URL=database_url(),
        CELERY_BROKER_URL=settings.CELERY_BROKER_URL,
        SAGA_ACTIVITY_MODULES="tests.worker_activities",
        SAGA_SWEEP_INTERVAL="0.5",
        SAGA_REDISPATCH_AFTER="2",
        PYTHONPATH=str(ROOT),
        **extra,
    )
    return env


@contextmanager
def celery_processes(
    concurrency: int = 2,
    beat: bool = True,
    *,
    queues: str | None = None,
    extra_env: dict[str, str] | None = None,
) -> Iterator[dict[str, subprocess.Popen[bytes]]]:
    """Start a worker (prefork pool) and optionally beat; stop both after.

    ``queues`` limits the worker to those queues (``-Q``)."""
    if not settings.CELERY_BROKER_URL.startswith("redis://"):
        raise RuntimeError("worker tests need a Redis broker (set CELERY_BROKER_URL)")
    connection.close()  # the children must not inherit this process's connection
    logdir = Path(tempfile.mkdtemp(prefix="saga-celery-"))
    procs: dict[str, subprocess.Popen[bytes]] = {}
    env = process_env(**(extra_env or {}))
    procs["worker"] = subprocess.Popen(
        [
            CELERY,
            "-A",
            "workflows_app",
            "worker",
            "-P",
            "prefork",
            "-c",
            str(concurrency),
            "-l",
            "info",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
            "-n",
            f"test-worker-{os.getpid()}@%h",
            *(["-Q", queues] if queues else []),
        ],
        cwd=ROOT,
        env=env,
        stdout=(logdir / "worker.log").open("wb"),
        stderr=subprocess.STDOUT,
    )
    if beat:
        procs["beat"] = subprocess.Popen(
            [
                CELERY,
                "-A",
                "workflows_app",
                "beat",
                "-l",
                "info",
                "-s",
                str(logdir / "beat-schedule"),
            ],
            cwd=ROOT,
            env=env,
            stdout=(logdir / "beat.log").open("wb"),
            stderr=subprocess.STDOUT,
        )
    try:
        yield procs
    finally:
        for proc in procs.values():
            proc.send_signal(signal.SIGTERM)
        for proc in procs.values():
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        procs["logdir"] = logdir  # type: ignore[assignment]


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
