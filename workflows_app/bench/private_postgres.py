"""A throw-away PostgreSQL cluster for a benchmark: initdb into a temporary
folder, one postmaster on a free loopback port, ``pg_stat_statements``
preloaded, trust authentication for ``postgres``. Nothing else connects to
it, so the server's counters (transactions, statements, sessions) are the
benchmark's own. It dies with the process that started it and is deleted by
:meth:`PrivatePostgres.stop`.

:func:`restart_cluster` restarts a cluster that a benchmark owns (this one
or a long-lived one such as a 1,000,000-instance database), for figures of
the first load after a restart.

(``tests/chaos/services.py`` has its own cluster for crash tests; the bench
app is installed without the tests, so it cannot import that one.)
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


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _as_postgres() -> None:
    """preexec_fn: PostgreSQL refuses to run as root; the server is killed
    when the benchmark dies (set after the uid change, which clears it)."""
    if os.geteuid() == 0:
        entry = pwd.getpwnam("postgres")
        os.setgid(entry.pw_gid)
        os.setuid(entry.pw_uid)
    die_with_parent()


def postgres_bin(name: str) -> str:
    found = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))
    if not found:
        raise RuntimeError(f"no PostgreSQL {name} under /usr/lib/postgresql")
    return str(found[-1])


class PrivatePostgres:
    def __init__(self) -> None:
        self.port = _free_port()
        self.root = Path(tempfile.mkdtemp(prefix="saga-bench-pg-"))
        self.data = self.root / "data"
        self.proc: subprocess.Popen[bytes] | None = None
        if os.geteuid() == 0:
            entry = pwd.getpwnam("postgres")
            os.chown(self.root, entry.pw_uid, entry.pw_gid)

    def url(self, database: str) -> str:
        return f"postgres://postgres@127.0.0.1:{self.port}/{database}"

    def start(self, database: str) -> None:
        """initdb, start the server and create ``database``."""
        subprocess.run(
            [
                postgres_bin("initdb"),
                *("-D", str(self.data), "-U", "postgres", "--auth=trust"),
                *("--no-sync", "-E", "UTF8", "--locale=C"),
            ],
            check=True,
            capture_output=True,
            preexec_fn=_as_postgres,
        )
        log = (self.root / "postgres.log").open("ab")
        if os.geteuid() == 0:  # restart_cluster's pg_ctl appends to it
            entry = pwd.getpwnam("postgres")
            os.chown(log.name, entry.pw_uid, entry.pw_gid)
        self.proc = subprocess.Popen(
            [
                postgres_bin("postgres"),
                *("-D", str(self.data), "-p", str(self.port)),
                *("-c", "listen_addresses=127.0.0.1"),
                *("-c", f"unix_socket_directories={self.root}"),
                *("-c", "shared_preload_libraries=pg_stat_statements"),
                *("-c", "pg_stat_statements.max=10000"),
                *("-c", "max_connections=100"),
                # Django's zone: no SET TIME ZONE on each new connection.
                *("-c", "timezone=UTC"),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=_as_postgres,
            start_new_session=True,
        )
        log.close()
        ready = [postgres_bin("pg_isready"), "-q", "-h", "127.0.0.1", "-p"]
        deadline = time.monotonic() + 60
        while subprocess.run([*ready, str(self.port)]).returncode != 0:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"PostgreSQL did not start; see {self.root}")
            time.sleep(0.1)
        subprocess.run(
            [
                postgres_bin("createdb"),
                *("-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres"),
                database,
            ],
            check=True,
            capture_output=True,
        )

    def stop(self) -> None:
        """Fast shutdown, then delete the cluster; safe to call twice."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None
        if (self.data / "postmaster.pid").exists():
            # Restarted by restart_cluster: pg_ctl started that postmaster.
            with contextlib.suppress(RuntimeError):
                _pg_ctl(self.data, "stop", "-m", "immediate")
        shutil.rmtree(self.root, ignore_errors=True)


def _pg_ctl(data: Path, *args: str) -> None:
    """pg_ctl as the owner of ``data`` (PostgreSQL refuses to run as root)."""
    owner = data.stat()

    def as_owner() -> None:
        if os.geteuid() == 0:
            os.setgid(owner.st_gid)
            os.setuid(owner.st_uid)

    done = subprocess.run(
        [postgres_bin("pg_ctl"), "-D", str(data), "-w", "-t", "300", *args],
        # The postmaster pg_ctl starts writes to the log, not to our pipes.
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        preexec_fn=as_owner,
    )
    if done.returncode:
        raise RuntimeError(f"pg_ctl {' '.join(args)}: {done.stdout}{done.stderr}")


def restart_cluster(data: Path, *, drop_os_cache: bool = False) -> None:
    """Fast shutdown of the cluster in ``data`` and a start with the options
    it last started with (``pg_ctl restart`` reads ``postmaster.opts``): its
    shared buffers are empty. With ``drop_os_cache`` (root only) the
    operating system's page cache is dropped too, as after a reboot (for the
    whole machine: other processes' reads are slower for a while)."""
    _pg_ctl(data, "restart", "-m", "fast", "-l", str(data.parent / "postgres.log"))
    if drop_os_cache:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
