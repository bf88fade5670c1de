"""Property: over random populations of held instances (every kind of hold the
engine makes, built by the real engine), each held instance is in exactly one
failure group, the one of what holds it now, so the counts add up to the held
count; each group's bulk previews act on its step and direction only; and a
group offers a bulk action exactly when its preview acts on some instance.

Every run prints what it exercised (holds by direction and kind, groups,
previews, offers) and fails when a direction or kind of hold never occurred.
Examples: ``SAGA_GROUPS_EXAMPLES`` (default 6, plus one with every scenario), e.g.
``SAGA_GROUPS_EXAMPLES=200 pytest tests/operations/test_failure_groups_property.py``.
"""

from __future__ import annotations

import collections
import contextlib
import os
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings as django_settings
from django.db import connection
from django.http import QueryDict
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.operations.held_population import SCENARIOS, make_definitions, make_held
from tests.support import user_in
from workflows_app.demo.models import ParticipantEffect
from workflows_app.engine.blocking import holding
from workflows_app.engine.commands.bulk import bulk_job_plan
from workflows_app.engine.signatures import error_signature
from workflows_app.failure_groups import DEADLINE_SIGNATURE, failure_groups
from workflows_app.filters import InstanceFilter
from workflows_app.models import (
    BulkJob,
    BulkJobItem,
    StepExecution,
    WorkflowInstance,
)

pytestmark = pytest.mark.django_db(transaction=True)
EXAMPLES = int(os.environ.get("SAGA_GROUPS_EXAMPLES", "6"))
STATS: collections.Counter[str] = collections.Counter()
# A hanging participant costs the worker's time limit: drawn less often.
FAST = [s for s in SCENARIOS if "hang" not in s.simulate.get("ship", "")]
SLOW = [s for s in SCENARIOS if s not in FAST]
populations = st.lists(st.sampled_from(FAST * 4 + SLOW), min_size=1, max_size=6)


def group_members(group: Any) -> set[Any]:
    """The instances the group's own link lists (the list page's filter)."""
    filterset = InstanceFilter(
        QueryDict(group.query), queryset=WorkflowInstance.objects.all()
    )
    assert filterset.is_valid(), filterset.errors
    return set(filterset.qs.values_list("pk", flat=True))


def plan(group: Any, action: str, user: Any) -> list[BulkJobItem]:
    filterset = InstanceFilter(
        QueryDict(group.query), queryset=WorkflowInstance.objects.all()
    )
    assert filterset.is_valid()
    job = bulk_job_plan(
        filterset.qs,
        action=action,
        reason="property",
        user=user,
        query=group.query,
        description="a failure group",
    )
    return list(job.items.all())


def check_population(broker: Any, operator: Any, population: list[Any]) -> None:
    expected = {}
    for n, scenario in enumerate(population):
        instance = make_held(broker, scenario, f"P-{n}")
        expected[instance.pk] = scenario
        STATS[f"held by {scenario.held_by}: {scenario.kind}"] += 1
    held = WorkflowInstance.objects.filter(state="needs_attention")
    assert held.count() == len(population)

    groups = failure_groups(user=operator)
    # The counts add up, and each instance is in exactly one group's list.
    assert sum(g.count for g in groups) == len(population)
    seen: dict[Any, Any] = {}
    for group in groups:
        members = group_members(group)
        assert len(members) == group.count, group
        for pk in members:
            assert pk not in seen, f"{expected[pk].name} in two groups"
            seen[pk] = group
    assert set(seen) == set(expected)

    for pk, group in seen.items():
        scenario = expected[pk]
        # The group is what holds it now, with the error of that hold.
        assert (group.step_name, group.held_by) == (scenario.step, scenario.held_by)
        instance = WorkflowInstance.objects.select_related("definition").get(pk=pk)
        steps = list(
            StepExecution.objects.filter(instance=instance)
            .select_related("step_definition")
            .order_by("position")
        )
        hold = holding(instance, steps)
        assert hold is not None and hold.held_by == scenario.held_by
        if hold.step is None:
            assert group.signature == DEADLINE_SIGNATURE
        else:
            assert hold.step.name == scenario.step
            assert group.signature == error_signature(hold.step.last_error)

    by_group = collections.defaultdict(set)
    for pk, group in seen.items():
        by_group[id(group)].add(expected[pk].name)
    for names in by_group.values():
        if {
            "ship interrupted by the worker",
            "ship never answers (short timeout)",
        } <= names:
            STATS["one group for the worker's and the sweeper's timeout"] += 1

    for group in groups:
        STATS[f"group held by {group.held_by}"] += 1
        members = group_members(group)
        for action in (BulkJob.Action.RETRY, BulkJob.Action.COMPENSATE):
            items = plan(group, action, operator)
            assert {i.instance_id for i in items} == members
            acting = [i for i in items if i.command]
            # Offered on the page exactly when the preview acts on some, and
            # the page's "acts on n" is the preview's count.
            assert group.offers.get(action, 0) == len(acting), (group, action)
            STATS[f"{action} preview acts: {bool(acting)} ({group.held_by})"] += 1
            for item in acting:
                if action == BulkJob.Action.COMPENSATE:
                    assert item.command == "compensate"
                    assert item.plan == "compensate the steps done"
                elif group.held_by == "compensation":
                    assert item.command == "retry_compensation"
                    assert item.plan == f"retry the compensation of {group.step_name}"
                else:
                    assert item.command == "retry_step"
                    assert item.plan == f"retry {group.step_name}"
    STATS["examples"] += 1
    STATS["held instances"] += len(population)
    STATS["groups"] += len(groups)


def cleanup() -> None:
    """Empty the tables the example wrote (what the test's flush does)."""
    tables = [m._meta.db_table for m in (WorkflowInstance, BulkJob, ParticipantEffect)]
    with connection.cursor() as cursor:
        cursor.execute(f"TRUNCATE {', '.join(tables)} CASCADE")


def report(capsys: Any) -> str:
    lines = [f"failure groups: what {STATS['examples']} examples exercised"]
    lines += [f"{n:7} {what}" for what, n in sorted(STATS.items())]
    text = "\n".join(lines)
    with contextlib.suppress(OSError):
        folder = Path(django_settings.VAR_DIR)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "failure_groups_property.txt").write_text(text + "\n")
    with capsys.disabled():
        print("\n" + text)
    return text


def test_each_held_instance_is_in_exactly_one_group(broker, capsys):
    make_definitions()
    operator = user_in("operator", "olga")
    STATS.clear()

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(population=populations)
    # Every kind of hold at least once in every run, besides the random ones.
    @example(population=SCENARIOS)
    def holds(population: list[Any]) -> None:
        try:
            check_population(broker, operator, population)
        finally:
            cleanup()

    try:
        holds()
    finally:
        text = report(capsys)
    if STATS["examples"]:
        never = [
            f"held by {s.held_by}: {s.kind}"
            for s in SCENARIOS
            if not STATS[f"held by {s.held_by}: {s.kind}"]
        ]
        never += [
            what
            for what in (
                "one group for the worker's and the sweeper's timeout",
                "compensate preview acts: True (action)",
                "compensate preview acts: False (action)",
                "retry preview acts: True (compensation)",
            )
            if not STATS[what]
        ]
        assert not never, f"never exercised: {never}\n{text}"
