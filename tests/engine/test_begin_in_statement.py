"""A unit of work sends BEGIN with its first statement (workflows_app/postgres):
one round trip less per transaction, and the transaction is still Django's:
it holds its locks, commits, rolls back, keeps savepoints and reports a
failed commit."""

from __future__ import annotations

import uuid
from typing import Any

import psycopg2
import pytest
from django.db import DataError, IntegrityError, connection, transaction
from django.test.utils import CaptureQueriesContext
from psycopg2.extensions import TRANSACTION_STATUS_IDLE, TRANSACTION_STATUS_INTRANS

from tests.support import make_definition, start
from workflows_app.engine.actors import Actor
from workflows_app.engine.transitions import Change
from workflows_app.models import TransitionLog, WorkflowInstance

pytestmark = [
    pytest.mark.skipif(
        connection.vendor != "postgresql", reason="psycopg2's BEGIN round trip"
    ),
    pytest.mark.django_db(transaction=True),
]


def other_session() -> Any:
    """A connection of its own to the test database, as another process."""
    db = connection.settings_dict
    conn = psycopg2.connect(
        dbname=db["NAME"],
        user=db.get("USER") or "postgres",
        host=db.get("HOST") or "127.0.0.1",
        port=db.get("PORT") or 5432,
    )
    conn.autocommit = True
    return conn


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
        TransitionLog.objects.create(
            instance_id=uuid.uuid4(), field="state", source="a", target="b"
        )
    assert business_key_seen_by_others(instance.id) == "order-1"
    assert TransitionLog.objects.count() == before
    assert connection.connection.info.transaction_status == TRANSACTION_STATUS_IDLE
