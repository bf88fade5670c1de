"""The database clock and the instance lock: the two things every command
starts with, below everything else in the engine."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from django.db import connection
from django.db.models.functions import Now
from django.utils import timezone

from workflows_app.engine.rows import CompiledSelect
from workflows_app.models import WorkflowInstance


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
