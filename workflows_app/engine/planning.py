"""Pure decisions of the engine: no database, no clock, no I/O.

``decide`` answers "what happens next for this instance?" from a snapshot of
its recorded state. The engine applies one decision at a time and asks again
until the answer is ``IDLE`` (work is in flight, or waits for a person), so
the whole orchestration logic lives here and is tested exhaustively without
a database.
"""

from __future__ import annotations

import dataclasses
import enum
import random
from collections.abc import Sequence
from datetime import timedelta
from typing import Any


class Move(enum.Enum):
    IDLE = "idle"
    START = "start"
    SCHEDULE = "schedule"  # schedule the action of `position`
    COMPLETE = "complete"
    BEGIN_COMPENSATION = "begin_compensation"
    HOLD = "hold"
    UNSCHEDULE = "unschedule"  # a scheduled action that will not run now
    ABANDON_RETRY = "abandon_retry"  # a pending retry that will not run now
    SKIP_COMPENSATION = "skip_compensation"
    COMPENSATE = "compensate"  # require and dispatch the compensation of `position`
    FINISH_COMPENSATION = "finish_compensation"
    EXPECT = "expect"  # observed workflows: wait for the milestone of `position`
    RESTART = "restart"  # the steps from `position` are undone: run them again
    BEGIN_WAIT = "begin_wait"  # a timer or a step for a person starts waiting
    STOP_WAITING = "stop_waiting"  # fence such a wait: no forward any more


@dataclasses.dataclass(frozen=True)
class StepView:
    position: int
    state: str
    compensation_state: str
    # Counted within the step's current run (a restart starts a new run).
    attempt: int
    attempts_allowed: int
    has_compensation: bool
    retry_on_timeout: bool
    # The last answer under the step's current key was a permanent failure.
    failed_permanently: bool = False
    # "activity" (a participant is called), "timer" or "human": the engine
    # does those itself, calls nothing and has nothing to undo.
    kind: str = "activity"
    # Parallel branches: the position of the first step of the step's stage
    # (steps of one stage start together). None: a stage of its own.
    stage: int | None = None

    @property
    def stage_key(self) -> int:
        return self.position if self.stage is None else self.stage

    @property
    def engine_run(self) -> bool:
        return self.kind != "activity"

    @property
    def started(self) -> bool:
        # A claimed attempt may have had an effect; a skipped step was done by hand.
        return self.attempt > 0 or self.state == "skipped"

    @property
    def may_have_applied(self) -> bool:
        """Succeeded, done by hand, timed out, or failed retryably (a 5xx may
        have applied); not when never started or declined for good."""
        return self.started and not self.failed_permanently


@dataclasses.dataclass(frozen=True)
class InstanceView:
    state: str
    failure_policy: str  # "compensate" | "hold"
    pivot_position: int | None
    steps: Sequence[StepView]  # ordered by position
    # Observed workflows: services drive the steps, the engine only watches.
    observed: bool = False
    # An operator's restart: while compensating, only the steps from this
    # position on are undone, then the instance runs forward from it again.
    restart_position: int | None = None


@dataclasses.dataclass(frozen=True)
class Decision:
    move: Move
    position: int | None = None
    attention_kind: str = ""
    reason: str = ""


IDLE = Decision(Move.IDLE)
IN_FLIGHT = frozenset({"running", "waiting"})
DONE = frozenset({"succeeded", "skipped"})
COMPENSATION_ACTIVE = frozenset({"pending", "running", "retrying"})


def before_pivot(view: InstanceView, step: StepView) -> bool:
    return view.pivot_position is None or step.position < view.pivot_position


def after_pivot(view: InstanceView, step: StepView) -> bool:
    return view.pivot_position is not None and step.position > view.pivot_position


def needs_compensation(view: InstanceView, step: StepView) -> bool:
    """Compensate a step before the pivot whose effect may exist: it succeeded,
    was done by hand, timed out or failed retryably. Never one that was not
    started or whose last answer was a permanent failure."""
    return step.has_compensation and step.may_have_applied and before_pivot(view, step)


def why_no_compensation(view: InstanceView, step: StepView) -> str:
    if not step.has_compensation:
        return "the step has no compensation"
    if not before_pivot(view, step):
        return "the step is at or after the pivot"
    if not step.started:
        return "the step never started: nothing to undo"
    return "its last answer was a permanent failure: nothing applied, nothing to undo"


def decide(view: InstanceView) -> Decision:
    if view.state == "accepted":
        return Decision(Move.START)
    if view.state == "running":
        return _decide_observed(view) if view.observed else _decide_forward(view)
    if view.state == "compensating":
        return _decide_compensation(view)
    return IDLE


def stages(steps: Sequence[StepView]) -> list[list[StepView]]:
    """The steps grouped into their stages, in order (each stage by position)."""
    groups: dict[int, list[StepView]] = {}
    for step in sorted(steps, key=lambda s: s.position):
        groups.setdefault(step.stage_key, []).append(step)
    return [groups[key] for key in sorted(groups)]


def stage_keys(steps: Sequence[Any]) -> dict[int, int]:
    """Per position, the position of the first step of its stage, for stored
    steps (with ``position`` and ``step_definition``): a step marked
    "parallel with previous" joins the stage of the step before it."""
    keys: dict[int, int] = {}
    current: int | None = None
    for s in sorted(steps, key=lambda s: s.position):
        if current is None or not s.step_definition.parallel_with_previous:
            current = s.position
        keys[s.position] = current
    return keys


def _decide_forward(view: InstanceView) -> Decision:
    """The first stage not yet done is the current one: its branches start
    together; a branch that failed for good decides at once (the others are
    fenced by the hold or the compensation, their outcomes still recorded)."""
    current = next(
        (
            stage
            for stage in stages(view.steps)
            if any(step.state not in DONE for step in stage)
        ),
        None,
    )
    if current is None:
        return Decision(Move.COMPLETE)
    here = {step.position for step in current}
    if any(s.state in IN_FLIGHT for s in view.steps if s.position not in here):
        return IDLE  # defensive: nothing outside the current stage runs
    for step in current:
        trouble = _branch_trouble(view, step)
        if trouble is not None:
            return trouble
    for step in current:
        if step.state == "pending":
            return Decision(Move.SCHEDULE, step.position)
        if step.state == "scheduled" and step.engine_run:
            return Decision(Move.BEGIN_WAIT, step.position)
    # Branches scheduled, retrying or in flight: wait for all of them.
    return IDLE


def _branch_trouble(view: InstanceView, step: StepView) -> Decision | None:
    """What a failed or unknown branch means for the instance (None when the
    branch is fine so far)."""
    if step.state not in {"unknown", "failed"}:
        return None
    at_pivot = step.position == view.pivot_position
    if step.state == "unknown" and not (
        step.retry_on_timeout and step.attempt >= step.attempts_allowed
    ):
        if at_pivot:
            return _pivot_uncertain(step, "its outcome is unknown after a timeout")
        return Decision(
            Move.HOLD,
            step.position,
            "step_unknown",
            "outcome unknown after a timeout; a person must decide",
        )
    # Failed for good: permanent error, or attempts used up.
    if at_pivot and step.may_have_applied:
        return _pivot_uncertain(
            step, "its attempts ran out on errors that may hide a success"
        )
    if after_pivot(view, step):
        return Decision(
            Move.HOLD,
            step.position,
            "after_pivot",
            "failed after the pivot: only forward retries are possible",
        )
    if view.failure_policy == "compensate":
        return Decision(Move.BEGIN_COMPENSATION, step.position, reason="step failed")
    return Decision(
        Move.HOLD, step.position, "step_failed", "step failed; policy is hold"
    )


def _pivot_uncertain(step: StepView, why: str) -> Decision:
    """The pivot may or may not have applied: only a person can tell, so both
    ways stay open (a pivot declined for good is a failure before the pivot)."""
    return Decision(
        Move.HOLD,
        step.position,
        "pivot_uncertain",
        f"the pivot may have applied ({why}): retry it, or compensate if you "
        "know it did not apply",
    )


def _decide_observed(view: InstanceView) -> Decision:
    """Milestones arrive as events, in any order; the engine waits for the
    first one still missing and holds when a service reports a failure."""
    for step in view.steps:
        if step.state == "failed":
            return Decision(
                Move.HOLD,
                step.position,
                "step_failed",
                "a service reported a failure: compensation needed",
            )
    for step in view.steps:
        if step.state in DONE:
            continue
        if step.state == "pending":
            return Decision(Move.EXPECT, step.position)
        return IDLE
    return Decision(Move.COMPLETE)


def _decide_compensation(view: InstanceView) -> Decision:
    # A timer or a step for a person applies nothing: its wait is fenced at
    # once (a late wake or completion then finds nothing waiting).
    for step in view.steps:
        if step.engine_run and step.state == "waiting":
            return Decision(
                Move.STOP_WAITING, step.position, reason="the instance stopped"
            )
    # An action still in flight may yet apply its effect: wait for its outcome
    # (or its timeout) so its compensation is never run before it.
    if any(step.state in IN_FLIGHT for step in view.steps):
        return IDLE
    # A restart undoes only the steps it will run again; the earlier ones keep
    # their effects (and may still need compensating later). A restart from a
    # branch leaves the earlier branches of its stage their scheduled work or
    # pending retry: it cannot be claimed while compensating and is sent
    # again when the instance runs forward.
    first = view.restart_position or 0
    for step in view.steps:
        if step.position < first:
            continue
        if step.state == "scheduled":
            return Decision(Move.UNSCHEDULE, step.position)
        if step.state == "retrying":
            return Decision(Move.ABANDON_RETRY, step.position)
    undone = [step for step in view.steps if step.position >= first]
    for step in undone:
        if step.compensation_state == "none" and not needs_compensation(view, step):
            return Decision(
                Move.SKIP_COMPENSATION,
                step.position,
                reason=why_no_compensation(view, step),
            )
    # Reverse order, stage by stage: the latest stage first; the branches of
    # one stage are undone together (each after its own action, which is
    # over by now), and an earlier stage only once the later one is undone.
    for stage in reversed(stages(undone)):
        if all(s.compensation_state in {"done", "not_needed"} for s in stage):
            continue
        for step in stage:
            if step.compensation_state == "none":
                return Decision(Move.COMPENSATE, step.position)
        # A held instance has no compensation under way: a failed branch
        # holds once its siblings' compensations have finished.
        if any(s.compensation_state in COMPENSATION_ACTIVE for s in stage):
            return IDLE
        failed = next(s for s in stage if s.compensation_state == "failed")
        return Decision(
            Move.HOLD,
            failed.position,
            "compensation_failed",
            "a compensation exhausted its retries",
        )
    if view.restart_position is not None:
        return Decision(Move.RESTART, view.restart_position)
    return Decision(Move.FINISH_COMPENSATION)


# -- retries -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Backoff:
    initial: timedelta
    multiplier: float
    cap: timedelta
    jitter: float


def retry_delay(
    policy: Backoff, failed_attempt: int, rng: random.Random | None = None
) -> timedelta:
    """Delay before the attempt after ``failed_attempt`` (1-based).

    Exponential: ``initial * multiplier ** (failed_attempt - 1)``, capped, then
    spread by +/- ``jitter`` (a fraction) so that a burst of failures does not
    retry in lockstep; never negative and never above the cap."""
    base = policy.initial.total_seconds() * policy.multiplier ** max(
        0, failed_attempt - 1
    )
    cap = policy.cap.total_seconds()
    base = min(base, cap)
    if policy.jitter:
        spread = base * policy.jitter
        base += (rng or random).uniform(-spread, spread)
    return timedelta(seconds=max(0.0, min(base, cap)))


def should_retry(*, attempt: int, attempts_allowed: int, permanent: bool) -> bool:
    return not permanent and attempt < attempts_allowed
