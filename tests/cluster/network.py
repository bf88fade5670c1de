"""Hosts made of Linux network namespaces on one bridge (needs root).

Each host is a namespace with its own loopback and one veth whose other end
is plugged into a bridge in the root namespace; the bridge has the subnet's
first address, so the driver (in the root namespace) reaches every host,
and the hosts reach each other through it. Ports are per namespace, so a
host's PostgreSQL on 5432 is not the shared server on the machine's 5432.

Every name carries the run's id (parallel runs do not clash) and a record
of the owner's pid is kept under ``STATE``: :func:`remove_stale` tears down
what a run that died without cleaning up (SIGKILL) left behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import random
import secrets
import shutil
import signal
import subprocess
import time
from pathlib import Path

CLONE_NEWNET = 0x40000000
CLONE_NEWUTS = 0x04000000
STATE = Path("/run/saga-cluster")
NS_PREFIX = "sagacl-"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True)


def enter_namespace(name: str, hostname: str = "") -> None:
    """Move the calling process into namespace ``name`` (a preexec_fn step)
    and, with ``hostname``, give it that host name (a UTS namespace of its
    own: the worker's name in the audit rows is its host's)."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {name}")
    finally:
        os.close(fd)
    if hostname:
        raw = hostname.encode()
        if libc.unshare(CLONE_NEWUTS) != 0 or libc.sethostname(raw, len(raw)) != 0:
            raise OSError(ctypes.get_errno(), f"hostname {hostname}")


def _free_subnet() -> str:
    """A 10.x.y.0/24 no interface on this machine uses."""
    used = _ip("-4", "-o", "addr").stdout + _ip("-4", "route").stdout
    for _ in range(200):
        prefix = f"10.{random.randint(160, 250)}.{random.randint(0, 255)}"
        if f" {prefix}." not in used:
            return prefix
    raise RuntimeError("no free 10.x.y.0/24 subnet")


class Network:
    """A bridge and the hosts plugged into it; :meth:`remove` undoes it all."""

    def __init__(self) -> None:
        self.run_id = secrets.token_hex(3)
        self.prefix = _free_subnet()
        self.bridge = f"scb{self.run_id}"
        self.hosts: dict[str, str] = {}  # host name -> address
        self._veth: dict[str, str] = {}  # host name -> root-side veth
        (STATE / self.run_id).mkdir(parents=True, exist_ok=True)
        (STATE / self.run_id / "owner").write_text(str(os.getpid()))
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.prefix}.1/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")

    def own(self, folder: Path) -> Path:
        """Delete ``folder`` with the run, also when a later run cleans up
        after this one."""
        with (STATE / self.run_id / "folders").open("a") as out:
            out.write(f"{folder}\n")
        return folder

    def namespace(self, host: str) -> str:
        return f"{NS_PREFIX}{self.run_id}-{host}"

    def add_host(self, host: str) -> str:
        """A new host with the next address; returns the address."""
        index = len(self.hosts)
        address = f"{self.prefix}.{index + 2}"
        ns = self.namespace(host)
        outside, inside = f"scv{self.run_id}{index}", f"sci{self.run_id}{index}"
        _ip("netns", "add", ns)
        self.hosts[host] = address
        _ip("link", "add", outside, "type", "veth", "peer", "name", inside)
        self._veth[host] = outside
        _ip("link", "set", outside, "master", self.bridge, "up")
        _ip("link", "set", inside, "netns", ns)
        for args in (
            ("link", "set", inside, "name", "eth0"),
            ("link", "set", "lo", "up"),
            ("link", "set", "eth0", "up"),
            ("addr", "add", f"{address}/24", "dev", "eth0"),
        ):
            _ip("-n", ns, *args)
        return address

    # -- faults -------------------------------------------------------------
    def cut(self, host: str) -> None:
        """Pull the host's cable at the switch: every packet to and from it
        is dropped (the host's connections stay open, as on a real
        partition, and resume or time out when it heals)."""
        _ip("link", "set", self._veth[host], "down")

    def heal(self, host: str) -> None:
        _ip("link", "set", self._veth[host], "up")

    def pids(self, host: str) -> list[int]:
        out = _ip("netns", "pids", self.namespace(host), check=False).stdout
        return [int(p) for p in out.split()]

    def kill_host(self, host: str) -> int:
        """SIGKILL every process in the host (a power cut); returns how many."""
        return _kill_namespace(self.namespace(host))

    # -- teardown -----------------------------------------------------------
    def remove(self) -> None:
        """Kill every process in every host, delete the namespaces (which
        deletes their veths) and the bridge. Safe to call twice."""
        _remove_run(self.run_id)


def _kill_namespace(ns: str) -> int:
    killed = 0
    for _ in range(20):
        out = _ip("netns", "pids", ns, check=False).stdout.split()
        if not out:
            return killed
        for pid in out:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
                killed += 1
        time.sleep(0.1)
    return killed


def _remove_run(run_id: str) -> None:
    for line in _ip("netns", "list", check=False).stdout.splitlines():
        ns = line.split()[0] if line.split() else ""
        if ns.startswith(f"{NS_PREFIX}{run_id}-"):
            _kill_namespace(ns)
            _ip("netns", "del", ns, check=False)
    links = _ip("-o", "link", "show", check=False).stdout
    for line in links.splitlines():
        name = line.split(":")[1].strip().split("@")[0]
        if name.startswith((f"scv{run_id}", f"scb{run_id}")):
            _ip("link", "del", name, check=False)
    record = STATE / run_id
    with contextlib.suppress(FileNotFoundError):
        for folder in (record / "folders").read_text().split():
            shutil.rmtree(folder, ignore_errors=True)
    shutil.rmtree(record, ignore_errors=True)


def remove_stale() -> list[str]:
    """Tear down the runs whose owner process is gone; returns their ids."""
    removed = []
    for record in STATE.glob("*") if STATE.exists() else []:
        with contextlib.suppress(ValueError, FileNotFoundError):
            pid = int((record / "owner").read_text())
            try:
                os.kill(pid, 0)
                continue  # still running
            except ProcessLookupError:
                pass
            _remove_run(record.name)
            removed.append(record.name)
    return removed
