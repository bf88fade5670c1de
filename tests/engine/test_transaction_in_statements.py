"""A unit of work sends BEGIN with its first statement, and the worker's
commands COMMIT with their last (workflows_app/postgres): two round trips
less per transaction, and the transaction is still Django's: it holds its
locks, commits, rolls back, keeps savepoints and reports a failed commit;
the fences of a write that commits are checked by the server."""

from __future__ import annotations

from typing import Any

import psycopg2
import pytest
from django.db import DataError, IntegrityError, connection, transaction
from django.db.models import F
from django.db.transaction import TransactionManagementError
from django.test.utils import CaptureQueriesContext
from psycopg2.extensions import TRANSACTION_STATUS_IDLE, TRANSACTION_STATUS_INTRANS

from tests.support import make_definition, other_session, start
from workflows_app.engine import commands, progress
from workflows_app.engine.actors import Actor
from workflows_app.engine.errors import AlreadyChanged
from workflows_app.engine.transitions import Change
from workflows_app.models import TransitionLog, WorkflowInstance

pytestmark = [
    pytest.mark.skipif(
        connection.vendor != "postgresql", reason="psycopg2's BEGIN round trip"
    ),
    pytest.mark.django_db(transaction=True),
]


def business_key_seen_by_others(instance_id: Any) -> str:
    conn = other_session()
    try:
        with conn.cursor() as cursor:
            cursor.execute(
                f"SELECT business_key FROM {WorkflowInstance._meta.db_table} "
                "WHERE id = %s",
                [str(instance_id)],
            )
            key: str = cursor.fetchone()[0]
            return key
    finally:
        conn.close()


def rename(instance_id: Any, business_key: str) -> None:
    WorkflowInstance.objects.filter(pk=instance_id).update(business_key=business_key)


def open_change(instance_id: Any) -> Change:
    return Change.open(instance_id, Actor.system("test"))


def test_the_first_statement_begins_the_transaction_and_holds_its_lock() -> None:
    make_definition()
    instance = start()
    with transaction.atomic(durable=True):
        with CaptureQueriesContext(connection) as queries:
            open_change(instance.id)
        assert len(queries) == 1
        assert queries[0]["sql"].startswith("BEGIN; ")
        raw = connection.connection
        assert raw.info.transaction_status == TRANSACTION_STATUS_INTRANS
        # The lock is a transaction's: another session cannot take it.
        other = other_session()
        try:
            with (
                other.cursor() as cursor,
                pytest.raises(psycopg2.errors.LockNotAvailable),
            ):
                cursor.execute(
                    f"SELECT 1 FROM {WorkflowInstance._meta.db_table} "
                    "WHERE id = %s FOR UPDATE NOWAIT",
                    [str(instance.id)],
                )
        finally:
            other.close()
        rename(instance.id, "renamed")
        # Not visible to others before the commit.
        assert business_key_seen_by_others(instance.id) == "order-1"
    assert business_key_seen_by_others(instance.id) == "renamed"
    assert connection.connection.info.transaction_status == TRANSACTION_STATUS_IDLE
    assert connection.get_autocommit()


def test_only_a_transaction_that_has_sent_nothing_is_begun_so() -> None:
    make_definition()
    instance = start()
    with transaction.atomic(durable=True):
        WorkflowInstance.objects.filter(pk=instance.id).exists()  # the driver began
        with CaptureQueriesContext(connection) as queries:
            open_change(instance.id)
        assert not queries[0]["sql"].startswith("BEGIN")
        rename(instance.id, "renamed")
    assert business_key_seen_by_others(instance.id) == "renamed"


def test_an_error_rolls_the_whole_transaction_back() -> None:
    make_definition()
    instance = start()
    with pytest.raises(RuntimeError), transaction.atomic(durable=True):
        open_change(instance.id)
        rename(instance.id, "lost")
        raise RuntimeError("the unit of work fails")
    assert business_key_seen_by_others(instance.id) == "order-1"
    assert connection.connection.info.transaction_status == TRANSACTION_STATUS_IDLE
    # A database error too, after which the session is usable again.
    with pytest.raises(DataError), transaction.atomic():
        open_change(instance.id)
        rename(instance.id, "lost")
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1 / 0")
    assert WorkflowInstance.objects.get(pk=instance.id).business_key == "order-1"


def test_a_savepoint_inside_is_rolled_back_alone() -> None:
    make_definition()
    instance = start()
    with transaction.atomic(durable=True):
        open_change(instance.id)
        rename(instance.id, "kept")
        with pytest.raises(RuntimeError), transaction.atomic():
            WorkflowInstance.objects.filter(pk=instance.id).update(input={"x": 1})
            raise RuntimeError("only the inner block fails")
    instance.refresh_from_db()
    assert (instance.business_key, instance.input) == ("kept", {})


def test_a_commit_that_fails_is_reported_and_keeps_nothing() -> None:
    """A deferred foreign-key check fails at COMMIT, which is sent here
    rather than by the driver: the caller gets the error, nothing stays."""
    make_definition()
    instance = start()
    before = TransitionLog.objects.count()
    with pytest.raises(IntegrityError), transaction.atomic(durable=True):
        open_change(instance.id)
        rename(instance.id, "lost")
        TransitionLog.objects.create(  # a user that does not exist
            instance_id=instance.id, user_id=2**31 - 1, field="state", target="b"
        )
    assert business_key_seen_by_others(instance.id) == "order-1"
    assert TransitionLog.objects.count() == before
    assert connection.connection.info.transaction_status == TRANSACTION_STATUS_IDLE


def state_seen_by_others(instance_id: Any) -> str:
    conn = other_session()
    try:
        with conn.cursor() as cursor:
            cursor.execute(
                f"SELECT state FROM {WorkflowInstance._meta.db_table} WHERE id = %s",
                [str(instance_id)],
            )
            state: str = cursor.fetchone()[0]
            return state
    finally:
        conn.close()


def test_a_workers_command_commits_with_its_last_statement() -> None:
    make_definition()
    instance = start()
    with CaptureQueriesContext(connection) as queries:
        claim = commands.instance_advance(
            instance.id, actor=Actor.worker("w1"), fits=lambda timeout: True
        )
    assert claim is not None
    # Django notes the transaction's start (BEGIN) without sending anything.
    sent = [q["sql"] for q in queries if q["sql"] != "BEGIN"]
    assert len(sent) == 2, sent  # the lock and read; the write
    assert sent[0].startswith("BEGIN; ")
    # The write, its COMMIT, and the snapshot the worker keeps (engine.held).
    write, snapshot = sent[-1].split("; COMMIT; ")
    assert "saga_fence(" in write
    assert "xmin" in snapshot and claim.held is not None
    assert state_seen_by_others(instance.id) == "running"
    assert connection.connection.info.transaction_status == TRANSACTION_STATUS_IDLE


def test_a_fence_that_fails_on_the_server_keeps_nothing() -> None:
    """The instance's version moves under the unit of work (here in its own
    transaction, as a writer that skipped the lock would): the write that
    was to commit fails, and nothing of the transaction stays."""
    make_definition()
    instance = start()
    with pytest.raises(AlreadyChanged) as raised, transaction.atomic(durable=True):
        change = open_change(instance.id)
        rename(instance.id, "lost")
        progress.advance(change)  # accepted -> running, fenced on the version
        WorkflowInstance.objects.filter(pk=instance.id).update(version=F("version") + 1)
        change.save(last=True)
    causes, cause = [], raised.value.__cause__
    while cause is not None:
        causes.append(getattr(cause, "pgcode", None))
        cause = cause.__cause__
    assert "SD409" in causes  # saga_fence's error: the server checked
    assert business_key_seen_by_others(instance.id) == "order-1"
    assert state_seen_by_others(instance.id) == "accepted"
    assert connection.connection.info.transaction_status == TRANSACTION_STATUS_IDLE
    assert WorkflowInstance.objects.get(pk=instance.id).version == instance.version


def test_nothing_may_run_after_the_statement_that_committed() -> None:
    make_definition()
    instance = start()
    with pytest.raises(TransactionManagementError), transaction.atomic(durable=True):
        change = open_change(instance.id)
        progress.advance(change)
        change.save(last=True)
        WorkflowInstance.objects.count()
    # What the last statement committed stays.
    assert state_seen_by_others(instance.id) == "running"
    assert WorkflowInstance.objects.count() == 1  # the session works again


def test_inside_a_savepoint_the_commit_is_left_to_django() -> None:
    make_definition()
    instance = start()
    with transaction.atomic(durable=True):
        change = open_change(instance.id)
        with transaction.atomic(), CaptureQueriesContext(connection) as queries:
            progress.advance(change)
            change.save(last=True)
        assert not any("COMMIT" in q["sql"] for q in queries)
        assert state_seen_by_others(instance.id) == "accepted"
    assert state_seen_by_others(instance.id) == "running"
