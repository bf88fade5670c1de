"""Failure groups: every held instance under what holds it now.

A group is (definition, step, held by, error signature). What holds an
instance is the engine's rule (``engine.blocking``): a step's action that
failed or whose outcome is unknown, a compensation that failed, or the
workflow's deadline (no step). Each held instance is in exactly one group,
with the error of that hold: a step that failed on the way forward and then
had its earlier steps compensated is not counted again once a compensation
holds the instance.

Which bulk actions a group offers comes from the catalogue
(``engine.actions.why_not``) asked once per kind of instance in the group, so
a button is shown only when its preview would act on some instance.

Queries: one aggregates the holding steps by group and kind of instance, one
the deadline holds; then the samples, the known-failure notes and, for the
offers, the representative instances with their steps.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Iterable
from datetime import datetime
from typing import Any
from urllib.parse import urlencode

from django.db.models import Count, Max, Min

from workflows_app.engine import actions
from workflows_app.engine.blocking import (
    COMPENSATION,
    DEADLINE,
    deadline_holds,
    holding_steps,
)
from workflows_app.engine.bulk_plan import catalogue_action
from workflows_app.models import (
    BulkJob,
    InstanceState,
    KnownFailure,
    StepExecution,
    WorkflowInstance,
)

GROUP_LIMIT = 200
# The deadline holds of a definition are one group: the signature names it.
DEADLINE_SIGNATURE = "Deadline: the workflow deadline passed"
# In a group's link, a hold whose step recorded no error text.
NO_SIGNATURE = "(none)"
BULK_ACTIONS = (BulkJob.Action.RETRY, BulkJob.Action.COMPENSATE)
# The instance columns the catalogue reads (``engine.actions``), as seen from
# a holding step.
PROFILE = tuple(f"instance__{c}" for c in actions.AVAILABILITY_COLUMNS)


@dataclasses.dataclass
class FailureGroup:
    definition_key: str
    step_name: str  # "" for the deadline
    held_by: str  # "action", "compensation" or "deadline"
    signature: str
    count: int
    first_seen: datetime
    last_seen: datetime
    sample_instance_id: Any = None
    sample_error: str = ""
    known: KnownFailure | None = None
    # Per kind of instance in the group (``PROFILE``): a representative
    # instance id and how many instances are of that kind.
    kinds: list[tuple[Any, int]] = dataclasses.field(default_factory=list)
    # Bulk action -> how many of the group's instances its preview would act
    # on for the user who asked (only actions that act on some are listed).
    offers: dict[str, int] = dataclasses.field(default_factory=dict)

    @property
    def key(self) -> tuple[str, str, str, str]:
        return (self.definition_key, self.step_name, self.held_by, self.signature)

    @property
    def query(self) -> str:
        """The instance list's query string that shows this group's instances."""
        params = {
            "definition": self.definition_key,
            "state": InstanceState.NEEDS_ATTENTION,
            "held_by": self.held_by,
        }
        if self.held_by != DEADLINE:
            params["failed_step"] = self.step_name
            params["signature"] = self.signature or NO_SIGNATURE
        return urlencode(params)


def failure_groups(
    *, include_known: bool = True, user: Any | None = None
) -> list[FailureGroup]:
    """Groups, largest first (then most recent); with ``user``, each group's
    ``offers`` say which bulk actions would act on its instances."""
    groups = _step_groups() + _deadline_groups()
    groups.sort(key=lambda g: (-g.count, -g.last_seen.timestamp()))
    groups = groups[:GROUP_LIMIT]
    known = {
        (k.definition_key, k.step_name, k.signature): k
        for k in KnownFailure.objects.select_related("marked_by").filter(
            definition_key__in={g.definition_key for g in groups}
        )
    }
    for group in groups:
        group.known = known.get(
            (group.definition_key, group.step_name, group.signature)
        )
    if not include_known:
        groups = [g for g in groups if g.known is None]
    if user is not None:
        _offer_bulk_actions(groups, user)
    return groups


def _step_groups() -> list[FailureGroup]:
    """One aggregate over the holding steps, by group and kind of instance
    (a group has a few kinds); the latest step of each kind is its sample."""
    rows = (
        holding_steps()
        .values(
            "instance__definition_key", "name", "held_by", "error_signature", *PROFILE
        )
        .annotate(
            n=Count("id"),
            first_seen=Min("instance__last_progress_at"),
            last_seen=Max("instance__last_progress_at"),
            sample=Max("id"),
        )
        .order_by()
    )
    groups: dict[tuple[str, str, str, str], FailureGroup] = {}
    kinds: dict[tuple[str, str, str, str], list[tuple[int, int]]] = defaultdict(list)
    for row in rows:
        key = (
            row["instance__definition_key"],
            row["name"],
            row["held_by"],
            row["error_signature"],
        )
        group = groups.get(key)
        if group is None:
            group = groups[key] = FailureGroup(
                *key, 0, row["first_seen"], row["last_seen"]
            )
        group.count += row["n"]
        group.first_seen = min(group.first_seen, row["first_seen"])
        group.last_seen = max(group.last_seen, row["last_seen"])
        kinds[key].append((row["sample"], row["n"]))
    samples = {
        step_id: (instance_id, error)
        for step_id, instance_id, error in StepExecution.objects.filter(
            pk__in=[step_id for per_group in kinds.values() for step_id, _ in per_group]
        ).values_list("id", "instance_id", "last_error")
    }
    for key, group in groups.items():
        present = [(step_id, n) for step_id, n in kinds[key] if step_id in samples]
        group.kinds = [(samples[step_id][0], n) for step_id, n in present]
        if present:
            latest = max(step_id for step_id, _ in present)
            group.sample_instance_id, group.sample_error = samples[latest]
    return list(groups.values())


def _deadline_groups() -> list[FailureGroup]:
    """The deadline holds of each definition, by kind of instance; one
    instance of each kind is its representative."""
    columns = list(actions.AVAILABILITY_COLUMNS)
    rows = (
        deadline_holds()
        .values("definition_key", *columns)
        .annotate(
            n=Count("id"),
            first_seen=Min("last_progress_at"),
            last_seen=Max("last_progress_at"),
        )
        .order_by()
    )
    groups: dict[str, FailureGroup] = {}
    for row in rows:
        key = row["definition_key"]
        group = groups.get(key)
        if group is None:
            group = groups[key] = FailureGroup(
                key,
                "",
                DEADLINE,
                DEADLINE_SIGNATURE,
                0,
                row["first_seen"],
                row["last_seen"],
            )
        group.count += row["n"]
        group.first_seen = min(group.first_seen, row["first_seen"])
        group.last_seen = max(group.last_seen, row["last_seen"])
        sample = (
            deadline_holds()
            .filter(**{c: row[c] for c in ("definition_key", *columns)})
            .order_by("-last_progress_at")
            .values("id", "attention_reason", "last_progress_at")
            .first()
        )
        if sample is None:
            continue  # moved on since the count (the page is a snapshot)
        group.kinds.append((sample["id"], row["n"]))
        if row["last_seen"] >= group.last_seen or group.sample_instance_id is None:
            group.sample_instance_id = sample["id"]
            group.sample_error = sample["attention_reason"]
    return list(groups.values())


def _offer_bulk_actions(groups: list[FailureGroup], user: Any) -> None:
    """For each group, how many instances each bulk action would act on:
    the catalogue asked once per kind of instance (``PROFILE``) in it."""
    representatives = _load(rep for g in groups for rep, _ in g.kinds)
    for group in groups:
        for bulk_action in BULK_ACTIONS:
            acting = 0
            for rep_id, n in group.kinds:
                if rep_id not in representatives:
                    continue  # gone since the count (the page is a snapshot)
                instance, steps = representatives[rep_id]
                name = catalogue_action(bulk_action, instance)
                if not actions.why_not(actions.CATALOGUE[name], instance, user, steps):
                    acting += n
            if acting:
                group.offers[bulk_action.value] = acting


def _load(ids: Iterable[Any]) -> dict[Any, tuple[WorkflowInstance, list[Any]]]:
    """The representatives with their definitions and steps, in two queries."""
    found = WorkflowInstance.objects.select_related("definition").in_bulk(list(ids))
    steps: dict[Any, list[StepExecution]] = defaultdict(list)
    for step in (
        StepExecution.objects.filter(instance_id__in=found)
        .select_related("step_definition")
        .order_by("instance_id", "position")
    ):
        steps[step.instance_id].append(step)
    return {pk: (instance, steps[pk]) for pk, instance in found.items()}


__all__ = [
    "COMPENSATION",
    "DEADLINE",
    "DEADLINE_SIGNATURE",
    "NO_SIGNATURE",
    "FailureGroup",
    "failure_groups",
]
