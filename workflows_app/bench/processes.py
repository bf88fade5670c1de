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
    SIGKILL what is left after ``grace`` seconds. Safe to call twice."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, None)):
        if proc.poll() is not None and sig is signal.SIGTERM:
            sig = signal.SIGKILL  # the leader is gone; its children may not be
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait)
            if sig is signal.SIGTERM:
                # The pool's children leave with the leader; make sure.
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
            return
        except subprocess.TimeoutExpired:
            continue
