"""The pure planner, exhaustively over small instances (no database)."""

from __future__ import annotations

import itertools
import random
from datetime import timedelta

import pytest

from workflows_app.engine.planning import (
    Backoff,
    Decision,
    InstanceView,
    Move,
    StepView,
    decide,
    retry_delay,
    should_retry,
)

ACTION_STATES = [
    "pending",
    "scheduled",
    "running",
    "retrying",
    "waiting",
    "unknown",
    "succeeded",
    "failed",
    "skipped",
]
COMP_STATES = ["none", "pending", "running", "retrying", "done", "failed", "not_needed"]
DONE = {"succeeded", "skipped"}


def step(
    position: int,
    state: str,
    comp: str = "none",
    *,
    attempt: int | None = None,
    allowed: int = 3,
    has_comp: bool = True,
    retry_on_timeout: bool = False,
    perm: bool = False,
) -> StepView:
    """``perm``: a failed step's last answer was a permanent failure."""
    if attempt is None:
        attempt = 0 if state in {"pending", "scheduled"} else 1
    return StepView(
        position,
        state,
        comp,
        attempt,
        allowed,
        has_comp,
        retry_on_timeout,
        failed_permanently=perm and state == "failed",
    )


def view(
    state: str,
    steps: list[StepView],
    *,
    policy: str = "compensate",
    pivot: int | None = None,
) -> InstanceView:
    return InstanceView(state, policy, pivot, steps)


@pytest.mark.parametrize(
    ("instance", "expected"),
    [
        (view("accepted", [step(1, "pending")]), Decision(Move.START)),
        (view("running", [step(1, "pending")]), Decision(Move.SCHEDULE, 1)),
        (
            view("running", [step(1, "succeeded"), step(2, "pending")]),
            Decision(Move.SCHEDULE, 2),
        ),
        (
            view("running", [step(1, "succeeded"), step(2, "skipped")]),
            Decision(Move.COMPLETE),
        ),
        (
            view("running", [step(1, "running"), step(2, "pending")]),
            Decision(Move.IDLE),
        ),
        (view("running", [step(1, "retrying")]), Decision(Move.IDLE)),
        (
            view("running", [step(1, "succeeded"), step(2, "failed")]),
            Decision(Move.BEGIN_COMPENSATION, 2, reason="step failed"),
        ),
        (
            view("running", [step(1, "failed")], policy="hold"),
            Decision(Move.HOLD, 1, "step_failed", "step failed; policy is hold"),
        ),
        (
            view(
                "running",
                [step(1, "succeeded"), step(2, "succeeded"), step(3, "failed")],
                pivot=2,
            ),
            Decision(
                Move.HOLD,
                3,
                "after_pivot",
                "failed after the pivot: only forward retries are possible",
            ),
        ),
        # A pivot declined for good did not apply: a failure before the pivot.
        (
            view(
                "running", [step(1, "succeeded"), step(2, "failed", perm=True)], pivot=2
            ),
            Decision(Move.BEGIN_COMPENSATION, 2, reason="step failed"),
        ),
        # A pivot that may have applied: a person chooses retry or compensate.
        (
            view("running", [step(1, "succeeded"), step(2, "failed")], pivot=2),
            Decision(
                Move.HOLD,
                2,
                "pivot_uncertain",
                "the pivot may have applied (its attempts ran out on errors that "
                "may hide a success): retry it, or compensate if you know it did "
                "not apply",
            ),
        ),
        (
            view("running", [step(1, "succeeded"), step(2, "unknown")], pivot=2),
            Decision(
                Move.HOLD,
                2,
                "pivot_uncertain",
                "the pivot may have applied (its outcome is unknown after a "
                "timeout): retry it, or compensate if you know it did not apply",
            ),
        ),
        (
            view("running", [step(1, "unknown")]),
            Decision(
                Move.HOLD,
                1,
                "step_unknown",
                "outcome unknown after a timeout; a person must decide",
            ),
        ),
        # Timed out on every allowed attempt: failed for good, per policy.
        (
            view("running", [step(1, "unknown", attempt=3, retry_on_timeout=True)]),
            Decision(Move.BEGIN_COMPENSATION, 1, reason="step failed"),
        ),
        (
            view("compensating", [step(1, "succeeded"), step(2, "failed")]),
            Decision(Move.COMPENSATE, 2),
        ),
        (
            view("compensating", [step(1, "succeeded"), step(2, "failed", "done")]),
            Decision(Move.COMPENSATE, 1),
        ),
        (
            view(
                "compensating",
                [step(1, "succeeded", "done"), step(2, "failed", "done")],
            ),
            Decision(Move.FINISH_COMPENSATION),
        ),
        (
            view("compensating", [step(1, "succeeded"), step(2, "pending")]),
            Decision(
                Move.SKIP_COMPENSATION,
                2,
                reason="the step never started: nothing to undo",
            ),
        ),
        # Declined for good: nothing applied, so nothing is undone.
        (
            view("compensating", [step(1, "succeeded"), step(2, "failed", perm=True)]),
            Decision(
                Move.SKIP_COMPENSATION,
                2,
                reason="its last answer was a permanent failure: nothing applied, "
                "nothing to undo",
            ),
        ),
        (
            view("compensating", [step(1, "succeeded"), step(2, "scheduled")]),
            Decision(Move.UNSCHEDULE, 2),
        ),
        (
            view("compensating", [step(1, "succeeded"), step(2, "retrying")]),
            Decision(Move.ABANDON_RETRY, 2),
        ),
        (
            view("compensating", [step(1, "succeeded"), step(2, "running")]),
            Decision(Move.IDLE),
        ),
        (
            view(
                "compensating",
                [step(1, "succeeded", has_comp=False), step(2, "failed", "done")],
            ),
            Decision(Move.SKIP_COMPENSATION, 1, reason="the step has no compensation"),
        ),
        (
            view("compensating", [step(1, "succeeded", "failed")]),
            Decision(
                Move.HOLD,
                1,
                "compensation_failed",
                "a compensation exhausted its retries",
            ),
        ),
        (view("needs_attention", [step(1, "failed")]), Decision(Move.IDLE)),
        (view("completed", [step(1, "succeeded")]), Decision(Move.IDLE)),
    ],
)
def test_examples(instance: InstanceView, expected: Decision) -> None:
    assert decide(instance) == expected


def _forward_views():
    for states in itertools.product(ACTION_STATES, repeat=3):
        for pivot, policy, rot, perm in itertools.product(
            (None, 1, 2, 3), ("compensate", "hold"), (False, True), (False, True)
        ):
            steps = [
                step(i + 1, s, retry_on_timeout=rot, perm=perm)
                for i, s in enumerate(states)
            ]
            yield view("running", steps, policy=policy, pivot=pivot)


def test_forward_exhaustively() -> None:
    """Every combination of three action states, pivots and policies."""
    checked = 0
    for v in _forward_views():
        d = decide(v)
        states = [s.state for s in v.steps]
        in_flight = any(s in {"running", "waiting"} for s in states)
        if in_flight:
            assert d.move is Move.IDLE, (v, d)
        if d.move is Move.SCHEDULE:
            i = d.position - 1
            assert states[i] == "pending" and all(s in DONE for s in states[:i]), (v, d)
        if d.move is Move.COMPLETE:
            assert all(s in DONE for s in states), (v, d)
        if d.move is Move.BEGIN_COMPENSATION:
            assert v.failure_policy == "compensate"
            pivot = v.pivot_position
            # At the pivot only when it was declined for good.
            assert (
                pivot is None
                or d.position < pivot
                or (d.position == pivot and v.steps[pivot - 1].failed_permanently)
            ), (v, d)
        if d.move is Move.HOLD and d.attention_kind == "after_pivot":
            assert d.position > v.pivot_position
        if d.move is Move.HOLD and d.attention_kind == "pivot_uncertain":
            held = v.steps[d.position - 1]
            assert d.position == v.pivot_position and held.may_have_applied, (v, d)
        assert d.move in {
            Move.IDLE,
            Move.SCHEDULE,
            Move.COMPLETE,
            Move.BEGIN_COMPENSATION,
            Move.HOLD,
        }
        checked += 1
    assert checked == 9**3 * 4 * 2 * 2 * 2


def test_compensation_exhaustively() -> None:
    """Reverse order, one at a time, never past the pivot, never unstarted."""
    for actions in itertools.product(ACTION_STATES, repeat=3):
        for comps in itertools.product(COMP_STATES, repeat=3):
            for pivot, perm in itertools.product((None, 2, 3), (False, True)):
                steps = [
                    step(i + 1, a, c, perm=perm)
                    for i, (a, c) in enumerate(zip(actions, comps, strict=True))
                ]
                v = view("compensating", steps, pivot=pivot)
                d = decide(v)
                if any(a in {"running", "waiting"} for a in actions):
                    assert d.move is Move.IDLE
                    continue
                if d.move is Move.COMPENSATE:
                    i = d.position - 1
                    target = steps[i]
                    assert comps[i] == "none" and target.may_have_applied
                    assert pivot is None or d.position < pivot
                    assert all(c in {"done", "not_needed"} for c in comps[i + 1 :]), (
                        v,
                        d,
                    )
                    assert not any(a in {"scheduled", "retrying"} for a in actions)
                if d.move is Move.FINISH_COMPENSATION:
                    assert all(c in {"done", "not_needed"} for c in comps), (v, d)
                    assert not any(a in {"scheduled", "retrying"} for a in actions)
                if d.move is Move.SKIP_COMPENSATION:
                    s = steps[d.position - 1]
                    assert comps[d.position - 1] == "none"
                    assert not s.may_have_applied or (
                        pivot is not None and s.position >= pivot
                    ), (v, d)
                if d.move is Move.HOLD:
                    assert "failed" in comps


def test_restart_undo_exhaustively() -> None:
    """A restart from position r undoes only steps r.., newest first, never
    touches the earlier ones, and restarts once they are all resolved."""
    checked = 0
    for actions in itertools.product(ACTION_STATES, repeat=3):
        for comps in itertools.product(COMP_STATES, repeat=3):
            for restart in (1, 2, 3):
                # The steps before the restart point kept their effects.
                if any(
                    a not in DONE or c != "none"
                    for a, c in zip(
                        actions[: restart - 1], comps[: restart - 1], strict=True
                    )
                ):
                    continue
                steps = [
                    step(i + 1, a, c)
                    for i, (a, c) in enumerate(zip(actions, comps, strict=True))
                ]
                v = InstanceView(
                    "compensating", "compensate", None, steps, restart_position=restart
                )
                d = decide(v)
                checked += 1
                if any(a in {"running", "waiting"} for a in actions):
                    assert d.move is Move.IDLE
                    continue
                if d.position is not None and d.move is not Move.RESTART:
                    assert d.position >= restart or d.move in {
                        Move.UNSCHEDULE,
                        Move.ABANDON_RETRY,
                    }, (v, d)
                if d.move is Move.COMPENSATE:
                    later = comps[d.position :]
                    assert all(c in {"done", "not_needed"} for c in later), (v, d)
                assert d.move is not Move.FINISH_COMPENSATION, (v, d)
                if d.move is Move.RESTART:
                    assert d.position == restart
                    assert all(
                        c in {"done", "not_needed"} for c in comps[restart - 1 :]
                    ), (v, d)
                    assert not any(a in {"scheduled", "retrying"} for a in actions)
    assert checked > 10_000


def test_planner_settles_when_applied() -> None:
    """Applying decisions to an in-memory model always reaches IDLE quickly."""
    rng = random.Random(7)
    for _ in range(2000):
        n = rng.randint(1, 4)
        steps = [
            step(i + 1, rng.choice(["succeeded", "pending", "failed", "unknown"]))
            for i in range(n)
        ]
        v = view(
            rng.choice(["running", "compensating"]),
            steps,
            pivot=rng.choice([None, *range(1, n + 1)]),
        )
        for _moves in range(4 * n + 8):
            d = decide(v)
            if d.move is Move.IDLE:
                break
            v = _apply(v, d)
        else:
            raise AssertionError(f"did not settle: {v}")


def _apply(v: InstanceView, d: Decision) -> InstanceView:
    steps = list(v.steps)

    def put(**changes: object) -> None:
        i = d.position - 1
        steps[i] = StepView(**{**steps[i].__dict__, **changes})

    state = v.state
    match d.move:
        case Move.START:
            state = "running"
        case Move.SCHEDULE:
            put(state="scheduled")
        case Move.COMPLETE:
            state = "completed"
        case Move.BEGIN_COMPENSATION:
            state = "compensating"
        case Move.HOLD:
            state = "needs_attention"
        case Move.UNSCHEDULE:
            put(state="pending")
        case Move.ABANDON_RETRY:
            put(state="failed")
        case Move.SKIP_COMPENSATION:
            put(compensation_state="not_needed")
        case Move.COMPENSATE:
            put(compensation_state="pending")
        case Move.FINISH_COMPENSATION:
            state = "compensated"
    return InstanceView(state, v.failure_policy, v.pivot_position, steps)


def test_retry_delay_grows_and_caps() -> None:
    policy = Backoff(timedelta(seconds=1), 2.0, timedelta(seconds=10), 0.0)
    assert [retry_delay(policy, n).total_seconds() for n in range(1, 7)] == [
        1,
        2,
        4,
        8,
        10,
        10,
    ]


def test_retry_delay_jitter_stays_in_bounds() -> None:
    policy = Backoff(timedelta(seconds=4), 2.0, timedelta(seconds=5), 0.5)
    rng = random.Random(1)
    delays = [retry_delay(policy, 1, rng).total_seconds() for _ in range(1000)]
    assert min(delays) >= 2.0 and max(delays) <= 5.0
    assert len({round(d, 3) for d in delays}) > 100  # actually spread out


def test_should_retry() -> None:
    assert should_retry(attempt=1, attempts_allowed=3, permanent=False)
    assert not should_retry(attempt=3, attempts_allowed=3, permanent=False)
    assert not should_retry(attempt=1, attempts_allowed=3, permanent=True)
