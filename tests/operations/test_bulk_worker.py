"""A bulk job over 10,000 held instances on a real Celery worker and Redis,
on PostgreSQL: the worker is killed mid-way, the job is taken over after its
lease runs out, and in the end every planned instance was acted on exactly
once, as many as the dry run said."""

from __future__ import annotations

import signal
import subprocess
import time

import pytest
from django.db.models import Count
from django.test import override_settings

from tests.celery_processes import celery_processes, wait_for
from tests.operations.conftest import held
from tests.support import LocalBroker
from workflows_app.bench.management.commands.bench_bulk import clone_instance
from workflows_app.engine import sweeps
from workflows_app.engine.commands import bulk
from workflows_app.engine.locking import db_now
from workflows_app.models import (
    BulkJob,
    TransitionLog,
    WorkflowInstance,
)

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.celery_worker]
INSTANCES = 10_000
QUEUE = "saga-bulk-test"


@pytest.fixture(autouse=True)
def empty_broker():
    from workflows_app.celery import app

    with app.connection_for_write() as conn:
        conn.default_channel.client.flushdb()
    yield
    with app.connection_for_write() as conn:
        conn.default_channel.client.flushdb()


def clone(template: WorkflowInstance, copies: int) -> None:
    clone_instance(template, copies, "BULK-")


def test_bulk_job_survives_a_killed_worker(wf, operator):
    with LocalBroker() as broker:  # only to build the held original
        clone(held(broker, "ORD-template"), INSTANCES - 1)
    job = bulk.bulk_job_plan(
        WorkflowInstance.objects.filter(definition_key="orders"),
        action="retry",
        reason="gateway is back",
        user=operator,
        description="orders held at charge",
    )
    planned = job.items.filter(outcome="pending").count()
    assert planned == INSTANCES

    def done() -> int:
        return job.items.exclude(outcome="pending").count()

    worker_env = {
        "SAGA_BULK_QUEUE": QUEUE,
        "SAGA_BULK_LEASE": "3",
        "SAGA_BULK_TASK_BUDGET": "5",
    }
    with (
        override_settings(SAGA_BULK_QUEUE=QUEUE, SAGA_REDISPATCH_AFTER=2),
        # Only the bulk queue: the step attempts the retries send stay queued,
        # so the worker's time goes to the job. The test runs the sweep.
        celery_processes(
            concurrency=1, beat=False, queues=QUEUE, extra_env=worker_env
        ) as procs,
    ):
        bulk.bulk_job_confirm(job.pk, user=operator)
        wait_for(lambda: done() >= 1000, 180, "the job to get going")
        pool = subprocess.run(
            ["pgrep", "-P", str(procs["worker"].pid)], capture_output=True, text=True
        ).stdout.split()
        assert pool, "no pool process to kill"
        for pid in pool:
            subprocess.run(["kill", f"-{signal.SIGKILL.value}", pid], check=False)
        killed_at = done()
        assert killed_at < INSTANCES, "killed too late to prove anything"

        deadline = time.monotonic() + 400
        while time.monotonic() < deadline:
            # What beat does every few seconds: re-send jobs nobody holds.
            sweeps.redispatch_bulk_jobs(db_now(), 10)
            job.refresh_from_db()
            if job.status == "finished":
                break
            time.sleep(0.5)
        assert job.status == "finished", (job.status, done())

    outcomes = dict(job.items.values_list("outcome").annotate(n=Count("id")))
    assert outcomes == {"done": planned}
    retries = TransitionLog.objects.filter(transition="retry_step")
    per_instance = retries.values("instance").annotate(n=Count("id"))
    assert per_instance.count() == planned
    assert not per_instance.filter(n__gt=1).exists()
    assert retries.filter(data__bulk_job=job.pk).count() == planned
    assert BulkJob.objects.get().lease_until is None
