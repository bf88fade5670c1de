"""Failure groups: held instances grouped by what blocks them.

A group is (definition, step, action or compensation, error signature) over
the steps that hold their instance for a person: an action failed or with an
unknown outcome, or a compensation that failed. One query groups them (served
by the ``step_exec_blocking`` partial index); one more fetches a sample error
per group and one the known-failure notes.
"""

from __future__ import annotations

import dataclasses
from datetime import datetime
from typing import Any
from urllib.parse import urlencode

from django.db.models import Case, CharField, Count, Max, Min, Q, Value, When

from workflows_app.models import (
    CompensationState,
    InstanceState,
    KnownFailure,
    StepExecution,
    StepState,
)

BLOCKING = Q(state__in=[StepState.FAILED, StepState.UNKNOWN]) | Q(
    compensation_state=CompensationState.FAILED
)
GROUP_LIMIT = 200


@dataclasses.dataclass
class FailureGroup:
    definition_key: str
    step_name: str
    direction: str  # "action" or "compensation"
    signature: str
    count: int
    first_seen: datetime
    last_seen: datetime
    sample_instance_id: Any = None
    sample_error: str = ""
    known: KnownFailure | None = None

    @property
    def query(self) -> str:
        """The instance list's query string that shows this group's instances."""
        return urlencode(
            {
                "definition": self.definition_key,
                "state": InstanceState.NEEDS_ATTENTION,
                "failed_step": self.step_name,
                "signature": self.signature,
            }
        )


def blocking_steps() -> Any:
    """Steps that hold their instance for a person."""
    return StepExecution.objects.filter(BLOCKING).filter(
        instance__state=InstanceState.NEEDS_ATTENTION
    )


def failure_groups(*, include_known: bool = True) -> list[FailureGroup]:
    """Groups, largest first (then most recent)."""
    rows = (
        blocking_steps()
        .annotate(
            direction=Case(
                When(
                    compensation_state=CompensationState.FAILED,
                    then=Value("compensation"),
                ),
                default=Value("action"),
                output_field=CharField(),
            )
        )
        .values("instance__definition_key", "name", "direction", "error_signature")
        .annotate(
            n=Count("id"),
            first_seen=Min("instance__last_progress_at"),
            last_seen=Max("instance__last_progress_at"),
            sample=Max("id"),
        )
        .order_by("-n", "-last_seen")[:GROUP_LIMIT]
    )
    groups = [
        FailureGroup(
            definition_key=row["instance__definition_key"],
            step_name=row["name"],
            direction=row["direction"],
            signature=row["error_signature"],
            count=row["n"],
            first_seen=row["first_seen"],
            last_seen=row["last_seen"],
        )
        for row in rows
    ]
    samples = {
        step_id: (instance_id, error)
        for step_id, instance_id, error in StepExecution.objects.filter(
            pk__in=[row["sample"] for row in rows]
        ).values_list("id", "instance_id", "last_error")
    }
    known = {
        (k.definition_key, k.step_name, k.signature): k
        for k in KnownFailure.objects.select_related("marked_by").filter(
            definition_key__in={g.definition_key for g in groups}
        )
    }
    for group, row in zip(groups, rows, strict=True):
        group.sample_instance_id, group.sample_error = samples.get(
            row["sample"], (None, "")
        )
        group.known = known.get(
            (group.definition_key, group.step_name, group.signature)
        )
    if not include_known:
        groups = [g for g in groups if g.known is None]
    return groups
