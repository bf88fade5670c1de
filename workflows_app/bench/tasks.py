"""The baseline the engine benchmark compares against: the strongest honest
bare Celery chain. Each task moves its workflow's row on (one ``UPDATE``) and
appends a history row (one ``INSERT``), both in one transaction and one round
trip, on a psycopg2 connection that lives as long as the worker process.
No claims, fences or engine bookkeeping. Celery's task discovery finds it
wherever the bench app is installed (with the demo); production workers never
load it.

Not Django's connection: Celery's Django fixup closes every Django
connection before and after each task (unless ``CELERY_DB_REUSE_MAX`` is
set), whatever ``CONN_MAX_AGE`` says, so a task on it would reconnect every
time. ``bench_engine`` prints sessions per workflow, which shows it.
"""

from __future__ import annotations

import os
from typing import Any

import psycopg2
from celery import shared_task
from django.db import connection as django_connection

WORKFLOWS = "saga_bench_baseline_workflow"
HISTORY = "saga_bench_baseline_history"

_connection: Any = None
_owner_pid = 0


def create_tables() -> None:
    with django_connection.cursor() as cursor:
        for table in (HISTORY, WORKFLOWS, "saga_bench_baseline"):
            cursor.execute(f"DROP TABLE IF EXISTS {table}")
        cursor.execute(
            f"CREATE TABLE {WORKFLOWS} (id bigint PRIMARY KEY, step int NOT NULL "
            "DEFAULT 0, accepted_at timestamptz NOT NULL DEFAULT clock_timestamp(), "
            "updated_at timestamptz)"
        )
        cursor.execute(
            f"CREATE TABLE {HISTORY} (id bigserial PRIMARY KEY, workflow bigint "
            "NOT NULL, step int NOT NULL, at timestamptz NOT NULL "
            "DEFAULT clock_timestamp())"
        )


def _database() -> Any:
    """This process's connection, opened after the fork (a prefork child must
    not share its parent's socket)."""
    global _connection, _owner_pid
    if _connection is None or _connection.closed or _owner_pid != os.getpid():
        db = django_connection.settings_dict
        _connection = psycopg2.connect(
            dbname=db["NAME"],
            user=db.get("USER") or "postgres",
            password=db.get("PASSWORD") or None,
            host=db.get("HOST") or "127.0.0.1",
            port=db.get("PORT") or 5432,
        )
        # Several statements in one execute run as one implicit transaction.
        _connection.autocommit = True
        _owner_pid = os.getpid()
    return _connection


def _advance(workflow: int, step: int) -> None:
    with _database().cursor() as cursor:
        cursor.execute(
            f"UPDATE {WORKFLOWS} SET step = %(step)s, updated_at = clock_timestamp() "
            f"WHERE id = %(workflow)s; "
            f"INSERT INTO {HISTORY} (workflow, step) VALUES (%(workflow)s, %(step)s)",
            {"workflow": workflow, "step": step},
        )


@shared_task(name="bench.baseline_step", ignore_result=True, acks_late=True)
def baseline_step(workflow: int, step: int) -> None:
    try:
        _advance(workflow, step)
    except psycopg2.OperationalError:
        # The benchmark ends idle sessions between runs to flush their
        # statistics; the next task reconnects once. Nothing was written.
        _connection.close()
        _advance(workflow, step)
