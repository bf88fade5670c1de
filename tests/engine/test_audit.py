"""Every transition writes exactly one history row, with who did it.

Real flows run through the engine and the in-memory broker (real tasks, real
activities, real commits: ``TransactionTestCase``). After each one the history
is replayed (``tests.history``) and compared with the persisted states, and the
transitions django-fsm fired (its ``post_transition`` signal) are compared with
the history rows one for one: no transition without its row, no row without
its transition.
"""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

import pytest
from django.test import TransactionTestCase

from tests.history import (
    assert_history_consistent,
    recorded_transitions,
    replay,
    state_rows,
)
from tests.support import Message, make_definition, start, user_in
from workflows_app.engine import sweeps
from workflows_app.engine.actors import Actor
from workflows_app.engine.commands import (
    attempt_claim,
    instance_cancel,
    instance_close_as_failed,
    instance_mark_step_done,
    instance_retry_compensation,
    instance_retry_step,
)
from workflows_app.models import (
    ActorKind,
    StepExecution,
    TransitionLog,
    WorkflowInstance,
)


class FlowTestCase(TransactionTestCase):
    # Tests that step through single messages want every attempt to travel
    # as a message: "broker_no_inline".
    broker_fixture = "broker"

    @pytest.fixture(autouse=True)
    def _local_broker(self, request):
        self.broker = request.getfixturevalue(self.broker_fixture)

    def setUp(self):
        self.fired = self.enterContext(recorded_transitions())
        self.operator = user_in("operator", "olivia")

    # -- driving ------------------------------------------------------------
    def step_id(self, inst: WorkflowInstance, name: str) -> int:
        return StepExecution.objects.get(instance=inst, name=name).pk

    def deliver_until(self, wanted: Any) -> Message:
        """Deliver messages in order until ``wanted(message)``; return that one,
        taken off the queue and not delivered."""
        while self.broker.queue:
            message = self.broker.queue.pop(0)
            if wanted(message):
                return message
            self.broker.deliver(message)
        raise AssertionError("the queue ran dry")

    def attempt_of(self, step_id: int, direction: str = "action") -> Any:
        return lambda m: m.task == "run_attempt" and m.args[1:] == [step_id, direction]

    # -- reading ------------------------------------------------------------
    def last_row_id(self, inst: WorkflowInstance) -> int:
        last = TransitionLog.objects.filter(instance=inst).order_by("-id").first()
        return last.id if last else 0

    def rows(self, inst: WorkflowInstance, after: int = 0, upto: int | None = None):
        qs = TransitionLog.objects.filter(instance=inst, id__gt=after)
        if upto is not None:
            qs = qs.filter(id__lte=upto)
        return list(qs.select_related("step", "user").order_by("id"))

    def timeline(self, inst: WorkflowInstance, after: int = 0) -> list[tuple]:
        return [
            (r.step.name if r.step else None, r.transition, r.actor_kind)
            for r in self.rows(inst, after)
        ]

    def states(self, inst: WorkflowInstance) -> dict[str, tuple[str, str]]:
        return {
            s.name: (s.state, s.compensation_state)
            for s in StepExecution.objects.filter(instance=inst)
        }

    def assert_audited(self, inst: WorkflowInstance) -> WorkflowInstance:
        """History replays to the persisted states, and matches the transitions
        fired for this instance one for one."""
        assert_history_consistent(inst)
        fired = [f for f in self.fired if f.instance_id == inst.pk]
        rows = state_rows(inst)
        assert len(fired) == len(rows)
        assert fired == rows
        inst = WorkflowInstance.objects.get(pk=inst.pk)
        # The fold reaches the persisted state (also checked inside).
        assert replay(inst)[(None, "state")] == inst.state
        return inst

    def assert_operator_rows(
        self, inst: WorkflowInstance, after: int, upto: int, reason: str
    ) -> None:
        rows = self.rows(inst, after, upto)
        assert rows
        for row in rows:
            assert row.actor_kind == ActorKind.OPERATOR, row
            assert row.user == self.operator
            assert row.actor_label == "olivia"
            if row.field:
                assert row.reason == reason


class HappyAndCompensationTest(FlowTestCase):
    def test_happy_path(self):
        make_definition()
        inst = start()
        self.broker.run()
        inst = self.assert_audited(inst)
        assert inst.state == "completed"
        forward = [
            (name, t, "worker")
            for name in ("one", "two", "three")
            for t in ("schedule", "begin_attempt", "succeed")
        ]
        assert self.timeline(inst) == [
            (None, "accept", "api"),
            (None, "start", "worker"),
            *forward,
            (None, "complete", "worker"),
        ]

    def test_failure_compensates(self):
        make_definition()
        inst = start(simulate={"two": "fail"})
        self.broker.run()
        inst = self.assert_audited(inst)
        assert inst.state == "compensated"
        assert self.states(inst) == {
            "one": ("succeeded", "done"),
            # Declined for good (a permanent failure): nothing to undo.
            "two": ("failed", "not_needed"),
            "three": ("pending", "not_needed"),
        }
        rows = self.rows(inst)
        assert rows[0].actor_kind == ActorKind.API
        assert {r.actor_kind for r in rows[1:]} == {ActorKind.WORKER}
        assert [r.transition for r in rows if r.step is None] == [
            "accept",
            "start",
            "begin_compensation",
            "finish_compensation",
        ]


class OperatorActionsTest(FlowTestCase):
    def test_retry_after_hold(self):
        make_definition(
            steps=[
                {"name": "one"},
                {"name": "two", "max_attempts": 1},
                {"name": "three"},
            ],
            failure_policy="hold",
        )
        inst = start(simulate={"two": "fail_once"})
        self.broker.run()
        inst = self.assert_audited(inst)
        assert (inst.state, inst.attention_kind) == ("needs_attention", "step_failed")
        assert self.states(inst)["two"] == ("failed", "none")

        before = self.last_row_id(inst)
        instance_retry_step(
            inst.pk,
            user=self.operator,
            reason="the service is back",
            expected_version=inst.version,
        )
        after = self.last_row_id(inst)
        assert self.timeline(inst, before) == [
            (None, "retry_step", "operator"),
            ("two", "retry_now", "operator"),
        ]
        self.assert_operator_rows(inst, before, after, "the service is back")
        self.assert_audited(inst)

        self.broker.run()
        inst = self.assert_audited(inst)
        assert inst.state == "completed"
        assert {kind for _, _, kind in self.timeline(inst, after)} == {"worker"}
        assert self.states(inst)["two"] == ("succeeded", "none")

    def test_compensation_failure_retry_then_close(self):
        make_definition()
        inst = start(simulate={"two": "fail", "one": "fail_compensation"})
        self.broker.run()
        inst = self.assert_audited(inst)
        assert (inst.state, inst.attention_kind) == (
            "needs_attention",
            "compensation_failed",
        )
        assert self.states(inst)["one"] == ("succeeded", "failed")

        before = self.last_row_id(inst)
        instance_retry_compensation(inst.pk, user=self.operator, reason="try again")
        after = self.last_row_id(inst)
        assert self.timeline(inst, before) == [
            (None, "retry_compensation", "operator"),
            ("one", "compensation_retry_now", "operator"),
        ]
        self.assert_operator_rows(inst, before, after, "try again")

        self.broker.run()
        inst = self.assert_audited(inst)
        assert (inst.state, inst.attention_kind) == (
            "needs_attention",
            "compensation_failed",
        )
        assert (
            TransitionLog.objects.filter(
                instance=inst, transition="begin_compensation_attempt", step__name="one"
            ).count()
            == 6
        )

        before = self.last_row_id(inst)
        instance_close_as_failed(
            inst.pk,
            user=self.operator,
            reason="refund by hand",
            expected_version=inst.version,
        )
        assert self.timeline(inst, before) == [(None, "close_as_failed", "operator")]
        self.assert_operator_rows(
            inst, before, self.last_row_id(inst), "refund by hand"
        )
        self.broker.run()
        inst = self.assert_audited(inst)
        assert inst.state == "failed"
        assert self.states(inst) == {
            "one": ("succeeded", "failed"),
            "two": ("failed", "not_needed"),
            "three": ("pending", "not_needed"),
        }


class TimeoutTest(FlowTestCase):
    broker_fixture = "broker_no_inline"

    def test_timeout_then_mark_done(self):
        make_definition(
            steps=[
                {"name": "one"},
                {"name": "two", "timeout": timedelta(milliseconds=1)},
                {"name": "three"},
            ]
        )
        inst = start()
        two = self.step_id(inst, "two")
        self.deliver_until(self.attempt_of(two))
        # A worker claims the attempt and dies before reporting anything.
        attempt_claim(inst.pk, two, "action", actor=Actor.worker("doomed"))
        time.sleep(0.05)
        before = self.last_row_id(inst)
        assert sweeps.time_out_attempts(sweeps.db_now(), 10) == 1
        inst = self.assert_audited(inst)
        assert (inst.state, inst.attention_kind) == ("needs_attention", "step_unknown")
        assert self.timeline(inst, before) == [
            ("two", "time_out", "system"),
            (None, "hold", "system"),
        ]

        before = self.last_row_id(inst)
        instance_mark_step_done(
            inst.pk,
            user=self.operator,
            reason="the partner confirmed it by phone",
            output={"ref": "manual-1"},
        )
        after = self.last_row_id(inst)
        # The engine moves on in the same command, under the operator's name.
        assert self.timeline(inst, before) == [
            (None, "mark_step_done", "operator"),
            ("two", "mark_done", "operator"),
            ("three", "schedule", "operator"),
        ]
        self.assert_operator_rows(
            inst, before, after - 1, "the partner confirmed it by phone"
        )
        self.assert_audited(inst)

        self.broker.run()
        inst = self.assert_audited(inst)
        assert inst.state == "completed"
        assert self.states(inst)["two"] == ("skipped", "none")


class CancelTest(FlowTestCase):
    broker_fixture = "broker_no_inline"

    def test_cancel_accepted(self):
        make_definition()
        inst = start()
        instance_cancel(inst.pk, user=self.operator, reason="customer called")
        self.broker.run()  # the start message finds nothing to do
        inst = self.assert_audited(inst)
        assert inst.state == "cancelled"
        assert self.timeline(inst) == [
            (None, "accept", "api"),
            (None, "cancel", "operator"),
        ]

    def test_cancel_before_the_first_claim_unschedules(self):
        make_definition()
        inst = start()
        one = self.step_id(inst, "one")
        message = self.deliver_until(self.attempt_of(one))
        before = self.last_row_id(inst)
        instance_cancel(inst.pk, user=self.operator, reason="customer called")
        inst = self.assert_audited(inst)
        assert inst.state == "compensated"
        assert self.timeline(inst, before) == [
            (None, "cancel", "operator"),
            ("one", "unschedule", "operator"),
            ("one", "skip_compensation", "operator"),
            ("two", "skip_compensation", "operator"),
            ("three", "skip_compensation", "operator"),
            (None, "finish_compensation", "operator"),
        ]
        # The late message is only noted: a row that changes no state.
        before = self.last_row_id(inst)
        self.broker.deliver(message)
        self.broker.run()
        notes = self.rows(inst, before)
        assert [(r.transition, r.field, r.actor_kind) for r in notes] == [
            ("message_ignored", "", "worker")
        ]
        inst = self.assert_audited(inst)
        assert self.states(inst)["one"] == ("pending", "not_needed")

    def test_cancel_abandons_a_pending_retry(self):
        make_definition()
        inst = start(simulate={"one": "fail_once"})
        one = self.step_id(inst, "one")
        self.broker.deliver(self.deliver_until(self.attempt_of(one)))
        assert self.states(inst)["one"] == ("retrying", "none")
        before = self.last_row_id(inst)
        instance_cancel(inst.pk, user=self.operator, reason="customer called")
        assert self.timeline(inst, before) == [
            (None, "cancel", "operator"),
            ("one", "abandon_retry", "operator"),
            ("two", "skip_compensation", "operator"),
            ("three", "skip_compensation", "operator"),
            ("one", "require_compensation", "operator"),
        ]
        self.broker.run()
        inst = self.assert_audited(inst)
        assert inst.state == "compensated"
        # The first attempt may have applied: it is compensated.
        assert self.states(inst)["one"] == ("failed", "done")


class HistoryCheckerTest(FlowTestCase):
    """The checker is not vacuous: it catches a gap, an illegal edge and a
    state changed behind the engine's back."""

    def setUp(self):
        super().setUp()
        make_definition()
        self.inst = start()
        self.broker.run()
        assert_history_consistent(self.inst)
        self.two = StepExecution.objects.get(instance=self.inst, name="two")

    def log(self, **fields: Any) -> None:
        TransitionLog.objects.create(
            instance=self.inst, **{"actor_kind": "worker", "actor_label": "w", **fields}
        )

    def test_gap(self):
        self.log(
            step=self.two,
            field="state",
            source="running",
            target="succeeded",
            transition="succeed",
        )
        with self.assertRaisesMessage(AssertionError, "a missing or extra row"):
            replay(self.inst)

    def test_illegal_edge(self):
        self.log(
            step=self.two,
            field="state",
            source="succeeded",
            target="pending",
            transition="succeed",
        )
        with self.assertRaisesMessage(AssertionError, "not a transition"):
            replay(self.inst)

    def test_note_is_skipped(self):
        self.log(transition="message_ignored", reason="late")
        assert_history_consistent(self.inst)

    def test_state_changed_without_history(self):
        StepExecution.objects.filter(pk=self.two.pk).update(state="failed")
        with self.assertRaises(AssertionError):
            assert_history_consistent(self.inst)

    def test_operator_row_without_user(self):
        self.log(transition="comment", actor_kind="operator")
        with self.assertRaisesMessage(AssertionError, "without user"):
            assert_history_consistent(self.inst)
