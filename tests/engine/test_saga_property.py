"""Level 1 of SAGA_INVARIANT.md c.5: the saga invariant under any fault schedule.

A Hypothesis state machine drives one instance per example through the real
engine commands, the real task functions and PostgreSQL. Only the transport
is replaced: messages sit in an in-memory queue (``LocalBroker``) from which
the machine delivers, reorders, duplicates and drops them. Workers crash or
hang inside the activity call (a ``BaseException`` the engine cannot catch),
so crashes also hit attempts a worker continues with inline, without a
message; whether workers continue inline is drawn per example. Participants
keep the demo ledger (``ParticipantEffect``) behind test-only activities that
misbehave on command, and call back for attempts they accepted.

After every rule the safety part of the invariant (S1-S10, S12, with the
replay equality of S1) is checked. The teardown lets the remaining faults play
out, heals everything, drives the instance to quiescence within a bound (L3),
checks L1 and G, lets an operator retry what escalated (L2) and checks G again.
Operators also restart instances from a restart point (a random action, a
way to resolve a hold, and half the time the teardown's rescue); a second
machine over definitions built for it makes restarts the common path.

Environment: ``SAGA_PROPERTY_EXAMPLES`` (default 500; the restart machine runs
a fifth of that), ``SAGA_PROPERTY_STEPS``
(rules per example, default 25), ``SAGA_PROPERTY_STATS=1`` prints what the
examples exercised.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import os
import sys
import types
import uuid
from collections.abc import Iterator
from datetime import timedelta
from typing import Any, ClassVar
from unittest import mock

import pytest
from celery.exceptions import SoftTimeLimitExceeded
from django.db.models import F
from hypothesis import HealthCheck, settings, target
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from tests.saga_invariant import (
    StepSpec,
    check_history,
    check_instance,
    fsm_table,
    load,
    pinned_steps,
)
from tests.support import LocalBroker, Message, make_definition, user_in
from workflows_app import tasks
from workflows_app.activities import activity
from workflows_app.activities.base import ActivityContext, ActivityError, Waiting
from workflows_app.activities.demo import perform_action, perform_compensation
from workflows_app.engine import commands, sweeps
from workflows_app.engine.actors import Actor
from workflows_app.engine.commands.operator import restart_points
from workflows_app.engine.errors import NotPermitted, TransitionRejected
from workflows_app.models import (
    TERMINAL_STATES,
    Attempt,
    AttentionKind,
    InboundMessage,
    InstanceState,
    ParticipantEffect,
    StepExecution,
    TransitionLog,
    WorkflowInstance,
)
from workflows_app.views.common import blocked_step

EXAMPLES = int(os.environ.get("SAGA_PROPERTY_EXAMPLES", "500"))
STEPS_PER_EXAMPLE = int(os.environ.get("SAGA_PROPERTY_STEPS", "25"))
SHOW_STATS = bool(os.environ.get("SAGA_PROPERTY_STATS"))
WORKER = Actor.worker("prop-worker")
PARTICIPANT = Actor.api("prop-participant")
# Bounds of the teardown: rounds of (deliver all, advance the clock, sweep),
# messages per round, operator rescues after healing.
MAX_ROUNDS = 12
MAX_MESSAGES = 300
MAX_RESCUES = 3

# What a call to a participant does.
CALL_FAULTS = (
    "retryable",  # a transient error before the participant is reached
    "permanent",  # the participant declines
    "lose_confirmation",  # the effect applies, then the reply is lost
    "hang",  # the worker's time limit fires before the participant is reached
    "hang_after_apply",  # the effect applies, then the time limit fires
    "waiting",  # the effect applies; the result comes by callback, or never
    "waiting_fails",  # accepted, not applied; a failure comes by callback, or never
    "crash",  # the worker dies after its claim, before the call
    "crash_after_effect",  # it dies after the effect, before recording it
    "crash_redelivered",  # ... and the broker hands its message out again
    "crash_after_effect_redelivered",
    "stall",  # the worker hangs after its claim until resumed, maybe much later
)
# What happens to a queued message besides its delivery.
DELIVERY_FAULTS = ("duplicate", "drop")
STATS: collections.Counter[str] = collections.Counter()


# -- participants that misbehave on command ---------------------------------------


class WorkerCrash(BaseException):
    """The worker process dies: nothing after this point of the task runs."""

    def __init__(self, redeliver: bool) -> None:
        super().__init__("worker crashed")
        self.redeliver = redeliver


class WorkerStalled(BaseException):
    """The worker hangs before calling the participant; the machine parks it."""

    def __init__(self, ctx: ActivityContext) -> None:
        super().__init__("worker stalled")
        self.ctx = ctx


def _plans() -> collections.defaultdict[tuple[str, str], collections.deque[str]]:
    return collections.defaultdict(collections.deque)


@dataclasses.dataclass
class FaultSchedule:
    """The faults still to come, by (step name, direction); each fires once."""

    calls: collections.defaultdict[tuple[str, str], collections.deque[str]] = (
        dataclasses.field(default_factory=_plans)
    )
    # Steps whose compensation keeps failing until healed.
    broken: set[str] = dataclasses.field(default_factory=set)
    # Task tokens of the attempts the participants received (they call back).
    tokens: list[str] = dataclasses.field(default_factory=list)

    def next_call(self, ctx: ActivityContext) -> str:
        if ctx.direction == "compensation" and ctx.step_name in self.broken:
            return "retryable"
        plan = self.calls[(ctx.step_name, ctx.direction)]
        return plan.popleft() if plan else "ok"

    def heal(self) -> None:
        self.calls.clear()
        self.broken.clear()


# By instance id: the activities are module-level, the schedule is per example.
SCHEDULES: dict[str, FaultSchedule] = {}
# What tasks._budget returns in this example: None (every attempt travels as
# a message) or a budget that always fits (workers continue inline).
INLINE: list[commands.InlineBudget | None] = [None]


def _call(ctx: ActivityContext, apply: Any) -> dict[str, Any] | Waiting:
    schedule = SCHEDULES.get(ctx.instance_id)
    fault = schedule.next_call(ctx) if schedule else "ok"
    STATS[f"call {ctx.direction}: {fault}"] += 1
    if fault == "stall":
        raise WorkerStalled(ctx)
    if fault in {"crash", "crash_redelivered"}:
        raise WorkerCrash(redeliver=fault.endswith("_redelivered"))
    if fault == "retryable":
        raise ActivityError("the participant is unavailable")
    if fault == "permanent":
        raise ActivityError("the participant declined", permanent=True)
    if fault == "hang":
        raise SoftTimeLimitExceeded()
    if schedule is not None:
        schedule.tokens.append(ctx.task_token)
    if fault == "waiting_fails":
        return Waiting({"callback": "later"})
    # The participants' ledger (as the demo's): deduplicated by idempotency
    # key, an undo of nothing is a no-op, a forward call after its undo is
    # refused and counted.
    result: dict[str, Any] = apply(ctx, "prop")
    if fault.startswith("crash_after_effect"):
        raise WorkerCrash(redeliver=fault.endswith("_redelivered"))
    if fault == "lose_confirmation":
        raise ActivityError("the participant applied it, but the reply was lost")
    if fault == "hang_after_apply":
        raise SoftTimeLimitExceeded()
    if fault == "waiting":
        return Waiting({"callback": "later"})
    return result


@activity("prop.step")
def prop_step(ctx: ActivityContext) -> dict[str, Any] | Waiting:
    # No "simulate" in these inputs: the demo ledger is the plain participant.
    return _call(ctx, perform_action)


@activity("prop.undo")
def prop_undo(ctx: ActivityContext) -> dict[str, Any] | Waiting:
    return _call(ctx, perform_compensation)


# -- strategies ----------------------------------------------------------------------

CALL_PLANS = st.lists(st.sampled_from(CALL_FAULTS), max_size=3)
RARELY = (False, False, False, True)


@st.composite
def definitions(draw: Any) -> dict[str, Any]:
    """A definition of 1-4 steps and the faults its first calls run into."""
    n = draw(st.integers(1, 4))
    pivot = draw(st.none() | st.integers(1, n))
    steps = []
    for position in range(1, n + 1):
        steps.append(
            {
                "max_attempts": draw(st.integers(1, 3)),
                # Operators may restart from here (where the definition
                # rules allow it: see _valid_restart_points).
                "restart_point": (pivot is None or position < pivot)
                and draw(st.booleans()),
                "retry_on_timeout": draw(st.booleans()),
                # Done when the participant's event arrives, not on the reply.
                "awaits_event": draw(st.sampled_from(RARELY)),
                # A step with nothing to undo (a notification, a lookup).
                "no_undo": draw(st.sampled_from(RARELY)),
                "faults": {
                    "action": draw(CALL_PLANS),
                    "compensation": draw(CALL_PLANS),
                    "compensation broken": draw(st.sampled_from(RARELY)),
                },
            }
        )
    _valid_restart_points(steps, pivot)
    return {
        "failure_policy": draw(st.sampled_from(["compensate", "hold"])),
        "pivot": pivot,
        "workers_continue_inline": draw(st.booleans()),
        # After healing, the operator restarts from a restart point instead
        # of retrying the blocked step, where the definition allows it.
        "rescue_by_restart": draw(st.booleans()),
        "steps": steps,
    }


@st.composite
def restartable_definitions(draw: Any) -> dict[str, Any]:
    """Definitions where restarts are the common path: held on failure, the
    first step a restart point, one step declined for good at first."""
    spec = draw(definitions())
    steps = spec["steps"]
    if len(steps) < 2:
        steps.append(draw(definitions())["steps"][0])
    pivot = draw(st.sampled_from([None, len(steps)]))
    for position, step in enumerate(steps, start=1):
        step["awaits_event"] = False
        step["restart_point"] = position == 1 or (
            step["restart_point"] and (pivot is None or position < pivot)
        )
    declined = draw(st.integers(2, len(steps)))
    steps[declined - 1]["faults"]["action"].insert(0, "permanent")
    return {
        **spec,
        "failure_policy": "hold",
        "pivot": pivot,
        "rescue_by_restart": True,
    }


def _valid_restart_points(steps: list[dict[str, Any]], pivot: int | None) -> None:
    """No restart point may re-run a step that awaits an event (the
    definition rule): drop the points that would."""
    end = pivot or len(steps) + 1
    for position, step in enumerate(steps, start=1):
        if any(s["awaits_event"] for s in steps[position - 1 : end - 1]):
            step["restart_point"] = False


# Cancel once, the others twice: a cancel before the start ends an example.
OPERATOR_ACTIONS = (
    "retry_step",
    "compensate",
    "retry_compensation",
    "mark_step_done",
    "cancel",
    "restart_from_step",
    "retry_step",
    "compensate",
    "retry_compensation",
    "mark_step_done",
    "restart_from_step",
)
TRANSPORT_OPS = ("deliver", *DELIVERY_FAULTS)
RESUMED = types.SimpleNamespace(request=types.SimpleNamespace(id="resumed"))


def always_fits(timeout: timedelta) -> bool:
    return True


class SagaMachine(RuleBasedStateMachine):
    broker: ClassVar[LocalBroker]
    operators: ClassVar[tuple[Any, Any]]

    def __init__(self) -> None:
        super().__init__()
        self.queue: list[Message] = self.broker.queue
        self.queue.clear()
        self.faults = FaultSchedule()
        self.stalled: list[ActivityContext] = []
        self.callback_ids: list[str] = []
        self.event_ids: list[str] = []
        self.awaits: dict[str, str] = {}  # step name -> awaited event type
        self.instance_id = ""
        self.state = ""  # as of the last invariant check
        self.business_key = ""
        self.names: list[str] = []
        self.step_ids: dict[str, int] = {}
        self.specs: list[StepSpec] = []
        self.rescue_by_restart = False

    # -- the instance and its transport ---------------------------------------------
    def instance(self) -> WorkflowInstance:
        return WorkflowInstance.objects.get(pk=self.instance_id)

    def _deliver(self, message: Message) -> None:
        """A worker runs the message's task (and maybe more attempts inline)."""
        self._as_worker(lambda: self.broker.deliver(message), message)

    def _as_worker(self, work: Any, message: Message | None) -> None:
        try:
            work()
        except WorkerCrash as crash:
            # With acks_late the broker hands the message of a dead worker
            # out again; without it the message is gone.
            if crash.redeliver and message is not None:
                self.queue.append(message)
        except WorkerStalled as stalled:
            self.stalled.append(stalled.ctx)

    def _resume(self, ctx: ActivityContext) -> None:
        """A stalled worker goes on: it calls the participant, records the
        outcome and continues like any worker."""
        claim = commands.Claim(
            instance_id=ctx.instance_id,
            step_id=self.step_ids[ctx.step_name],
            timeout=timedelta(seconds=5),
            activity="prop.step" if ctx.direction == "action" else "prop.undo",
            context=ctx,
        )
        self._as_worker(
            lambda: tasks._work(RESUMED, claim, WORKER, INLINE[0]), message=None
        )

    def _advance_clock(self, seconds: float) -> None:
        # Time passing, simulated without touching any clock: every bookkeeping
        # column that the sweeper (and attempt_claim's backoff check) compares
        # with the database's now() moves `seconds` into the past, which is
        # what the clock moving `seconds` forward looks like to them. Only
        # this instance's rows move; status columns are never touched.
        delta = timedelta(seconds=seconds)
        WorkflowInstance.objects.filter(pk=self.instance_id).update(
            deadline_at=F("deadline_at") - delta,
            redispatch_at=F("redispatch_at") - delta,
            stuck_check_at=F("stuck_check_at") - delta,
        )
        StepExecution.objects.filter(instance_id=self.instance_id).update(
            deadline_at=F("deadline_at") - delta,
            next_attempt_at=F("next_attempt_at") - delta,
            redispatch_at=F("redispatch_at") - delta,
        )

    def _sweep(self) -> None:
        sweeps.sweep_all()
        # The sweeper serves every instance in the database (earlier examples
        # too); only this example's messages belong in its queue.
        self.queue[:] = [m for m in self.queue if m.args[0] == self.instance_id]

    # -- operators -------------------------------------------------------------------
    def _operate(self, action: str, user: Any, expected_version: int | None) -> bool:
        """One operator action; True if it applied, False if it was refused."""
        kwargs = {
            "user": user,
            "reason": f"{action} by {user.username}",
            "expected_version": expected_version,
        }
        try:
            if action == "mark_step_done":
                # An operator marks a step done by hand only after checking at
                # the participant that its effect did happen.
                blocked = (
                    StepExecution.objects.filter(
                        instance_id=self.instance_id, state__in=["failed", "unknown"]
                    )
                    .order_by("position")
                    .first()
                )
                if blocked is None or not ParticipantEffect.objects.filter(
                    idempotency_key=blocked.idempotency_key("action"), applied=True
                ):
                    return False
                commands.instance_mark_step_done(
                    self.instance_id, output={"by_hand": True}, **kwargs
                )
            elif action == "restart_from_step":
                # Any restart point, also one after the blocked step (refused).
                points = list(
                    StepExecution.objects.filter(
                        instance_id=self.instance_id,
                        step_definition__restart_point=True,
                    )
                    .order_by("position")
                    .values_list("id", flat=True)
                )
                if not points:
                    STATS["operator skipped: restart_from_step (no point)"] += 1
                    return False
                pick = points[self.instance().version % len(points)]
                commands.instance_restart_from_step(
                    self.instance_id, step_id=pick, **kwargs
                )
            else:
                getattr(commands, f"instance_{action}")(self.instance_id, **kwargs)
        except (TransitionRejected, NotPermitted):  # AlreadyChanged included
            STATS[f"operator refused: {action}"] += 1
            return False
        STATS[f"operator applied: {action}"] += 1
        return True

    def _manual_rows(self) -> int:
        """Instance rows of operator transitions (not of what they set off)."""
        manual = [name for scope, name in fsm_table()[1] if scope == "instance"]
        return TransitionLog.objects.filter(
            instance_id=self.instance_id, step=None, transition__in=manual
        ).count()

    # -- rules -----------------------------------------------------------------------
    @initialize(spec=definitions())
    def start(self, spec: dict[str, Any]) -> None:
        key = f"prop-{uuid.uuid4().hex[:16]}"
        self.names = [f"s{i}" for i in range(1, len(spec["steps"]) + 1)]
        make_definition(
            key,
            steps=[
                {
                    "name": name,
                    "action": "prop.step",
                    "compensation": "" if step.get("no_undo") else "prop.undo",
                    "is_pivot": position == spec["pivot"],
                    "max_attempts": step["max_attempts"],
                    "retry_on_timeout": step["retry_on_timeout"],
                    "restart_point": step.get("restart_point", False),
                    "awaits_event": f"prop.{name}.done" if step["awaits_event"] else "",
                }
                for position, (name, step) in enumerate(
                    zip(self.names, spec["steps"], strict=True), start=1
                )
            ],
            failure_policy=spec["failure_policy"],
        )
        instance = commands.instance_start(
            key, business_key=key, input={}, actor=Actor.api("prop")
        ).instance
        self.instance_id = str(instance.id)
        self.step_ids = {
            name: pk for pk, name in instance.steps.values_list("id", "name")
        }
        for name, step in zip(self.names, spec["steps"], strict=True):
            faults = step["faults"]
            self.faults.calls[(name, "action")].extend(faults["action"])
            self.faults.calls[(name, "compensation")].extend(faults["compensation"])
            if faults["compensation broken"]:
                self.faults.broken.add(name)
        self.specs = pinned_steps(instance.definition_id)
        self.business_key = key
        self.awaits = {
            name: f"prop.{name}.done"
            for name, step in zip(self.names, spec["steps"], strict=True)
            if step["awaits_event"]
        }
        SCHEDULES[self.instance_id] = self.faults
        INLINE[0] = always_fits if spec["workers_continue_inline"] else None
        self.rescue_by_restart = spec.get("rescue_by_restart", False)

    @precondition(lambda self: self.queue)
    @rule()
    def deliver_next(self) -> None:
        self._deliver(self.queue.pop(0))

    @precondition(lambda self: self.queue)
    @rule(op=st.sampled_from(TRANSPORT_OPS), pick=st.integers(0, 15))
    def transport(self, op: str, pick: int) -> None:
        """Deliver any queued message (out of order); ``duplicate``: the broker
        delivers it twice; ``drop``: it is lost (the sweeper must re-send the
        work)."""
        message = self.queue.pop(pick % len(self.queue))
        STATS[f"transport: {op} {message.task}"] += 1
        if op == "duplicate":
            self.queue.append(Message(message.task, [*message.args], message.options))
        if op != "drop":
            self._deliver(message)

    @precondition(lambda self: self.stalled)
    @rule(pick=st.integers(0, 3))
    def resume_stalled(self, pick: int) -> None:
        STATS["stalled worker resumed"] += 1
        self._resume(self.stalled.pop(pick % len(self.stalled)))

    @rule(
        position=st.integers(1, 4),
        direction=st.sampled_from(["action", "compensation"]),
        fault=st.sampled_from((*CALL_FAULTS, "broken")),
    )
    def inject_fault(self, position: int, direction: str, fault: str) -> None:
        """Plan one more fault; ``broken``: the compensation fails until healed."""
        name = self.names[(position - 1) % len(self.names)]
        if fault == "broken":
            self.faults.broken.add(name)
        else:
            self.faults.calls[(name, direction)].append(fault)

    @precondition(lambda self: self.faults.tokens)
    @rule(pick=st.integers(0, 7), replay=st.booleans(), permanent=st.booleans())
    def callback(self, pick: int, replay: bool, permanent: bool) -> None:
        """A participant reports the result of an attempt it received: success
        if its ledger shows the effect applied, else a failure. Most recent
        attempts first; older ones are stale. ``replay``: the same callback id
        again (S11: the stored answer, no history row)."""
        tokens = self.faults.tokens
        token = tokens[-1 - pick % len(tokens)]
        attempt = Attempt.objects.select_related("step").get(task_token=token)
        key = attempt.step.idempotency_key(attempt.direction)
        applied = ParticipantEffect.objects.filter(
            idempotency_key=key, applied=True
        ).exists()
        if replay and self.callback_ids:
            message_id = self.callback_ids[-1]
        else:
            message_id = uuid.uuid4().hex
            self.callback_ids.append(message_id)
        rows = TransitionLog.objects.filter(instance_id=self.instance_id).count()
        stored = InboundMessage.objects.filter(
            source=PARTICIPANT.label, message_id=message_id
        ).first()
        result = commands.callback_report(
            token,
            message_id=message_id,
            succeeded=applied,
            output={"callback": message_id} if applied else None,
            error="" if applied else "the participant could not do it",
            permanent=permanent,
            actor=PARTICIPANT,
        )
        STATS[
            f"callback: replay={result.replay} {result.response.get('accepted')}"
        ] += 1
        if stored is not None:
            after = TransitionLog.objects.filter(instance_id=self.instance_id).count()
            assert result.replay and result.response == stored.response, (
                "S11: a replayed callback did not get the stored answer"
            )
            assert after == rows, "S11: a replayed callback wrote history"

    def _applied(self, name: str, direction: str = "action") -> bool:
        """Whether the participant applied the step's current run (a restart
        sends new keys, and the participant announces each run's effect)."""
        step = StepExecution.objects.get(instance_id=self.instance_id, name=name)
        return ParticipantEffect.objects.filter(
            idempotency_key=step.idempotency_key(direction), applied=True
        ).exists()

    def _emit(self, name: str, *, replay: bool = False) -> None:
        """The participant announces a step's effect, once it applied it."""
        if name not in self.awaits or not self._applied(name):
            return
        if replay and self.event_ids:
            event_id = self.event_ids[-1]
        else:
            event_id = uuid.uuid4().hex
            self.event_ids.append(event_id)
        rows = TransitionLog.objects.filter(instance_id=self.instance_id).count()
        replayed = InboundMessage.objects.filter(
            source=PARTICIPANT.label, message_id=event_id
        ).exists()
        result = commands.event_ingest(
            event_id,
            event_type=self.awaits[name],
            correlation_key=self.business_key,
            payload={"event": event_id},
            actor=PARTICIPANT,
        )
        STATS[
            f"event: replay={result.replay} acted={bool(result.response['completed'])}"
        ] += 1
        if replayed:
            after = TransitionLog.objects.filter(instance_id=self.instance_id).count()
            assert result.replay and after == rows, "S11: a replayed event acted"

    @rule(position=st.integers(1, 4), replay=st.booleans())
    def participant_event(self, position: int, replay: bool) -> None:
        """The awaited event of a step (if it awaits one and its effect applied),
        possibly early, late or again (``replay``: the same event id)."""
        self._emit(self.names[(position - 1) % len(self.names)], replay=replay)

    @rule()
    def heal(self) -> None:
        self.faults.heal()

    @rule(seconds=st.sampled_from([0, 6, 31, 3600]), sweep=st.booleans())
    def time_passes(self, seconds: int, sweep: bool) -> None:
        self._advance_clock(seconds)
        if sweep:
            self._sweep()

    @rule(
        action=st.sampled_from(OPERATOR_ACTIONS),
        who=st.integers(0, 1),
        version=st.sampled_from(["current", "stale", "unchecked"]),
    )
    def operator(self, action: str, who: int, version: str) -> None:
        """Any operator action at any time: most are refused."""
        current = self.instance().version
        expected = {"current": current, "stale": current - 1, "unchecked": None}
        applied = self._operate(action, self.operators[who], expected[version])
        assert not (applied and version == "stale"), (
            "S10: an action against a stale state version applied"
        )

    @precondition(lambda self: self.state == InstanceState.NEEDS_ATTENTION)
    @rule(
        choice=st.sampled_from(
            ["retry", "compensate", "mark_step_done", "restart_from_step"]
        )
    )
    def operator_resolves(self, choice: str) -> None:
        """An operator picks an action that fits why the instance is held."""
        instance = self.instance()
        if instance.attention_kind == AttentionKind.COMPENSATION_FAILED:
            action = "retry_compensation"
        else:
            action = "retry_step" if choice == "retry" else choice
        self._operate(action, self.operators[0], instance.version)

    @precondition(lambda self: self.state == InstanceState.NEEDS_ATTENTION)
    @rule(
        first=st.sampled_from(OPERATOR_ACTIONS),
        second=st.sampled_from(OPERATOR_ACTIONS),
    )
    def two_operators(self, first: str, second: str) -> None:
        """Two operators act on the same state version: at most one applies,
        with exactly one manual row."""
        seen = self.instance().version
        before = self._manual_rows()
        applied = [
            self._operate(first, self.operators[0], seen),
            self._operate(second, self.operators[1], seen),
        ]
        after = self._manual_rows()
        assert sum(applied) <= 1, f"S10: both {first} and {second} applied"
        assert after - before == sum(applied), (
            f"S10: {after - before} manual instance rows for {sum(applied)} actions"
        )

    @invariant()
    def saga_is_safe(self) -> None:
        if not self.instance_id:
            return
        recorded = load(self.instance_id, steps=self.specs)
        assert recorded.persisted is not None
        self.state = recorded.persisted.state
        # Every command has committed between two rules and nothing runs
        # concurrently, so the persisted columns must equal the replayed
        # history at every point, not only at the end.
        check_history(recorded, quiescent=False, replay=True)

    # -- teardown: play out, heal, quiesce, rescue, check the terminal guarantee ---
    def _deliver_all(self) -> None:
        for _ in range(MAX_MESSAGES):
            if not self.queue:
                return
            self._deliver(self.queue.pop(0))
        raise AssertionError(f"L3: more than {MAX_MESSAGES} messages in one round")

    def _resume_all(self) -> None:
        while self.stalled:
            self._resume(self.stalled.pop(0))

    def _time_passes(self) -> None:
        self._advance_clock(3600)
        self._sweep()

    def _play_out(self) -> None:
        """Before healing: time passes and the sweeper times out what hangs;
        the hung workers come back late, first after the work that followed
        their timeout (a late forward call after its compensation), then
        before it. The faults still planned fire once each."""
        for late in (True, False):
            self._time_passes()
            if late:
                self._deliver_all()
            self._resume_all()
            self._deliver_all()

    def _drive(self) -> str:
        """Deliver, advance the clock and sweep until the instance finished or
        waits for a person with nothing left to do (L3: within a bound)."""
        for _ in range(MAX_ROUNDS):
            self._resume_all()
            self._deliver_all()
            # Participants announce what they did (the awaited events).
            awaiting = StepExecution.objects.filter(
                instance_id=self.instance_id,
                name__in=list(self.awaits),
                state__in=["running", "waiting"],
            )
            for name in awaiting.values_list("name", flat=True):
                self._emit(name)
            self._deliver_all()
            state = self.instance().state
            if state in TERMINAL_STATES:
                return state
            self._time_passes()
            if state == InstanceState.NEEDS_ATTENTION and not self.queue:
                return state
        raise AssertionError(
            f"L3: still {self.instance().state} after {MAX_ROUNDS} healed rounds"
        )

    def _rescue(self) -> None:
        """L2: after healing, an operator retries what escalated (or restarts
        from the earliest restart point up to the blocked step)."""
        instance = self.instance()
        if self.rescue_by_restart and self._restart_first(instance):
            return
        action = (
            "retry_compensation"
            if instance.attention_kind == AttentionKind.COMPENSATION_FAILED
            else "retry_step"
        )
        getattr(commands, f"instance_{action}")(
            self.instance_id,
            user=self.operators[0],
            reason="healed: try again",
            expected_version=instance.version,
        )

    def _restart_first(self, instance: WorkflowInstance) -> bool:
        steps = list(
            instance.steps.select_related("step_definition").order_by("position")
        )
        points = restart_points(steps, blocked_step(steps))
        point = points[0] if points else None
        forward_blocked = instance.attention_kind in {
            AttentionKind.STEP_FAILED,
            AttentionKind.STEP_UNKNOWN,
        }
        if point is None or instance.pivot_passed or not forward_blocked:
            return False
        commands.instance_restart_from_step(
            self.instance_id,
            user=self.operators[0],
            reason="healed: run it again from a restart point",
            step_id=point.id,
            expected_version=instance.version,
        )
        STATS["rescued by a restart"] += 1
        self.rescue_by_restart = False  # then retries, as L2 bounds the rounds
        return True

    def teardown(self) -> None:
        try:
            # After a failed rule or invariant only clean up: the original
            # error is the one to report and to shrink.
            if not self.instance_id or sys.exc_info()[0] is not None:
                return
            # An "eventually healed" schedule: finitely many faults, then none.
            self._play_out()
            self.faults.heal()
            state = self._drive()
            # L1: finished, or escalated to a person; G if finished.
            check_instance(self.instance_id, quiescent=True)
            STATS[f"healed: {state}"] += 1
            for _ in range(MAX_RESCUES):
                if state != InstanceState.NEEDS_ATTENTION:
                    break
                self._rescue()
                state = self._drive()
            assert state in {"completed", "compensated", "cancelled"}, (
                f"L2: still {state} after {MAX_RESCUES} operator retries"
            )
            check_instance(self.instance_id, quiescent=True)
            self._steer()
            self._count_outcome(state)
        finally:
            SCHEDULES.pop(self.instance_id, None)

    def _steer(self) -> None:
        """Point Hypothesis' targeted search at histories with more kinds of
        events and at late calls refused by a participant (rare paths)."""
        if not currently_in_test_context():  # a scenario played by hand
            return
        kinds = (
            TransitionLog.objects.filter(instance_id=self.instance_id)
            .values("transition")
            .distinct()
            .count()
        )
        late = ParticipantEffect.objects.filter(
            instance_id=self.instance_id, late_refused__gt=0
        ).count()
        target(float(kinds + 5 * late), label="event kinds and late calls")

    def _count_outcome(self, state: str) -> None:
        if not SHOW_STATS:
            return
        STATS[f"final: {state}"] += 1
        notes = TransitionLog.objects.filter(instance_id=self.instance_id, field="")
        for transition in notes.values_list("transition", flat=True):
            STATS[f"note: {transition}"] += 1
        for effect in ParticipantEffect.objects.filter(instance_id=self.instance_id):
            STATS[
                f"ledger {effect.direction}: applied={effect.applied} "
                f"repeated={effect.calls > 1} late_refused={effect.late_refused > 0}"
            ] += 1


@contextlib.contextmanager
def machine_session() -> Iterator[None]:
    """Operators, the in-memory broker and the per-example inline switch."""
    SagaMachine.operators = (
        user_in("operator", "prop_op_a"),
        user_in("operator", "prop_op_b"),
    )
    budget = mock.patch.object(tasks, "_budget", lambda task: INLINE[0])
    with LocalBroker() as broker, budget:
        SagaMachine.broker = broker
        yield


class RestartMachine(SagaMachine):
    """The same machine over definitions where operators restart often."""

    @initialize(spec=restartable_definitions())
    def start(self, spec: dict[str, Any]) -> None:
        super().start(spec)


def _run_machine(machine: type[SagaMachine], examples: int) -> None:
    STATS.clear()
    with machine_session():
        run_state_machine_as_test(
            machine,
            settings=settings(
                max_examples=examples,
                stateful_step_count=STEPS_PER_EXAMPLE,
                deadline=None,
                print_blob=True,
                suppress_health_check=[
                    HealthCheck.too_slow,
                    HealthCheck.function_scoped_fixture,
                ],
            ),
        )
    if SHOW_STATS:
        print(*(f"{n:6} {what}" for what, n in sorted(STATS.items())), sep="\n")


@pytest.mark.django_db(transaction=True)
def test_saga_invariant_holds_across_restarts():
    _run_machine(RestartMachine, max(1, EXAMPLES // 5))


@pytest.mark.django_db(transaction=True)
def test_saga_invariant_holds_under_faults():
    _run_machine(SagaMachine, EXAMPLES)


# -- scenarios the machine must reach: fixed rule sequences ---------------------------


def one_step(**faults: Any) -> dict[str, Any]:
    return {
        "max_attempts": 1,
        "retry_on_timeout": True,
        "awaits_event": False,
        "faults": {
            "action": [],
            "compensation": [],
            "compensation broken": False,
            **faults,
        },
    }


def play(spec: dict[str, Any], *rules: tuple[str, dict[str, Any]]) -> SagaMachine:
    """Run the machine through ``rules`` with the invariant after each one,
    then its teardown (quiescence, L1-L3, G)."""
    spec = {"failure_policy": "compensate", "pivot": None, **spec}
    machine = SagaMachine()
    machine.start(spec=spec)
    machine.saga_is_safe()
    for name, kwargs in rules:
        getattr(machine, name)(**kwargs)
        machine.saga_is_safe()
    machine.teardown()
    return machine


def effects(machine: SagaMachine) -> dict[str, ParticipantEffect]:
    rows = ParticipantEffect.objects.filter(instance_id=machine.instance_id)
    return {f"{e.step_name}:{e.direction}": e for e in rows}


@pytest.mark.django_db(transaction=True)
def test_late_forward_call_after_its_compensation_is_refused():
    """The worker hangs after its claim; the sweeper times the attempt out,
    the step is compensated (a no-op: nothing applied), then the hung worker
    reaches the participant, which refuses the late call."""
    with machine_session():
        machine = play(
            {"workers_continue_inline": False, "steps": [one_step(action=["stall"])]},
            ("deliver_next", {}),
            ("deliver_next", {}),
            ("time_passes", {"seconds": 3600, "sweep": True}),
            ("deliver_next", {}),
            ("resume_stalled", {"pick": 0}),
        )
    assert machine.instance().state == "compensated"
    ledger = effects(machine)
    assert ledger["s1:action"].late_refused == 1
    assert not ledger["s1:action"].applied
    assert not ledger["s1:compensation"].applied


@pytest.mark.django_db(transaction=True)
def test_waiting_step_completes_by_callback_once():
    with machine_session():
        machine = play(
            {
                "workers_continue_inline": True,
                "steps": [one_step(action=["waiting"]), one_step()],
            },
            ("deliver_next", {}),
            ("callback", {"pick": 0, "replay": False, "permanent": False}),
            ("deliver_next", {}),
            ("callback", {"pick": 0, "replay": True, "permanent": False}),
        )
    assert machine.instance().state == "completed"
    history = TransitionLog.objects.filter(instance_id=machine.instance_id)
    assert history.filter(transition="wait").count() == 1
    assert (
        InboundMessage.objects.filter(message_id__in=machine.callback_ids).count() == 1
    )


@pytest.mark.django_db(transaction=True)
def test_crash_after_the_effect_of_an_inline_attempt_is_recovered():
    """The worker continues inline with step two, which applies its effect
    and dies before recording it. The attempt times out; the operator sees
    the effect at the participant and marks the step done."""
    with machine_session():
        machine = play(
            {
                "workers_continue_inline": True,
                "failure_policy": "hold",
                "steps": [
                    one_step(),
                    {
                        **one_step(action=["crash_after_effect_redelivered"]),
                        "retry_on_timeout": False,
                    },
                ],
            },
            ("deliver_next", {}),
            ("deliver_next", {}),  # the redelivered start message: nothing to do
            ("time_passes", {"seconds": 3600, "sweep": True}),
            ("operator_resolves", {"choice": "mark_step_done"}),
        )
    assert machine.instance().state == "completed"
    assert TransitionLog.objects.filter(
        instance_id=machine.instance_id, transition="mark_done"
    ).exists()


@pytest.mark.django_db(transaction=True)
def test_two_operators_on_one_held_version():
    with machine_session():
        machine = play(
            {
                "workers_continue_inline": False,
                "failure_policy": "hold",
                "steps": [one_step(action=["permanent"])],
            },
            ("deliver_next", {}),
            ("deliver_next", {}),
            ("two_operators", {"first": "compensate", "second": "retry_step"}),
        )
    assert machine.instance().state == "compensated"


@pytest.mark.django_db(transaction=True)
def test_step_awaiting_an_event_completes_once():
    with machine_session():
        machine = play(
            {
                "workers_continue_inline": True,
                "steps": [{**one_step(), "awaits_event": True}, one_step()],
            },
            ("deliver_next", {}),
            ("participant_event", {"position": 1, "replay": False}),
            ("deliver_next", {}),
            ("participant_event", {"position": 1, "replay": True}),
        )
    assert machine.instance().state == "completed"
    assert TransitionLog.objects.filter(
        instance_id=machine.instance_id, transition="wait"
    ).exists()


@pytest.mark.django_db(transaction=True)
def test_restart_from_an_earlier_step_runs_it_again():
    """Held at the second step; an operator restarts from the first: both are
    undone (newest first), then run again under new keys and complete."""
    with machine_session():
        machine = play(
            {
                "workers_continue_inline": True,
                "failure_policy": "hold",
                "steps": [
                    {**one_step(), "restart_point": True},
                    one_step(action=["permanent"]),
                ],
            },
            ("deliver_next", {}),
            ("operator_resolves", {"choice": "restart_from_step"}),
        )
    assert machine.instance().state == "completed"
    keys = set(effects(machine).values())
    assert {e.idempotency_key.rsplit(":", 1)[1] for e in keys} >= {"action", "2"}
    assert TransitionLog.objects.filter(
        instance_id=machine.instance_id, transition="restart"
    ).exists()
