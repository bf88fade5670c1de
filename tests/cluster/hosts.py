"""The cluster's hosts and what runs on each.

======  ==========================================================
host    processes
======  ==========================================================
db      PostgreSQL, and the broker (Redis, or a RabbitMQ node)
web     gunicorn (the API the traffic goes through)
w1      celery worker (prefork, one child) and celery beat
w2      celery worker (prefork, one child) and celery beat
w3      celery worker (prefork, one child)
======  ==========================================================

The driver (the test itself) sits in the root namespace, on the bridge's
address: it sends the traffic to the web host and reads the verdict from
the database host. Each worker host has its own var folder (metrics, beat
schedule), its own host name and its own ``application_name`` on its
database connections, so the database can tell who did what.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

from tests.celery_processes import beat_command, process_env, worker_command
from tests.chaos.services import die_with_parent
from tests.cluster.network import STATE, Network, enter_namespace
from tests.cluster.services import (
    Broker,
    HostPostgres,
    HostRabbitMQ,
    HostRedis,
    wait_port,
)

WORKER_HOSTS = ("w1", "w2", "w3")
BEAT_HOSTS = ("w1", "w2")
WEB_PORT = 8000
METRICS_PORT = 9100  # a worker serves /metrics once ready: the readiness probe
DATABASE = "cluster"
SECRET = "cluster-test-secret-key-not-for-production-0123456789abcdef"


class Cluster:
    def __init__(self, rundir: Path, settings: dict[str, str]) -> None:
        self.rundir = rundir
        self.settings = settings  # SAGA_* for every process
        self.net = Network()
        try:
            self.address = {
                host: self.net.add_host(host) for host in ("db", "web", *WORKER_HOSTS)
            }
        except BaseException:
            self.net.remove()
            raise
        self.net.own(rundir)
        db = self.net.namespace("db")
        self.pg = HostPostgres(db, self.address["db"])
        self.brokers: dict[str, Broker] = {
            "redis": HostRedis(db, self.address["db"]),
            "rabbitmq": HostRabbitMQ(db, self.address["db"]),
        }
        for folder in [self.pg.root, *(b.root for b in self.brokers.values())]:
            self.net.own(folder)
        self.broker: Broker = self.brokers["redis"]
        self.procs: dict[str, list[subprocess.Popen[bytes]]] = {}
        self._spawned = 0

    @property
    def driver_address(self) -> str:
        return f"{self.net.prefix}.1"

    def database_url(self, host: str) -> str:
        return f"{self.pg.url(DATABASE)}?application_name={host}"

    def web_url(self) -> str:
        return f"http://{self.address['web']}:{WEB_PORT}"

    # -- processes ------------------------------------------------------------
    def var(self, host: str) -> Path:
        """The host's var folder (metrics, beat schedule), one per broker
        run: each run's counters start at 0."""
        return self.rundir / self.broker.kind / host

    def env(self, host: str) -> dict[str, str]:
        var = self.var(host)
        (var / "prometheus").mkdir(parents=True, exist_ok=True)
        env = process_env(
            database=self.database_url(host),
            broker=self.broker.url(),
            SAGA_DESK_VAR_DIR=str(var),
            PROMETHEUS_MULTIPROC_DIR=str(var / "prometheus"),
            SECRET_KEY=SECRET,
            ALLOWED_HOSTS=self.address["web"],
            SAGA_DESK_NO_BOOTSTRAP="1",
            LOG_LEVEL="WARNING",
            **self.settings,
        )
        if host in WORKER_HOSTS:
            env["SAGA_METRICS_WORKER_BIND"] = f"{self.address[host]}:{METRICS_PORT}"
        return env

    def spawn(self, host: str, name: str, command: list[str]) -> None:
        ns = self.net.namespace(host)

        def preexec() -> None:
            enter_namespace(ns, f"cluster-{host}")
            die_with_parent()

        self._spawned += 1
        log = self.rundir / f"{host}-{name}-{self._spawned}.log"
        with log.open("ab") as out:
            proc = subprocess.Popen(
                command,
                cwd=Path(__file__).resolve().parents[2],
                env=self.env(host),
                stdout=out,
                stderr=subprocess.STDOUT,
                preexec_fn=preexec,
                start_new_session=True,
            )
        self.procs.setdefault(host, []).append(proc)

    def boot_worker_host(self, host: str) -> None:
        """The host's worker (and beat where it has one), not waiting."""
        self.spawn(host, "worker", worker_command(1, host, level="warning"))
        if host in BEAT_HOSTS:
            schedule = self.var(host) / f"beat-schedule-{self._spawned}"
            self.spawn(host, "beat", beat_command(schedule))

    def wait_worker(self, host: str, timeout: float = 90) -> None:
        wait_port(self.address[host], METRICS_PORT, timeout, f"worker on {host}")

    def boot_web(self) -> None:
        bind = f"{self.address['web']}:{WEB_PORT}"
        gunicorn = str(Path(worker_command(1, "x")[0]).with_name("gunicorn"))
        command = [gunicorn, "workflows_app.wsgi", "--bind", bind]
        self.spawn("web", "gunicorn", [*command, "--workers", "2", "--threads", "2"])

    def wait_web(self, timeout: float = 90) -> None:
        wait_port(self.address["web"], WEB_PORT, timeout, "gunicorn")

    def sweeps_by_host(self) -> dict[str, int | str]:
        """Sweeps each worker host ran, from its own /metrics (the counters
        of its processes since the run began, a killed one's included)."""
        counts: dict[str, int | str] = {}
        for host in WORKER_HOSTS:
            url = f"http://{self.address[host]}:{METRICS_PORT}/metrics"
            try:
                with urllib.request.urlopen(url, timeout=10) as answer:
                    text = answer.read().decode()
            except OSError as exc:
                codes = [p.poll() for p in self.procs.get(host, [])]
                counts[host] = f"no answer ({exc}); exit codes {codes}"
                continue
            counts[host] = int(
                sum(
                    float(line.split()[-1])
                    for line in text.splitlines()
                    if line.startswith("saga_sweep_duration_seconds_count")
                )
            )
        return counts

    def diagnose(self, host: str) -> str:
        """What the host's processes are doing: each one's command, kernel
        state and Python stacks (py-spy, when installed), and the host's
        TCP connections with their timers (``ss``)."""
        lines = []
        py_spy = shutil.which("py-spy") or shutil.which(
            "py-spy", path=str(Path(sys.executable).parent)
        )
        for pid in self.net.pids(host):
            proc = Path(f"/proc/{pid}")
            try:
                command = (proc / "cmdline").read_bytes().replace(b"\0", b" ")
                state = [
                    line
                    for line in (proc / "status").read_text().splitlines()
                    if line.startswith(("State", "PPid"))
                ]
                wchan = (proc / "wchan").read_text()
            except OSError:
                continue
            lines.append(f"-- pid {pid}: {command.decode()[:160]}")
            lines.append(f"   {' '.join(state)} wchan {wchan}")
            if py_spy:
                dump = subprocess.run(
                    [py_spy, "dump", "--pid", str(pid)],
                    capture_output=True,
                    text=True,
                    timeout=30,
                )
                lines += [f"   {line}" for line in dump.stdout.splitlines()]
        sockets = subprocess.run(
            ["ip", "netns", "exec", self.net.namespace(host), "ss", "-tnpo"],
            capture_output=True,
            text=True,
        )
        lines += ["-- TCP connections", *sockets.stdout.splitlines()]
        # The other ends, as the database host sees them: a connection the
        # host holds that is missing here is half-open.
        address = self.address[host]
        peers = subprocess.run(
            ["ip", "netns", "exec", self.net.namespace("db"), "ss", "-tn"],
            capture_output=True,
            text=True,
        )
        lines += [f"-- the db host's connections with {host}"]
        lines += [line for line in peers.stdout.splitlines() if f" {address}:" in line]
        return "\n".join(lines)

    def kill_host(self, host: str) -> int:
        """Every process on the host, at once (a power cut)."""
        killed = self.net.kill_host(host)
        for proc in self.procs.pop(host, []):
            proc.wait()
        return killed

    def stop_application(self) -> None:
        """At quiescence nothing is in flight: every host is simply powered
        off (a warm shutdown of seven processes would only cost time)."""
        for host in ("web", *WORKER_HOSTS):
            self.net.heal(host)
            self.kill_host(host)

    def use_broker(self, kind: str) -> Broker:
        self.broker = self.brokers[kind]
        return self.broker

    def remove(self, *, keep_logs: bool = False) -> None:
        """Everything, also after a failure: processes, servers, namespaces,
        folders (but the logs with ``keep_logs``)."""
        for broker in self.brokers.values():
            broker.proc = None  # killed with its namespace
        self.pg.proc = None
        if keep_logs:
            (STATE / self.net.run_id / "folders").unlink(missing_ok=True)
        self.net.remove()

    def describe(self) -> dict[str, Any]:
        return {"subnet": f"{self.net.prefix}.0/24", **self.address}
