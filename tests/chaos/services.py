"""Private PostgreSQL and Redis servers that a test may crash and restart.

The shared servers (5432, 6379) belong to everybody on the machine and are
never stopped. These are started on free loopback ports from temporary
folders, tied to the process that started them (they die with it, see
:func:`die_with_parent`) and removed by :meth:`stop`.

No Django here: the chaos driver starts them before it configures Django.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from workflows_app.bench.processes import die_with_parent


def free_port(start: int) -> int:
    """The first port from ``start`` that nothing on loopback listens on."""
    for port in range(start, start + 500):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port from {start}")


def _as_postgres() -> None:
    """preexec_fn: PostgreSQL refuses to run as root."""
    if os.geteuid() == 0:
        entry = pwd.getpwnam("postgres")
        os.setgid(entry.pw_gid)
        os.setuid(entry.pw_uid)
    die_with_parent()


def _wait(check: list[str], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if subprocess.run(check, capture_output=True).returncode == 0:
            return
        time.sleep(0.2)
    raise RuntimeError(f"{what} did not come up within {timeout}s")


def postgres_bin(name: str) -> str:
    found = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))
    if not found:
        raise RuntimeError(f"no PostgreSQL {name} under /usr/lib/postgresql")
    return str(found[-1])


class PostgresCluster:
    """A throw-away cluster: initdb into a temporary folder, one postmaster,
    trust authentication for ``postgres`` on 127.0.0.1 only."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port(55432)
        self.root = Path(tempfile.mkdtemp(prefix="saga-chaos-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "postgres.log"
        self.proc: subprocess.Popen[bytes] | None = None
        if os.geteuid() == 0:
            entry = pwd.getpwnam("postgres")
            os.chown(self.root, entry.pw_uid, entry.pw_gid)

    def url(self, database: str) -> str:
        return f"postgres://postgres@127.0.0.1:{self.port}/{database}"

    def init(self) -> None:
        subprocess.run(
            [
                postgres_bin("initdb"),
                "-D",
                str(self.data),
                "-U",
                "postgres",
                "--auth=trust",
                "--no-sync",  # a throw-away cluster; fsync itself stays on
                "-E",
                "UTF8",
                "--locale=C",
            ],
            check=True,
            capture_output=True,
            preexec_fn=_as_postgres,
        )

    def start(self) -> None:
        log = self.log.open("ab")
        self.proc = subprocess.Popen(
            [
                postgres_bin("postgres"),
                "-D",
                str(self.data),
                "-p",
                str(self.port),
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                f"unix_socket_directories={self.root}",
                "-c",
                "max_connections=60",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=_as_postgres,
            start_new_session=True,
        )
        log.close()
        _wait(
            [postgres_bin("pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(self.port)],
            60,
            "PostgreSQL",
        )

    def create_database(self, name: str) -> None:
        subprocess.run(
            [
                postgres_bin("createdb"),
                "-h",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-U",
                "postgres",
                name,
            ],
            check=True,
            capture_output=True,
        )

    def crash(self) -> None:
        """Immediate shutdown (what ``pg_ctl stop -m immediate`` sends):
        every connection is cut and the next start runs crash recovery."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None

    def restart(self, down_for: float) -> None:
        self.crash()
        time.sleep(down_for)
        self.start()

    def stop(self, *, delete: bool = True) -> None:
        """Stop (fast shutdown) and delete the cluster; safe to call twice."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None
        if delete:
            shutil.rmtree(self.root, ignore_errors=True)


class RedisServer:
    """A Redis without persistence: a restart loses every queued message."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port(56379)
        self.root = Path(tempfile.mkdtemp(prefix="saga-chaos-redis-"))
        self.proc: subprocess.Popen[bytes] | None = None

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def start(self) -> None:
        log = (self.root / "redis.log").open("ab")
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--bind",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.root),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent,
            start_new_session=True,
        )
        log.close()
        _wait(
            ["redis-cli", "-h", "127.0.0.1", "-p", str(self.port), "ping"],
            20,
            "Redis",
        )

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def restart(self, down_for: float) -> None:
        self.kill()
        time.sleep(down_for)
        self.start()

    def stop(self) -> None:
        self.kill()
        shutil.rmtree(self.root, ignore_errors=True)
