"""The database host's servers: a PostgreSQL cluster, a Redis and a RabbitMQ
of the run's own, each started inside the host's namespace and listening on
its address (the shared servers on the machine are never touched; the
ports are the namespace's own).

No Django here: the driver starts them before it configures Django.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from tests.chaos.services import PostgresCluster, _as_postgres, die_with_parent
from tests.chaos.services import postgres_bin as pg_bin
from tests.cluster.network import enter_namespace


def in_namespace(ns: str, *then: Callable[[], None]) -> Callable[[], None]:
    """A preexec_fn: join the host's namespace, then ``then`` (uid changes
    come after: joining a namespace needs root)."""

    def preexec() -> None:
        enter_namespace(ns)
        for step in then:
            step()

    return preexec


def wait_port(address: str, port: int, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with (
            contextlib.suppress(OSError),
            socket.create_connection((address, port), timeout=1),
        ):
            return
        time.sleep(0.2)
    raise RuntimeError(f"{what} on {address}:{port} not up within {timeout}s")


class HostPostgres(PostgresCluster):
    """The chaos run's throw-away cluster, in a namespace, on its address."""

    def __init__(self, ns: str, address: str) -> None:
        super().__init__(port=5432)
        self.ns = ns
        self.address = address

    def url(self, database: str) -> str:
        return f"postgres://postgres@{self.address}:{self.port}/{database}"

    def start(self) -> None:
        # Trust for the subnet: the run's hosts are the only clients.
        hba = self.data / "pg_hba.conf"
        line = f"host all all {self.address.rsplit('.', 1)[0]}.0/24 trust\n"
        if line not in hba.read_text():
            with hba.open("a") as out:
                out.write(line)
        log = self.log.open("ab")
        self.proc = subprocess.Popen(
            [
                pg_bin("postgres"),
                "-D",
                str(self.data),
                "-p",
                str(self.port),
                "-c",
                f"listen_addresses={self.address}",
                "-c",
                f"unix_socket_directories={self.root}",
                "-c",
                "max_connections=80",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=in_namespace(self.ns, _as_postgres),
            start_new_session=True,
        )
        log.close()
        wait_port(self.address, self.port, 60, "PostgreSQL")
        deadline = time.monotonic() + 60
        while subprocess.run(
            [pg_bin("pg_isready"), "-q", "-h", self.address, "-p", str(self.port)]
        ).returncode:
            if time.monotonic() > deadline:
                raise RuntimeError("PostgreSQL did not accept connections")
            time.sleep(0.2)

    def create_database(self, name: str) -> None:
        subprocess.run(
            [pg_bin("createdb"), "-h", self.address, "-U", "postgres", name],
            check=True,
            capture_output=True,
        )


class Broker:
    """What the run needs of a broker: start, kill (a crash), a URL."""

    kind = ""
    port = 0
    user = ""  # run as this user (root switches to it)

    def __init__(self, ns: str, address: str) -> None:
        self.ns = ns
        self.address = address
        self.root = Path(tempfile.mkdtemp(prefix=f"saga-cluster-{self.kind}-"))
        self.proc: subprocess.Popen[bytes] | None = None

    def url(self) -> str:
        raise NotImplementedError

    def command(self) -> tuple[list[str], dict[str, str]]:
        raise NotImplementedError

    def start(self, wait: bool = True) -> None:
        command, env = self.command()
        with (self.root / f"{self.kind}.log").open("ab") as log:
            self.proc = subprocess.Popen(
                command,
                cwd=self.root,
                env={**os.environ, **env},
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=in_namespace(self.ns, self._as_user, die_with_parent),
                start_new_session=True,
            )
        if wait:
            self.wait()

    def _as_user(self) -> None:
        if self.user and os.geteuid() == 0:
            entry = pwd.getpwnam(self.user)
            os.setgid(entry.pw_gid)
            os.setuid(entry.pw_uid)

    def wait(self, timeout: float = 90) -> None:
        wait_port(self.address, self.port, timeout, self.kind)

    def kill(self) -> None:
        """SIGKILL the server's whole process group (a crash)."""
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None


class HostRedis(Broker):
    """No persistence: a restart loses every queued message."""

    kind = "redis"
    port = 6379

    def url(self) -> str:
        return f"redis://{self.address}:{self.port}/0"

    def command(self) -> tuple[list[str], dict[str, str]]:
        return [
            "redis-server",
            "--bind",
            self.address,
            "--port",
            str(self.port),
            "--protected-mode",
            "no",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.root),
        ], {}


class HostRabbitMQ(Broker):
    """A private RabbitMQ node: its own node name, config, mnesia folder,
    Erlang cookie (HOME) and, being in its own namespace, its own epmd and
    ports. Queues are durable and Celery's messages persistent, so a crash
    keeps what was queued (unacknowledged deliveries come back)."""

    kind = "rabbitmq"
    port = 5672
    # Debian's /usr/sbin/rabbitmq-server switches to this user with su,
    # which would reset HOME (the cookie) and the folder; we switch ourselves.
    user = "rabbitmq"

    def url(self) -> str:
        return f"amqp://guest:guest@{self.address}:{self.port}//"

    def command(self) -> tuple[list[str], dict[str, str]]:
        conf = self.root / "rabbitmq.conf"
        if not conf.exists():
            conf.write_text(
                f"listeners.tcp.default = {self.address}:{self.port}\n"
                # guest from another host (the default allows loopback only)
                "loopback_users = none\n"
            )
            (self.root / "enabled_plugins").write_text("[].\n")
            if os.geteuid() == 0:
                entry = pwd.getpwnam(self.user)
                for path in [self.root, *self.root.iterdir()]:
                    os.chown(path, entry.pw_uid, entry.pw_gid)
        return ["/usr/lib/rabbitmq/bin/rabbitmq-server"], {
            "HOME": str(self.root),
            "RABBITMQ_NODENAME": "rabbit@localhost",
            "RABBITMQ_MNESIA_BASE": str(self.root / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.root / "log"),
            "RABBITMQ_CONFIG_FILE": str(conf),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.root / "enabled_plugins"),
            "RABBITMQ_PID_FILE": str(self.root / "pid"),
        }
