"""Engine commands end to end with the in-memory transport: starting,
retries, timeouts, holds, operator actions, the sweeper."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from django.db import connection

from tests.support import advance_clock, make_definition, start, user_in
from workflows_app.demo.models import ParticipantEffect
from workflows_app.engine import commands
from workflows_app.engine.actors import Actor
from workflows_app.engine.errors import (
    DefinitionNotFound,
    IdempotencyConflict,
    InvalidInput,
    NotPermitted,
    TransitionRejected,
)
from workflows_app.engine.sweeps import sweep_all
from workflows_app.models import (
    StepExecution,
    TransitionLog,
    WorkflowInstance,
)

pytestmark = pytest.mark.django_db(transaction=True)
API = Actor.api("test")


def states(instance: WorkflowInstance) -> list[tuple[str, str]]:
    return [
        (s.state, s.compensation_state) for s in instance.steps.order_by("position")
    ]


def applied(instance: WorkflowInstance) -> list[str]:
    rows = ParticipantEffect.objects.filter(instance_id=instance.id, applied=True)
    return [
        f"{'T' if r.direction == 'action' else 'C'}:{r.step_name}"
        for r in rows.order_by("first_applied_at", "id")
    ]


# -- starting -------------------------------------------------------------------


def test_start_is_idempotent_per_key(broker):
    make_definition()
    first = commands.instance_start(
        "wf", business_key="o-1", input={"a": 1}, idempotency_key="k1", actor=API
    )
    again = commands.instance_start(
        "wf", business_key="o-1", input={"a": 1}, idempotency_key="k1", actor=API
    )
    assert first.created and not again.created
    assert again.instance.id == first.instance.id
    with pytest.raises(IdempotencyConflict, match="different input"):
        commands.instance_start(
            "wf", business_key="o-1", input={"a": 2}, idempotency_key="k1", actor=API
        )
    assert WorkflowInstance.objects.count() == 1
    assert len(broker.queue) == 1  # one start message, for the one instance


def test_concurrent_identical_starts_create_one_instance(broker):
    make_definition()
    barrier = threading.Barrier(8)
    results, errors = [], []

    def go() -> None:
        try:
            barrier.wait()
            results.append(
                commands.instance_start(
                    "wf",
                    business_key="o-1",
                    input={"x": 1},
                    idempotency_key="same",
                    actor=API,
                )
            )
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=go) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert WorkflowInstance.objects.count() == 1
    assert sum(r.created for r in results) == 1
    assert len({r.instance.id for r in results}) == 1


@pytest.mark.parametrize(
    ("key", "business_key", "data", "error"),
    [
        ("nope", "o-1", {}, DefinitionNotFound),
        ("wf", "", {}, InvalidInput),
        ("wf", "x" * 201, {}, InvalidInput),
        ("wf", "o-1", ["not", "an", "object"], InvalidInput),
        ("wf", "o-1", {"bad": {1, 2}}, InvalidInput),
    ],
)
def test_bad_start_creates_nothing(broker, key, business_key, data, error):
    make_definition()
    with pytest.raises(error):
        commands.instance_start(key, business_key=business_key, input=data, actor=API)
    assert WorkflowInstance.objects.count() == 0
    assert TransitionLog.objects.count() == 0
    assert broker.queue == []


def test_draft_definitions_cannot_be_started(broker):
    make_definition(publish=False)
    with pytest.raises(DefinitionNotFound):
        start()


def test_new_version_leaves_running_instances_pinned(broker):
    v1 = make_definition()
    old = start()
    v2 = v1.new_draft()
    v2.publish()
    new = start(business_key="o-2")
    broker.run()
    old.refresh_from_db()
    assert (old.definition_id, new.definition_id) == (v1.id, v2.id)
    assert old.state == "completed"
    assert {s.step_definition.definition_id for s in old.steps.all()} == {v1.id}


# -- retries, timeouts, failure policies -------------------------------------


def test_fail_once_is_retried(broker):
    make_definition()
    instance = start(simulate={"two": "fail_once"})
    broker.run()
    instance.refresh_from_db()
    assert instance.state == "completed"
    assert instance.steps.get(name="two").attempt == 2
    assert applied(instance) == ["T:one", "T:two", "T:three"]


def test_permanent_error_stops_retrying_at_once(broker):
    make_definition()
    instance = start(simulate={"two": "fail"})
    broker.run()
    instance.refresh_from_db()
    assert instance.state == "compensated"
    assert instance.steps.get(name="two").attempt == 1
    assert applied(instance) == ["T:one", "C:one"]


def test_attempts_are_capped(broker):
    make_definition(
        steps=[{"name": "one", "action": "demo.step", "max_attempts": 2}],
        failure_policy="hold",
    )
    instance = start(simulate={"one": ["fail_once", "lose_confirmation"]})
    broker.run()
    instance.refresh_from_db()
    # Attempt 1 fails (fail_once), attempt 2 applies: completed within the cap.
    assert instance.state == "completed"


def test_lose_confirmation_applies_once(broker):
    make_definition()
    instance = start(simulate={"two": "lose_confirmation"})
    broker.run()
    instance.refresh_from_db()
    assert instance.state == "completed"
    effect = ParticipantEffect.objects.get(idempotency_key=f"{instance.id}:two:action")
    assert (effect.applied, effect.calls) == (True, 2)


def test_hold_policy_waits_for_an_operator_then_retry_completes(broker):
    make_definition(failure_policy="hold")
    instance = start(simulate={"two": "fail_once"})
    StepExecution.objects.filter(instance=instance).update(attempts_allowed=1)
    broker.run()
    instance.refresh_from_db()
    assert instance.state == "needs_attention"
    assert instance.attention_kind == "step_failed"
    assert instance.stuck and "two" in instance.stuck_reason

    operator = user_in("operator")
    commands.instance_retry_step(
        instance.id,
        user=operator,
        reason="payments is back",
        expected_version=instance.version,
    )
    broker.run()
    instance.refresh_from_db()
    assert instance.state == "completed"
    assert not instance.stuck
    row = TransitionLog.objects.get(instance=instance, transition="retry_step")
    assert (row.user, row.reason, row.actor_kind) == (
        operator,
        "payments is back",
        "operator",
    )


def test_viewer_cannot_act(broker):
    make_definition(failure_policy="hold")
    instance = start(simulate={"one": "fail"})
    broker.run()
    instance.refresh_from_db()
    with pytest.raises(NotPermitted):
        commands.instance_retry_step(instance.id, user=user_in("viewer"), reason="try")
    with pytest.raises(InvalidInput, match="reason"):
        commands.instance_retry_step(instance.id, user=user_in("operator"), reason=" ")
    assert WorkflowInstance.objects.get(pk=instance.pk).version == instance.version


def test_timeout_with_retry_allowed_is_retried_by_the_sweeper(broker):
    make_definition(steps=[{"name": "one", "retry_on_timeout": True}, {"name": "two"}])
    instance = start()
    broker.queue.clear()
    commands.instance_advance(instance.id, actor=API)
    message = broker.queue.pop()
    # The worker claims the attempt and then vanishes (killed mid-activity).
    claim = commands.attempt_claim(*message.args, actor=Actor.worker("doomed"))
    assert claim is not None
    broker.run()  # the redelivered message finds the attempt running: no-op
    assert sweep_all()["timeouts"] == 0  # not yet due
    advance_clock(instance, 60)
    assert sweep_all()["timeouts"] == 1
    broker.run()
    instance.refresh_from_db()
    assert instance.state == "completed"
    one = instance.steps.get(name="one")
    assert list(one.attempts.values_list("outcome", flat=True).order_by("number")) == [
        "timed_out",
        "succeeded",
    ]
    # The dead worker's late result is fenced off.
    assert not commands.attempt_record(
        instance.id, one.id, "action", 1, commands.Outcome("succeeded"), actor=API
    )
    assert (
        TransitionLog.objects.filter(
            instance=instance, transition="stale_outcome_ignored"
        ).count()
        == 1
    )


def test_timeout_without_retry_is_held_as_unknown_then_marked_done(broker):
    make_definition()
    instance = start()
    commands.instance_advance(instance.id, actor=API)
    broker.queue.clear()
    step = instance.steps.get(name="one")
    commands.attempt_claim(instance.id, step.id, "action", actor=API)
    advance_clock(instance, 60)
    sweep_all()
    instance.refresh_from_db()
    assert instance.state == "needs_attention"
    assert instance.attention_kind == "step_unknown"
    commands.instance_mark_step_done(
        instance.id,
        user=user_in("operator"),
        reason="checked by hand",
        output={"ref": "manual"},
    )
    broker.run()
    instance.refresh_from_db()
    assert instance.state == "completed"
    assert instance.outputs["one"] == {"ref": "manual"}
    assert states(instance)[0] == ("skipped", "none")


def test_lost_message_is_redispatched(broker_no_inline):
    broker = broker_no_inline
    make_definition()
    instance = start()
    broker.queue.clear()  # the start message is lost
    assert sweep_all()["redispatched_instances"] == 0
    advance_clock(instance, 60)
    assert sweep_all()["redispatched_instances"] == 1
    assert sweep_all()["redispatched_instances"] == 0  # claimed: not sent twice
    broker.deliver(broker.queue.pop(0))  # starts and schedules step one...
    broker.queue.clear()  # ...whose message is lost too
    advance_clock(instance, 60)
    assert sweep_all()["redispatched_steps"] == 1
    broker.run()
    instance.refresh_from_db()
    assert instance.state == "completed"


def test_compensation_failure_holds_then_retry_compensation_finishes(broker):
    make_definition()
    instance = start(simulate={"one": "fail_compensation", "two": "fail"})
    broker.run()
    instance.refresh_from_db()
    assert instance.state == "needs_attention"
    assert instance.attention_kind == "compensation_failed"
    assert states(instance) == [
        ("succeeded", "failed"),
        ("failed", "not_needed"),  # declined for good: nothing to undo
        ("pending", "not_needed"),
    ]
    # Heal the participant, then retry the compensation.
    WorkflowInstance.objects.filter(pk=instance.pk).update(input={})
    commands.instance_retry_compensation(
        instance.id, user=user_in("operator"), reason="inventory fixed"
    )
    broker.run()
    instance.refresh_from_db()
    assert instance.state == "compensated"
    assert applied(instance) == ["T:one", "C:one"]


def test_failure_after_pivot_is_held_and_cannot_be_compensated(broker):
    make_definition(
        steps=[{"name": "one"}, {"name": "two", "is_pivot": True}, {"name": "three"}]
    )
    instance = start(simulate={"three": "fail"})
    broker.run()
    instance.refresh_from_db()
    assert (instance.state, instance.attention_kind) == (
        "needs_attention",
        "after_pivot",
    )
    with pytest.raises(TransitionRejected):
        commands.instance_compensate(
            instance.id, user=user_in("operator"), reason="undo"
        )
    commands.instance_close_as_failed(
        instance.id, user=user_in("operator", "op2"), reason="refund by hand"
    )
    instance.refresh_from_db()
    assert instance.state == "failed"


def test_cancel_accepted_ends_at_once(broker):
    make_definition()
    instance = start()
    commands.instance_cancel(
        instance.id, user=user_in("operator"), reason="customer asked"
    )
    broker.run()
    instance.refresh_from_db()
    assert instance.state == "cancelled"
    assert applied(instance) == []


def test_cancel_with_a_step_in_flight_waits_for_it_then_compensates(broker):
    make_definition()
    instance = start()
    commands.instance_advance(instance.id, actor=API)
    message = broker.queue.pop()
    broker.queue.clear()
    claim = commands.attempt_claim(*message.args, actor=API)  # step one in flight
    commands.instance_cancel(instance.id, user=user_in("operator"), reason="stop")
    instance.refresh_from_db()
    assert instance.state == "compensating"
    assert broker.queue == []  # nothing compensated while the action may still apply
    # The in-flight call finishes and applies its effect.
    from workflows_app.activities.runner import call_activity

    outcome = call_activity(claim)
    commands.attempt_record(
        instance.id, claim_step(instance, "one"), "action", 1, outcome, actor=API
    )
    broker.run()
    instance.refresh_from_db()
    assert instance.state == "compensated"
    assert applied(instance) == ["T:one", "C:one"]


def claim_step(instance: WorkflowInstance, name: str) -> int:
    return instance.steps.get(name=name).id


def test_deadline_holds_then_resume_continues(broker):
    make_definition(deadline=timedelta(minutes=5))
    instance = start()
    commands.instance_advance(instance.id, actor=API)
    broker.queue.clear()
    advance_clock(instance, 600)
    sweep_all()
    instance.refresh_from_db()
    assert (instance.state, instance.attention_kind) == ("needs_attention", "deadline")
    commands.instance_resume(
        instance.id, user=user_in("operator"), reason="late is fine"
    )
    advance_clock(instance, 60)
    sweep_all()
    broker.run()
    instance.refresh_from_db()
    assert instance.state == "completed"


def test_one_at_a_time_work_past_the_budget_waits_for_the_next_sweep(broker, settings):
    """Deadline holds (an engine command each) stop at the sweep's budget
    once the kind's turn is done; what is left stays due, and the kind is
    counted as cut short."""
    settings.SAGA_SWEEP_SECONDS = 0
    settings.SAGA_SWEEP_MIN_ACTS = 2
    make_definition(deadline=timedelta(minutes=5))
    instances = [start(business_key=f"late-{n}") for n in range(3)]
    for instance in instances:
        commands.instance_advance(instance.id, actor=API)
        advance_clock(instance, 600)
    broker.queue.clear()
    first = sweep_all()
    assert first["deadlines"] == 2 and first["cut_short"] >= 1
    second = sweep_all()
    assert second["deadlines"] == 1
    states = {
        i.state
        for i in WorkflowInstance.objects.filter(pk__in=[i.pk for i in instances])
    }
    assert states == {"needs_attention"}


def test_stuck_is_flagged_once_and_cleared_by_progress(broker):
    make_definition(stuck_after=timedelta(minutes=1))
    instance = start()
    advance_clock(instance, 120)
    counts = sweep_all()
    assert counts["stuck"] == 1
    assert sweep_all()["stuck"] == 0  # one flag per episode
    instance.refresh_from_db()
    # Written by the UPDATE itself, as Python would write it.
    assert instance.stuck and instance.stuck_reason == (
        f"no progress since {instance.last_progress_at:%Y-%m-%d %H:%M:%S} UTC "
        f"while {instance.state}"
    )
    broker.run()
    instance.refresh_from_db()
    assert instance.state == "completed" and not instance.stuck


def test_worker_continues_inline_without_the_broker(broker):
    make_definition()
    instance = start()
    assert broker.run() == 1  # the start message only: the worker ran every step
    instance.refresh_from_db()
    assert instance.state == "completed"


def test_reusing_a_key_for_another_business_key_is_a_conflict(broker):
    make_definition()
    commands.instance_start(
        "wf", business_key="o-1", input={}, idempotency_key="k", actor=API
    )
    with pytest.raises(IdempotencyConflict):
        commands.instance_start(
            "wf", business_key="o-2", input={}, idempotency_key="k", actor=API
        )
