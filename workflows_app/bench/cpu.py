"""CPU time of process trees, from Linux's /proc: what a benchmark's worker,
database server and broker each spent, so it can say where the time per
workflow goes (and so which part limits throughput on this machine).

A tree's time is the sum, over its live processes, of their own user and
system time plus that of the children they have reaped: a process that
exited and was waited for is in its parent's ``cutime``/``cstime``, a live
one is counted by itself, so nothing is counted twice. Children that exited
and were never waited for are lost (the worker pool and PostgreSQL's
postmaster wait for theirs). Plain Python, no Django.
"""

from __future__ import annotations

import os
from pathlib import Path

PROC = Path("/proc")
TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def available() -> bool:
    return (PROC / "self" / "stat").exists()


def _stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, seconds of CPU of the process and its reaped children)."""
    try:
        text = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces.
    fields = text[text.rindex(")") + 2 :].split()
    ppid = int(fields[1])
    utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
    return ppid, (utime + stime + cutime + cstime) / TICKS


def tree_seconds(root: int) -> float:
    """CPU seconds used so far by ``root`` and every process under it."""
    parents: dict[int, int] = {}
    seconds: dict[int, float] = {}
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        found = _stat(int(entry.name))
        if found is not None:
            parents[int(entry.name)], seconds[int(entry.name)] = found
    total = 0.0
    for pid, used in seconds.items():
        node = pid
        while node > 1 and node != root:
            node = parents.get(node, 0)
        if node == root:
            total += used
    return total


def parent_of(pid: int) -> int | None:
    found = _stat(pid)
    return None if found is None else found[0]


def machine_ticks() -> dict[str, int]:
    """The whole machine's CPU time so far, in clock ticks, from /proc/stat:
    ``steal`` (time the hypervisor gave to other guests while this one
    wanted to run), ``idle`` (with I/O wait) and ``all``. A share of steal
    that changes between rounds says the machine's speed changed, whatever
    the code did."""
    try:
        first = (PROC / "stat").read_text().splitlines()[0]
    except (OSError, IndexError):
        return {}
    # cpu user nice system idle iowait irq softirq steal guest guest_nice;
    # guest time is in user already.
    ticks = [int(x) for x in first.split()[1:9]]
    if len(ticks) < 8:
        return {}
    return {"steal": ticks[7], "idle": ticks[3] + ticks[4], "all": sum(ticks)}
