"""The planner with parallel stages, exhaustively over small instances (no
database): every combination of branch states of a three-branch stage, and
a model check that walks every interleaving of branch claims and outcomes
of a definition ``1 | 2 3 4 | 5`` through the planner."""

from __future__ import annotations

import dataclasses
import itertools
from collections import Counter

import pytest

from tests.engine.test_planning import ACTION_STATES, COMP_STATES
from workflows_app.engine.planning import (
    COMPENSATION_ACTIVE,
    DONE,
    Decision,
    InstanceView,
    Move,
    StepView,
    decide,
    needs_compensation,
    stages,
)

SETTLED = {"done", "not_needed"}
# Step 1 alone, then the stage of 2, 3 and 4, then step 5 alone.
STAGE = {1: 1, 2: 2, 3: 2, 4: 2, 5: 5}


def step(
    position: int,
    state: str,
    comp: str = "none",
    *,
    attempt: int | None = None,
    allowed: int = 2,
    perm: bool = False,
    rot: bool = False,
    stage: dict[int, int] = STAGE,
) -> StepView:
    if attempt is None:
        attempt = 0 if state in {"pending", "scheduled"} else 1
    return StepView(
        position,
        state,
        comp,
        attempt,
        allowed,
        True,
        rot,
        failed_permanently=perm and state == "failed",
        stage=stage[position],
    )


def view(
    state: str,
    steps: list[StepView],
    *,
    policy: str = "compensate",
    pivot: int | None = None,
    restart: int | None = None,
) -> InstanceView:
    return InstanceView(state, policy, pivot, steps, restart_position=restart)


def test_stages_group_consecutive_positions() -> None:
    steps = [step(p, "pending") for p in (5, 3, 1, 4, 2)]
    assert [[s.position for s in g] for g in stages(steps)] == [[1], [2, 3, 4], [5]]
    # Without stage marks every step is a stage of its own.
    plain = [dataclasses.replace(s, stage=None) for s in steps]
    assert [[s.position for s in g] for g in stages(plain)] == [[1], [2], [3], [4], [5]]


@pytest.mark.parametrize(
    ("steps", "expected"),
    [
        # The branches of a stage start together (one decision at a time).
        (["succeeded", "pending", "pending", "pending", "pending"], (Move.SCHEDULE, 2)),
        (
            ["succeeded", "scheduled", "pending", "pending", "pending"],
            (Move.SCHEDULE, 3),
        ),
        (
            ["succeeded", "running", "scheduled", "pending", "pending"],
            (Move.SCHEDULE, 4),
        ),
        # The stage is done only when every branch succeeded.
        (
            ["succeeded", "succeeded", "running", "succeeded", "pending"],
            (Move.IDLE, None),
        ),
        (
            ["succeeded", "succeeded", "skipped", "succeeded", "pending"],
            (Move.SCHEDULE, 5),
        ),
        # A branch failed for good: decide at once, siblings in flight or not.
        (
            ["succeeded", "failed", "running", "scheduled", "pending"],
            (Move.BEGIN_COMPENSATION, 2),
        ),
        (
            ["succeeded", "succeeded", "running", "failed", "pending"],
            (Move.BEGIN_COMPENSATION, 4),
        ),
        (["succeeded", "running", "unknown", "pending", "pending"], (Move.HOLD, 3)),
    ],
)
def test_examples(steps: list[str], expected: tuple[Move, int | None]) -> None:
    v = view("running", [step(i + 1, s) for i, s in enumerate(steps)])
    d = decide(v)
    assert (d.move, d.position) == expected


def _branch_trouble(s: StepView) -> bool:
    return s.state in {"failed", "unknown"}


def test_forward_exhaustively_over_a_three_branch_stage() -> None:
    checked = 0
    for branches in itertools.product(ACTION_STATES, repeat=3):
        for pivot, policy, rot, perm, after in itertools.product(
            (None, 1, 5),
            ("compensate", "hold"),
            (False, True),
            (False, True),
            ("pending", "succeeded"),
        ):
            if after == "succeeded" and any(b not in DONE for b in branches):
                continue  # a later stage never runs before this one is done
            states = ["succeeded", *branches, after]
            steps = [step(i + 1, s, perm=perm, rot=rot) for i, s in enumerate(states)]
            v = view("running", steps, policy=policy, pivot=pivot)
            d = decide(v)
            checked += 1
            stage = steps[1:4]
            trouble = [s for s in stage if _branch_trouble(s)]
            if trouble:
                # The first troubled branch decides, whatever its siblings do.
                first = trouble[0]
                assert d.position == first.position, (v, d)
                assert d.move in {Move.HOLD, Move.BEGIN_COMPENSATION}, (v, d)
                if d.move is Move.BEGIN_COMPENSATION:
                    # Never after the pivot: only forward retries there.
                    assert policy == "compensate" and pivot != 1, (v, d)
                if pivot == 1 and d.move is Move.HOLD:
                    assert d.attention_kind in {"after_pivot", "step_unknown"}
                continue
            pending = [s for s in stage if s.state == "pending"]
            if pending:
                assert d == Decision(Move.SCHEDULE, pending[0].position), (v, d)
            elif all(s.state in DONE for s in stage):
                expected = Move.SCHEDULE if after == "pending" else Move.COMPLETE
                assert d.move is expected, (v, d)
            else:
                # Scheduled, retrying, running or waiting branches: wait for all.
                assert d.move is Move.IDLE, (v, d)
            # The next stage starts only when every branch is done.
            if d.move is Move.SCHEDULE and d.position == 5:
                assert all(s.state in DONE for s in stage)
    assert checked > 9**3 * 3 * 2 * 2 * 2


def test_compensation_exhaustively_over_a_two_branch_stage() -> None:
    """Stage by stage back: both branches of the stage may be undone at once,
    step 1 only after both are settled; never a branch that did not apply."""
    stage_map = {1: 1, 2: 2, 3: 2}
    checked = 0
    for a2, a3 in itertools.product(ACTION_STATES, repeat=2):
        for c1, c2, c3 in itertools.product(COMP_STATES, repeat=3):
            for perm in (False, True):
                steps = [
                    step(1, "succeeded", c1, stage=stage_map),
                    step(2, a2, c2, perm=perm, stage=stage_map),
                    step(3, a3, c3, stage=stage_map),
                ]
                v = view("compensating", steps)
                d = decide(v)
                checked += 1
                if any(a in {"running", "waiting"} for a in (a2, a3)):
                    assert d.move is Move.IDLE, (v, d)
                    continue
                if d.move is Move.COMPENSATE:
                    target = steps[d.position - 1]
                    assert target.compensation_state == "none"
                    assert target.may_have_applied
                    if d.position == 1:
                        assert c2 in SETTLED and c3 in SETTLED, (v, d)
                    assert not any(a in {"scheduled", "retrying"} for a in (a2, a3))
                if d.move is Move.SKIP_COMPENSATION:
                    assert not steps[d.position - 1].may_have_applied, (v, d)
                if d.move is Move.HOLD:
                    held = steps[d.position - 1]
                    assert held.compensation_state == "failed"
                    # Held only once no sibling's undo is under way.
                    same = [s for s in steps if s.stage == held.stage]
                    assert not any(
                        s.compensation_state in COMPENSATION_ACTIVE for s in same
                    ), (v, d)
                    assert all(
                        s.compensation_state in SETTLED
                        for s in steps
                        if s.stage > held.stage
                    ), (v, d)
                if d.move is Move.FINISH_COMPENSATION:
                    assert all(s.compensation_state in SETTLED for s in steps)
    assert checked == 9**2 * 7**3 * 2


def test_restart_from_a_branch_undoes_it_and_what_follows() -> None:
    """Restart from branch 3 of stage {2, 3}: branch 2 keeps its effect."""
    stage_map = {1: 1, 2: 2, 3: 2, 4: 4}
    steps = [
        step(1, "succeeded", stage=stage_map),
        step(2, "succeeded", stage=stage_map),
        step(3, "failed", stage=stage_map),
        step(4, "pending", stage=stage_map),
    ]
    v = view("compensating", steps, restart=3)
    assert decide(v) == Decision(
        Move.SKIP_COMPENSATION, 4, reason=("the step never started: nothing to undo")
    )


# -- the model check -------------------------------------------------------


OUTCOMES = ("succeed", "decline", "error", "timeout")


def _put(v: InstanceView, position: int, **changes: object) -> InstanceView:
    steps = tuple(
        dataclasses.replace(s, **changes) if s.position == position else s  # type: ignore[arg-type]
        for s in v.steps
    )
    return dataclasses.replace(v, steps=steps)


def _apply(v: InstanceView, d: Decision) -> InstanceView:
    p = d.position
    match d.move:
        case Move.START:
            return dataclasses.replace(v, state="running")
        case Move.SCHEDULE:
            assert p is not None
            return _put(v, p, state="scheduled")
        case Move.COMPLETE:
            return dataclasses.replace(v, state="completed")
        case Move.BEGIN_COMPENSATION:
            return dataclasses.replace(v, state="compensating")
        case Move.HOLD:
            return dataclasses.replace(v, state="needs_attention")
        case Move.UNSCHEDULE:
            assert p is not None
            return _put(v, p, state="pending")
        case Move.ABANDON_RETRY:
            assert p is not None
            return _put(v, p, state="failed")
        case Move.SKIP_COMPENSATION:
            assert p is not None
            return _put(v, p, compensation_state="not_needed")
        case Move.COMPENSATE:
            assert p is not None
            return _put(v, p, compensation_state="pending")
        case Move.FINISH_COMPENSATION:
            return dataclasses.replace(v, state="compensated")
    raise AssertionError(d)


def _check_decision(v: InstanceView, d: Decision) -> None:
    """The guarantees, at the moment each decision is applied."""
    by_stage = stages(v.steps)
    if d.move is Move.SCHEDULE:
        target = next(s for s in v.steps if s.position == d.position)
        assert v.state == "running"
        for group in by_stage:
            if group[0].stage_key < target.stage_key:
                assert all(s.state in DONE for s in group), v
            if group[0].stage_key == target.stage_key:
                assert not any(_branch_trouble(s) for s in group), v
    if d.move is Move.COMPENSATE:
        target = next(s for s in v.steps if s.position == d.position)
        assert needs_compensation(v, target), v
        assert not any(s.state in {"running", "waiting"} for s in v.steps), v
        later = [s for s in v.steps if s.stage_key > target.stage_key]
        assert all(s.compensation_state in SETTLED for s in later), v
    if d.move is Move.FINISH_COMPENSATION:
        for s in v.steps:
            if needs_compensation(v, s):
                assert s.compensation_state == "done", v
            else:
                assert s.compensation_state == "not_needed", v
    if d.move is Move.COMPLETE:
        assert all(s.state == "succeeded" for s in v.steps), v


def _settle(v: InstanceView) -> InstanceView:
    for _ in range(4 * len(v.steps) + 8):
        d = decide(v)
        if d.move is Move.IDLE:
            return v
        _check_decision(v, d)
        v = _apply(v, d)
    raise AssertionError(f"did not settle: {v}")


def _events(v: InstanceView) -> list[tuple[str, int, str]]:
    events: list[tuple[str, int, str]] = []
    for s in v.steps:
        if s.state in {"scheduled", "retrying"} and v.state == "running":
            events.append(("claim", s.position, ""))
        if s.state == "running":
            events += [("finish", s.position, o) for o in OUTCOMES]
        if s.compensation_state in {"pending", "retrying"} and (
            v.state == "compensating"
        ):
            events.append(("claim_undo", s.position, ""))
        if s.compensation_state == "running":
            events += [("finish_undo", s.position, o) for o in ("succeed", "fail")]
    return events


def _fire(v: InstanceView, event: tuple[str, int, str]) -> InstanceView:
    kind, p, outcome = event
    s = next(s for s in v.steps if s.position == p)
    if kind == "claim":
        return _put(v, p, state="running", attempt=s.attempt + 1)
    if kind == "finish":
        # A fenced branch (the instance left running) is recorded, never retried.
        forward = v.state in {"running", "needs_attention"}
        if outcome == "succeed":
            return _put(v, p, state="succeeded")
        if outcome == "decline":
            return _put(v, p, state="failed", failed_permanently=True)
        if outcome == "error":
            retry = forward and s.attempt < s.attempts_allowed
            return _put(v, p, state="retrying" if retry else "failed")
        return _put(v, p, state="unknown")
    if kind == "claim_undo":
        return _put(v, p, compensation_state="running")
    return _put(v, p, compensation_state="done" if outcome == "succeed" else "failed")


def _explore(start: InstanceView) -> Counter[str]:
    seen: set[InstanceView] = set()
    stack = [_settle(start)]
    figures: Counter[str] = Counter()
    while stack:
        v = stack.pop()
        if v in seen:
            continue
        seen.add(v)
        events = _events(v)
        if not events:
            # Quiescent: finished, or held for a person (never stranded).
            assert v.state in {"completed", "compensated", "needs_attention"}, v
            figures[v.state] += 1
            if v.state == "compensated":
                undone = sum(s.compensation_state == "done" for s in v.steps)
                figures[f"compensated_with_{undone}_undone"] += 1
                for s in v.steps:
                    if s.state == "unknown":
                        assert s.compensation_state == "done", v
                        figures["unknown_branch_undone"] += 1
                    if s.attempt == 0:
                        assert s.compensation_state == "not_needed", v
                        figures["unstarted_branch_left_alone"] += 1
            continue
        for event in events:
            figures[f"event_{event[0]}"] += 1
            stack.append(_settle(_fire(v, event)))
    figures["states"] = len(seen)
    return figures


@pytest.mark.parametrize("policy", ["compensate", "hold"])
@pytest.mark.parametrize("pivot", [None, 5])
def test_every_interleaving_of_a_three_branch_stage(
    policy: str, pivot: int | None
) -> None:
    steps = tuple(step(p, "pending", attempt=0, allowed=2) for p in range(1, 6))
    figures = _explore(view("accepted", steps, policy=policy, pivot=pivot))
    print(f"policy={policy} pivot={pivot}: {dict(sorted(figures.items()))}")
    assert figures["completed"] >= 1
    if policy == "compensate":
        assert figures["compensated"] > 100
        assert figures["unknown_branch_undone"] > 0
        assert figures["unstarted_branch_left_alone"] > 0
        assert figures["compensated_with_4_undone"] > 0
    assert figures["needs_attention"] > 0


def test_a_restart_from_a_branch_keeps_the_earlier_branch_retry() -> None:
    """Restart from branch 3 while branch 2 waits for a retry: only 3 and
    later are stopped and undone; 2 keeps its retry and runs on."""
    stage_map = {1: 1, 2: 2, 3: 2, 4: 4}
    steps = [
        step(1, "succeeded", stage=stage_map),
        step(2, "retrying", stage=stage_map),
        step(3, "succeeded", "none", stage=stage_map),
        step(4, "pending", stage=stage_map),
    ]
    v = view("compensating", steps, restart=3)
    assert decide(v).move is Move.SKIP_COMPENSATION  # 4 never started
    v = _apply(v, decide(v))
    assert decide(v) == Decision(Move.COMPENSATE, 3)
    v = _put(v, 3, compensation_state="done")
    assert decide(v) == Decision(Move.RESTART, 3)
