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

from workflows_app.celery import app

log = logging.getLogger(__name__)

# The tasks of workflows_app.tasks, by the names they are registered under:
# sending by name keeps the engine below the task module that calls it.
RUN_ATTEMPT = "workflows.run_attempt"
ADVANCE = "workflows.advance"
RUN_BULK_JOB = "workflows.run_bulk_job"


def send(name: str, args: list[Any], **options: Any) -> None:
    app.send_task(name, args=args, **options)


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
    def sender() -> None:
        options: dict[str, Any] = {"time_limit": hard_time_limit(timeout)}
        if delay > timedelta(0):
            options["countdown"] = delay.total_seconds()
        send(RUN_ATTEMPT, [str(instance_id), step_id, direction], **options)

    return sender


def advance_sender(instance_id: Any) -> Callable[[], None]:
    def sender() -> None:
        send(ADVANCE, [str(instance_id)], time_limit=hard_time_limit(timedelta(0)))

    return sender


def bulk_job_sender(job_id: int) -> Callable[[], None]:
    def sender() -> None:
        # A queue of its own when configured, so a long job never queues
        # ahead of step attempts (workers then also consume that queue).
        queue = settings.SAGA_BULK_QUEUE or None
        send(RUN_BULK_JOB, [job_id], queue=queue)

    return sender
