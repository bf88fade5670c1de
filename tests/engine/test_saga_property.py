"""Level 1 of SAGA_INVARIANT.md c.5: the saga invariant under any fault schedule.

A Hypothesis state machine drives one instance per example through the real
engine commands, the real task functions and PostgreSQL. Only the transport
is replaced: messages sit in an in-memory queue (``LocalBroker``) from which
the machine delivers, reorders, duplicates and drops them. Workers crash or
hang inside the activity call (a ``BaseException`` the engine cannot catch),
so crashes also hit attempts a worker continues with inline, without a
message; whether workers continue inline is drawn per example. Participants
keep the demo ledger (``ParticipantEffect``) behind test-only activities that
misbehave on command, and call back for attempts they accepted. A
participant keeps its answers: a request it declined for good stays declined,
and one it applied is answered from its record, never declined afterwards.

Faults are drawn evenly: each example draws a sequence of faults per
direction (action, compensation), each kind with the same chance, and the
next calls of that direction take them in order; a rule plans more. No
targeting: it made whole fault kinds disappear for 500 examples. Definitions
are drawn with pivots and with short workflow deadlines (the sweeper holds
the instance while attempts are in flight), and with timers and steps for a
person among their steps (``saga_waits.py``): the sweeper wakes timers as
time passes, operators wake them early or extend them, people claim,
release, complete (with a right or a wrong form) or reject their steps, and
in the teardown complete what waits for them, at once or once it went
overdue. Operators try every action:
retry step, mark step done, compensate, cancel, resume, retry compensation,
close as failed, restart from a step, repair the input then retry (a new
run), acknowledge an alert; two of them on the same version. After the
instance finished, late worker outcomes, callbacks, events and sweeps keep
coming: nothing may change (S2).

After every rule the safety part of the invariant (S1-S10, S12, with the
replay equality of S1) is checked. The teardown lets the remaining faults play
out, heals everything, drives the instance to quiescence within a bound (L3),
checks L1 and G, lets an operator retry what escalated (L2), checks G again,
then sends late messages to the finished instance. Operators also restart
instances from a restart point (a random action, a way to resolve a hold,
and half the time the teardown's rescue); a second machine over definitions
built for it makes restarts the common path. Real threads (operator, worker,
sweeper at once) are in ``test_prop_threads.py``.

Every run prints what it exercised (fault kinds, operator actions applied
and refused, holds by kind, deadlines, late messages, terminal states) and
writes it to ``$SAGA_DESK_VAR_DIR/saga_property_<test>.txt``; with 200
examples or more a run fails if a fault kind, an operator action or a
transition of a timer or a person's step (``saga_waits.COUNTED``) never
fired, so coverage cannot silently rot.

Environment: ``SAGA_PROPERTY_EXAMPLES`` (default 800: the fault machine runs
that many, the restart machine a fifth, the thread test a tenth: 1,040 in
all), ``SAGA_PROPERTY_STEPS`` (rules per example, default 8),
``SAGA_PROPERTY_STATS=1`` adds the ledger and note counts to the table.
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
from pathlib import Path
from typing import Any, ClassVar
from unittest import mock

import pytest
from celery.exceptions import SoftTimeLimitExceeded
from django.conf import settings as django_settings
from django.db.models import F
from django.db.models.functions import Now
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from tests.engine import saga_waits
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
from workflows_app.activities.base import (
    ActivityContext,
    ActivityError,
    Waiting,
    step_idempotency_key,
)
from workflows_app.demo.activities import perform_action, perform_compensation
from workflows_app.demo.models import ParticipantEffect
from workflows_app.engine import commands, sweeps
from workflows_app.engine.actors import Actor
from workflows_app.engine.blocking import blocking_step as blocked_step
from workflows_app.engine.commands.operator import restart_points
from workflows_app.engine.commands.repair import instance_repair_input
from workflows_app.engine.errors import InvalidInput, NotPermitted, TransitionRejected
from workflows_app.models import (
    TERMINAL_STATES,
    Alert,
    Attempt,
    AttentionKind,
    InboundMessage,
    InstanceState,
    StepExecution,
    TransitionLog,
    WorkflowInstance,
)
from workflows_app.monitoring import metrics

EXAMPLES = int(os.environ.get("SAGA_PROPERTY_EXAMPLES", "800"))
STEPS_PER_EXAMPLE = int(os.environ.get("SAGA_PROPERTY_STEPS", "8"))
SHOW_STATS = bool(os.environ.get("SAGA_PROPERTY_STATS"))
# Below this many examples a run only reports what it missed.
COVERAGE_MIN_EXAMPLES = 200
WORKER = Actor.worker("prop-worker")
PARTICIPANT = Actor.api("prop-participant")
# Bounds of the teardown: rounds of (deliver all, advance the clock, sweep),
# messages per round, operator rescues after healing.
MAX_ROUNDS = 12
MAX_MESSAGES = 300
MAX_RESCUES = 3
# Callbacks the teardown sends to a finished instance (the latest attempts').
LATE_CALLBACKS = 2

# What a call to a participant does.
CALL_FAULTS = (
    "retryable",  # a transient error before the participant is reached
    "permanent",  # the participant declines (for good: it keeps that answer)
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
# Every operator action; the random ones are drawn evenly from this list.
OPERATOR_ACTIONS = (
    "retry_step",
    "mark_step_done",
    "compensate",
    "cancel",
    "resume",
    "retry_compensation",
    "close_as_failed",
    "restart_from_step",
    "repair_and_retry",
    "acknowledge_alert",
)
STATS: collections.Counter[str] = collections.Counter()


# -- participants that misbehave on command ---------------------------------------


class WorkerCrash(BaseException):
    """The worker process dies: nothing after this point of the task runs."""

    def __init__(self, redeliver: bool) -> None:
        super().__init__("worker crashed")
        self.redeliver = redeliver


class WorkerStalled(BaseException):
    """The worker hangs before calling the participant; the machine parks it
    with its claim, which holds what the worker kept of the transaction that
    made it (engine.held): a resumed worker decides from that if the rows
    are still as it left them."""

    def __init__(self, ctx: ActivityContext) -> None:
        super().__init__("worker stalled")
        self.ctx = ctx
        self.claim: commands.Claim | None = None


def _calling(call: Any) -> Any:
    """tasks.call_activity, whose stalls carry the claim."""

    def call_activity(claim: commands.Claim) -> Any:
        try:
            return call(claim)
        except WorkerStalled as stalled:
            stalled.claim = claim
            raise

    return call_activity


def _keeping(record: Any) -> Any:
    """commands.attempt_record_and_continue, with what the worker kept
    dropped when the example says so."""

    def attempt_record_and_continue(
        claim: commands.Claim, outcome: Any, **options: Any
    ) -> Any:
        if not KEEP[0]:
            claim = dataclasses.replace(claim, held=None)
        return record(claim, outcome, **options)

    return attempt_record_and_continue


def _counting(record: Any) -> Any:
    """metrics.worker_recorded, also counted in STATS."""

    def worker_recorded(way: str) -> None:
        STATS[f"worker recorded: {way}"] += 1
        record(way)

    return worker_recorded


def _plans() -> collections.defaultdict[Any, collections.deque[str]]:
    return collections.defaultdict(collections.deque)


@dataclasses.dataclass
class FaultSchedule:
    """The faults still to come; each fires once. ``steps``: by (step name,
    direction), for scenarios that aim at one step; ``calls``: by direction,
    taken by the next calls of any step (how the machine's draws are spent,
    so every drawn kind fires whichever step comes first)."""

    steps: collections.defaultdict[Any, collections.deque[str]] = dataclasses.field(
        default_factory=_plans
    )
    calls: collections.defaultdict[Any, collections.deque[str]] = dataclasses.field(
        default_factory=_plans
    )
    # Steps whose compensation keeps failing until healed.
    broken: set[str] = dataclasses.field(default_factory=set)
    # Task tokens of the attempts the participants received (they call back).
    tokens: list[str] = dataclasses.field(default_factory=list)
    # Idempotency keys a participant declined for good: it keeps that answer.
    declined: set[str] = dataclasses.field(default_factory=set)

    def next_call(self, ctx: ActivityContext) -> str:
        if ctx.direction == "compensation" and ctx.step_name in self.broken:
            return "retryable"
        for plan in (
            self.steps[(ctx.step_name, ctx.direction)],
            self.calls[ctx.direction],
        ):
            if plan:
                return plan.popleft()
        return "ok"

    def heal(self) -> None:
        self.steps.clear()
        self.calls.clear()
        self.broken.clear()


# Published definitions by shape, within one test (its database).
DEFINITIONS: dict[str, str] = {}
# By instance id: the activities are module-level, the schedule is per example.
SCHEDULES: dict[str, FaultSchedule] = {}
# What tasks._budget returns in this example: None (every attempt travels as
# a message) or a budget that always fits (workers continue inline).
INLINE: list[commands.InlineBudget | None] = [None]
# Whether workers use what they kept of their last transaction (engine.held).
KEEP: list[bool] = [True]


def _applied(key: str) -> bool:
    return ParticipantEffect.objects.filter(idempotency_key=key, applied=True).exists()


def _call(ctx: ActivityContext, apply: Any) -> dict[str, Any] | Waiting:
    schedule = SCHEDULES.get(ctx.instance_id)
    fault = schedule.next_call(ctx) if schedule else "ok"
    forward = ctx.direction == "action"
    if schedule is not None and forward and ctx.idempotency_key in schedule.declined:
        # A participant keeps its answer: what it declined stays declined.
        STATS["participant: a declined request asked again, declined again"] += 1
        raise ActivityError("the participant declined this request", permanent=True)
    if fault == "permanent" and forward and _applied(ctx.idempotency_key):
        # ... and answers an applied request from its record.
        STATS["participant: permanent for an applied request, answered ok"] += 1
        fault = "ok"
    STATS[f"fault {ctx.direction}: {fault}"] += 1
    if fault == "stall":
        raise WorkerStalled(ctx)
    if fault in {"crash", "crash_redelivered"}:
        raise WorkerCrash(redeliver=fault.endswith("_redelivered"))
    if fault == "retryable":
        raise ActivityError("the participant is unavailable")
    if fault == "permanent":
        if schedule is not None and forward:
            schedule.declined.add(ctx.idempotency_key)
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

FAULT = st.sampled_from(CALL_FAULTS)
RARELY = (False, False, False, True)
# Restart twice: it applies only where a restart point precedes the block.
RESCUES = (
    "retry",
    "restart",
    "restart",
    "close",
    "mark_done",
    "compensate",
    "repair",
    "cancel",
)
# Workflow deadlines (seconds): shorter than a step's 5 s timeout, so the
# sweeper holds the instance while an attempt is in flight.
DEADLINES = (None, 2, 3, 4)


@st.composite
def definitions(draw: Any) -> dict[str, Any]:
    """A definition of 1-4 steps and the faults its first calls run into."""
    n = draw(st.integers(1, 4))
    pivot = draw(st.none() | st.integers(1, n))
    steps = []
    for position in range(1, n + 1):
        step = {
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
                "action": [],
                "compensation": [],
                "compensation broken": draw(st.sampled_from(RARELY)),
            },
        }
        # A timer or a step for a person (never the pivot: it applies nothing).
        kind = draw(st.sampled_from(saga_waits.KINDS))
        if kind != "activity" and position != pivot:
            saga_waits.draw_wait(draw, step, kind)
        steps.append(step)
    _valid_restart_points(steps, pivot)
    return {
        "failure_policy": draw(st.sampled_from(["compensate", "hold"])),
        "pivot": pivot,
        "deadline": draw(st.sampled_from(DEADLINES)),
        "workers_continue_inline": draw(st.booleans()),
        # Whether a worker decides its next step from what it kept of its
        # last transaction (engine.held) or reads it again under the lock.
        "workers_keep_rows": draw(st.booleans()),
        # What the operator does first about a hold after healing (then the
        # action that fits the hold); "close" also closes before the late
        # workers come back.
        "rescue": draw(st.sampled_from(RESCUES)),
        # Taken in order by the next calls of each direction, any step.
        "action_faults": draw(st.lists(FAULT, min_size=1, max_size=3)),
        "compensation_faults": draw(st.lists(FAULT, max_size=3)),
        # What the teardown's people do with a step that waits for them.
        "person": draw(st.sampled_from(saga_waits.PEOPLE)),
        "timer_op": draw(st.sampled_from(saga_waits.TIMER_PEOPLE)),
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
    for position in (pivot, declined):
        # The pivot and the step declined at first call a participant.
        if position is not None and steps[position - 1].get("kind", "activity") != (
            "activity"
        ):
            steps[position - 1] = draw(definitions())["steps"][0]
            steps[position - 1].update(
                kind="activity",
                awaits_event=False,
                no_undo=False,
                restart_point=position == 1,
            )
    steps[declined - 1]["faults"]["action"].insert(0, "permanent")
    return {
        **spec,
        "failure_policy": "hold",
        "pivot": pivot,
        "rescue": "restart",
    }


def _valid_restart_points(steps: list[dict[str, Any]], pivot: int | None) -> None:
    """No restart point may re-run a step that awaits an event (the
    definition rule): drop the points that would."""
    end = pivot or len(steps) + 1
    for position, step in enumerate(steps, start=1):
        if any(s["awaits_event"] for s in steps[position - 1 : end - 1]):
            step["restart_point"] = False


TRANSPORT_OPS = ("deliver", *DELIVERY_FAULTS)
LATE_OPS = ("worker", "callback", "event", "sweep")
RESUMED = types.SimpleNamespace(request=types.SimpleNamespace(id="resumed"))


def always_fits(timeout: timedelta) -> bool:
    return True


class SagaMachine(saga_waits.WaitActions, RuleBasedStateMachine):
    broker: ClassVar[LocalBroker]
    operators: ClassVar[tuple[Any, Any]]
    stats = STATS

    def __init__(self) -> None:
        super().__init__()
        self.queue: list[Message] = self.broker.queue
        self.queue.clear()
        self.faults = FaultSchedule()
        self.stalled: list[ActivityContext] = []
        self.stalled_claims: dict[str, commands.Claim] = {}
        self.callback_ids: list[str] = []
        self.event_ids: list[str] = []
        self.awaits: dict[str, str] = {}  # step name -> awaited event type
        self.instance_id = ""
        self.state = ""  # as of the last invariant check
        self.business_key = ""
        self.names: list[str] = []
        self.step_ids: dict[str, int] = {}
        self.specs: list[StepSpec] = []
        self.pivot: str | None = None  # the pivot step's name
        self.rescue = "retry"
        self.has_deadline = False
        self.holds: set[str] = set()  # attention kinds this example went through
        self.has_waits = False  # a timer or a step for a person
        self.wait_kinds: set[str] = set()
        self.people = "complete"  # what the teardown's people do
        self.timer_op = "sweeper"  # ... and its operator with a timer
        self.overdue_seen: set[int] = set()
        self.waiting: set[str] = set()  # kinds of wait open now (the rules')

    # -- the instance and its transport ---------------------------------------------
    def instance(self) -> WorkflowInstance:
        return WorkflowInstance.objects.get(pk=self.instance_id)

    def _instance_version(self) -> int:
        return self.instance().version

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
            if stalled.claim is not None:
                self.stalled_claims[stalled.ctx.task_token] = stalled.claim

    def _resume(self, ctx: ActivityContext) -> None:
        """A stalled worker goes on: it calls the participant, records the
        outcome and continues like any worker."""
        claim = self.stalled_claims.pop(ctx.task_token, None) or commands.Claim(
            instance_id=ctx.instance_id,
            step_id=self.step_ids[ctx.step_name],
            timeout=timedelta(seconds=5),
            activity="prop.step" if ctx.direction == "action" else "prop.undo",
            context=ctx,
        )
        if self.state in TERMINAL_STATES:
            STATS[f"late: a stalled worker resumed after {self.state}"] += 1
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
            wake_at=F("wake_at") - delta,
        )

    def _sweep(self) -> None:
        sweeps.sweep_all()
        # The sweeper serves every instance in the database (earlier examples
        # too); only this example's messages belong in its queue.
        self.queue[:] = [m for m in self.queue if m.args[0] == self.instance_id]

    def _state_rows(self) -> int:
        return TransitionLog.objects.filter(
            instance_id=self.instance_id, field__gt=""
        ).count()

    # -- operators -------------------------------------------------------------------
    def _blocked(self) -> StepExecution | None:
        return (
            StepExecution.objects.filter(
                instance_id=self.instance_id, state__in=["failed", "unknown"]
            )
            .select_related("step_definition")
            .order_by("position")
            .first()
        )

    def _pivot_may_have_applied(self) -> bool:
        """What an operator checks before undoing around an uncertain pivot:
        the participant shows no effect, and no worker still holds a call."""
        if self.pivot is None:
            return False
        step = StepExecution.objects.get(instance_id=self.instance_id, name=self.pivot)
        busy = any(ctx.step_name == self.pivot for ctx in self.stalled)
        return busy or _applied(step.idempotency_key("action"))

    def _operate(self, action: str, user: Any, expected_version: int | None) -> bool:
        """One operator action; True if it applied, False if it was refused
        (or the operator, checking first, did not ask)."""
        kwargs = {
            "user": user,
            "reason": f"{action} by {user.username}",
            "expected_version": expected_version,
        }
        try:
            if action == "mark_step_done":
                # An operator marks a step done by hand only after checking at
                # the participant that its effect did happen.
                blocked = self._blocked()
                if blocked is None or not (
                    # A timer or a person's step applies nothing: marking it
                    # done is the operator's call alone.
                    blocked.step_definition.kind != "activity"
                    or _applied(blocked.idempotency_key("action"))
                ):
                    STATS["operator did not ask: mark_step_done (no effect)"] += 1
                    return False
                commands.instance_mark_step_done(
                    self.instance_id, output={"by_hand": True}, **kwargs
                )
            elif action in {"compensate", "cancel"} and (
                self.instance().attention_kind == AttentionKind.PIVOT_UNCERTAIN
                and self._pivot_may_have_applied()
            ):
                # Undoing around an uncertain pivot is a person's judgement
                # that it did not apply: only when the participant says so.
                STATS[f"operator did not ask: {action} (the pivot applied)"] += 1
                return False
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
                    STATS["operator did not ask: restart_from_step (no point)"] += 1
                    return False
                pick = points[self.instance().version % len(points)]
                commands.instance_restart_from_step(
                    self.instance_id, step_id=pick, **kwargs
                )
            elif action == "repair_and_retry":
                # The input is corrected, then the blocked step retried: a new
                # run (undone first where it may have applied); a timer's
                # time is among what was corrected.
                instance_repair_input(
                    self.instance_id,
                    new_input={
                        "repaired": self.instance().version,
                        **saga_waits.wake_at_input(),
                    },
                    **kwargs,
                )
                STATS["operator applied: repair input"] += 1
                commands.instance_retry_step(
                    self.instance_id,
                    user=user,
                    reason=kwargs["reason"],
                    expected_version=self.instance().version,
                )
            elif action == "acknowledge_alert":
                alert = Alert.objects.filter(
                    instance_id=self.instance_id,
                    resolved_at__isnull=True,
                    acknowledged_at__isnull=True,
                ).first()
                if alert is None:
                    STATS["operator did not ask: acknowledge_alert (none open)"] += 1
                    return False
                commands.alert_acknowledge(alert.pk, user=user, reason=action)
                STATS[f"alert acknowledged: {alert.kind}"] += 1
            else:
                getattr(commands, f"instance_{action}")(self.instance_id, **kwargs)
        except (TransitionRejected, NotPermitted, InvalidInput):
            STATS[f"operator refused: {action}"] += 1  # AlreadyChanged included
            return False
        STATS[f"operator applied: {action}"] += 1
        return True

    def _manual_rows(self) -> int:
        """Instance rows of operator transitions (not of what they set off)."""
        manual = [name for scope, name in fsm_table()[1] if scope == "instance"]
        return TransitionLog.objects.filter(
            instance_id=self.instance_id, step=None, transition__in=manual
        ).count()

    def _definition(self, spec: dict[str, Any]) -> str:
        """The key of a published definition for ``spec`` (made once per
        shape: publishing is slow, and instances pin their version anyway)."""
        deadline = spec.get("deadline")
        steps = [
            {
                "name": name,
                "action": "prop.step",
                "compensation": "" if step.get("no_undo") else "prop.undo",
                "is_pivot": position == spec["pivot"],
                "max_attempts": step["max_attempts"],
                "retry_on_timeout": step["retry_on_timeout"],
                "restart_point": step.get("restart_point", False),
                "awaits_event": f"prop.{name}.done" if step["awaits_event"] else "",
                # A timer or a step for a person: no action, nothing to undo.
                **(
                    saga_waits.declared(step)
                    if step.get("kind", "activity") != "activity"
                    else {}
                ),
            }
            for position, (name, step) in enumerate(
                zip(self.names, spec["steps"], strict=True), start=1
            )
        ]
        shape = repr((steps, spec["failure_policy"], deadline))
        if shape not in DEFINITIONS:
            key = f"prop-{uuid.uuid4().hex[:16]}"
            make_definition(
                key,
                steps=steps,
                failure_policy=spec["failure_policy"],
                deadline=timedelta(seconds=deadline) if deadline else None,
            )
            DEFINITIONS[shape] = key
        return DEFINITIONS[shape]

    # -- rules -----------------------------------------------------------------------
    @initialize(spec=definitions())
    def start(self, spec: dict[str, Any]) -> None:
        key = f"prop-{uuid.uuid4().hex[:16]}"
        self.names = [f"s{i}" for i in range(1, len(spec["steps"]) + 1)]
        deadline = spec.get("deadline")
        definition_key = self._definition(spec)
        instance = commands.instance_start(
            definition_key,
            business_key=key,
            input=saga_waits.starting_input(spec["steps"]),
            actor=Actor.api("prop"),
        ).instance
        self.instance_id = str(instance.id)
        self.step_ids = {
            name: pk for pk, name in instance.steps.values_list("id", "name")
        }
        for name, step in zip(self.names, spec["steps"], strict=True):
            faults = step["faults"]
            self.faults.steps[(name, "action")].extend(faults["action"])
            self.faults.steps[(name, "compensation")].extend(faults["compensation"])
            if faults["compensation broken"]:
                self.faults.broken.add(name)
        self.faults.calls["action"].extend(spec.get("action_faults", []))
        self.faults.calls["compensation"].extend(spec.get("compensation_faults", []))
        self.specs = pinned_steps(instance.definition_id)
        self.pivot = next((s.name for s in self.specs if s.is_pivot), None)
        self.business_key = key
        self.awaits = {
            name: f"prop.{name}.done"
            for name, step in zip(self.names, spec["steps"], strict=True)
            if step["awaits_event"]
        }
        SCHEDULES[self.instance_id] = self.faults
        INLINE[0] = always_fits if spec["workers_continue_inline"] else None
        KEEP[0] = spec.get("workers_keep_rows", True)
        self.rescue = spec.get("rescue", "retry")
        self.has_deadline = bool(deadline)
        STATS["examples"] += 1
        STATS[
            f"definition: deadline {deadline}s"
            if deadline
            else "definition: no deadline"
        ] += 1
        STATS[f"definition: pivot {'yes' if spec['pivot'] else 'no'}"] += 1
        kinds = {step.get("kind", "activity") for step in spec["steps"]}
        for kind in sorted(kinds - {"activity"}):
            STATS[f"definition: has a {kind} step"] += 1
        self.has_waits = kinds != {"activity"}
        self.wait_kinds = kinds - {"activity"}
        self.people = spec.get("person", "complete")
        self.timer_op = spec.get("timer_op", "sweeper")

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
        direction=st.sampled_from(["action", "compensation"]),
        fault=st.sampled_from((*CALL_FAULTS, "broken")),
        position=st.integers(1, 4),
    )
    def inject_fault(self, direction: str, fault: str, position: int) -> None:
        """Plan one more fault for the next call of ``direction``; ``broken``:
        a step's compensation fails until healed."""
        if fault == "broken":
            self.faults.broken.add(self.names[(position - 1) % len(self.names)])
        else:
            self.faults.calls[direction].append(fault)

    @precondition(lambda self: self.faults.tokens)
    @rule(pick=st.integers(0, 7), replay=st.booleans(), permanent=st.booleans())
    def callback(self, pick: int, replay: bool, permanent: bool) -> None:
        """A participant reports the result of an attempt it received: success
        if its ledger shows the effect applied, else a failure. Most recent
        attempts first; older ones are stale. ``replay``: the same callback id
        again (S11: the stored answer, no history row)."""
        tokens = self.faults.tokens
        self._callback(tokens[-1 - pick % len(tokens)], replay, permanent)

    def _callback(
        self, token: str, replay: bool, permanent: bool, *, remember: bool = True
    ) -> None:
        attempt = Attempt.objects.select_related("step").get(task_token=token)
        key = step_key(attempt)
        applied = _applied(key)
        if permanent and not applied and attempt.direction == "action":
            self.faults.declined.add(key)  # it keeps that answer
        if replay and self.callback_ids:
            message_id = self.callback_ids[-1]
        else:
            message_id = uuid.uuid4().hex
            if remember:
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

    def _step_applied(self, name: str, direction: str = "action") -> bool:
        """Whether the participant applied the step's current run (a restart
        sends new keys, and the participant announces each run's effect)."""
        step = StepExecution.objects.get(instance_id=self.instance_id, name=name)
        return _applied(step.idempotency_key(direction))

    def _emit(self, name: str, *, replay: bool = False, anyway: bool = False) -> None:
        """The participant announces a step's effect, once it applied it
        (``anyway``: also before, a participant's mistake)."""
        if name not in self.awaits or not (anyway or self._step_applied(name)):
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

    def _until_waiting(self, kind: str) -> None:
        """Work goes on (queued messages delivered, a few at most) until a
        step of ``kind`` waits: a person acts when their step arrives."""
        for _ in range(4):
            if kind in self.waiting or not self.queue:
                return
            self._deliver(self.queue.pop(0))
            self.saga_is_safe()

    @precondition(lambda self: "human" in self.wait_kinds)
    @rule(
        op=st.sampled_from(saga_waits.PERSON_OPS),
        who=st.integers(0, 1),
        stale=st.sampled_from(RARELY),
    )
    def person(self, op: str, who: int, stale: bool) -> None:
        """A person claims, releases, completes (with a right or a wrong
        form) or rejects a step that waits for them."""
        self._until_waiting("human")
        self.person_acts(op, who, stale)

    @precondition(lambda self: "timer" in self.wait_kinds)
    @rule(
        op=st.sampled_from(saga_waits.TIMER_OPS),
        who=st.integers(0, 1),
        stale=st.sampled_from(RARELY),
    )
    def timer(self, op: str, who: int, stale: bool) -> None:
        """An operator wakes a waiting timer now or extends it (to an
        earlier time: refused)."""
        self._until_waiting("timer")
        self.timer_acts(op, who, stale)

    @rule()
    def heal(self) -> None:
        """Broken compensations work again; the one-shot faults still
        planned stay (finitely many: they fire, or the teardown heals them)."""
        self.faults.broken.clear()

    @precondition(
        lambda self: self.has_deadline and self.state == InstanceState.RUNNING
    )
    @rule(close=st.booleans())
    def deadline_passes(self, close: bool) -> None:
        """The workflow deadline passes before a step's timeout: the sweeper
        holds the instance while its attempts may be in flight; maybe an
        operator closes it then (the workers come back later)."""
        self._deadline_passes(close=close)

    def _deadline_passes(self, *, close: bool) -> None:
        # As _advance_clock, but only the instance's deadline: it is as if
        # the deadline had been drawn shorter.
        WorkflowInstance.objects.filter(
            pk=self.instance_id, deadline_at__isnull=False
        ).update(deadline_at=Now() - timedelta(seconds=1))
        self._sweep()
        instance = self.instance()
        if instance.state != InstanceState.NEEDS_ATTENTION:
            return
        self.holds.add(instance.attention_kind)
        if close:
            self._operate("close_as_failed", self.operators[1], instance.version)

    def _count_close(self) -> None:
        in_flight = Attempt.objects.filter(
            step__instance_id=self.instance_id, outcome=Attempt.Outcome.ABANDONED
        ).exists()
        STATS[f"closed as failed: attempts in flight={in_flight}"] += 1

    @rule(seconds=st.sampled_from([0, 3, 6, 31, 3600]), sweep=st.booleans())
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
        assert not (applied and version == "stale" and action != "acknowledge_alert"), (
            "S10: an action against a stale state version applied"
        )

    @precondition(lambda self: self.state == InstanceState.NEEDS_ATTENTION)
    @rule(choice=st.sampled_from(OPERATOR_ACTIONS))
    def operator_resolves(self, choice: str) -> None:
        """An operator picks an action that fits why the instance is held."""
        instance = self.instance()
        kind = instance.attention_kind
        STATS[f"operator resolves a hold: {kind or 'none'}"] += 1
        if kind == AttentionKind.COMPENSATION_FAILED and choice not in {
            "close_as_failed",
            "acknowledge_alert",
        }:
            choice = "retry_compensation"
        elif kind == AttentionKind.DEADLINE and choice in {
            "retry_step",
            "mark_step_done",
            "restart_from_step",
            "repair_and_retry",
            "retry_compensation",
        }:
            choice = "resume"
        self._operate(choice, self.operators[0], instance.version)

    @precondition(lambda self: self.state == InstanceState.NEEDS_ATTENTION)
    @rule(
        first=st.sampled_from(OPERATOR_ACTIONS),
        second=st.sampled_from(OPERATOR_ACTIONS),
    )
    def two_operators(self, first: str, second: str) -> None:
        """Two operators act on the same state version: at most one applies,
        with exactly one manual row."""
        if "acknowledge_alert" in {first, second}:
            return  # not a state change: the version does not fence it
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

    @precondition(lambda self: self.state in TERMINAL_STATES)
    @rule(
        op=st.sampled_from(LATE_OPS),
        pick=st.integers(0, 7),
        succeeded=st.booleans(),
        permanent=st.booleans(),
    )
    def after_the_end(
        self, op: str, pick: int, succeeded: bool, permanent: bool
    ) -> None:
        """The instance finished; workers, participants and the sweeper do
        not know: nothing they send may change a state (S2)."""
        before = self._state_rows()
        self._late(op, pick, succeeded=succeeded, permanent=permanent)
        assert self._state_rows() == before, f"S2: a late {op} changed a state"

    def _late(self, op: str, pick: int, *, succeeded: bool, permanent: bool) -> None:
        STATS[f"late after the end: {op}"] += 1
        if op == "worker" and self.stalled:
            self._resume(self.stalled.pop(pick % len(self.stalled)))
        elif op == "worker" and self.queue:
            self._deliver(self.queue.pop(pick % len(self.queue)))
        elif op == "worker":
            # A worker that missed everything reports for the latest attempt.
            attempt = (
                Attempt.objects.filter(step__instance_id=self.instance_id)
                .order_by("-started_at", "-id")
                .first()
            )
            if attempt is not None:
                commands.attempt_record(
                    self.instance_id,
                    attempt.step_id,
                    attempt.direction,
                    attempt.number,
                    commands.Outcome("succeeded")
                    if succeeded
                    else commands.Outcome(
                        "failed", error_message="late", permanent=permanent
                    ),
                    actor=WORKER,
                )
        elif op == "callback" and self.faults.tokens:
            tokens = self.faults.tokens
            self._callback(tokens[-1 - pick % len(tokens)], False, permanent)
        elif op == "event" and self.awaits:
            names = sorted(self.awaits)
            self._emit(names[pick % len(names)], anyway=True)
        else:
            self._advance_clock(3600)
            self._sweep()

    @invariant()
    def saga_is_safe(self) -> None:
        if not self.instance_id:
            return
        recorded = load(self.instance_id, steps=self.specs)
        assert recorded.persisted is not None
        state = recorded.persisted.state
        if state != self.state:
            self._entered(state)
        self.state = state
        self.waiting = {
            spec.kind
            for spec in self.specs
            if spec.kind != "activity"
            and recorded.persisted.steps[spec.position].state == "waiting"
        }
        # Every command has committed between two rules and nothing runs
        # concurrently, so the persisted columns must equal the replayed
        # history at every point, not only at the end.
        check_history(recorded, quiescent=False, replay=True)

    def _entered(self, state: str) -> None:
        """Count what the instance went through; a closed instance has no
        attempt left open (the close fenced them as abandoned)."""
        if state == InstanceState.NEEDS_ATTENTION:
            self.holds.add(self.instance().attention_kind)
        if state == InstanceState.FAILED:
            self._count_close()
            open_attempts = Attempt.objects.filter(
                step__instance_id=self.instance_id,
                outcome__in=[Attempt.Outcome.RUNNING, Attempt.Outcome.WAITING],
            ).count()
            assert not open_attempts, f"S2: closed with {open_attempts} open attempts"

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
            if not late and not (self.stalled or self.queue):
                return  # nothing hangs any more: the second round is a no-op
            self._time_passes()
            if late:
                self._deliver_all()
            self._resume_all()
            self._deliver_all()

    def _drive(self) -> str:
        """Deliver, advance the clock and sweep until the instance finished or
        waits for a person with nothing left to do (L3: within a bound)."""
        for _ in range(MAX_ROUNDS):
            if self.has_waits:
                # People do what waits for them (the sweeper wakes the timers).
                self.people = self.people_finish(self.people, self.overdue_seen)
                self.timer_op = self.timers_finish(self.timer_op)
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
            instance = self.instance()
            state = instance.state
            if state in TERMINAL_STATES:
                return state
            if state == InstanceState.NEEDS_ATTENTION:
                self.holds.add(instance.attention_kind)
            self._time_passes()
            if state == InstanceState.NEEDS_ATTENTION and not self.queue:
                return state
        raise AssertionError(
            f"L3: still {self.instance().state} after {MAX_ROUNDS} healed rounds"
        )

    def _rescue(self, *, last: bool = False) -> None:
        """L2: after healing, an operator lets the instance go on. First what
        the example drew (restart from the earliest restart point, close,
        mark done, compensate, repair and retry, cancel), then what fits the
        hold (resume after a deadline, retry a compensation or the step);
        where that is refused (a repaired step that may have applied and
        cannot be undone) the step is marked done if it applied, else the
        instance closed."""
        # A person takes the alert first (it stays open until the instance
        # moves on), then acts.
        self._operate("acknowledge_alert", self.operators[0], None)
        instance = self.instance()
        kind = instance.attention_kind
        rescue, self.rescue = self.rescue, "retry"  # then what fits (L2 bound)
        if rescue == "restart" and self._restart_first(instance):
            return
        drawn = {
            "close": "close_as_failed",
            "mark_done": "mark_step_done",
            "compensate": "compensate",
            "repair": "repair_and_retry",
            "cancel": "cancel",
        }.get(rescue)
        blocked = self._blocked()
        fits = {
            AttentionKind.COMPENSATION_FAILED: "retry_compensation",
            AttentionKind.DEADLINE: "resume",
        }.get(kind, "retry_step")
        if fits == "retry_step" and blocked and blocked.last_failure_permanent:
            # Declined for good: the participant keeps that answer for this
            # key; only a new request (repaired data: a new run) can succeed.
            fits = "repair_and_retry"
        if last:
            drawn = fits = "close_as_failed"  # the operator gives up
        for action in (drawn, fits, "mark_step_done", "close_as_failed"):
            if action and self._operate(action, self.operators[0], instance.version):
                STATS[f"rescued by {action}"] += 1
                return
            instance = self.instance()
        raise AssertionError(f"L2: no operator action applies to a {kind} hold")

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
        STATS["operator applied: restart_from_step"] += 1
        return True

    def _close_first(self) -> None:
        """An operator closes the instance while workers may still be busy
        (the deadline passes before a step's timeout: held with attempts in
        flight); they come back after the close."""
        instance = self.instance()
        if self.has_deadline and instance.state == InstanceState.RUNNING:
            self._deadline_passes(close=True)
        elif instance.state == InstanceState.NEEDS_ATTENTION:
            self._operate("close_as_failed", self.operators[1], instance.version)
        if self.state != InstanceState.FAILED and self.instance().state == "failed":
            self._count_close()  # (no invariant runs in the teardown)

    def _after_the_end_all(self, state: str) -> None:
        """Late messages for the finished instance: every attempt's callback
        (success where the participant applied it, else a failure), every
        awaited event, a sweep much later. Nothing may change (S2)."""
        before = self._state_rows()
        # The latest attempts' callbacks (an abandoned one among them, if the
        # instance was closed while it was in flight) and one event.
        for token in self.faults.tokens[-LATE_CALLBACKS:]:
            self._callback(token, replay=False, permanent=False, remember=False)
            STATS["late after the end: callback (teardown)"] += 1
        for name in sorted(self.awaits)[:1]:
            self._emit(name, anyway=True)
            STATS["late after the end: event (teardown)"] += 1
        self._time_passes()
        self._deliver_all()
        assert self._state_rows() == before, "S2: a late message changed a state"
        if self.has_waits:
            self.nothing_after_the_end({spec.kind for spec in self.specs})
        assert self.instance().state == state, "S2: the outcome changed"
        # A person takes a late-effect alert: that, and only that, ends it.
        self._operate("acknowledge_alert", self.operators[1], None)

    def teardown(self) -> None:
        try:
            # After a failed rule or invariant only clean up: the original
            # error is the one to report and to shrink.
            if not self.instance_id or sys.exc_info()[0] is not None:
                return
            if self.rescue == "close":
                self._close_first()
            if self.has_waits:
                # Before the hour passes: an operator wakes or extends a timer.
                self.timer_op = self.timers_finish(self.timer_op)
            # An "eventually healed" schedule: finitely many faults, then none.
            self._play_out()
            self.faults.heal()
            state = self._drive()
            STATS[f"healed: {state}"] += 1
            if state == InstanceState.NEEDS_ATTENTION:
                # L1, L3: escalated to a person, with an alert (a finished
                # instance is checked below, after the late messages).
                check_instance(self.instance_id, quiescent=True)
            for rescue in range(MAX_RESCUES):
                if state != InstanceState.NEEDS_ATTENTION:
                    break
                self._rescue(last=rescue == MAX_RESCUES - 1)
                state = self._drive()
            assert state in TERMINAL_STATES, (
                f"L2: still {state} after {MAX_RESCUES} operator retries"
            )
            # (G and L1 again after the late messages below.)
            self._after_the_end_all(state)
            check_instance(self.instance_id, quiescent=True)
            self._count_outcome(state)
            for kind in self.holds:
                STATS[f"held: {kind}"] += 1
        finally:
            SCHEDULES.pop(self.instance_id, None)

    def _count_outcome(self, state: str) -> None:
        STATS[f"final: {state}"] += 1
        notes = TransitionLog.objects.filter(instance_id=self.instance_id, field="")
        end = TransitionLog.objects.filter(
            instance_id=self.instance_id, step=None, target__in=TERMINAL_STATES
        ).values_list("id", flat=True)
        for transition in notes.filter(id__gt=end[0] if end else 0).values_list(
            "transition", flat=True
        ):
            STATS[f"noted after the end: {transition}"] += 1
        STATS["late-effect alerts opened"] += notes.filter(
            transition="alert_opened", data__kind="late_effect"
        ).count()
        if self.has_waits:
            saga_waits.count_waits(self.instance_id, STATS)
        if not SHOW_STATS:
            return
        for transition in notes.values_list("transition", flat=True):
            STATS[f"note: {transition}"] += 1
        for effect in ParticipantEffect.objects.filter(instance_id=self.instance_id):
            STATS[
                f"ledger {effect.direction}: applied={effect.applied} "
                f"repeated={effect.calls > 1} late_refused={effect.late_refused > 0}"
            ] += 1


def step_key(attempt: Attempt) -> str:
    """The idempotency key the attempt's call carried (its run's key)."""
    step = attempt.step
    return step_idempotency_key(
        step.instance_id, step.name, attempt.direction, attempt.run
    )


@contextlib.contextmanager
def machine_session() -> Iterator[None]:
    """Operators, the in-memory broker and the per-example inline switch."""
    SagaMachine.operators = (
        user_in("operator", "prop_op_a"),
        user_in("operator", "prop_op_b"),
    )
    DEFINITIONS.clear()  # a new test: a new (flushed) database
    budget = mock.patch.object(tasks, "_budget", lambda task: INLINE[0])
    calls = mock.patch.object(tasks, "call_activity", _calling(tasks.call_activity))
    records = mock.patch.object(
        metrics, "worker_recorded", _counting(metrics.worker_recorded)
    )
    keeping = mock.patch.object(
        commands,
        "attempt_record_and_continue",
        _keeping(commands.attempt_record_and_continue),
    )
    # The sweeper's parts that serve nothing of this machine's (no bulk job,
    # no approval, hourly roll-ups and purges change no state) are left out:
    # about a tenth of its time.
    unrelated = [
        mock.patch.object(sweeps, "redispatch_bulk_jobs", lambda now, size: 0),
        mock.patch.object(sweeps.approvals, "expire_approvals", lambda n, s: 0),
        mock.patch.object(sweeps.activity, "roll_up", lambda now, max_hours=6: 0),
        mock.patch.object(sweeps.retention, "sweep", lambda now: 0),
    ]
    with LocalBroker() as broker, budget, contextlib.ExitStack() as stack:
        for patch in [calls, records, keeping, *unrelated]:
            stack.enter_context(patch)
        SagaMachine.broker = broker
        yield


class RestartMachine(SagaMachine):
    """The same machine over definitions where operators restart often."""

    @initialize(spec=restartable_definitions())
    def start(self, spec: dict[str, Any]) -> None:
        super().start(spec)


# -- what a run exercised ------------------------------------------------------------


def coverage_gaps(
    stats: collections.Counter[str],
    actions: tuple[str, ...] = OPERATOR_ACTIONS,
    *,
    outcomes: bool = True,
    faults: bool = True,
) -> list[str]:
    """What a long run must have exercised: every fault kind fired, every
    operator action applied (``actions``), a deadline hold, late messages
    after the end, and each way an instance ends."""
    gaps = [
        f"fault {kind}"
        for kind in CALL_FAULTS
        if faults
        and not stats[f"fault action: {kind}"] + stats[f"fault compensation: {kind}"]
    ]
    gaps += [
        f"operator applied: {action}"
        for action in actions
        if not stats[f"operator applied: {action}"]
    ]
    if not outcomes:
        return gaps
    if not stats["held: deadline"]:
        gaps.append("held: deadline")
    # Both ways a worker records an outcome (engine.held); "changed", the
    # kept rows out of date, is printed too and tested in test_held.
    gaps += [
        f"worker recorded: {way}"
        for way in ("kept", "read")
        if not stats[f"worker recorded: {way}"]
    ]
    gaps += saga_waits.coverage_gaps(stats)
    gaps += [
        f"noted after the end: {note}"
        for note in ("late_outcome_ignored", "stale_outcome_ignored")
        if not stats[f"noted after the end: {note}"]
    ]
    gaps += [
        f"final: {state}"
        for state in ("completed", "compensated", "failed")
        if not stats[f"final: {state}"]
    ]
    return gaps


def report(name: str, stats: collections.Counter[str], capsys: Any) -> str:
    """Print what the run exercised (always, past pytest's capture) and keep
    it in ``$SAGA_DESK_VAR_DIR`` (xdist workers print nowhere)."""
    lines = [f"{name}: what {stats['examples']} examples exercised"]
    lines += [f"{n:7} {what}" for what, n in sorted(stats.items())]
    text = "\n".join(lines)
    folder = Path(django_settings.VAR_DIR)
    with contextlib.suppress(OSError):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"saga_property_{name}.txt").write_text(text + "\n")
    with capsys.disabled():
        print("\n" + text)
    return text


def _run_machine(
    machine: type[SagaMachine],
    examples: int,
    name: str,
    capsys: Any,
    *,
    actions: tuple[str, ...] = OPERATOR_ACTIONS,
    coverage_from: int = COVERAGE_MIN_EXAMPLES,
) -> None:
    STATS.clear()
    try:
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
                        HealthCheck.filter_too_much,
                    ],
                ),
            )
    finally:
        text = report(name, STATS, capsys)
    # The fault machine (800 examples) must fire every fault kind; the restart
    # machine (a fifth of that) must apply restarts, and prints its faults.
    restarts = actions == ("restart_from_step",)
    gaps = coverage_gaps(STATS, actions, outcomes=not restarts, faults=not restarts)
    if examples >= coverage_from:
        assert not gaps, f"never exercised: {gaps}\n{text}"


@pytest.mark.django_db(transaction=True)
def test_saga_invariant_holds_across_restarts(capsys):
    # Its definitions never pivot-hold nor end most ways: restarts must show
    # up (the fault machine below is the one that must fire every fault kind).
    _run_machine(
        RestartMachine,
        max(1, EXAMPLES // 5),
        "restarts",
        capsys,
        actions=("restart_from_step",),
        coverage_from=COVERAGE_MIN_EXAMPLES // 2,
    )


@pytest.mark.django_db(transaction=True)
def test_saga_invariant_holds_under_faults(capsys):
    # Restarts are the restart machine's (the test above) to exercise.
    actions = tuple(a for a in OPERATOR_ACTIONS if a != "restart_from_step")
    _run_machine(SagaMachine, EXAMPLES, "faults", capsys, actions=actions)


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
    spec = {
        "failure_policy": "compensate",
        "pivot": None,
        "deadline": None,
        **spec,
    }
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
    keys = ParticipantEffect.objects.filter(instance_id=machine.instance_id)
    assert {e.idempotency_key.rsplit(":", 1)[1] for e in keys} >= {"action", "2"}
    assert TransitionLog.objects.filter(
        instance_id=machine.instance_id, transition="restart"
    ).exists()


@pytest.mark.django_db(transaction=True)
def test_closed_while_in_flight_then_the_effect_is_reported():
    """Held on its deadline while the worker hangs after its claim; an
    operator closes the instance (the attempt is fenced as abandoned); the
    worker comes back, the participant applies the effect, the report is
    only noted and opens a late-effect alert, which a person acknowledges."""
    with machine_session():
        machine = play(
            {
                "workers_continue_inline": False,
                "failure_policy": "hold",
                "deadline": 2,
                "steps": [one_step(action=["stall"])],
            },
            ("deliver_next", {}),
            ("deliver_next", {}),
            ("time_passes", {"seconds": 3, "sweep": True}),
            ("operator_resolves", {"choice": "close_as_failed"}),
            ("resume_stalled", {"pick": 0}),
            (
                "operator",
                {"action": "acknowledge_alert", "who": 1, "version": "current"},
            ),
        )
    assert machine.instance().state == "failed"
    assert effects(machine)["s1:action"].applied
    attempt = Attempt.objects.get(step__instance_id=machine.instance_id)
    assert attempt.outcome == Attempt.Outcome.ABANDONED
    # The worker's report, acknowledged; the teardown's late callback of the
    # same attempt reports the effect again (a new alert, which the
    # teardown's operator acknowledges too): each ended by a person.
    alerts = Alert.objects.filter(instance_id=machine.instance_id, kind="late_effect")
    assert alerts.exists()
    assert all(a.acknowledged_at and a.resolved_at for a in alerts)
    assert TransitionLog.objects.filter(
        instance_id=machine.instance_id, transition="late_outcome_ignored"
    ).exists()


@pytest.mark.django_db(transaction=True)
def test_a_hold_keeps_the_retry_budget_and_resume_uses_it():
    """The deadline holds the instance while an attempt is in flight; it
    fails retryably meanwhile: retried but parked, sent on Resume."""
    with machine_session():
        machine = play(
            {
                "workers_continue_inline": False,
                "failure_policy": "hold",
                "deadline": 2,
                "steps": [
                    {**one_step(action=["stall", "retryable"]), "max_attempts": 3}
                ],
            },
            ("deliver_next", {}),
            ("deliver_next", {}),
            ("time_passes", {"seconds": 3, "sweep": True}),
            ("resume_stalled", {"pick": 0}),
            ("operator_resolves", {"choice": "resume"}),
        )
    assert machine.instance().state == "completed"
    retry = TransitionLog.objects.get(
        instance_id=machine.instance_id, transition="retry"
    )
    assert retry.data.get("parked") is True


@pytest.mark.django_db(transaction=True)
def test_a_pivot_declined_for_good_is_a_failure_before_the_pivot():
    with machine_session():
        machine = play(
            {
                "workers_continue_inline": True,
                "pivot": 2,
                "steps": [one_step(), one_step(action=["permanent"])],
            },
            ("deliver_next", {}),
        )
    assert machine.instance().state == "compensated"
    steps = dict(
        StepExecution.objects.filter(instance_id=machine.instance_id).values_list(
            "position", "compensation_state"
        )
    )
    assert steps == {1: "done", 2: "not_needed"}


@pytest.mark.django_db(transaction=True)
def test_a_restart_never_runs_an_uncertain_pivot_again_under_new_keys():
    """The pivot applied, then its worker timed out: held, pivot uncertain.
    A restart from an earlier step must not call the pivot again under a new
    key while its first call may have applied (and cannot be undone)."""
    with machine_session():
        machine = play(
            {
                "workers_continue_inline": True,
                "failure_policy": "hold",
                "pivot": 2,
                "steps": [
                    {**one_step(), "restart_point": True},
                    {
                        **one_step(action=["hang_after_apply"]),
                        "retry_on_timeout": False,
                    },
                ],
            },
            ("deliver_next", {}),
            ("time_passes", {"seconds": 3600, "sweep": True}),
            ("operator_resolves", {"choice": "restart_from_step"}),
        )
    assert machine.instance().state in {"completed", "failed"}


@pytest.mark.django_db(transaction=True)
def test_a_compensation_that_answers_waiting_is_not_left_waiting():
    """A compensation cannot wait for a callback: the engine treats the
    answer as a failure, and its Attempt must say so (not stay open)."""
    with machine_session():
        machine = play(
            {
                "workers_continue_inline": True,
                "steps": [
                    one_step(compensation=["waiting"]),
                    one_step(action=["permanent"]),
                ],
            },
            ("deliver_next", {}),
        )
    assert machine.instance().state == "compensated"
    left_open = Attempt.objects.filter(
        step__instance_id=machine.instance_id,
        outcome__in=[Attempt.Outcome.RUNNING, Attempt.Outcome.WAITING],
    )
    assert not left_open.exists(), list(left_open.values("direction", "outcome"))
