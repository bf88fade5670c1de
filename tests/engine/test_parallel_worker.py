"""Parallel stages on a real Celery worker (two prefork processes), Redis and
PostgreSQL: the branches of a stage run at the same time on two processes,
and when they finish together exactly one of them moves the instance on;
a branch that declines while its sibling is in flight sends the instance
back, the sibling's late success recorded and undone."""

from __future__ import annotations

import tempfile
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

import tests.worker_activities  # noqa: F401 - the worker's test activities, here too
from tests.celery_processes import celery_processes, wait_for
from tests.saga_invariant import check_instance
from tests.support import make_definition, start
from workflows_app.demo.models import ParticipantEffect
from workflows_app.models import Attempt, TransitionLog, WorkflowInstance

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.celery_worker]

SETTLED = {"completed", "compensated", "needs_attention", "failed", "cancelled"}


@pytest.fixture(autouse=True)
def empty_broker():
    from workflows_app.celery import app

    with app.connection_for_write() as conn:
        conn.default_channel.client.flushdb()


def _branch(name: str, folder: Path, party: list[str], **config: Any) -> dict[str, Any]:
    return {
        "name": name,
        "action": "test.branch",
        "compensation": "test.undo",
        "action_config": {"dir": str(folder), "party": party, **config},
        "parallel_with_previous": True,
        "timeout": timedelta(seconds=20),
    }


def _settle(instance: WorkflowInstance, timeout: float = 60) -> WorkflowInstance:
    def settled() -> bool:
        state = WorkflowInstance.objects.get(pk=instance.pk).state
        return state in SETTLED

    wait_for(settled, timeout, f"instance {instance.business_key} to settle")
    instance.refresh_from_db()
    return instance


def _word(instance: WorkflowInstance) -> list[str]:
    rows = ParticipantEffect.objects.filter(instance_id=instance.id, applied=True)
    return [
        f"{'T' if r.direction == 'action' else 'C'}:{r.step_name}"
        for r in rows.order_by("first_applied_at", "id")
    ]


def _log(instance: WorkflowInstance, transition: str, step: str) -> list[int]:
    return list(
        TransitionLog.objects.filter(
            instance=instance, transition=transition, step__name=step
        ).values_list("id", flat=True)
    )


def test_branches_run_together_and_exactly_one_moves_on():
    folder = Path(tempfile.mkdtemp(prefix="saga-branches-"))
    party = ["left", "right"]
    make_definition(
        "fork",
        [
            {"name": "first"},
            {**_branch("left", folder, party), "parallel_with_previous": False},
            _branch("right", folder, party),
            {"name": "after"},
        ],
    )
    instance = start("fork", "fork-1")
    with celery_processes(concurrency=2, beat=False):
        _settle(instance)

    assert instance.state == "completed", instance.attention_reason
    # Both branches ran at once, in two worker processes (each waited for
    # the other's marker), and finished together.
    pids = {(folder / name).read_text() for name in party}
    assert len(pids) == 2
    attempts = Attempt.objects.filter(
        step__instance=instance, step__name__in=party
    ).order_by("started_at")
    assert attempts.count() == 2
    first, second = attempts
    assert second.started_at < first.finished_at
    # The join: the next stage was scheduled exactly once, after both.
    [scheduled] = _log(instance, "schedule", "after")
    assert all(s < scheduled for b in party for s in _log(instance, "succeed", b))
    word = _word(instance)
    assert sorted(word[1:3]) == ["T:left", "T:right"]
    assert word[0] == "T:first" and word[3] == "T:after"
    check_instance(instance, quiescent=True)


def test_a_branch_declines_while_its_sibling_is_in_flight():
    folder = Path(tempfile.mkdtemp(prefix="saga-branches-"))
    party = ["slow", "declines"]
    make_definition(
        "fork-fails",
        [
            {"name": "first"},
            {
                **_branch("slow", folder, party, linger=1.5),
                "parallel_with_previous": False,
            },
            _branch("declines", folder, party, decline=True),
            {"name": "after"},
        ],
    )
    instance = start("fork-fails", "fork-2")
    with celery_processes(concurrency=2, beat=False):
        _settle(instance)

    assert instance.state == "compensated"
    [turned] = TransitionLog.objects.filter(
        instance=instance, transition="begin_compensation"
    ).values_list("id", flat=True)
    # The sibling was in flight when the instance turned back: fenced (no
    # retry, nothing new started), its success still recorded, then undone.
    [succeeded] = _log(instance, "succeed", "slow")
    assert succeeded > turned
    assert not _log(instance, "schedule", "after")
    steps = {s.name: s for s in instance.steps.all()}
    assert steps["declines"].compensation_state == "not_needed"
    assert steps["after"].compensation_state == "not_needed"
    assert steps["slow"].compensation_state == "done"
    assert _word(instance) == ["T:first", "T:slow", "C:slow", "C:first"]
    check_instance(instance, quiescent=True)
