"""Real Celery worker and beat processes for the tests that claim distribution.

They run the project's own ``celery -A workflows_app`` commands against the
test database (pytest-django's ``test_*`` database, committed data only, so
tests using them are transactional) and a real Redis broker. The chaos test
(``tests/chaos``) starts them against servers of its own instead: each
process is the leader of its own process group, so that killing the group
kills the prefork pool's children too, and it dies with its starter.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CELERY = str(Path(sys.executable).with_name("celery"))


def database_url() -> str:
    from django.conf import settings

    db = settings.DATABASES["default"]
    if db["ENGINE"] != "workflows_app.postgres":
        raise RuntimeError("worker tests need PostgreSQL (set DATABASE_URL)")
    user = db.get("USER") or "postgres"
    auth = f"{user}:{db['PASSWORD']}@" if db.get("PASSWORD") else f"{user}@"
    host = f"{db.get('HOST') or '127.0.0.1'}:{db.get('PORT') or 5432}"
    return f"postgres://{auth}{host}/{db['NAME']}"


def process_env(
    *, database: str | None = None, broker: str | None = None, **extra: str
) -> dict[str, str]:
    """The workers' environment: the test's database and broker unless
    ``database`` / ``broker`` name others; ``extra`` overrides the rest."""
    if broker is None:
        from django.conf import settings

        broker = settings.CELERY_BROKER_URL
    env = dict(os.environ)
    env.update(
        DATABASE_URL=database or database_url(),
        CELERY_BROKER_URL=broker,
        SAGA_ACTIVITY_MODULES="tests.worker_activities",
        # The demo app: its participants' ledger and activities.
        SAGA_DEMO="1",
        SAGA_SWEEP_INTERVAL="0.5",
        SAGA_REDISPATCH_AFTER="2",
        PYTHONPATH=str(ROOT),
    )
    env.update(extra)
    return env


def worker_command(
    concurrency: int, name: str, queues: str | None = None, level: str = "info"
) -> list[str]:
    return [
        CELERY,
        "-A",
        "workflows_app",
        "worker",
        "-P",
        "prefork",
        "-c",
        str(concurrency),
        "-l",
        level,
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
        "-n",
        f"{name}@%h",
        *(["-Q", queues] if queues else []),
    ]


def beat_command(schedule: Path) -> list[str]:
    return [CELERY, "-A", "workflows_app", "beat", "-l", "info", "-s", str(schedule)]


def _own_group() -> None:
    # Imported here: tests.chaos.services is plain Python, no Django.
    from tests.chaos.services import die_with_parent

    die_with_parent()


def spawn(
    command: list[str], env: dict[str, str], log: Path, *, own_group: bool = False
) -> subprocess.Popen[bytes]:
    """Start a process with its output in ``log``. ``own_group``: a new
    session (see :func:`kill_group`) that dies with this process."""
    with log.open("ab") as out:
        return subprocess.Popen(
            command,
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=own_group,
            preexec_fn=_own_group if own_group else None,
        )


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL a process started with ``own_group`` and all its children: a
    machine losing power, as far as that worker is concerned."""
    with suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def stop(procs: list[subprocess.Popen[bytes]], timeout: float = 20) -> None:
    """Warm shutdown (SIGTERM); SIGKILL whatever does not exit in time."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def celery_processes(
    concurrency: int = 2,
    beat: bool = True,
    *,
    queues: str | None = None,
    extra_env: dict[str, str] | None = None,
    broker: str | None = None,
) -> Iterator[dict[str, subprocess.Popen[bytes]]]:
    """Start a worker (prefork pool) and optionally beat; stop both after.

    ``queues`` limits the worker to those queues (``-Q``); ``broker`` is a
    Redis of the test's own instead of ``CELERY_BROKER_URL``."""
    from django.conf import settings
    from django.db import connection

    if not (broker or settings.CELERY_BROKER_URL).startswith("redis://"):
        raise RuntimeError("worker tests need a Redis broker (set CELERY_BROKER_URL)")
    connection.close()  # the children must not inherit this process's connection
    logdir = Path(tempfile.mkdtemp(prefix="saga-celery-"))
    procs: dict[str, subprocess.Popen[bytes]] = {}
    env = process_env(broker=broker, **(extra_env or {}))
    procs["worker"] = spawn(
        worker_command(concurrency, f"test-worker-{os.getpid()}", queues),
        env,
        logdir / "worker.log",
    )
    if beat:
        procs["beat"] = spawn(
            beat_command(logdir / "beat-schedule"), env, logdir / "beat.log"
        )
    try:
        yield procs
    finally:
        stop(list(procs.values()))
        procs["logdir"] = logdir  # type: ignore[assignment]


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
