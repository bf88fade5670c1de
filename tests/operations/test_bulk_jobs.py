"""Bulk jobs in the engine: the plan is the dry run, the job does exactly what
the plan said, once per instance, and can be paused, cancelled, resumed and
taken over after a crash."""

from __future__ import annotations

from unittest import mock

import pytest

from tests.operations.conftest import finished, held
from tests.support import user_in
from workflows_app.engine.commands import bulk, instance_compensate, instance_retry_step
from workflows_app.engine.errors import InvalidInput, NotPermitted
from workflows_app.models import BulkJob, BulkJobItem, TransitionLog, WorkflowInstance

pytestmark = pytest.mark.django_db(transaction=True)


def plan(user, action="retry", **kwargs):
    return bulk.bulk_job_plan(
        WorkflowInstance.objects.filter(definition_key="orders"),
        action=action,
        reason=kwargs.pop("reason", "gateway is back"),
        user=user,
        description="orders",
        **kwargs,
    )


def outcomes(job):
    return sorted(job.items.values_list("instance__business_key", "outcome"))


def test_plan_previews_and_changes_nothing(broker, wf, operator):
    held_ones = [held(broker, f"ORD-{n}") for n in range(3)]
    finished(broker, "ORD-done")
    versions = {i.pk: i.version for i in held_ones}
    logs = TransitionLog.objects.count()

    job = plan(operator)

    assert job.status == "draft"
    assert TransitionLog.objects.count() == logs
    assert {
        i.pk: i.version for i in WorkflowInstance.objects.filter(pk__in=versions)
    } == versions
    assert outcomes(job) == [
        ("ORD-0", "pending"),
        ("ORD-1", "pending"),
        ("ORD-2", "pending"),
        ("ORD-done", "skipped"),
    ]
    assert set(job.items.values_list("plan", flat=True)) == {
        "retry charge",
        "already completed: nothing to retry",
    }
    assert broker.queue == []


def test_confirmed_job_does_exactly_the_plan_once(broker, wf, operator):
    for n in range(4):
        held(broker, f"ORD-{n}")
    finished(broker, "ORD-done")
    job = plan(operator, rate=0)
    planned = job.items.filter(outcome="pending").count()

    bulk.bulk_job_confirm(job.pk, user=operator)
    bulk.bulk_job_confirm(job.pk, user=operator)  # a double click: nothing more
    assert [m.task for m in broker.queue] == ["run_bulk_job"]
    assert bulk.bulk_job_work(job.pk) == "finished"

    job.refresh_from_db()
    assert job.status == "finished" and job.finished_at is not None
    assert job.items.filter(outcome="done").count() == planned == 4
    # Every held instance got exactly one retry, attributed to the operator
    # and the job, with the job's reason.
    retries = TransitionLog.objects.filter(transition="retry_step")
    assert retries.count() == 4
    assert {(r.user_id, r.reason, r.data["bulk_job"]) for r in retries} == {
        (operator.pk, "gateway is back", job.pk)
    }
    broker.run()  # the retried steps run; the confirm's message finds no work
    states = WorkflowInstance.objects.filter(definition_key="orders")
    assert set(states.values_list("state", flat=True)) == {"completed"}
    # Running the finished job again does nothing.
    assert bulk.bulk_job_work(job.pk) == "busy"
    assert TransitionLog.objects.filter(transition="retry_step").count() == 4


def test_instance_changed_since_the_plan_is_left_alone(broker, wf, operator):
    moved, kept = held(broker, "ORD-moved"), held(broker, "ORD-kept")
    job = plan(operator)
    instance_retry_step(moved.pk, user=operator, reason="done by hand meanwhile")
    bulk.bulk_job_confirm(job.pk, user=operator)
    assert bulk.bulk_job_work(job.pk) == "finished"
    assert outcomes(job) == [("ORD-kept", "done"), ("ORD-moved", "changed")]
    assert (
        TransitionLog.objects.filter(instance=moved, transition="retry_step").count()
        == 1
    )
    assert kept.pk


def test_a_runner_dying_mid_item_leaves_it_untouched(broker, wf, operator):
    """The command and the item's outcome commit together: a runner that dies
    before the commit (here: recording the outcome fails) leaves the instance
    as it was and the item pending, and the next runner acts on it once."""
    first, second = held(broker, "ORD-1"), held(broker, "ORD-2")
    job = plan(operator)
    bulk.bulk_job_confirm(job.pk, user=operator)

    def die(item, outcome, message):
        raise SystemExit("worker killed")

    with mock.patch.object(bulk, "_record", die), pytest.raises(SystemExit):
        bulk.bulk_job_work(job.pk)
    states = WorkflowInstance.objects.filter(pk__in=[first.pk, second.pk])
    assert set(states.values_list("state", flat=True)) == {"needs_attention"}
    assert not TransitionLog.objects.filter(transition="retry_step").exists()
    assert outcomes(job) == [("ORD-1", "pending"), ("ORD-2", "pending")]

    BulkJob.objects.filter(pk=job.pk).update(lease_until=None)  # lease ran out
    assert bulk.bulk_job_work(job.pk) == "finished"
    assert outcomes(job) == [("ORD-1", "done"), ("ORD-2", "done")]
    for instance in (first, second):
        retries = TransitionLog.objects.filter(
            instance=instance, transition="retry_step"
        )
        assert retries.count() == 1


def test_lease_is_exclusive_and_expires(broker, wf, operator, settings):
    held(broker, "ORD-1")
    job = plan(operator)
    bulk.bulk_job_confirm(job.pk, user=operator)
    assert bulk._claim_lease(job.pk, "dead-runner")
    assert bulk.bulk_job_work(job.pk) == "busy"
    BulkJob.objects.filter(pk=job.pk).update(lease_until="2000-01-01T00:00:00Z")
    assert bulk.bulk_job_work(job.pk) == "finished"


def test_sweeper_resends_a_job_nobody_holds(broker, wf, operator):
    from workflows_app.engine import sweeps
    from workflows_app.engine.locking import db_now

    held(broker, "ORD-1")
    job = plan(operator)
    bulk.bulk_job_confirm(job.pk, user=operator)
    broker.queue.clear()  # the message was lost
    assert sweeps.redispatch_bulk_jobs(db_now(), 10) == 0  # not due yet
    BulkJob.objects.filter(pk=job.pk).update(redispatch_at="2000-01-01T00:00:00Z")
    assert sweeps.redispatch_bulk_jobs(db_now(), 10) == 1
    assert sweeps.redispatch_bulk_jobs(db_now(), 10) == 0  # claimed once
    broker.run()
    job.refresh_from_db()
    assert job.status == "finished"


def test_pause_resume_cancel(broker, wf, operator):
    for n in range(3):
        held(broker, f"ORD-{n}")
    job = plan(operator)
    bulk.bulk_job_confirm(job.pk, user=operator)
    bulk.bulk_job_pause(job.pk, user=operator)
    assert bulk.bulk_job_work(job.pk) == "busy"  # paused: no lease to take
    assert job.items.filter(outcome="pending").count() == 3
    bulk.bulk_job_resume(job.pk, user=operator)
    bulk.bulk_job_cancel(job.pk, user=operator, reason="wrong selection")
    assert bulk.bulk_job_work(job.pk) == "busy"
    job.refresh_from_db()
    assert job.status == "cancelled"
    assert set(job.items.values_list("outcome", flat=True)) == {"cancelled"}
    assert [e["what"] for e in job.log] == ["confirm", "pause", "resume", "cancel"]
    assert job.log[-1]["reason"] == "wrong selection"
    assert not TransitionLog.objects.filter(transition="retry_step").exists()


def test_compensate_all_skips_what_cannot_be(broker, wf, operator):
    held(broker, "ORD-1")
    done = held(broker, "ORD-2")
    instance_compensate(done.pk, user=operator, reason="customer gave up")
    broker.run()
    job = plan(operator, action="compensate")
    assert dict(job.items.values_list("instance__business_key", "plan")) == {
        "ORD-1": "compensate the steps done",
        "ORD-2": "already compensated: nothing to compensate",
    }
    bulk.bulk_job_confirm(job.pk, user=operator)
    bulk.bulk_job_work(job.pk)
    assert outcomes(job) == [("ORD-1", "done"), ("ORD-2", "skipped")]


def test_bad_plans_write_nothing(broker, wf, operator):
    held(broker, "ORD-1")
    viewer = user_in("viewer", "vera")
    with pytest.raises(NotPermitted):
        plan(viewer)
    with pytest.raises(InvalidInput, match="reason"):
        plan(operator, reason="  ")
    with pytest.raises(InvalidInput, match="unknown bulk action"):
        plan(operator, action="explode")
    with pytest.raises(InvalidInput, match="no instance"):
        bulk.bulk_job_plan(
            WorkflowInstance.objects.none(),
            action="retry",
            reason="r",
            user=operator,
            description="",
        )
    assert not BulkJob.objects.exists() and not BulkJobItem.objects.exists()


def test_only_the_planner_starts_the_job(broker, wf, operator, second_operator):
    held(broker, "ORD-1")
    job = plan(operator)
    with pytest.raises(NotPermitted):
        bulk.bulk_job_confirm(job.pk, user=second_operator)
    job.refresh_from_db()
    assert job.status == "draft"


def test_an_item_cancelled_under_the_runner_is_not_acted_on(broker, wf, operator):
    """The runner had read the item as pending; a cancel marked it before
    the runner's transaction: the command is not run."""
    instance = held(broker, "ORD-1")
    job = plan(operator)
    bulk.bulk_job_confirm(job.pk, user=operator)
    item = job.items.get()
    bulk.bulk_job_cancel(job.pk, user=operator, reason="stop")
    bulk._apply(BulkJob.objects.get(pk=job.pk), item)
    assert job.items.get().outcome == "cancelled"
    assert WorkflowInstance.objects.get(pk=instance.pk).state == "needs_attention"
    assert not TransitionLog.objects.filter(transition="retry_step").exists()
