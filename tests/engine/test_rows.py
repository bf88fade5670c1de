"""The engine's compiled reads and writes (engine/rows.py) give what the ORM
gives, and keep django-fsm's compare-and-set."""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

import pytest
from django.core.exceptions import ValidationError
from django.db import connection, transaction
from django.db.models.expressions import DatabaseDefault
from django.db.transaction import TransactionManagementError
from django.test.utils import CaptureQueriesContext
from django_fsm import ConcurrentTransition

from tests.engine.test_races import lock_waiters
from tests.support import make_definition, start
from workflows_app.engine import rows
from workflows_app.engine.actors import Actor
from workflows_app.engine.errors import AlreadyChanged
from workflows_app.engine.locking import lock_instance
from workflows_app.engine.transitions import Change
from workflows_app.models import (
    Attempt,
    StepExecution,
    TransitionLog,
    WorkflowInstance,
)

pytestmark = pytest.mark.django_db


def field_values(obj: object) -> dict[str, object]:
    return {f.attname: getattr(obj, f.attname) for f in obj._meta.concrete_fields}  # type: ignore[attr-defined]


def test_compiled_reads_match_the_orm() -> None:
    make_definition()
    instance = start(note={"nested": [1, "two"]})
    with transaction.atomic():
        locked, now = lock_instance(instance.id)
        # Also with the id as text, as a task message carries it.
        again, _ = lock_instance(str(instance.id))
        orm = WorkflowInstance.objects.get(pk=instance.id)
        assert field_values(locked) == field_values(orm) == field_values(again)
        assert locked.input == {"note": {"nested": [1, "two"]}}  # JSON decoded
        assert now is not None
        with CaptureQueriesContext(connection) as queries:
            assert locked.definition.key == "wf"  # select_related: no query
            steps = Change(locked, now, Actor.system("test")).steps
            assert [s.step_definition.name for s in steps] == ["one", "two", "three"]
            assert all(s.instance is locked for s in steps)
        # Only the steps: the start read the published definition's steps,
        # once per process.
        assert len(queries) == 1
        with CaptureQueriesContext(connection) as queries:
            again_steps = Change(locked, now, Actor.system("test")).steps
        assert len(queries) == 1
        assert [s.step_definition for s in again_steps] == [
            s.step_definition for s in steps
        ]
        expected = StepExecution.objects.filter(instance=instance).order_by("position")
        assert [field_values(s) for s in steps] == [field_values(s) for s in expected]


def test_a_missing_or_malformed_id_fails_as_through_the_orm() -> None:
    with transaction.atomic():
        with pytest.raises(WorkflowInstance.DoesNotExist):
            lock_instance(uuid.uuid4())
        with pytest.raises(ValidationError):
            lock_instance("not-a-uuid")


def test_a_write_is_fenced_on_the_state_and_version_it_read() -> None:
    make_definition()
    instance = start()
    with transaction.atomic():
        change = Change.open(instance.id, Actor.system("test"))
        step = change.steps[0]
        # Another writer moved the step and the instance on meanwhile.
        StepExecution.objects.filter(pk=step.pk).update(state="running")
        WorkflowInstance.objects.filter(pk=instance.pk).update(version=99)
        with pytest.raises(ConcurrentTransition):
            rows.write([rows.FencedUpdate(step, ["attempt"], step.fence())])
        with pytest.raises(ConcurrentTransition):
            rows.write(
                [rows.FencedUpdate(change.instance, ["state"], change.instance.fence())]
            )
        change.mark_instance()
        with pytest.raises(AlreadyChanged):
            change.save()
        transaction.set_rollback(True)


def test_a_unit_of_work_writes_what_it_changed_and_fences_the_next_write() -> None:
    make_definition()
    instance = start()
    with transaction.atomic():
        change = Change.open(instance.id, Actor.system("test"))
        first, second = change.steps[:2]
        first.attempts_allowed, second.attempts_allowed = 7, 8
        change.mark_step(first)
        change.mark_step(second)
        change.mark_instance()
        change.save()
        assert change.instance.fence()["version"] == instance.version + 1
        # Written: the next save of the same objects is fenced on the new row.
        first.attempts_allowed = 9
        change.mark_step(first)
        change.mark_instance()
        change.save()
    assert list(
        StepExecution.objects.filter(instance=instance)
        .order_by("position")
        .values_list("attempts_allowed", flat=True)[:2]
    ) == [9, 8]
    assert WorkflowInstance.objects.get(pk=instance.pk).version == instance.version + 2


def test_an_update_of_a_row_inserted_in_the_same_change_is_not_lost() -> None:
    """The parts of one statement share a snapshot: an update of a model
    inserted earlier in the batch goes to a statement of its own."""
    make_definition()
    instance = start()
    with transaction.atomic():
        change = Change.open(instance.id, Actor.system("test"))
        step = change.steps[0]
        change.insert(
            Attempt(step=step, direction="action", number=7, started_at=change.now)
        )
        change.update(
            Attempt,
            {"outcome": Attempt.Outcome.SUCCEEDED, "finished_at": change.now},
            step=step.id,
            direction="action",
            number=7,
        )
        change.mark_step(step)  # two writes at least: the CTE path
        change.note("test", step=step)
        change.save()
    attempt = Attempt.objects.get(step=step, number=7)
    assert attempt.outcome == Attempt.Outcome.SUCCEEDED, attempt.outcome


@pytest.mark.django_db(transaction=True)
def test_locking_outside_a_transaction_is_refused_as_by_the_orm() -> None:
    """Once compiled, the lock would otherwise run in autocommit and end at
    once, while the caller believes it holds it."""
    make_definition()
    instance = start()
    with transaction.atomic():
        lock_instance(instance.id)  # compiles it (if not yet)
    if connection.features.has_select_for_update:  # SQLite has no row locks
        with pytest.raises(TransactionManagementError):
            WorkflowInstance.objects.select_for_update().get(pk=instance.id)
    with pytest.raises(TransactionManagementError):
        lock_instance(instance.id)


def test_compiled_objects_are_those_the_orm_builds() -> None:
    """The compiled read builds objects without ``__init__`` (engine/rows.py
    ``_builder``): the same fields, the same model state, the same fence."""
    make_definition()
    instance = start()
    with transaction.atomic():
        locked, now = lock_instance(instance.id)
        steps = Change(locked, now, Actor.system("test")).steps
        orm = WorkflowInstance.objects.get(pk=instance.id)
        orm_steps = list(StepExecution.objects.filter(instance=instance))
    for built, expected in [(locked, orm), *zip(steps, orm_steps, strict=True)]:
        assert type(built) is type(expected)
        assert (built._state.adding, built._state.db) == (False, "default")
        assert built.fence() == expected.fence()
        assert built.changed(["state", "version"]) == []
        mine = {k: v for k, v in vars(built).items() if not k.startswith("_")}
        theirs = {k: v for k, v in vars(expected).items() if not k.startswith("_")}
        assert mine.keys() - {"db_now"} == theirs.keys()
        assert all(mine[k] == theirs[k] for k in theirs)
    # The fast path, not the fallback to from_db, built them.
    assert (
        rows._builder(
            WorkflowInstance,
            [f.attname for f in WorkflowInstance._meta.concrete_fields],
            "default",
        ).__name__
        == "build"
    )


@pytest.mark.skipif(
    connection.vendor != "postgresql", reason="prepared statements are PostgreSQL's"
)
def test_hot_statements_are_prepared_once_per_session() -> None:
    make_definition()
    instance = start()
    with CaptureQueriesContext(connection) as queries:
        for _ in range(3):
            with transaction.atomic():
                lock_instance(instance.id)
    sent = [
        q["sql"]
        for q in queries
        if "workflowinstance" in q["sql"] or "EXECUTE" in q["sql"]
    ]
    # Prepared at the first use in this session (or earlier), executed by name since.
    assert all(s.startswith(("PREPARE saga_", "EXECUTE saga_")) for s in sent), sent
    assert sum(s.startswith("EXECUTE saga_") for s in sent) >= 2
    # A failed transaction does not lose the statement: the next one runs.
    with pytest.raises(ZeroDivisionError), transaction.atomic():
        lock_instance(instance.id)
        raise ZeroDivisionError
    with transaction.atomic():
        assert lock_instance(instance.id)[0].pk == instance.id


@pytest.mark.skipif(
    connection.vendor != "postgresql", reason="prepared statements are PostgreSQL's"
)
def test_prepared_statements_can_be_turned_off(settings) -> None:  # type: ignore[no-untyped-def]
    settings.SAGA_PREPARED_STATEMENTS = False
    make_definition()
    instance = start()
    with CaptureQueriesContext(connection) as queries, transaction.atomic():
        lock_instance(instance.id)
        change = Change.open(instance.id, Actor.system("test"))
        assert [s.position for s in change.steps] == [1, 2, 3]
    assert not any("saga_" in q["sql"] for q in queries)


def test_the_related_definition_is_built_as_the_orm_builds_it() -> None:
    make_definition()
    instance = start()
    with transaction.atomic():
        locked, _ = lock_instance(instance.id)
    built = locked.definition
    expected = (
        WorkflowInstance.objects.select_related("definition")
        .get(pk=instance.id)
        .definition
    )
    assert type(built) is type(expected)
    assert field_values(built) == field_values(expected)
    assert (built._state.adding, built._state.db) == (False, "default")


def test_new_objects_are_those_the_model_makes() -> None:
    """``rows.new`` (history rows) gives what ``TransitionLog(...)`` gives:
    the same field values and defaults, the related objects cached."""
    make_definition()
    instance = start()
    step = instance.steps.order_by("position").first()
    values = {
        "instance_id": instance.id,
        "field": "state",
        "source": "a",
        "target": "b",
        "transition": "t",
        "actor_kind": "worker",
        "actor_label": "w1",
        "reason": "why",
        "data": {"k": 1},
    }
    built = rows.new(TransitionLog, {"step": step, "user": None}, **values)
    expected = TransitionLog(step=step, user=None, **values)

    def plain(obj: object) -> dict[str, object]:
        # A DatabaseDefault marker compares by identity: by its kind here.
        return {
            k: type(v).__name__ if isinstance(v, DatabaseDefault) else v
            for k, v in vars(obj).items()
            if k != "_state"
        }

    assert plain(built) == plain(expected)
    assert built.step is step and built.user is None
    assert built._state.adding and expected._state.adding
    # And saved through the engine's batched insert, it reads back the same.
    with transaction.atomic():
        rows.write([rows.Insert([built])])
    saved = TransitionLog.objects.filter(instance=instance, transition="t").get()
    assert (saved.step_id, saved.reason, saved.data) == (step.id, "why", {"k": 1})


def test_a_start_reads_a_published_definitions_steps_once_per_process() -> None:
    first = make_definition(steps=[{"name": "one"}, {"name": "two"}])
    start(business_key="order-1")
    with CaptureQueriesContext(connection) as queries:
        again = start(business_key="order-2")
    assert not [q for q in queries if "workflows_app_stepdefinition" in q["sql"]]
    assert [s.name for s in again.steps.order_by("position")] == ["one", "two"]
    # A newer published version is another definition row: its own steps.
    newer = first.new_draft()
    newer.steps.filter(position=2).update(name="second")
    newer.publish()
    third = start(business_key="order-3")
    assert third.definition_id == newer.id
    assert [s.name for s in third.steps.order_by("position")] == ["one", "second"]


@pytest.mark.skipif(
    connection.vendor != "postgresql", reason="one round trip is PostgreSQL's"
)
def test_a_change_locks_and_reads_its_steps_in_one_round_trip() -> None:
    make_definition()
    instance = start()
    with transaction.atomic():
        with CaptureQueriesContext(connection) as queries:
            change = Change.open(instance.id, Actor.system("test"))
            steps = change.steps
            assert change.instance.definition.key == "wf"
        assert len(queries) == 1, [q["sql"] for q in queries]
        orm = WorkflowInstance.objects.get(pk=instance.id)
        orm_steps = list(
            StepExecution.objects.filter(instance=instance).order_by("position")
        )
    assert field_values(change.instance) == field_values(orm)
    assert change.now is not None
    assert [field_values(s) for s in steps] == [field_values(s) for s in orm_steps]
    for built, expected in zip(steps, orm_steps, strict=True):
        assert built.instance is change.instance
        assert built.fence() == expected.fence()
        assert (built._state.adding, built._state.db) == (False, "default")
        assert not hasattr(built, "db_now")
    with transaction.atomic(), pytest.raises(WorkflowInstance.DoesNotExist):
        Change.open(uuid.uuid4(), Actor.system("test"))


@pytest.mark.skipif(connection.vendor != "postgresql", reason="row locks")
@pytest.mark.django_db(transaction=True)
def test_steps_read_with_the_lock_are_those_its_last_holder_committed() -> None:
    """The steps are read by a statement of their own, after the lock is
    granted: one that waited sees what the holder wrote, even a step the
    holder changed without touching the instance row."""
    make_definition()
    instance = start()
    first = StepExecution.objects.get(instance=instance, position=1)
    seen: list[Any] = []

    def contender() -> None:
        try:
            with transaction.atomic():
                change = Change.open(instance.id, Actor.system("test"))
                seen.append(change.steps[0].attempts_allowed)
        except Exception as exc:
            seen.append(exc)
        finally:
            connection.close()

    thread = threading.Thread(target=contender, daemon=True)
    with transaction.atomic():
        Change.open(instance.id, Actor.system("holder"))
        StepExecution.objects.filter(pk=first.pk).update(
            attempts_allowed=first.attempts_allowed + 5
        )
        thread.start()
        deadline = time.monotonic() + 10
        while lock_waiters() < 1:
            assert time.monotonic() < deadline, f"the contender never waited: {seen}"
            time.sleep(0.01)
    thread.join(timeout=30)
    assert seen == [first.attempts_allowed + 5]
