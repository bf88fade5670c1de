"""Sending work to Celery. Only ever called after the database commit.

The broker is transport, not truth: a message that fails to send is logged
and the sweeper sends it again at the row's ``redispatch_at``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from django.conf import settings

log = logging.getLogger(__name__)


def hard_time_limit(timeout: timedelta) -> float:
    """Celery's backstop for a task: the attempt's own timeout (enforced in
    the worker by an alarm) plus grace, plus the time the worker may spend
    continuing with the instance's next attempts in the same task."""
    return (
        max(1.0, timeout.total_seconds())
        + settings.SAGA_HARD_TIMEOUT_GRACE
        + settings.SAGA_INLINE_BUDGET
    )


def attempt_sender(
    instance_id: Any, step_id: int, direction: str, timeout: timedelta, delay: timedelta
) -> Callable[[], None]:
    def send() -> None:
        from workflows_app.tasks import run_attempt

        options: dict[str, Any] = {"time_limit": hard_time_limit(timeout)}
        if delay > timedelta(0):
            options["countdown"] = delay.total_seconds()
        run_attempt.apply_async(args=(str(instance_id), step_id, direction), **options)

    return send


def advance_sender(instance_id: Any) -> Callable[[], None]:
    def send() -> None:
        from workflows_app.tasks import advance

        advance.apply_async(
            args=(str(instance_id),),
            # Celery takes float seconds; celery-types declares int.
            time_limit=hard_time_limit(timedelta(0)),  # type: ignore[arg-type]
        )

    return send


def bulk_job_sender(job_id: int) -> Callable[[], None]:
    def send() -> None:
        from workflows_app.tasks import run_bulk_job

        # A queue of its own when configured, so a long job never queues
        # ahead of step attempts (workers then also consume that queue).
        queue = settings.SAGA_BULK_QUEUE
        options: dict[str, Any] = {"queue": queue} if queue else {}
        run_bulk_job.apply_async(args=(job_id,), **options)

    return send
