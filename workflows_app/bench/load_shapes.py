"""The states a synthetic instance of a definition can be in, for ``generate_load``.

Each :class:`Shape` is one instance's recorded state (instance row, steps,
attempts) as the engine would leave it: the decisions (hold or compensate,
which hold kind and reason, which steps are undone and in which order) are
asked of the engine's own planner (``engine.planning.decide``), so the load
generator cannot drift from the engine's semantics. ``generate_load``
multiplies these few shapes into millions of rows in SQL.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from workflows_app.engine.planning import InstanceView, Move, StepView, decide
from workflows_app.engine.signatures import error_signature
from workflows_app.engine.stuck import HOLD_KINDS
from workflows_app.models import StepDefinition, StuckKind, WorkflowDefinition

# The mix generate_load asks for; a definition without a shape of a category
# (e.g. nothing to compensate) falls back to "completed".
CATEGORIES = (
    "completed",
    "compensated",
    "cancelled",
    "failed",
    "running",
    "accepted",
    "needs_attention",
    "compensating",
)
DECLINED = "ActivityError: {name} declined the request"
TIMED_OUT = "Timeout: no outcome within {seconds}s"


@dataclasses.dataclass(frozen=True)
class AttemptShape:
    direction: str  # action | compensation
    outcome: str  # an Attempt.Outcome value
    error: str = ""  # "Class: message"


@dataclasses.dataclass(frozen=True)
class StepShape:
    state: str = "pending"
    compensation_state: str = "none"
    attempts: tuple[AttemptShape, ...] = ()
    permanent: bool = False
    error: str = ""
    # Sent to the workers and not claimed yet (redispatch_at is set).
    dispatched: bool = False

    def count(self, direction: str) -> int:
        return sum(a.direction == direction for a in self.attempts)

    @property
    def signature(self) -> str:
        return error_signature(self.error)


@dataclasses.dataclass(frozen=True)
class Shape:
    category: str
    state: str
    # The step that failed or runs (steps + 1 when all succeeded).
    cur: int
    steps: tuple[StepShape, ...]
    # The instance's last history row: (step position or None, source, transition).
    final: tuple[int | None, str, str]
    attention_kind: str = ""
    attention_reason: str = ""
    pivot_passed: bool = False

    @property
    def stuck_kind(self) -> str:
        """A held instance's stuck kind (its alert's); "" for the others."""
        if self.state != "needs_attention":
            return ""
        return str(HOLD_KINDS.get(self.attention_kind, StuckKind.HELD))


def _succeeded() -> StepShape:
    return StepShape("succeeded", attempts=(AttemptShape("action", "succeeded"),))


def _endings(sd: StepDefinition, pivot: int | None) -> list[StepShape]:
    """How step ``sd`` can end for good: declined (a permanent failure), or
    timed out where the engine does not retry a timeout on its own."""
    declined = DECLINED.format(name=sd.name)
    endings = [
        StepShape(
            "failed",
            attempts=(AttemptShape("action", "failed_permanent", declined),),
            permanent=True,
            error=declined,
        )
    ]
    timeout = TIMED_OUT.format(seconds=int(sd.timeout.total_seconds()))
    if not sd.retry_on_timeout or sd.position == pivot:
        tries = sd.max_attempts if sd.retry_on_timeout else 1
        endings.append(
            StepShape(
                "unknown",
                attempts=(AttemptShape("action", "timed_out", timeout),) * tries,
                error=timeout,
            )
        )
    return endings


def _stages(sds: Sequence[StepDefinition]) -> dict[int, int]:
    """Per position, the first position of its stage (as the engine's
    ``planning.stage_keys`` reads them from stored steps)."""
    keys: dict[int, int] = {}
    for sd in sds:
        keys[sd.position] = (
            keys[sd.position - 1]
            if sd.parallel_with_previous and sd.position - 1 in keys
            else sd.position
        )
    return keys


def _view(
    state: str,
    policy: str,
    pivot: int | None,
    sds: Sequence[StepDefinition],
    steps: Sequence[StepShape],
) -> InstanceView:
    stage = _stages(sds)
    return InstanceView(
        state=state,
        failure_policy=policy,
        pivot_position=pivot,
        steps=[
            StepView(
                position=sd.position,
                state=step.state,
                compensation_state=step.compensation_state,
                attempt=step.count("action"),
                attempts_allowed=sd.max_attempts,
                has_compensation=bool(sd.compensation),
                retry_on_timeout=sd.retry_on_timeout,
                failed_permanently=step.permanent,
                kind=sd.kind,
                stage=stage[sd.position],
            )
            for sd, step in zip(sds, steps, strict=True)
        ],
    )


def _compensate(
    policy: str,
    pivot: int | None,
    sds: Sequence[StepDefinition],
    steps: list[StepShape],
) -> tuple[list[StepShape] | None, list[StepShape]]:
    """Run the planner's compensation to its end. Returns the steps once the
    first compensations are sent (every branch of a parallel stage that the
    planner sends together; None if nothing needed undoing) and at the end."""
    in_flight: list[StepShape] | None = None
    steps = list(steps)
    done = AttemptShape("compensation", "succeeded")
    while True:
        decision = decide(_view("compensating", policy, pivot, sds, steps))
        if decision.move is Move.FINISH_COMPENSATION:
            return in_flight, steps
        if decision.move is Move.IDLE:
            # Waiting on what was sent: at rest, as a snapshot may show it.
            sent = [s.compensation_state == "pending" for s in steps]
            if not any(sent):
                raise AssertionError("the planner waits on nothing")
            if in_flight is None:
                in_flight = list(steps)
            steps = [
                dataclasses.replace(
                    s,
                    compensation_state="done",
                    dispatched=False,
                    attempts=s.attempts + (done,),
                )
                if pending
                else s
                for s, pending in zip(steps, sent, strict=True)
            ]
            continue
        assert decision.position is not None, decision
        i = decision.position - 1
        if decision.move is Move.SKIP_COMPENSATION:
            steps[i] = dataclasses.replace(steps[i], compensation_state="not_needed")
        elif decision.move is Move.COMPENSATE:
            steps[i] = dataclasses.replace(
                steps[i], compensation_state="pending", dispatched=True
            )
        else:
            raise AssertionError(f"unexpected compensation move {decision}")


def definition_shapes(definition: WorkflowDefinition) -> list[Shape]:
    sds = list(definition.steps.order_by("position"))
    n = len(sds)
    policy = definition.failure_policy
    pivot = next((sd.position for sd in sds if sd.is_pivot), None)
    pending = StepShape()
    shapes = [
        Shape(
            "completed",
            "completed",
            n + 1,
            (_succeeded(),) * n,
            (None, "running", "complete"),
            pivot_passed=pivot is not None,
        ),
        Shape("accepted", "accepted", 1, (pending,) * n, (None, "", "accept")),
        # Cancelling an accepted instance ends it at once; no step ever ran.
        Shape(
            "cancelled", "cancelled", 1, (pending,) * n, (None, "accepted", "cancel")
        ),
    ]
    stage = _stages(sds)
    for sd in sds:
        cur = sd.position
        first = stage[cur]
        # A parallel stage: its branches are sent together; a branch that
        # ends for good does so after its siblings succeeded.
        branches = [p for p in range(first, n + 1) if stage[p] == first]
        before = [_succeeded() for _ in range(first - 1)]
        after = [pending] * (n - branches[-1])
        # Sent to the workers, not claimed yet: the snapshot is of a site
        # whose workers are behind (how instances turn stuck).
        scheduled = StepShape("scheduled", dispatched=True)
        if sd.kind != "activity":
            # A timer or a step for a person: the engine waits (nothing is
            # sent, nothing fails; such a step is never in a parallel stage).
            shapes.append(
                Shape(
                    "running",
                    "running",
                    cur,
                    (*before, StepShape("waiting"), *after),
                    (cur, "scheduled", "begin_wait"),
                    pivot_passed=pivot is not None and pivot < cur,
                )
            )
            continue
        if cur == first:
            shapes.append(
                Shape(
                    "running",
                    "running",
                    cur,
                    (*before, *[scheduled] * len(branches), *after),
                    (cur, "pending", "schedule"),
                    pivot_passed=pivot is not None and pivot < cur,
                )
            )
        for ended in _endings(sd, pivot):
            siblings = [ended if p == cur else _succeeded() for p in branches]
            steps = [*before, *siblings, *after]
            passed = pivot is not None and (
                pivot < cur or (pivot == cur and not ended.permanent)
            )
            decision = decide(_view("running", policy, pivot, sds, steps))
            if decision.move is Move.HOLD:
                reason = f"{sd.name}: {decision.reason}"
                held: dict[str, Any] = {
                    "steps": tuple(steps),
                    "attention_kind": decision.attention_kind,
                    "attention_reason": reason,
                    "pivot_passed": passed,
                }
                shapes.append(
                    Shape(
                        "needs_attention",
                        "needs_attention",
                        cur,
                        final=(None, "running", "hold"),
                        **held,
                    )
                )
                # Closing keeps the held steps as they are (nothing in flight).
                shapes.append(
                    Shape(
                        "failed",
                        "failed",
                        cur,
                        final=(None, "needs_attention", "close_as_failed"),
                        **held,
                    )
                )
                # An operator may compensate instead (not past the pivot,
                # unless the pivot's outcome is uncertain).
                if not passed or decision.attention_kind == "pivot_uncertain":
                    shapes += _compensated(
                        policy, pivot, sds, steps, cur, "needs_attention", "compensate"
                    )
            elif decision.move is Move.BEGIN_COMPENSATION:
                shapes += _compensated(
                    policy, pivot, sds, steps, cur, "running", "begin_compensation"
                )
            else:
                raise AssertionError(f"unexpected move after a failure: {decision}")
    return shapes


def _compensated(
    policy: str,
    pivot: int | None,
    sds: Sequence[StepDefinition],
    steps: list[StepShape],
    cur: int,
    source: str,
    transition: str,
) -> list[Shape]:
    """The instance once its first compensation is sent, and once undone."""
    in_flight, undone = _compensate(policy, pivot, sds, steps)
    shapes = []
    if in_flight is not None:
        shapes.append(
            Shape(
                "compensating",
                "compensating",
                cur,
                tuple(in_flight),
                (None, source, transition),
            )
        )
    shapes.append(
        Shape(
            "compensated",
            "compensated",
            cur,
            tuple(undone),
            (None, "compensating", "finish_compensation"),
        )
    )
    return shapes
