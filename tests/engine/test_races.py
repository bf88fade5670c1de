"""Concurrent transitions on one row resolve to exactly one winner.

Each contender runs in its own thread with its own database connection. The
test holds the instance row lock while they start, and lets go only once
PostgreSQL reports every contender waiting for a lock: the race is real, not
two calls that happened to run one after the other.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from django.db import connection, transaction
from django.test import TransactionTestCase
from django.utils import timezone
from django_fsm import ConcurrentTransition

from tests.history import assert_history_consistent
from tests.support import make_definition, start, user_in
from workflows_app import tasks
from workflows_app.engine.actors import Actor
from workflows_app.engine.commands import (
    instance_cancel,
    instance_close_as_failed,
    instance_compensate,
    instance_mark_step_done,
    instance_resume,
    instance_retry_compensation,
    instance_retry_step,
)
from workflows_app.engine.errors import AlreadyChanged, TransitionRejected
from workflows_app.engine.transitions import CHANGED_MEANWHILE, Change
from workflows_app.models import StepExecution, TransitionLog, WorkflowInstance

pytestmark = pytest.mark.django_db(transaction=True)

WON = "won"


def lock_waiters() -> int:
    with connection.cursor() as cursor:
        # Inside a transaction the activity view is a snapshot: take a new one.
        cursor.execute("SELECT pg_stat_clear_snapshot()")
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE datname = current_database() AND wait_event_type = 'Lock'"
        )
        return cursor.fetchone()[0]


def race(instance_id: Any, *calls: Callable[[], Any]) -> list[Any]:
    """Run ``calls`` at once, each in a thread; return WON or the exception.

    The instance row is locked here until every call waits on a lock."""
    assert connection.vendor == "postgresql", "races are tested on PostgreSQL"
    barrier = threading.Barrier(len(calls) + 1)
    results: list[Any] = [None] * len(calls)

    def contender(i: int, call: Callable[[], Any]) -> None:
        try:
            barrier.wait(timeout=10)
            call()
            results[i] = WON
        except Exception as exc:
            results[i] = exc
        finally:
            connection.close()

    threads = [
        threading.Thread(target=contender, args=(i, c), daemon=True)
        for i, c in enumerate(calls)
    ]
    with transaction.atomic():
        WorkflowInstance.objects.select_for_update().get(pk=instance_id)
        for thread in threads:
            thread.start()
        barrier.wait(timeout=10)
        deadline = time.monotonic() + 10
        while lock_waiters() < len(calls):
            assert time.monotonic() < deadline, f"never queued up: {results}"
            time.sleep(0.01)
    for thread in threads:
        thread.join(timeout=30)
        assert not thread.is_alive()
    return results


class RaceTestCase(TransactionTestCase):
    broker_fixture = "broker"

    @pytest.fixture(autouse=True)
    def _local_broker(self, request):
        self.broker = request.getfixturevalue(self.broker_fixture)

    def setUp(self):
        self.alice = user_in("operator", "alice")
        self.bob = user_in("operator", "bob")

    def held(self, **simulate: Any) -> WorkflowInstance:
        """An instance held because step two failed for good (policy hold)."""
        make_definition(failure_policy="hold")
        inst = start(simulate={"two": "fail", **simulate})
        self.broker.run()
        inst = WorkflowInstance.objects.get(pk=inst.pk)
        assert (inst.state, inst.attention_kind) == ("needs_attention", "step_failed")
        return inst

    def count(self, inst: WorkflowInstance, transition: str) -> int:
        return TransitionLog.objects.filter(
            instance=inst, transition=transition
        ).count()

    def one_winner(self, results: list[Any]) -> tuple[int, Exception]:
        assert results.count(WON) == 1, results
        winner = results.index(WON)
        loser = results[1 - winner]
        assert isinstance(loser, TransitionRejected), repr(loser)
        return winner, loser


class TwoOperatorsTest(RaceTestCase):
    def test_same_retry_twice(self):
        inst = self.held()

        def retry(user):
            return lambda: instance_retry_step(inst.pk, user=user, reason="retry")

        results = race(inst.pk, retry(self.alice), retry(self.bob))
        winner, loser = self.one_winner(results)
        assert "not allowed while the instance is running" in str(loser), loser
        assert self.count(inst, "retry_step") == 1
        assert self.count(inst, "retry_now") == 1
        row = TransitionLog.objects.get(instance=inst, transition="retry_step")
        assert row.user == [self.alice, self.bob][winner]
        assert_history_consistent(inst)

    def test_same_retry_twice_from_the_same_page(self):
        """Both saw the same version: the loser is told it changed meanwhile."""
        inst = self.held()

        def retry(user):
            return lambda: instance_retry_step(
                inst.pk, user=user, reason="retry", expected_version=inst.version
            )

        results = race(inst.pk, retry(self.alice), retry(self.bob))
        _, loser = self.one_winner(results)
        assert type(loser) is AlreadyChanged
        assert str(loser) == CHANGED_MEANWHILE
        assert self.count(inst, "retry_step") == 1
        assert_history_consistent(inst)

    def test_cancel_against_retry_from_the_same_page(self):
        inst = self.held()
        seen = inst.version
        results = race(
            inst.pk,
            lambda: instance_cancel(
                inst.pk, user=self.alice, reason="stop", expected_version=seen
            ),
            lambda: instance_retry_step(
                inst.pk, user=self.bob, reason="go", expected_version=seen
            ),
        )
        winner, loser = self.one_winner(results)
        assert type(loser) is AlreadyChanged
        assert str(loser) == CHANGED_MEANWHILE
        assert self.count(inst, "cancel") == (winner == 0)
        assert self.count(inst, "retry_step") == (winner == 1)
        inst.refresh_from_db()
        assert inst.state == ("compensating", "running")[winner]
        assert_history_consistent(inst)
        self.broker.run()
        inst.refresh_from_db()
        assert inst.state in {"compensated", "needs_attention"}
        assert_history_consistent(inst)

    def test_close_against_retry(self):
        """Mutually exclusive transitions: the loser's is no longer allowed."""
        inst = self.held()
        results = race(
            inst.pk,
            lambda: instance_close_as_failed(
                inst.pk, user=self.alice, reason="give up"
            ),
            lambda: instance_retry_step(inst.pk, user=self.bob, reason="go"),
        )
        winner, loser = self.one_winner(results)
        assert type(loser) is TransitionRejected
        assert "is not allowed while the instance is" in str(loser), loser
        assert self.count(inst, "close_as_failed") == (winner == 0)
        assert self.count(inst, "retry_step") == (winner == 1)
        inst.refresh_from_db()
        assert inst.state == ("failed", "running")[winner]
        assert_history_consistent(inst)


class TwoWorkersTest(RaceTestCase):
    broker_fixture = "broker_no_inline"

    def test_duplicate_delivery_claims_once(self):
        make_definition()
        inst = start()
        one = StepExecution.objects.get(instance=inst, name="one")
        self.broker.deliver(self.broker.queue.pop(0))  # start, schedule one
        [message] = self.broker.queue
        assert message.args == [str(inst.pk), one.pk, "action"]
        self.broker.queue.clear()

        results = race(
            inst.pk,
            lambda: tasks.run_attempt(*message.args),
            lambda: tasks.run_attempt(*message.args),
        )
        assert results == [WON, WON]  # a duplicate is a no-op, not an error
        begun = TransitionLog.objects.filter(step=one, transition="begin_attempt")
        assert begun.count() == 1
        assert self.count(inst, "message_ignored") == 1
        assert self.count(inst, "succeed") == 1
        assert_history_consistent(inst)
        self.broker.run()
        inst.refresh_from_db()
        assert inst.state == "completed"
        assert_history_consistent(inst)


class VersionFenceTest(RaceTestCase):
    def test_stale_expected_version_changes_nothing(self):
        inst = self.held()
        commands = {
            "retry_step": instance_retry_step,
            "mark_step_done": instance_mark_step_done,
            "compensate": instance_compensate,
            "cancel": instance_cancel,
            "close_as_failed": instance_close_as_failed,
            "resume": instance_resume,
            "retry_compensation": instance_retry_compensation,
        }
        rows = TransitionLog.objects.filter(instance=inst).count()
        steps = list(StepExecution.objects.filter(instance=inst).values())
        for name, command in commands.items():
            with self.subTest(command=name):
                with self.assertRaisesMessage(AlreadyChanged, CHANGED_MEANWHILE):
                    command(
                        inst.pk,
                        user=self.alice,
                        reason="stale page",
                        expected_version=inst.version - 1,
                    )
                fresh = WorkflowInstance.objects.get(pk=inst.pk)
                assert (fresh.state, fresh.version) == (inst.state, inst.version)
                assert fresh.attention_kind == "step_failed"
                assert TransitionLog.objects.filter(instance=inst).count() == rows
                assert list(StepExecution.objects.filter(instance=inst).values()) == (
                    steps
                )
                assert self.broker.queue == []
        # The current version goes through.
        instance_close_as_failed(
            inst.pk, user=self.alice, reason="give up", expected_version=inst.version
        )
        inst.refresh_from_db()
        assert inst.state == "failed"
        assert_history_consistent(inst)

    def test_compare_and_set_without_row_locks(self):
        """Two writers that loaded the same version (no lock, as on SQLite):
        the second save matches no row and changes nothing."""
        inst = self.held()
        first = Change(
            WorkflowInstance.objects.get(pk=inst.pk),
            timezone.now(),
            Actor.operator(self.alice),
        )
        second = Change(
            WorkflowInstance.objects.get(pk=inst.pk),
            timezone.now(),
            Actor.operator(self.bob),
        )
        with transaction.atomic():
            first.fire(first.instance, "close_as_failed", reason="a", check_user=True)
            first.save()
        with self.assertRaisesMessage(AlreadyChanged, CHANGED_MEANWHILE):  # noqa: SIM117
            with transaction.atomic():
                second.fire(
                    second.instance, "close_as_failed", reason="b", check_user=True
                )
                second.save()
        row = TransitionLog.objects.get(instance=inst, transition="close_as_failed")
        assert row.user == self.alice
        fresh = WorkflowInstance.objects.get(pk=inst.pk)
        assert (fresh.state, fresh.version) == ("failed", inst.version + 1)
        assert_history_consistent(inst)

    def test_step_compare_and_set(self):
        inst = self.held()
        first = StepExecution.objects.get(instance=inst, name="two")
        second = StepExecution.objects.get(pk=first.pk)
        first.retry_now(1)
        first.save()
        second.mark_done(None)
        with pytest.raises(ConcurrentTransition):
            second.save()
        assert StepExecution.objects.get(pk=first.pk).state == "scheduled"
