"""Issue 13: closed means closed, the pivot, what gets compensated, holds keep
their retry budget and their own alerts, repaired data runs under a new key.

Each test drives the real engine commands on PostgreSQL with the in-memory
transport; an attempt "in flight" is one a worker claimed (``attempt_claim``)
and has not reported yet.
"""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from django.db import connection, transaction

from tests.support import advance_clock, make_definition, start, user_in
from workflows_app.demo.models import ParticipantEffect
from workflows_app.engine import commands
from workflows_app.engine.actors import Actor
from workflows_app.engine.commands.execution import Outcome
from workflows_app.engine.commands.repair import instance_repair_input
from workflows_app.engine.errors import InvalidInput, TransitionRejected
from workflows_app.engine.sweeps import sweep_all
from workflows_app.models import (
    TERMINAL_STATES,
    Alert,
    Attempt,
    StepExecution,
    TransitionLog,
    WorkflowInstance,
)

pytestmark = pytest.mark.django_db(transaction=True)
WORKER = Actor.worker("test-worker")
SUCCESS = Outcome("succeeded", output={"ok": True})
RETRYABLE = Outcome("failed", error_class="Unavailable", error_message="503")


def operator():
    from django.contrib.auth.models import User

    return User.objects.filter(username="operator").first() or user_in("operator")


def refresh(instance: WorkflowInstance) -> WorkflowInstance:
    instance.refresh_from_db()
    return instance


def step(instance: WorkflowInstance, name: str) -> StepExecution:
    return StepExecution.objects.get(instance=instance, name=name)


def rows_after(instance: WorkflowInstance, row_id: int) -> list[TransitionLog]:
    return list(
        TransitionLog.objects.filter(instance=instance, id__gt=row_id).order_by("id")
    )


def last_row(instance: WorkflowInstance) -> int:
    return TransitionLog.objects.filter(instance=instance).latest("id").id


def state_changes_after_outcome(instance: WorkflowInstance) -> list[str]:
    """State-changing rows after the instance's terminal row (S2)."""
    rows = list(TransitionLog.objects.filter(instance=instance).order_by("id"))
    end = next(
        (
            i
            for i, r in enumerate(rows)
            if r.step_id is None and r.field == "state" and r.target in TERMINAL_STATES
        ),
        None,
    )
    if end is None:
        return []
    return [f"{r.transition}:{r.target}" for r in rows[end + 1 :] if r.field]


ATTEMPT_TIMEOUT = timedelta(seconds=60)
THREE_STEPS = [
    {"name": "one"},
    {"name": "two", "timeout": ATTEMPT_TIMEOUT},
    {"name": "three"},
]


def in_flight_at_deadline(
    broker, steps: list[dict] | None = None
) -> tuple[WorkflowInstance, commands.Claim]:
    """Step two claimed by a worker (no outcome yet) when the workflow's
    deadline passes, long before the attempt's own: the sweeper holds."""
    make_definition(steps=steps or THREE_STEPS, deadline=timedelta(seconds=1))
    instance = start()
    broker.deliver(broker.queue.pop(0))  # start: schedules step one
    broker.deliver(broker.queue.pop(0))  # step one runs, schedules step two
    claim = commands.attempt_claim(*broker.queue.pop(0).args, actor=WORKER)
    assert claim is not None and claim.context.step_name == "two"
    advance_clock(instance, 5)
    sweep_all()
    instance = refresh(instance)
    assert (instance.state, instance.attention_kind) == ("needs_attention", "deadline")
    return instance, claim


def close(instance: WorkflowInstance, reason: str = "customer refunded by hand"):
    instance = refresh(instance)
    commands.instance_close_as_failed(
        instance.id,
        user=operator(),
        reason=reason,
        expected_version=instance.version,
    )
    return refresh(instance)


# -- 1. closed means closed ------------------------------------------------------


def test_outcome_after_close_changes_nothing_and_a_late_effect_alerts(
    broker_no_inline,
):
    instance, claim = in_flight_at_deadline(broker_no_inline)
    instance = close(instance)
    assert instance.state == "failed"
    two = step(instance, "two")
    # The close fenced the attempt in flight, in its own transaction.
    assert two.state == "unknown" and two.deadline_at is None
    attempt = Attempt.objects.get(step=two, number=claim.context.attempt)
    assert attempt.outcome == Attempt.Outcome.ABANDONED
    before = last_row(instance)

    recorded = commands.attempt_record(
        claim.instance_id,
        claim.step_id,
        "action",
        claim.context.attempt,
        SUCCESS,
        actor=WORKER,
    )

    assert recorded is False
    assert refresh(instance).state == "failed"
    assert step(instance, "two").state == "unknown"
    notes = rows_after(instance, before)
    assert [r.transition for r in notes] == ["late_outcome_ignored", "alert_opened"]
    assert all(not r.field for r in notes)  # notes only
    alert = Alert.objects.get(instance=instance, kind=Alert.Kind.LATE_EFFECT)
    assert alert.is_open and alert.next_send_at is not None
    assert notes[1].data["alert"] == alert.pk
    assert "reported an effect after the instance was failed" in alert.reason
    # The sweeper leaves it open (the instance is closed, not "moved on")...
    advance_clock(instance, 60)
    sweep_all()
    assert Alert.objects.get(pk=alert.pk).is_open
    # ...until a person takes it.
    commands.alert_acknowledge(alert.pk, user=operator(), reason="refund issued")
    assert not Alert.objects.get(pk=alert.pk).is_open
    assert state_changes_after_outcome(instance) == []


def test_outcome_recorded_while_held_then_close(broker_no_inline):
    """The other order: a hold does not fence, so the outcome lands on the
    step while the instance waits for a person; then the close."""
    instance, claim = in_flight_at_deadline(broker_no_inline)
    assert commands.attempt_record(
        claim.instance_id,
        claim.step_id,
        "action",
        claim.context.attempt,
        SUCCESS,
        actor=WORKER,
    )
    instance = refresh(instance)
    assert instance.state == "needs_attention"
    assert step(instance, "two").state == "succeeded"
    instance = close(instance)
    assert instance.state == "failed"
    assert step(instance, "two").state == "succeeded"
    assert not Alert.objects.filter(kind=Alert.Kind.LATE_EFFECT).exists()
    assert state_changes_after_outcome(instance) == []


def test_a_late_failure_after_close_alerts_nobody(broker_no_inline):
    instance, claim = in_flight_at_deadline(broker_no_inline)
    instance = close(instance)
    commands.attempt_record(
        claim.instance_id,
        claim.step_id,
        "action",
        claim.context.attempt,
        RETRYABLE,
        actor=WORKER,
    )
    assert not Alert.objects.filter(kind=Alert.Kind.LATE_EFFECT).exists()
    assert TransitionLog.objects.filter(transition="late_outcome_ignored").count() == 1
    assert state_changes_after_outcome(instance) == []


def test_no_worker_at_all_sweeps_after_close_change_nothing(broker_no_inline):
    instance, _claim = in_flight_at_deadline(broker_no_inline)
    instance = close(instance)
    before = last_row(instance)
    for _ in range(5):
        advance_clock(instance, 3600)
        sweep_all()
    assert rows_after(instance, before) == []
    assert refresh(instance).state == "failed"


def test_the_engine_refuses_any_transition_on_a_closed_instance(broker):
    make_definition()
    instance = start()
    broker.run()
    assert refresh(instance).state == "completed"
    with pytest.raises(TransitionRejected, match="nothing changes any more"):
        commands.instance_cancel(instance.id, user=operator(), reason="too late")


# -- 2. no endless re-sends --------------------------------------------------------


def test_held_and_closed_instances_get_no_messages_and_no_rows(broker_no_inline):
    instance, claim = in_flight_at_deadline(broker_no_inline)
    # A retry that arrives while held is parked, not sent.
    commands.attempt_record(
        claim.instance_id,
        claim.step_id,
        "action",
        claim.context.attempt,
        RETRYABLE,
        actor=WORKER,
    )
    assert step(instance, "two").state == "retrying"
    before = last_row(instance)
    for _ in range(5):
        advance_clock(instance, 60)
        sweep_all()
    assert broker_no_inline.queue == []
    assert [r.transition for r in rows_after(instance, before)] == []
    instance = close(instance)
    before = last_row(instance)
    for _ in range(5):
        advance_clock(instance, 60)
        sweep_all()
    assert broker_no_inline.queue == []
    assert rows_after(instance, before) == []


def test_work_parked_by_a_hold_is_sent_again_on_resume(broker_no_inline):
    instance, claim = in_flight_at_deadline(broker_no_inline)
    # A retryable failure while held keeps the budget: a retry, parked.
    commands.attempt_record(
        claim.instance_id,
        claim.step_id,
        "action",
        claim.context.attempt,
        RETRYABLE,
        actor=WORKER,
    )
    two = step(instance, "two")
    assert two.state == "retrying" and two.redispatch_at is None
    assert broker_no_inline.queue == []
    for _ in range(3):
        advance_clock(instance, 60)
        sweep_all()
    assert broker_no_inline.queue == []  # not re-sent while held

    instance = refresh(instance)
    commands.instance_resume(
        instance.id,
        user=operator(),
        reason="deadline accepted",
        expected_version=instance.version,
    )
    assert [m.task for m in broker_no_inline.queue] == ["run_attempt"]
    broker_no_inline.run()
    instance = refresh(instance)
    assert instance.state == "completed"
    # The remaining attempts were used: attempt 2 of step two succeeded.
    assert list(
        step(instance, "two")
        .attempts.order_by("number")
        .values_list("outcome", flat=True)
    ) == ["failed", "succeeded"]


def test_a_timeout_while_held_is_retried_after_resume(broker_no_inline):
    instance, claim = in_flight_at_deadline(
        broker_no_inline,
        steps=[
            {"name": "one"},
            {"name": "two", "timeout": ATTEMPT_TIMEOUT, "retry_on_timeout": True},
        ],
    )
    advance_clock(instance, 120)  # the attempt's own deadline passes now
    sweep_all()
    two = step(instance, "two")
    assert two.state == "retrying"
    assert refresh(instance).state == "needs_attention"
    instance = refresh(instance)
    commands.instance_resume(
        instance.id, user=operator(), reason="go on", expected_version=instance.version
    )
    broker_no_inline.run()
    assert refresh(instance).state == "completed"
    assert list(
        step(instance, "two")
        .attempts.order_by("number")
        .values_list("outcome", flat=True)
    ) == ["timed_out", "succeeded"]


# -- 3. every hold is its own alert episode ----------------------------------------


def test_a_repeat_incident_gets_its_own_alert(broker):
    make_definition(
        steps=[{"name": "one"}, {"name": "two", "max_attempts": 1}],
        failure_policy="hold",
    )
    instance = start(simulate={"two": "fail"})
    broker.run()
    sweep_all()
    first = Alert.objects.get(instance=instance)
    assert first.is_open

    instance = refresh(instance)
    commands.instance_retry_step(
        instance.id,
        user=operator(),
        reason="try again",
        expected_version=instance.version,
    )
    # The episode ended with the retry, in its transaction: no stale alert.
    assert not Alert.objects.get(pk=first.pk).is_open
    resolved = TransitionLog.objects.get(instance=instance, transition="alert_resolved")
    assert resolved.data["alert"] == first.pk
    broker.run()  # fails again before any sweep
    assert refresh(instance).state == "needs_attention"
    sweep_all()
    alerts = list(Alert.objects.filter(instance=instance).order_by("id"))
    assert len(alerts) == 2 and alerts[1].is_open
    opened = TransitionLog.objects.filter(
        instance=instance, transition="alert_opened"
    ).order_by("id")
    assert [r.data["alert"] for r in opened] == [first.pk, alerts[1].pk]


# -- 4. a failed pivot does not strand the customer -----------------------------


PIVOTED = [
    {"name": "one"},
    {"name": "two"},
    {"name": "ship", "is_pivot": True, "compensation": ""},
    {"name": "four"},
]


def test_a_pivot_declined_for_good_is_compensated_by_policy(broker):
    make_definition(steps=PIVOTED)
    instance = start(simulate={"ship": "fail"})
    broker.run()
    instance = refresh(instance)
    assert instance.state == "compensated"
    assert not instance.pivot_passed
    effects = ParticipantEffect.objects.filter(instance_id=instance.id, applied=True)
    assert sorted(f"{e.direction}:{e.step_name}" for e in effects) == [
        "action:one",
        "action:two",
        "compensation:one",
        "compensation:two",
    ]


def test_an_uncertain_pivot_offers_retry_and_compensate(broker_no_inline):
    make_definition(
        steps=[
            {"name": "one"},
            {"name": "ship", "is_pivot": True, "compensation": "", "max_attempts": 1},
        ]
    )
    instance = start()
    broker_no_inline.deliver(broker_no_inline.queue.pop(0))  # start
    broker_no_inline.deliver(broker_no_inline.queue.pop(0))  # one
    claim = commands.attempt_claim(*broker_no_inline.queue.pop(0).args, actor=WORKER)
    assert claim is not None and claim.context.step_name == "ship"
    advance_clock(instance, 60)
    sweep_all()  # the pivot's attempt times out: did the shipment go out?
    instance = refresh(instance)
    assert (instance.state, instance.attention_kind) == (
        "needs_attention",
        "pivot_uncertain",
    )
    assert "retry it, or compensate" in instance.attention_reason
    names = {t.name for t in instance.get_available_user_state_transitions(operator())}
    assert {"retry_step", "compensate", "mark_step_done", "close_as_failed"} <= names
    commands.instance_compensate(
        instance.id,
        user=operator(),
        reason="the carrier confirms nothing shipped",
        expected_version=instance.version,
    )
    broker_no_inline.run()
    assert refresh(instance).state == "compensated"


def test_a_failure_after_the_pivot_still_holds_forward_only(broker):
    make_definition(steps=PIVOTED)
    instance = start(simulate={"four": "fail"})
    broker.run()
    instance = refresh(instance)
    assert (instance.state, instance.attention_kind) == (
        "needs_attention",
        "after_pivot",
    )
    with pytest.raises(TransitionRejected):
        commands.instance_compensate(instance.id, user=operator(), reason="undo")


# -- 5. compensate only what may have happened ------------------------------------


def test_a_step_declined_for_good_is_not_compensated(broker):
    make_definition()
    instance = start(simulate={"two": "fail"})
    broker.run()
    two = step(refresh(instance), "two")
    assert (two.state, two.compensation_state) == ("failed", "not_needed")
    skip = TransitionLog.objects.get(step=two, transition="skip_compensation")
    assert "permanent failure" in skip.reason
    assert not ParticipantEffect.objects.filter(
        instance_id=instance.id, step_name="two", direction="compensation"
    ).exists()


def test_a_step_whose_retries_ran_out_is_compensated(broker):
    make_definition(steps=[{"name": "one"}, {"name": "two", "max_attempts": 1}])
    instance = start(simulate={"two": "lose_confirmation"})
    broker.run()
    instance = refresh(instance)
    assert instance.state == "compensated"
    two = step(instance, "two")
    assert (two.state, two.compensation_state) == ("failed", "done")
    # The lost confirmation hid a success: the refund undid it.
    undo = ParticipantEffect.objects.get(
        instance_id=instance.id, step_name="two", direction="compensation"
    )
    assert undo.applied


# -- 7. repaired data is a new call ---------------------------------------------


def test_retry_after_repair_runs_under_a_new_key(broker):
    make_definition(
        steps=[{"name": "one"}, {"name": "two", "max_attempts": 1}],
        failure_policy="hold",
    )
    instance = start(simulate={"two": "fail"})
    broker.run()
    instance = refresh(instance)
    instance_repair_input(
        instance.id,
        user=operator(),
        reason="address corrected",
        new_input={"address": "Main St 1"},
        expected_version=instance.version,
    )
    assert step(instance, "two").data_repaired
    instance = refresh(instance)
    commands.instance_retry_step(
        instance.id, user=operator(), reason="retry", expected_version=instance.version
    )
    broker.run()
    instance = refresh(instance)
    assert instance.state == "completed"
    two = step(instance, "two")
    assert two.run == 2 and not two.data_repaired
    keys = [k[1] for k in two.keys_by_run()]
    assert keys == [f"{instance.id}:two:action", f"{instance.id}:two:action:2"]
    effect = ParticipantEffect.objects.get(
        idempotency_key=f"{instance.id}:two:action:2"
    )
    assert effect.applied


def test_retry_after_repair_undoes_a_call_that_may_have_applied(broker_no_inline):
    make_definition(
        steps=[{"name": "one"}, {"name": "two", "max_attempts": 1}],
        failure_policy="hold",
    )
    instance = start(simulate={"two": "lose_confirmation"})
    broker_no_inline.run()
    instance = refresh(instance)
    assert (instance.state, instance.attention_kind) == (
        "needs_attention",
        "step_failed",
    )
    instance_repair_input(
        instance.id,
        user=operator(),
        reason="amount corrected",
        new_input={"amount": 12},
        expected_version=instance.version,
    )
    instance = refresh(instance)
    commands.instance_retry_step(
        instance.id, user=operator(), reason="retry", expected_version=instance.version
    )
    assert refresh(instance).state == "compensating"
    broker_no_inline.run()
    instance = refresh(instance)
    assert instance.state == "completed"
    applied = ParticipantEffect.objects.filter(
        instance_id=instance.id, step_name="two", applied=True
    ).order_by("first_applied_at")
    assert [e.idempotency_key.split(":", 1)[1] for e in applied] == [
        "two:action",
        "two:compensation",
        "two:action:2",
    ]


def test_retry_after_repair_is_refused_when_the_old_call_cannot_be_undone(broker):
    make_definition(
        steps=[
            {"name": "one"},
            {"name": "two", "max_attempts": 1, "compensation": ""},
        ],
        failure_policy="hold",
    )
    instance = start(simulate={"two": "lose_confirmation"})
    broker.run()
    instance = refresh(instance)
    instance_repair_input(
        instance.id,
        user=operator(),
        reason="amount corrected",
        new_input={"amount": 12},
        expected_version=instance.version,
    )
    instance = refresh(instance)
    with pytest.raises(TransitionRejected, match="could apply twice"):
        commands.instance_retry_step(
            instance.id,
            user=operator(),
            reason="retry",
            expected_version=instance.version,
        )
    assert refresh(instance).state == "needs_attention"


# -- 9. one lock order ------------------------------------------------------------


def test_acknowledge_takes_the_instance_lock_before_the_alert(broker):
    make_definition(steps=[{"name": "one", "max_attempts": 1}], failure_policy="hold")
    instance = start(simulate={"one": "fail"})
    broker.run()
    sweep_all()
    alert = Alert.objects.get(instance=instance)
    user = operator()
    locked, release = threading.Event(), threading.Event()

    def hold_instance() -> None:
        with transaction.atomic():
            WorkflowInstance.objects.select_for_update().get(pk=instance.pk)
            locked.set()
            release.wait(10)
        connection.close()

    def acknowledge() -> None:
        commands.alert_acknowledge(alert.pk, user=user, reason="mine")
        connection.close()

    holder = threading.Thread(target=hold_instance)
    holder.start()
    assert locked.wait(10)
    acker = threading.Thread(target=acknowledge)
    acker.start()
    acker.join(0.5)  # it now waits for the instance lock...
    assert acker.is_alive()
    # ...without holding the alert's: another writer can take it at once.
    with transaction.atomic():
        Alert.objects.select_for_update(nowait=True).get(pk=alert.pk)
    release.set()
    holder.join(10)
    acker.join(10)
    assert Alert.objects.get(pk=alert.pk).acknowledged_at is not None


def test_an_event_after_close_is_noted_and_alerts(broker_no_inline):
    """A step that awaits an event is waiting when its instance is closed;
    the event then reports the effect: a note and an alert, no change."""
    instance, _claim = in_flight_at_deadline(
        broker_no_inline,
        steps=[
            {"name": "one"},
            {
                "name": "two",
                "timeout": ATTEMPT_TIMEOUT,
                "awaits_event": "parcel.shipped",
            },
        ],
    )
    claim = _claim
    # The participant accepted the call: the step waits for the event.
    commands.attempt_record(
        claim.instance_id,
        claim.step_id,
        "action",
        claim.context.attempt,
        SUCCESS,
        actor=WORKER,
    )
    assert step(instance, "two").state == "waiting"
    instance = close(instance)
    before = last_row(instance)
    result = commands.event_ingest(
        "evt-1",
        event_type="parcel.shipped",
        correlation_key=instance.business_key,
        payload={"parcel": "P-1"},
        actor=Actor.event("shipping"),
    )
    assert result.response["completed"] == []
    assert [r.transition for r in rows_after(instance, before)] == [
        "late_outcome_ignored",
        "alert_opened",
    ]
    assert Alert.objects.get(instance=instance, resolved_at__isnull=True).kind == (
        Alert.Kind.LATE_EFFECT
    )
    assert state_changes_after_outcome(instance) == []


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("reason", "nul \x00 inside"),
        ("reason", "lone \ud800"),
        ("output", {"a": float("nan")}),
    ],
)
def test_the_engine_refuses_what_postgres_cannot_store(broker, field, value):
    """Pages and the API validate first; the engine refuses on its own too,
    whatever calls it, before anything is written."""
    make_definition(steps=[{"name": "one", "max_attempts": 1}], failure_policy="hold")
    instance = refresh(start(simulate={"one": "fail"}))
    broker.run()
    instance = refresh(instance)
    before = last_row(instance)
    kwargs = {"reason": "done by hand", "output": {"ok": True}, field: value}
    with pytest.raises(InvalidInput):
        commands.instance_mark_step_done(
            instance.id, user=operator(), expected_version=instance.version, **kwargs
        )
    assert rows_after(instance, before) == []


def test_re_sends_of_unclaimed_work_back_off(broker_no_inline, settings):
    """A message stuck behind a backlog is re-sent after SAGA_REDISPATCH_AFTER,
    then after twice that, and so on: copies do not pile up behind it."""
    settings.SAGA_REDISPATCH_AFTER = 30
    make_definition()
    instance = start()
    broker_no_inline.deliver(broker_no_inline.queue.pop(0))  # schedules step one
    broker_no_inline.queue.clear()  # its message waits in a long queue
    sent = []
    for _ in range(8):
        advance_clock(instance, 31)
        sent.append(sweep_all()["redispatched_steps"])
    # Due after 30 s, then 60 s, then 120 s (31 s per round).
    assert sent == [1, 0, 1, 0, 0, 0, 1, 0]
    broker_no_inline.queue.clear()
    # Claimed at last: the next send starts from the short interval again.
    assert step(instance, "one").redispatches == 3
