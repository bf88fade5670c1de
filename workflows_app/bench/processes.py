"""Processes a benchmark (or a test) starts must not outlive it: a worker
left behind keeps consuming from the broker and takes the next run's tasks
to a database that is gone. Plain Python, no Django."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess

PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """preexec_fn: the child is killed when the process that started it dies.
    Set after any uid change, which would clear it."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def own_group_dying_with_parent() -> None:
    """preexec_fn for a process that starts children of its own (a Celery
    worker and its pool): a new process group, so :func:`stop_group` reaches
    them all, and killed with its parent."""
    os.setsid()
    die_with_parent()


def stop_group(
    proc: subprocess.Popen[bytes] | subprocess.Popen[str], grace: float = 30
) -> None:
    """SIGTERM the process group started with :func:`own_group_dying_with_parent`,
    then SIGKILL whatever of it is left (the leader after ``grace`` seconds,
    its children in any case). Safe to call twice."""
    if proc.poll() is None:
        _signal_group(proc, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace)
    _signal_group(proc, signal.SIGKILL)
    proc.wait()


def _signal_group(
    proc: subprocess.Popen[bytes] | subprocess.Popen[str], sig: signal.Signals
) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
