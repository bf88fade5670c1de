"""Timers and steps that wait for a person: the planner (exhaustively over
small instances), the commands, the sweeper, four eyes and the saga checker."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta

import pytest

from tests.saga_invariant import check_instance
from tests.support import advance_clock, make_definition, start, user_in
from workflows_app.demo.models import ParticipantEffect
from workflows_app.engine import actions, operate
from workflows_app.engine.commands import approvals, operator, waits
from workflows_app.engine.errors import (
    AlreadyChanged,
    InvalidInput,
    NotPermitted,
    TransitionRejected,
)
from workflows_app.engine.human_form import clean_submission, spec_errors
from workflows_app.engine.planning import InstanceView, Move, StepView, decide
from workflows_app.engine.sweeps import sweep_all
from workflows_app.models import (
    Alert,
    StepDefinition,
    StepExecution,
    TransitionLog,
    WorkflowInstance,
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
ENGINE_STATES = ["pending", "scheduled", "waiting", "succeeded", "failed", "skipped"]


# -- the planner ------------------------------------------------------------------


def _view(
    state: str, steps: list[StepView], policy: str = "compensate"
) -> InstanceView:
    return InstanceView(state, policy, None, steps)


def _engine_step(position: int, state: str, kind: str) -> StepView:
    return StepView(
        position,
        state,
        "none",
        0,
        1,
        False,
        False,
        failed_permanently=state == "failed",
        kind=kind,
    )


def _activity(position: int, state: str) -> StepView:
    return StepView(
        position, state, "none", 0 if state == "pending" else 1, 3, True, False
    )


@pytest.mark.parametrize("kind", ["timer", "human"])
def test_planner_forward_over_every_state_of_a_wait_after_a_done_step(kind):
    """Running, with step 1 done: what the planner does with a timer or a
    step for a person in each of its states, followed by an activity."""
    expected = {
        "pending": (Move.SCHEDULE, 2),
        "scheduled": (Move.BEGIN_WAIT, 2),  # never sent to a worker
        "waiting": (Move.IDLE, None),  # the sweeper or a person ends it
        "succeeded": (Move.SCHEDULE, 3),
        "skipped": (Move.SCHEDULE, 3),
        # Failed for good (an unreadable time, a person said no): nothing
        # applied at this step, the policy applies to the earlier ones.
        "failed": (Move.BEGIN_COMPENSATION, 2),
    }
    for state, (move, position) in expected.items():
        steps = [
            _activity(1, "succeeded"),
            _engine_step(2, state, kind),
            _activity(3, "pending"),
        ]
        decision = decide(_view("running", steps))
        assert (decision.move, decision.position) == (move, position), state
        held = decide(_view("running", steps, policy="hold"))
        if state == "failed":
            assert (held.move, held.attention_kind) == (Move.HOLD, "step_failed")


@pytest.mark.parametrize("kind", ["timer", "human"])
def test_planner_compensation_fences_a_wait_first_and_never_undoes_it(kind):
    """Compensating, exhaustively over the states of the step before and
    the wait itself: a wait is fenced before anything else; after that the
    wait is never compensated (it has nothing to undo)."""
    for before, wait_state in itertools.product(
        ["succeeded", "failed", "unknown", "running"], ENGINE_STATES
    ):
        steps = [_activity(1, before), _engine_step(2, wait_state, kind)]
        decision = decide(_view("compensating", steps))
        if wait_state == "waiting":
            assert (decision.move, decision.position) == (Move.STOP_WAITING, 2)
            continue
        if before == "running":
            assert decision.move is Move.IDLE  # the action may still apply
            continue
        if wait_state == "scheduled":
            assert (decision.move, decision.position) == (Move.UNSCHEDULE, 2)
            continue
        # The wait's own compensation is skipped, never run.
        assert decision.move is Move.SKIP_COMPENSATION
        assert decision.position in {1, 2}
        if decision.position == 2:
            assert "no compensation" in decision.reason


def test_planner_every_pair_of_wait_states_settles_or_moves():
    """Over every state of two waits of both kinds and every instance state,
    the planner never starts anything while a wait is open, and never
    leaves a wait open while compensating."""
    for kind_a, kind_b, a, b, state in itertools.product(
        ["timer", "human"],
        ["timer", "human"],
        ENGINE_STATES,
        ENGINE_STATES,
        ["running", "compensating", "needs_attention"],
    ):
        steps = [_engine_step(1, a, kind_a), _engine_step(2, b, kind_b)]
        decision = decide(_view(state, steps))
        if state == "running" and "waiting" in {a, b}:
            assert decision.move is Move.IDLE
        if state == "compensating" and "waiting" in {a, b}:
            assert decision.move is Move.STOP_WAITING
        if decision.move is Move.BEGIN_WAIT:
            assert state == "running" and steps[decision.position - 1].state == (
                "scheduled"
            )


# -- the form of a step for a person ------------------------------------------------

FORM = [
    {"name": "approved", "type": "boolean", "required": True},
    {"name": "amount", "type": "number"},
    {"name": "channel", "type": "choice", "choices": ["phone", "mail"]},
    {"name": "note", "type": "text", "required": True},
]


def test_form_declaration_errors_are_clear():
    assert spec_errors(FORM) == []
    assert "JSON list" in spec_errors({"name": "x"})[0]
    errors = spec_errors(
        [
            {"name": "Bad Name", "type": "text"},
            {"name": "a", "type": "date"},
            {"name": "c", "type": "choice"},
            {"name": "d", "type": "text", "choices": ["x"]},
            {"name": "d", "type": "text", "colour": "red"},
        ]
    )
    text = " | ".join(errors)
    assert "lower-case" in text
    assert "type must be one of" in text
    assert "a choice needs a list" in text
    assert "only a choice field has choices" in text
    assert "declared twice" in text
    assert "unknown keys colour" in text


def test_form_submission_is_typed_and_checked():
    cleaned, errors = clean_submission(
        FORM, {"approved": "on", "amount": "12.5", "channel": "mail", "note": " ok "}
    )
    assert errors == {}
    assert cleaned == {
        "approved": True,
        "amount": 12.5,
        "channel": "mail",
        "note": "ok",
    }
    cleaned, errors = clean_submission(
        FORM, {"approved": True, "amount": 3, "note": "x"}
    )
    assert errors == {} and cleaned["amount"] == 3
    _, errors = clean_submission(
        FORM, {"amount": "lots", "channel": "fax", "note": "", "extra": 1}
    )
    assert set(errors) == {"approved", "amount", "channel", "note", ""}
    _, errors = clean_submission(FORM, ["not", "an", "object"])
    assert errors[""].startswith("the form data must be")


# -- commands, with the database --------------------------------------------------

TIMER = {
    "name": "cool_off",
    "kind": "timer",
    "action": "",
    "compensation": "",
    "wait_for": timedelta(hours=72),
}
HUMAN = {
    "name": "review",
    "kind": "human",
    "action": "",
    "compensation": "",
    "timeout": timedelta(hours=4),
    "form_fields": FORM,
}


def _steps(*middle):
    return [{"name": "reserve"}, *middle, {"name": "ship"}]


def _step(instance, name):
    return StepExecution.objects.get(instance=instance, name=name)


def _effects(instance):
    return [
        f"{'T' if e.direction == 'action' else 'C'}:{e.step_name}"
        for e in ParticipantEffect.objects.filter(
            instance_id=instance.pk, applied=True
        ).order_by("first_applied_at", "id")
    ]


pytestmark_db = pytest.mark.django_db(transaction=True)


@pytestmark_db
def test_timer_waits_in_the_database_and_the_sweeper_wakes_it(broker):
    make_definition("wf", _steps(TIMER), stuck_after=timedelta(minutes=5))
    instance = start()
    broker.run()
    timer = _step(instance, "cool_off")
    instance.refresh_from_db()
    assert (instance.state, timer.state) == ("running", "waiting")
    assert timer.attempt == 0 and not broker.queue  # nothing sent anywhere
    # Never "stuck" for a long wait: checked only past the wake time.
    assert instance.stuck_check_at >= timer.wake_at + timedelta(minutes=5)
    assert sweep_all()["timers"] == 0  # not due yet
    advance_clock(instance, 72 * 3600 - 60)
    assert sweep_all()["timers"] == 0
    advance_clock(instance, 61)
    assert sweep_all()["timers"] == 1
    broker.run()
    instance.refresh_from_db()
    assert instance.state == "completed"
    assert "woke_at" in instance.outputs["cool_off"]
    assert _step(instance, "cool_off").wake_at is None
    assert _effects(instance) == ["T:reserve", "T:ship"]
    check_instance(instance, quiescent=True)


@pytestmark_db
def test_timer_until_a_time_from_the_input_and_a_bad_one_fails_for_good(broker):
    until = {**TIMER, "wait_for": None, "wait_until": "input.ship_by"}
    make_definition("wf", _steps(until))
    at = "2031-05-01T10:00:00+02:00"
    good = start(business_key="o-good", ship_by=at)
    broker.run()
    assert _step(good, "cool_off").wake_at == datetime.fromisoformat(at)
    missing = start(business_key="o-missing")
    garbage = start(business_key="o-garbage", ship_by="next tuesday")
    broker.run()
    for instance, words in ((missing, "has no input.ship_by"), (garbage, "not a date")):
        instance.refresh_from_db()
        timer = _step(instance, "cool_off")
        assert timer.state == "failed" and timer.last_failure_permanent
        assert words in timer.last_error
        # Failed before anything applied at the timer: the earlier step is undone.
        assert instance.state == "compensated"
        assert _effects(instance) == ["T:reserve", "C:reserve"]
        check_instance(instance, quiescent=True)


@pytestmark_db
def test_wake_early_and_extend_through_the_catalogue(broker):
    make_definition("wf", _steps(TIMER))
    alice = user_in("operator", "alice")
    viewer = user_in("viewer", "vera")
    instance = start()
    broker.run()
    timer = _step(instance, "cool_off")
    instance.refresh_from_db()
    offered = {a.action.name: a for a in actions.availability(instance, alice)}
    assert offered["wake_timer"].allowed and offered["extend_timer"].allowed
    assert not offered["complete_human_step"].allowed
    assert offered["complete_human_step"].why_not == "no step waits for a person"
    assert not {a.action.name: a for a in actions.availability(instance, viewer)}[
        "wake_timer"
    ].allowed
    with pytest.raises(NotPermitted):
        operate.act(instance.pk, "wake_timer", user=viewer, reason="no")
    # Extend: later only, audited with from/to, a new instance version.
    with pytest.raises(InvalidInput, match="later time"):
        operate.act(
            instance.pk,
            "extend_timer",
            user=alice,
            reason="r",
            step_id=timer.pk,
            data={"until": "2000-01-01T00:00:00Z"},
        )
    with pytest.raises(InvalidInput, match="either until"):
        operate.act(
            instance.pk, "extend_timer", user=alice, reason="r", step_id=timer.pk
        )
    version = WorkflowInstance.objects.get(pk=instance.pk).version
    operate.act(
        instance.pk,
        "extend_timer",
        user=alice,
        reason="customer asked for a week",
        step_id=timer.pk,
        data={"by_seconds": 4 * 86400},
        expected_version=version,
    )
    extended = _step(instance, "cool_off")
    assert extended.wake_at == timer.wake_at + timedelta(days=4)
    note = TransitionLog.objects.get(instance=instance, transition="timer_extended")
    assert note.user == alice and note.reason == "customer asked for a week"
    # The old version is stale now: a second operator gets "changed meanwhile".
    with pytest.raises(AlreadyChanged):
        operate.act(
            instance.pk,
            "wake_timer",
            user=alice,
            reason="r",
            step_id=timer.pk,
            expected_version=version,
        )
    operate.act(instance.pk, "wake_timer", user=alice, reason="window waived")
    broker.run()
    instance.refresh_from_db()
    assert instance.state == "completed"
    row = TransitionLog.objects.get(instance=instance, transition="wake_early")
    assert row.user == alice and row.reason == "window waived"
    with pytest.raises(TransitionRejected, match="completed"):
        operate.act(instance.pk, "wake_timer", user=alice, reason="again")
    check_instance(instance, quiescent=True)


@pytestmark_db
def test_cancel_fences_a_timer_and_a_closed_instance_never_wakes(broker):
    make_definition("wf", _steps(TIMER))
    alice = user_in("operator", "alice")
    instance = start()
    broker.run()
    operator.instance_cancel(instance.pk, user=alice, reason="customer withdrew")
    broker.run()
    instance.refresh_from_db()
    timer = _step(instance, "cool_off")
    assert instance.state == "compensated"
    assert (timer.state, timer.wake_at) == ("pending", None)
    assert _effects(instance) == ["T:reserve", "C:reserve"]
    advance_clock(instance, 73 * 3600)
    assert sweep_all()["timers"] == 0
    with pytest.raises(TransitionRejected, match="compensated"):
        operate.act(instance.pk, "wake_timer", user=alice, reason="late")
    check_instance(instance, quiescent=True)


@pytestmark_db
def test_close_as_failed_fences_a_waiting_timer(broker):
    # A deadline hold while the timer waits, then the operator closes.
    make_definition("wf", _steps(TIMER), deadline=timedelta(hours=1))
    alice = user_in("operator", "alice")
    instance = start()
    broker.run()
    advance_clock(instance, 3601)
    assert sweep_all()["deadlines"] == 1
    operator.instance_close_as_failed(instance.pk, user=alice, reason="give up")
    instance.refresh_from_db()
    timer = _step(instance, "cool_off")
    assert instance.state == "failed"
    assert (timer.state, timer.wake_at) == ("pending", None)
    advance_clock(instance, 80 * 3600)
    assert sweep_all()["timers"] == 0
    check_instance(instance, quiescent=True)


@pytestmark_db
def test_human_step_claim_complete_and_a_second_completion_conflicts(broker):
    make_definition("wf", _steps(HUMAN))
    alice = user_in("operator", "alice")
    bob = user_in("operator", "bob")
    instance = start()
    broker.run()
    review = _step(instance, "review")
    instance.refresh_from_db()
    assert review.state == "waiting" and review.deadline_at is not None
    assert instance.stuck_check_at is None  # its own time rule applies
    waits.step_claim(instance.pk, review.pk, user=alice)
    waits.step_claim(instance.pk, review.pk, user=alice)  # already hers: no-op
    with pytest.raises(AlreadyChanged, match="claimed by alice"):
        waits.step_claim(instance.pk, review.pk, user=bob)
    with pytest.raises(TransitionRejected, match="claimed by alice"):
        operate.act(
            instance.pk,
            "complete_human_step",
            user=bob,
            reason="r",
            data={"output": {"approved": True, "note": "x"}},
        )
    with pytest.raises(InvalidInput, match="unclaim|reason to release"):
        waits.step_unclaim(instance.pk, review.pk, user=bob)
    # Validated on the server: every wrong field named, nothing written.
    version = WorkflowInstance.objects.get(pk=instance.pk).version
    with pytest.raises(InvalidInput) as bad:
        operate.act(
            instance.pk,
            "complete_human_step",
            user=alice,
            reason="looked at it",
            data={"output": {"amount": "lots", "channel": "fax"}},
        )
    for name in ("approved", "amount", "channel", "note"):
        assert name in str(bad.value)
    assert WorkflowInstance.objects.get(pk=instance.pk).version == version
    operate.act(
        instance.pk,
        "complete_human_step",
        user=alice,
        reason="order checked with the customer",
        data={"output": {"approved": "on", "amount": "250", "note": "called"}},
        expected_version=version,
    )
    broker.run()
    instance.refresh_from_db()
    assert instance.state == "completed"
    assert instance.outputs["review"] == {
        "approved": True,
        "amount": 250,
        "note": "called",
    }
    row = TransitionLog.objects.get(instance=instance, transition="complete_task")
    assert row.user == alice and row.reason == "order checked with the customer"
    assert row.data["claimed_by"] == "alice"
    with pytest.raises(TransitionRejected, match="completed"):
        operate.act(
            instance.pk,
            "complete_human_step",
            user=alice,
            reason="twice",
            data={"output": {"approved": True, "note": "x"}},
        )
    check_instance(instance, quiescent=True)


@pytestmark_db
def test_a_second_completion_of_a_running_instance_is_already_changed(broker):
    make_definition(
        "wf",
        [
            *_steps(HUMAN),
            {
                "name": "later",
                "kind": "timer",
                "action": "",
                "compensation": "",
                "wait_for": timedelta(days=1),
            },
        ],
    )
    alice = user_in("operator", "alice")
    instance = start()
    broker.run()
    body = {"output": {"approved": True, "note": "ok"}}
    operate.act(instance.pk, "complete_human_step", user=alice, reason="r", data=body)
    broker.run()
    # The instance still runs (its timer waits): the step no longer waits.
    with pytest.raises(AlreadyChanged, match="no longer waits"):
        operate.act(
            instance.pk, "complete_human_step", user=alice, reason="r", data=body
        )


@pytestmark_db
def test_rejecting_a_human_step_fails_it_for_good_and_compensates(broker):
    make_definition("wf", _steps(HUMAN))
    alice = user_in("operator", "alice")
    instance = start()
    broker.run()
    operate.act(
        instance.pk,
        "complete_human_step",
        user=alice,
        reason="order looks fraudulent",
        data={"reject": True},
    )
    broker.run()
    instance.refresh_from_db()
    review = _step(instance, "review")
    assert instance.state == "compensated"
    assert review.state == "failed" and review.last_failure_permanent
    assert "fraudulent" in review.last_error
    assert _effects(instance) == ["T:reserve", "C:reserve"]
    check_instance(instance, quiescent=True)


@pytestmark_db
def test_four_eyes_on_completion_goes_through_the_engine(broker):
    make_definition(
        "wf", _steps(HUMAN), approval_actions=["complete_human_step", "wake_timer"]
    )
    alice = user_in("operator", "alice")
    bob = user_in("operator", "bob")
    instance = start()
    broker.run()
    review = _step(instance, "review")
    # The body itself refuses without an approval, whoever calls it.
    with pytest.raises(NotPermitted, match="second operator"):
        actions.CATALOGUE["complete_human_step"].command(
            instance.pk,
            user=alice,
            reason="r",
            output={"approved": True, "note": "x"},
        )
    # A wrong form is refused before a second operator is asked.
    with pytest.raises(InvalidInput, match="note"):
        operate.act(
            instance.pk,
            "complete_human_step",
            user=alice,
            reason="r",
            step_id=review.pk,
            data={"output": {"approved": True}},
        )
    outcome = operate.act(
        instance.pk,
        "complete_human_step",
        user=alice,
        reason="big order, checked",
        step_id=review.pk,
        data={"output": {"approved": True, "note": "ok"}},
    )
    assert not outcome.done and outcome.approval is not None
    assert _step(instance, "review").state == "waiting"
    with pytest.raises(NotPermitted):
        approvals.approval_decide(outcome.approval.pk, user=alice, approve=True)
    decided = approvals.approval_decide(outcome.approval.pk, user=bob, approve=True)
    assert decided.status == "approved", decided.outcome
    broker.run()
    instance.refresh_from_db()
    assert instance.state == "completed"
    row = TransitionLog.objects.get(instance=instance, transition="complete_task")
    assert row.user == alice and row.data["approved_by"] == "bob"
    check_instance(instance, quiescent=True)


@pytestmark_db
def test_a_human_step_past_its_time_rule_flags_stuck_and_alerts(broker):
    make_definition("wf", _steps(HUMAN), stuck_after=timedelta(minutes=1))
    alice = user_in("operator", "alice")
    instance = start()
    broker.run()
    advance_clock(instance, 3600)  # past stuck_after, but not the step's rule
    sweep_all()
    instance.refresh_from_db()
    assert not instance.stuck
    advance_clock(instance, 3 * 3600 + 1)
    sweep_all()
    instance.refresh_from_db()
    assert instance.stuck and instance.stuck_kind == "human_step_overdue"
    assert "review waits for a person" in instance.stuck_reason
    alert = Alert.objects.get(instance=instance)
    assert alert.kind == "human_step_overdue" and alert.resolved_at is None
    operate.act(
        instance.pk,
        "complete_human_step",
        user=alice,
        reason="done late",
        data={"output": {"approved": False, "note": "late"}},
    )
    broker.run()
    instance.refresh_from_db()
    alert.refresh_from_db()
    assert instance.state == "completed" and not instance.stuck
    assert alert.resolved_at is not None
    check_instance(instance, quiescent=True)


@pytestmark_db
def test_definition_validation_of_waits():
    definition = make_definition("wf", publish=False)
    bad = [
        ({"kind": "timer"}, "exactly one"),
        ({"kind": "timer", "wait_for": timedelta(0)}, "positive"),
        ({"kind": "timer", "wait_until": "ship_by"}, "input.ship_by"),
        (
            {"kind": "timer", "wait_for": timedelta(1), "action": "demo.step"},
            "no action",
        ),
        ({"kind": "human", "form_fields": [{"name": "x"}]}, "type must be"),
        ({"kind": "human", "is_pivot": True}, "cannot be the pivot"),
        (
            {"kind": "activity", "action": "demo.step", "form_fields": FORM},
            "choose that kind",
        ),
    ]
    for fields, words in bad:
        step = StepDefinition(
            definition=definition,
            position=9,
            name="x",
            **{"action": "", "compensation": "", **fields},
        )
        with pytest.raises(Exception, match=words):
            step.full_clean()


def test_wake_time_reads_the_input():
    from workflows_app.engine.waits import BadWakeTime, wake_time

    now = datetime(2030, 1, 1, tzinfo=UTC)
    step = StepDefinition(kind="timer", wait_until="input.order.ship_by")
    assert wake_time(step, {"order": {"ship_by": "2030-02-01T00:00:00"}}, now) == (
        datetime(2030, 2, 1, tzinfo=UTC)
    )
    for data in (
        {},
        {"order": 5},
        {"order": {"ship_by": 17}},
        {"order": {"ship_by": "x"}},
    ):
        with pytest.raises(BadWakeTime):
            wake_time(step, data, now)
    assert wake_time(
        StepDefinition(kind="timer", wait_for=timedelta(days=3)), {}, now
    ) == (now + timedelta(days=3))


# -- the saga checker learns the waits (and catches their misuse) -----------------


@pytestmark_db
def test_the_checker_catches_a_broken_wait(broker):
    """A real history passes; the same history broken the ways a buggy
    engine would break it fails with the named rule."""
    import dataclasses

    from tests.saga_invariant import check_history, load

    make_definition("wf", _steps(TIMER))
    alice = user_in("operator", "alice")
    instance = start()
    broker.run()
    operate.act(instance.pk, "wake_timer", user=alice, reason="go")
    broker.run()
    recorded = load(instance)
    check_history(recorded, quiescent=True)
    rows = recorded.rows
    woke = next(i for i, r in enumerate(rows) if r.transition == "wake_early")

    def broken(new_rows):
        with pytest.raises(AssertionError) as caught:
            check_history(dataclasses.replace(recorded, rows=new_rows), quiescent=False)
        return str(caught.value)

    # A timer woken by nobody in particular: the manual edge needs an operator.
    anonymous = dataclasses.replace(rows[woke], actor_kind="worker", user_id=None)
    assert "S10" in broken([*rows[:woke], anonymous, *rows[woke + 1 :]])
    # A wait fenced while the instance runs forward.
    fence = dataclasses.replace(
        rows[woke],
        transition="stop_waiting",
        target="pending",
        user_id=None,
        actor_kind="system",
    )
    assert "S3" in broken([*rows[:woke], fence])
    # The timer claimed an attempt like an activity would.
    begun = next(i for i, r in enumerate(rows) if r.transition == "begin_wait")
    claim = dataclasses.replace(
        rows[begun], transition="begin_attempt", target="running", data={"attempt": 1}
    )
    assert "S12" in broken([*rows[:begun], claim])
