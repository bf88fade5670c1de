"""Calling an activity in a worker: time limit, error classification.

The per-attempt timeout is enforced inside the worker with ``SIGALRM`` (the
prefork and solo pools run tasks on the main thread of a process). The
exception derives from ``BaseException`` so that an activity's broad
``except Exception`` cannot swallow it. Celery's hard ``time_limit`` stays as
the backstop that kills a process stuck in C code.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded

from workflows_app.activities import get_activity
from workflows_app.activities.base import ActivityError, Claim, Outcome, Waiting

log = logging.getLogger(__name__)


class AttemptTimeout(BaseException):
    """The attempt ran past its step's timeout."""


def alarms_available() -> bool:
    return (
        hasattr(signal, "setitimer")
        and threading.current_thread() is threading.main_thread()
    )


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    if not alarms_available():
        yield
        return

    def expire(signum: int, frame: Any) -> None:
        raise AttemptTimeout

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(0.001, seconds))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def call_activity(claim: Claim) -> Outcome:
    """Run the claimed attempt's activity and classify what happened."""
    try:
        fn = get_activity(claim.activity)
        with time_limit(claim.timeout.total_seconds()):
            result = fn(claim.context)
    except (AttemptTimeout, SoftTimeLimitExceeded):
        return Outcome(
            "timed_out",
            error_class="Timeout",
            error_message=f"no outcome within {claim.timeout.total_seconds():g}s "
            "(interrupted in the worker)",
        )
    except ActivityError as exc:
        return Outcome(
            "failed",
            error_class=type(exc).__name__,
            error_message=str(exc),
            permanent=exc.permanent,
            retry_after=exc.retry_after,
        )
    except LookupError as exc:
        return Outcome(
            "failed", error_class="LookupError", error_message=str(exc), permanent=True
        )
    except Exception as exc:
        # An unexpected error is retried within the step's attempt budget.
        log.exception("activity %s raised", claim.activity)
        return Outcome("failed", error_class=type(exc).__name__, error_message=str(exc))
    if isinstance(result, Waiting):
        return Outcome("waiting", output=dict(result.detail))
    try:
        json.dumps(result)
    except (TypeError, ValueError) as exc:
        return Outcome(
            "failed",
            error_class="TypeError",
            permanent=True,
            error_message=f"activity output is not JSON: {exc}",
        )
    return Outcome("succeeded", output=result)
