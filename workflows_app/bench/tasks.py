"""The baseline the engine benchmark compares against: a bare Celery chain of
tasks that each write one row to PostgreSQL, with none of the engine's
claims, fences or audit rows. Celery's task discovery finds it wherever the
bench app is installed (with the demo); production workers never load it."""

from __future__ import annotations

from celery import shared_task
from django.db import connection

TABLE = "saga_bench_baseline"


def create_table() -> None:
    with connection.cursor() as cursor:
        cursor.execute(f"DROP TABLE IF EXISTS {TABLE}")
        cursor.execute(
            f"CREATE TABLE {TABLE} (id bigserial PRIMARY KEY, workflow int NOT NULL, "
            "step int NOT NULL, at timestamptz NOT NULL DEFAULT clock_timestamp())"
        )


@shared_task(name="bench.baseline_step", ignore_result=True, acks_late=True)
def baseline_step(workflow: int, step: int) -> None:
    with connection.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {TABLE} (workflow, step) VALUES (%s, %s)", [workflow, step]
        )
