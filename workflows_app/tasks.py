"""Celery entry points: thin, id-based, idempotent. All logic is in the engine."""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

from celery import shared_task
from django.conf import settings

from workflows_app import alerts
from workflows_app.activities.runner import alarms_available, call_activity
from workflows_app.engine import commands, dispatch, sweeps
from workflows_app.engine.actors import Actor
from workflows_app.engine.commands import bulk
from workflows_app.webhooks import delivery


def _budget(task: Any) -> commands.InlineBudget | None:
    """Whether this task may run one more attempt of the given timeout before
    Celery's hard time limit; None where per-attempt alarms are unavailable."""
    if not alarms_available():
        return None
    started = time.monotonic()
    hard_limit: float | None = (task.request.timelimit or (None, None))[0]
    grace = settings.SAGA_HARD_TIMEOUT_GRACE

    def fits(timeout: timedelta) -> bool:
        if hard_limit is None:
            return True
        return time.monotonic() - started + timeout.total_seconds() + grace < hard_limit

    return fits


def _work(task: Any, claim: commands.Claim | None, actor: Actor, fits: Any) -> None:
    """Run claimed attempts one after another while the next is due at once."""
    while claim is not None:
        outcome = call_activity(claim)
        claim = commands.attempt_record_and_continue(
            claim, outcome, actor=actor, fits=fits, task_id=task.request.id or ""
        )


@shared_task(name=dispatch.ADVANCE, bind=True, ignore_result=True, acks_late=True)
def advance(self: Any, instance_id: str) -> None:
    actor = Actor.worker(self.request.hostname)
    fits = _budget(self)
    claim = commands.instance_advance(
        instance_id, actor=actor, fits=fits, task_id=self.request.id or ""
    )
    _work(self, claim, actor, fits)


@shared_task(name=dispatch.RUN_ATTEMPT, bind=True, ignore_result=True, acks_late=True)
def run_attempt(self: Any, instance_id: str, step_id: int, direction: str) -> None:
    """Claim the attempt (a no-op for a duplicate), call the activity outside any
    transaction, record the outcome, and go on with the next attempt if due."""
    actor = Actor.worker(self.request.hostname)
    claim = commands.attempt_claim(
        instance_id, step_id, direction, task_id=self.request.id or "", actor=actor
    )
    _work(self, claim, actor, _budget(self))


@shared_task(name="workflows.sweep", ignore_result=True)
def sweep() -> dict[str, int]:
    return sweeps.sweep_all()


@shared_task(name="workflows.send_alerts", ignore_result=True)
def send_alerts() -> dict[str, int]:
    return alerts.send_due_alerts()


@shared_task(name="workflows.send_webhooks", ignore_result=True)
def send_webhooks() -> dict[str, int]:
    return delivery.deliver_due()


@shared_task(name=dispatch.RUN_BULK_JOB, ignore_result=True, acks_late=True)
def run_bulk_job(job_id: int) -> str:
    """Work a bulk job for a while, then hand it back to the broker so that
    one long job never holds a worker (a duplicate message finds the lease
    taken and does nothing)."""
    state = bulk.bulk_job_work(job_id)
    if state == "more":
        dispatch.bulk_job_sender(job_id)()
    return state
