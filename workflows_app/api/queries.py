"""Read-only selectors for the API: a fixed number of queries per request,
whatever the number of steps, rows or instances."""

from __future__ import annotations

import base64
import binascii
import json
import uuid
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from django.db.models import Count, Prefetch, Q, QuerySet

from workflows_app.api.errors import ApiError
from workflows_app.models import (
    InstanceState,
    StepExecution,
    TransitionLog,
    WorkflowInstance,
)
from workflows_app.search import Search
from workflows_app.search import apply as apply_search


def instance_detail(instance_id: uuid.UUID) -> WorkflowInstance | None:
    """The instance with its definition and its steps, each annotated with
    its number of attempts: two queries."""
    steps = (
        StepExecution.objects.select_related("step_definition")
        .annotate(attempt_count=Count("attempts"))
        .order_by("position")
    )
    instance: WorkflowInstance | None = (
        WorkflowInstance.objects.select_related("definition")
        .prefetch_related(Prefetch("steps", queryset=steps, to_attr="ordered_steps"))
        .filter(pk=instance_id)
        .first()
    )
    return instance


def completed_at(state: str, finished_at: datetime | None) -> datetime | None:
    # "completed" is the business outcome; a compensated, cancelled or failed
    # instance finished too, but never completed.
    return finished_at if state == InstanceState.COMPLETED else None


def actor_name(kind: str, label: str) -> str:
    if not label:
        return kind
    return label if label.startswith(f"{kind}:") else f"{kind}:{label}"


def history(instance_id: uuid.UUID) -> list[dict[str, Any]] | None:
    """The audited timeline in order, or None for an unknown instance."""
    rows = list(
        TransitionLog.objects.filter(instance_id=instance_id)
        .order_by("id")
        .values_list(
            "created_at",
            "step__name",
            "field",
            "source",
            "target",
            "transition",
            "actor_kind",
            "actor_label",
            "reason",
        )
    )
    # Every instance has its creation row; only then is the extra query due.
    if not rows and not WorkflowInstance.objects.filter(pk=instance_id).exists():
        return None
    return [
        {
            "at": at,
            "step": step,
            "field": field,
            "source": source,
            "target": target,
            "transition": transition,
            "actor": actor_name(kind, label),
            "reason": reason,
        }
        for at, step, field, source, target, transition, kind, label, reason in rows
    ]


# -- listing with keyset pagination --------------------------------------------
#
# Ordered by (last_progress_at, id) descending, the order of the indexes
# instance_progress, instance_state_progress and instance_def_state_times:
# a page is an index range scan plus LIMIT, never an OFFSET or a COUNT. The
# key moves when an instance progresses, so an instance that moves while a
# client pages may be skipped by that walk (it reappears on the first page);
# no instance is ever listed twice in one walk.

SUMMARY_FIELDS = (
    "id",
    "definition_key",
    "definition__version",
    "business_key",
    "state",
    "stuck",
    "accepted_at",
    "finished_at",
    "last_progress_at",
)


def encode_cursor(last_progress_at: datetime, pk: uuid.UUID) -> str:
    raw = json.dumps([last_progress_at.isoformat(), str(pk)]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        when, pk = json.loads(raw)
        moment = datetime.fromisoformat(when)
        if moment.tzinfo is None:
            raise ValueError("naive time")
        return moment, uuid.UUID(pk)
    except (binascii.Error, ValueError, TypeError, AttributeError):
        raise ApiError(
            400, "invalid_cursor", "the cursor is not one this API returned"
        ) from None


def instance_page(
    *,
    definition: str | None,
    statuses: Iterable[str],
    search: Search | None = None,
    business_key: str | None,
    stuck: bool | None,
    cursor: str | None,
    limit: int,
) -> tuple[list[dict[str, Any]], str | None]:
    """One page of instance summaries and the cursor of the next page."""
    qs: QuerySet[WorkflowInstance] = WorkflowInstance.objects.all()
    if definition:
        qs = qs.filter(definition_key=definition)
    statuses = list(statuses)
    if statuses:
        qs = qs.filter(state__in=statuses)
    if business_key:
        qs = qs.filter(business_key=business_key)
    if search:
        qs = apply_search(qs, search)
    if stuck is not None:
        qs = qs.filter(stuck=stuck)
    if cursor:
        when, pk = decode_cursor(cursor)
        # The redundant "<=" bounds the index range; the OR picks the rows.
        qs = qs.filter(last_progress_at__lte=when).filter(
            Q(last_progress_at__lt=when) | Q(last_progress_at=when, id__lt=pk)
        )
    rows = list(
        qs.order_by("-last_progress_at", "-id").values(*SUMMARY_FIELDS)[: limit + 1]
    )
    more = len(rows) > limit
    rows = rows[:limit]
    following = None
    if more:
        last = rows[-1]
        following = encode_cursor(last["last_progress_at"], last["id"])
    return rows, following
