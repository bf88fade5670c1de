"""The database clock and the instance lock: the two things every command
starts with, below everything else in the engine."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from django.db import connection
from django.db.models import CharField
from django.db.models.expressions import RawSQL
from django.db.models.functions import Now
from django.utils import timezone

from workflows_app.engine.rows import CompiledSelect
from workflows_app.models import StepExecution, WorkflowInstance


def db_now() -> datetime:
    """The database's clock (the one every deadline is written with)."""
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SELECT statement_timestamp()")
            now: datetime = cursor.fetchone()[0]
            return now
    return timezone.now()


_LOCKED_INSTANCE = CompiledSelect(
    lambda instance_id: (
        WorkflowInstance.objects.select_for_update(of=("self",))
        .select_related("definition")
        .annotate(db_now=Now())
        .filter(pk=instance_id)
    ),
    WorkflowInstance._meta.pk,
)


def lock_statement(db: Any) -> str | None:
    """The instance row's lock alone (the same lock as _LOCKED_INSTANCE's);
    none on a database without row locks."""
    if not db.features.has_select_for_update:
        return None
    meta = WorkflowInstance._meta
    table, key = db.ops.quote_name(meta.db_table), db.ops.quote_name(meta.pk.column)
    return f"SELECT 1 FROM {table} WHERE {key} = %s FOR UPDATE"


# The instance's steps in order, with the instance and its definition, read
# by a statement that follows the lock: its snapshot is taken once the lock
# is held, so it sees everything the previous holder committed. Each step
# row's xmin (the transaction that wrote it last) too, which tells a worker
# later whether the row is still as read (engine.held).
_LOCKED_STEPS = CompiledSelect(
    lambda instance_id: (
        StepExecution.objects.select_related("instance__definition")
        .annotate(
            db_now=Now(),
            row_xmin=RawSQL(
                f'"{StepExecution._meta.db_table}".xmin::text',
                (),
                output_field=CharField(),
            ),
        )
        .filter(instance_id=instance_id)
        .order_by("position")
    ),
    StepExecution._meta.get_field("instance"),
    before=lock_statement,
    related_once=True,
)


@dataclass
class Locked:
    instance: WorkflowInstance
    now: datetime
    # The steps in order; None where they are read apart (not PostgreSQL).
    steps: list[StepExecution] | None
    # Each step row's xmin as read, by step id (PostgreSQL).
    xmins: dict[int, str] = field(default_factory=dict)


def lock_instance_with_steps(instance_id: Any) -> Locked:
    """:func:`lock_instance`, and the instance's steps in order read after
    the lock, in one round trip where the database allows (PostgreSQL);
    elsewhere the steps are None (read them apart).

    Raises ``WorkflowInstance.DoesNotExist``."""
    if not connection.features.has_select_for_update:
        instance, now = lock_instance(instance_id)
        return Locked(instance, now, None)
    steps: list[StepExecution] = _LOCKED_STEPS.rows(instance_id)
    if not steps:
        # No such instance, or one without steps: it is locked already, if
        # it exists; this reads it (or raises DoesNotExist).
        instance, now = lock_instance(instance_id)
        return Locked(instance, now, [])
    instance = steps[0].instance
    read_at = steps[0].db_now  # type: ignore[attr-defined]
    xmins = {}
    for step in steps:
        del step.db_now  # type: ignore[attr-defined]
        xmins[step.id] = step.__dict__.pop("row_xmin")
        step._state.fields_cache["instance"] = instance
    return Locked(instance, read_at, steps, xmins)


def lock_instance(instance_id: Any) -> tuple[WorkflowInstance, datetime]:
    """Lock the instance row (always first: one lock order) and read the DB clock.

    Raises ``WorkflowInstance.DoesNotExist``."""
    found = _LOCKED_INSTANCE.rows(instance_id)
    if not found:
        raise WorkflowInstance.DoesNotExist(
            "WorkflowInstance matching query does not exist."
        )
    instance = found[0]
    return instance, instance.db_now
