"""A worker's next step from what it kept of its last transaction
(engine.held): one message, the same history as under the lock, and read
again under the lock whenever any row changed meanwhile, by whoever
(an operator, a sweeper's update that leaves the version alone)."""

from __future__ import annotations

import dataclasses
import threading
import types
from datetime import timedelta
from typing import Any

import pytest
from django.db import connection
from django.db.models.functions import Now
from django.test.utils import CaptureQueriesContext

from tests.support import (
    advance_clock,
    make_definition,
    other_session,
    start,
    user_in,
)
from workflows_app.activities.runner import call_activity
from workflows_app.engine import commands, held
from workflows_app.engine.actors import Actor
from workflows_app.engine.commands.execution import Outcome
from workflows_app.engine.sweeps import sweep_all
from workflows_app.models import (
    Attempt,
    StepExecution,
    StuckKind,
    TransitionLog,
    WorkflowInstance,
)
from workflows_app.monitoring import metrics

pytestmark = [
    pytest.mark.skipif(
        connection.vendor != "postgresql", reason="xmin and one-message commits"
    ),
    pytest.mark.django_db(transaction=True),
]
WORKER = Actor.worker("test-worker")
SUCCESS = Outcome("succeeded", output={"ok": True})
STEPS = [{"name": n, "action": "demo.noop", "compensation": ""} for n in "abc"]


def always(timeout: timedelta) -> bool:
    return True


def recorded(way: str) -> float:
    value: float = metrics.WORKER_RECORDS.labels(way)._value.get()
    return value


def first_claim(broker: Any, **fields: Any) -> Any:
    make_definition(steps=STEPS, **fields)
    instance = start()
    broker.queue.clear()
    claim = commands.instance_advance(instance.id, actor=WORKER, fits=always)
    assert claim is not None and claim.held is not None
    return claim


def record(claim: Any, outcome: Outcome = SUCCESS) -> Any:
    return commands.attempt_record_and_continue(
        claim, outcome, actor=WORKER, fits=always, task_id="t"
    )


def history(instance_id: Any) -> list[tuple[str, ...]]:
    return [
        (row.transition, row.field, row.source, row.target, row.step.name)
        if row.step is not None
        else (row.transition, row.field, row.source, row.target)
        for row in TransitionLog.objects.filter(instance_id=instance_id)
        .select_related("step")
        .order_by("id")
    ]


def run_to_the_end(claim: Any, *, keep: bool) -> None:
    while claim is not None:
        outcome = call_activity(claim)
        if not keep:
            claim = dataclasses.replace(claim, held=None)
        claim = record(claim, outcome)


def test_the_next_step_is_one_message_and_writes_what_the_lock_would(broker):
    claim = first_claim(broker)
    kept_before = recorded("kept")
    with CaptureQueriesContext(connection) as queries:
        following = record(claim)
    sent = [q["sql"] for q in queries if q["sql"] != "BEGIN"]
    assert len(sent) == 1, sent
    # The guard, the write and COMMIT, then the snapshot the worker keeps.
    assert sent[0].startswith("BEGIN; ") and "; COMMIT; " in sent[0]
    assert recorded("kept") == kept_before + 1
    assert following is not None and following.held is not None
    assert following.context.step_name == "b"
    run_to_the_end(following, keep=True)
    kept_id = claim.instance_id

    broker.queue.clear()
    other = commands.instance_advance(
        start(business_key="order-2").id, actor=WORKER, fits=always
    )
    run_to_the_end(other, keep=False)
    assert WorkflowInstance.objects.get(pk=kept_id).state == "completed"
    assert history(kept_id) == history(other.instance_id)
    times = list(
        TransitionLog.objects.filter(instance_id=kept_id)
        .order_by("id")
        .values_list("created_at", flat=True)
    )
    assert times == sorted(times)
    for attempt in Attempt.objects.filter(step__instance_id=kept_id):
        assert attempt.finished_at is not None
        assert attempt.started_at <= attempt.finished_at


def test_a_row_changed_without_the_lock_is_read_again(broker):
    """The stuck sweeper's flag takes no instance lock and leaves the
    version alone: the worker's kept copy is out of date, so it goes the
    usual way, and the step's progress clears the flag."""
    claim = first_claim(broker)
    WorkflowInstance.objects.filter(pk=claim.instance_id).update(
        stuck=True,
        stuck_kind=StuckKind.NO_PROGRESS,
        stuck_reason="no progress",
        stuck_since=Now(),
    )
    changed = recorded("changed")
    following = record(claim)
    assert recorded("changed") == changed + 1
    instance = WorkflowInstance.objects.get(pk=claim.instance_id)
    assert not instance.stuck and instance.state == "running"
    assert following is not None and following.context.step_name == "b"
    succeeded = TransitionLog.objects.filter(
        instance_id=claim.instance_id, transition="succeed"
    )
    assert succeeded.count() == 1  # the kept attempt wrote nothing


def test_a_step_row_changed_meanwhile_is_read_again(broker):
    claim = first_claim(broker)
    other = StepExecution.objects.get(instance_id=claim.instance_id, name="c")
    StepExecution.objects.filter(pk=other.pk).update(redispatches=7)
    changed = recorded("changed")
    following = record(claim)
    assert recorded("changed") == changed + 1
    assert following is not None and following.context.step_name == "b"
    assert StepExecution.objects.get(pk=other.pk).redispatches == 7


def record_while_locked(claim: Any, statements: list[tuple[str, list[Any]]]) -> Any:
    """Another session runs ``statements`` and keeps its transaction (and
    the instance's lock) open while the worker records; then commits."""
    other = other_session(autocommit=False)
    with other.cursor() as cursor:
        for sql, params in statements:
            cursor.execute(sql, params)
    result: list[Any] = []

    def worker() -> None:
        try:
            result.append(record(claim))
        finally:
            connection.close()

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join(1.0)
    assert thread.is_alive()  # waiting for the lock
    other.commit()
    other.close()
    thread.join(30)
    assert not thread.is_alive()
    return result[0]


@pytest.mark.parametrize("changes", ["the instance", "a step alone"])
def test_a_writer_holding_the_lock_is_waited_for_then_seen(broker, changes):
    """Another session holds the instance's lock and changes its row, or
    only a step's (as a unit of work that changes no instance column may):
    the guard waits for the lock, then sees the change and the worker goes
    the usual way."""
    claim = first_claim(broker)
    instances = WorkflowInstance._meta.db_table
    steps = StepExecution._meta.db_table
    lock = (f"SELECT 1 FROM {instances} WHERE id = %s FOR UPDATE", [claim.instance_id])
    change = (
        (
            f"UPDATE {instances} SET attention_reason = 'seen' WHERE id = %s",
            [claim.instance_id],
        )
        if changes == "the instance"
        else (
            f"UPDATE {steps} SET redispatches = 7 "
            "WHERE instance_id = %s AND name = 'c'",
            [claim.instance_id],
        )
    )
    changed = recorded("changed")
    following = record_while_locked(claim, [lock, change])
    assert recorded("changed") == changed + 1
    assert following is not None and following.context.step_name == "b"


def test_a_lock_holder_that_changes_nothing_is_waited_for(broker):
    claim = first_claim(broker)
    instances = WorkflowInstance._meta.db_table
    kept = recorded("kept")
    lock = (f"SELECT 1 FROM {instances} WHERE id = %s FOR UPDATE", [claim.instance_id])
    following = record_while_locked(claim, [lock])
    assert recorded("kept") == kept + 1
    assert following is not None and following.context.step_name == "b"


def test_an_instance_closed_meanwhile_stays_closed(broker):
    """The workflow's deadline passes while the worker's activity runs (the
    hold times the attempt out) and an operator closes the instance: the
    outcome changes nothing and is only noted, as under the lock."""
    claim = first_claim(broker, deadline=timedelta(seconds=1))
    instance = WorkflowInstance.objects.get(pk=claim.instance_id)
    advance_clock(instance, 5)
    sweep_all()
    instance.refresh_from_db()
    assert instance.state == "needs_attention"
    commands.instance_close_as_failed(
        instance.id,
        user=user_in("operator"),
        reason="refunded by hand",
        expected_version=instance.version,
    )
    changed = recorded("changed")
    assert record(claim) is None
    assert recorded("changed") == changed + 1
    instance.refresh_from_db()
    assert instance.state == "failed"
    assert not TransitionLog.objects.filter(
        instance_id=instance.id, transition="succeed"
    ).exists()
    assert history(instance.id)[-1] == ("stale_outcome_ignored", "", "", "", "a")


def test_what_the_activity_does_to_its_context_is_not_kept(broker):
    make_definition(steps=STEPS)
    instance = start(order={"total": 10})
    broker.queue.clear()
    claim = commands.instance_advance(instance.id, actor=WORKER, fits=always)
    claim.context.input["order"]["total"] = 0
    claim.context.outputs["forged"] = {"by": "the activity"}
    following = record(claim)
    assert following.held is not None
    assert following.context.input == {"order": {"total": 10}}
    assert "forged" not in following.context.outputs
    run_to_the_end(following, keep=True)
    instance.refresh_from_db()
    assert "forged" not in instance.outputs and instance.state == "completed"


def test_a_failure_that_needs_a_read_goes_the_usual_way(broker):
    """An outcome for an attempt that is not the live one is noted under
    the lock (the note needs the attempt rows read)."""
    claim = first_claim(broker)
    stale = dataclasses.replace(
        claim,
        context=dataclasses.replace(claim.context, attempt=claim.context.attempt + 5),
    )
    needs_read = recorded("needs_read")
    assert record(stale) is None
    assert recorded("needs_read") == needs_read + 1
    assert TransitionLog.objects.filter(
        instance_id=claim.instance_id, transition="stale_outcome_ignored"
    ).exists()


# -- what a worker keeps: pure ----------------------------------------------------


def _kept(row: Any, written: tuple[int, ...] = (1,)) -> held.Held | None:
    instance = types.SimpleNamespace(version=4)
    steps = [types.SimpleNamespace(id=1), types.SimpleNamespace(id=2)]
    known = {1: "100", 2: "90"}
    return held.kept(instance, steps, known, written, row)  # type: ignore[arg-type]


def test_kept_only_when_every_row_is_as_the_transaction_left_it():
    assert _kept(("200", "200", 4, Now(), "1:200,2:90")) is not None
    assert _kept(None) is None
    # The instance row written by someone else after the commit.
    assert _kept(("200", "201", 4, Now(), "1:200,2:90")) is None
    # ... or at another version.
    assert _kept(("200", "200", 5, Now(), "1:200,2:90")) is None
    # A step it did not write changed; one it wrote was written again.
    assert _kept(("200", "200", 4, Now(), "1:200,2:95")) is None
    assert _kept(("200", "200", 4, Now(), "1:201,2:90")) is None
    # A step appeared.
    assert _kept(("200", "200", 4, Now(), "1:200,2:90,3:200")) is None
