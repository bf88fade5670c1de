"""The saga invariant checker catches what it claims to catch.

Each test takes a real history recorded by the engine, checks that it passes,
then breaks it the way a buggy engine or participant would and expects the
named rule to fire, so the property test cannot pass vacuously.
"""

from __future__ import annotations

import dataclasses
from datetime import timedelta

import pytest

from tests.saga_invariant import (
    Effect,
    Recorded,
    Row,
    StepColumns,
    check_history,
    load,
)
from tests.support import advance_clock, make_definition, start, user_in
from workflows_app.demo.activities import perform_action
from workflows_app.engine import sweeps
from workflows_app.engine.actors import Actor
from workflows_app.engine.commands import (
    Outcome,
    attempt_claim,
    attempt_record,
    instance_close_as_failed,
    instance_resume,
    instance_retry_step,
)
from workflows_app.engine.commands.repair import instance_repair_input
from workflows_app.models import TransitionLog, WorkflowInstance

pytestmark = pytest.mark.django_db(transaction=True)
WORKER = Actor.worker("checker-worker")


def compensated(broker) -> Recorded:
    """one, two succeed; three fails for good; all three are undone (T3 never
    applied, so C3 is a no-op): the word is T1 T2 C2 C1."""
    make_definition()
    instance = start(simulate={"three": "fail"})
    broker.run()
    recorded = load(instance)
    assert recorded.persisted is not None
    assert recorded.persisted.state == "compensated"
    check_history(recorded, quiescent=True)
    return recorded


def completed(broker) -> Recorded:
    make_definition()
    instance = start()
    broker.run()
    recorded = load(instance)
    check_history(recorded, quiescent=True)
    return recorded


def violations(recorded: Recorded, *, quiescent: bool = True) -> str:
    with pytest.raises(AssertionError) as caught:
        check_history(recorded, quiescent=quiescent)
    return str(caught.value)


def comp_rows(recorded: Recorded, position: int) -> list[Row]:
    return [
        r
        for r in recorded.rows
        if r.position == position and r.field == "compensation_state"
    ]


def effect(recorded: Recorded, step: str, direction: str) -> Effect:
    return next(
        e for e in recorded.ledger if e.step_name == step and e.direction == direction
    )


def test_compensation_out_of_order_is_caught(broker):
    recorded = compensated(broker)
    one, two = comp_rows(recorded, 1), comp_rows(recorded, 2)
    rest = [r for r in recorded.rows if r not in one and r not in two]
    finish = next(
        i for i, r in enumerate(rest) if r.transition == "finish_compensation"
    )
    # C1 before C2, in the history and in the ledger.
    rows = rest[:finish] + one + two + rest[finish:]
    recorded.rows = [dataclasses.replace(r, seq=i) for i, r in enumerate(rows, 1)]
    c1, c2 = (
        effect(recorded, "one", "compensation"),
        effect(recorded, "two", "compensation"),
    )
    recorded.ledger = [
        e
        if e not in (c1, c2)
        else dataclasses.replace(
            e, first_applied_at=(c2 if e is c1 else c1).first_applied_at
        )
        for e in recorded.ledger
    ]
    report = violations(recorded, quiescent=False)
    assert "S7" in report
    assert "S1" not in report  # still a legal path per step
    assert "G: compensated with word ['T1', 'T2', 'C1', 'C2']" in violations(recorded)


def test_double_effect_is_caught(broker):
    recorded = completed(broker)
    t2 = effect(recorded, "two", "action")
    # A second applied effect for the same step under another key: the engine
    # did not pass a stable idempotency key.
    recorded.ledger.append(dataclasses.replace(t2, key=t2.key + "#2", order=999))
    report = violations(recorded, quiescent=False)
    assert "S5" in report and "effT=2" in report


def test_compensated_with_an_uncompensated_started_step_is_caught(broker):
    recorded = compensated(broker)
    two = comp_rows(recorded, 2)
    skip = dataclasses.replace(
        two[0], source="none", target="not_needed", transition="skip_compensation"
    )
    recorded.rows = [
        skip if r is two[0] else r for r in recorded.rows if r not in two[1:]
    ]
    recorded.ledger = [
        e
        for e in recorded.ledger
        if (e.step_name, e.direction) != ("two", "compensation")
    ]
    report = violations(recorded)
    assert "S6" in report  # the undo of a started step was skipped
    assert "S8" in report  # ... and the instance still claimed COMPENSATED
    assert "G: compensated with word ['T1', 'T2', 'C1']" in report


def test_effect_from_nowhere_and_late_forward_effect_are_caught(broker):
    recorded = compensated(broker)
    # Three was declined for good: nothing to undo, no call to its undo.
    assert "three" not in {e.step_name for e in recorded.ledger}
    c2 = effect(recorded, "two", "compensation")
    t2 = effect(recorded, "two", "action")
    t3 = dataclasses.replace(
        t2,
        step_name="three",
        key=t2.key.replace(":two:", ":three:"),
        calls=2,
        first_applied_at=c2.first_applied_at,
        order=999,
    )
    recorded.ledger = [
        dataclasses.replace(
            e, first_applied_at=c2.first_applied_at + timedelta(seconds=1)
        )
        if e is t2
        else e
        for e in recorded.ledger
    ] + [t3]
    report = violations(recorded)
    assert "S12" in report and "T applied after its compensation" in report
    assert "step 3: 2 forward calls (effT=1) from 1 STEP_STARTED" in report
    assert "G: compensated with word" in report


def test_outcome_for_a_stale_attempt_is_caught(broker):
    recorded = completed(broker)
    succeed = next(r for r in recorded.rows if r.transition == "succeed")
    stale = dataclasses.replace(succeed, data={**succeed.data, "attempt": 7})
    recorded.rows = [stale if r is succeed else r for r in recorded.rows]
    assert "S4" in violations(recorded, quiescent=False)


def test_illegal_transition_and_replay_mismatch_are_caught(broker):
    recorded = completed(broker)
    complete = recorded.rows[-1]
    assert complete.transition == "complete"
    # A forward step started after the outcome, from a state it is not in.
    late = dataclasses.replace(
        recorded.rows[3], seq=complete.seq + 1, data={"attempt": 2}
    )
    recorded.rows = [*recorded.rows, late]
    report = violations(recorded, quiescent=False)
    assert "S1" in report and "S2" in report
    recorded.rows = recorded.rows[:-1]
    assert recorded.persisted is not None
    recorded.persisted.steps[1] = StepColumns("running", "none", 1, 0)  # type: ignore[index]
    assert "S1" in violations(recorded)


def test_schedule_out_of_order_and_completed_early_are_caught(broker):
    recorded = completed(broker)
    # Step three scheduled before step two succeeded; complete without step three.
    schedule3 = next(
        r for r in recorded.rows if r.position == 3 and r.transition == "schedule"
    )
    rows = [r for r in recorded.rows if r.position != 3]
    at = next(i for i, r in enumerate(rows) if r.position == 2)
    rows.insert(at, schedule3)
    recorded.rows = rows
    report = violations(recorded, quiescent=False)
    assert "S3" in report and "S9" in report
    assert "S12" in report  # T3 applied but never started


def test_manual_action_without_a_user_is_caught(broker):
    make_definition(steps=[{"name": "one", "max_attempts": 1}], failure_policy="hold")
    instance = start(simulate={"one": "fail_once"})
    broker.run()
    instance_retry_step(instance.id, user=user_in("operator"), reason="try again")
    broker.run()
    recorded = load(instance)
    check_history(recorded, quiescent=True)
    manual = next(r for r in recorded.rows if r.transition == "retry_step")
    anonymous = dataclasses.replace(manual, user_id=None)
    recorded.rows = [anonymous if r is manual else r for r in recorded.rows]
    assert "S10" in violations(recorded, quiescent=False)


def test_completed_without_an_effect_and_a_second_alert_are_caught(broker):
    recorded = completed(broker)
    ledger = recorded.ledger
    recorded.ledger = [
        e for e in ledger if (e.step_name, e.direction) != ("three", "action")
    ]
    report = violations(recorded)
    assert "G: completed with word ['T1', 'T2']" in report
    assert "STEP_SUCCEEDED(3) but effT=0" in report
    recorded.ledger = ledger
    last = recorded.rows[-1]
    alert = dataclasses.replace(
        last, field="", source="", target="", transition="alert_opened"
    )
    recorded.rows = [
        *recorded.rows,
        dataclasses.replace(alert, seq=last.seq + 1),
        dataclasses.replace(alert, seq=last.seq + 2),
    ]
    assert "L1" in violations(recorded, quiescent=False)


# -- issue 13: closed means closed, mayApply, the pivot, repaired retries ----------

OPERATOR_REASON = "checked with the participant"


def held_with_an_attempt_in_flight(broker_no_inline, **step: object):
    """One step, a one-second workflow deadline: the sweeper holds the
    instance while a worker's attempt is claimed and not yet recorded."""
    make_definition(
        steps=[{"name": "one", **step}],
        failure_policy="hold",
        deadline=timedelta(seconds=1),
    )
    instance = start()
    # The start: step one is scheduled; its message is taken by the claim below.
    broker_no_inline.deliver(broker_no_inline.queue.pop(0))
    broker_no_inline.queue.clear()
    step_id = instance.steps.get().id
    claim = attempt_claim(instance.id, step_id, "action", actor=WORKER)
    assert claim is not None
    advance_clock(instance, 2)  # past the deadline, not past the step timeout
    sweeps.sweep_all()
    assert WorkflowInstance.objects.get(pk=instance.pk).state == "needs_attention"
    return instance, claim


def closed_with_a_late_effect(broker_no_inline) -> Recorded:
    """Closed as failed while the attempt was in flight; the worker then
    applies the effect and reports it: noted, and a late-effect alert."""
    instance, claim = held_with_an_attempt_in_flight(broker_no_inline)
    operator = user_in("operator")
    instance_close_as_failed(instance.id, user=operator, reason=OPERATOR_REASON)
    output = perform_action(claim.context, "generic")
    recorded_now = attempt_record(
        instance.id,
        claim.step_id,
        "action",
        claim.context.attempt,
        Outcome("succeeded", output=output),
        actor=WORKER,
    )
    assert not recorded_now
    recorded = load(instance)
    assert recorded.persisted is not None
    assert recorded.persisted.state == "failed"
    check_history(recorded, quiescent=True)
    return recorded


def row_named(recorded: Recorded, transition: str, **data: object) -> Row:
    return next(
        r
        for r in recorded.rows
        if r.transition == transition
        and all(r.data.get(k) == v for k, v in data.items())
    )


def renumbered(rows: list[Row]) -> list[Row]:
    return [dataclasses.replace(r, seq=i) for i, r in enumerate(rows, 1)]


def test_a_state_change_after_close_as_failed_is_caught(broker_no_inline):
    recorded = closed_with_a_late_effect(broker_no_inline)
    fence = row_named(recorded, "time_out", abandoned=True)
    assert recorded.rows.index(fence) < recorded.rows.index(
        row_named(recorded, "close_as_failed")
    )
    # The late outcome applied after all: unknown -> retrying after the close.
    late = dataclasses.replace(
        fence,
        seq=recorded.rows[-1].seq + 1,
        source="unknown",
        target="retrying",
        transition="retry",
        data={"attempt": fence.data["attempt"]},
    )
    recorded.rows = [*recorded.rows, late]
    report = violations(recorded, quiescent=False)
    assert "S2" in report and "state changed after the outcome failed" in report


def test_close_as_failed_without_its_fence_is_caught(broker_no_inline):
    recorded = closed_with_a_late_effect(broker_no_inline)
    fence = row_named(recorded, "time_out", abandoned=True)
    close = row_named(recorded, "close_as_failed")
    # The fence after the close, as if the close had left the attempt open.
    rows = [r for r in recorded.rows if r is not fence]
    rows.insert(rows.index(close) + 1, fence)
    recorded.rows = renumbered(rows)
    report = violations(recorded, quiescent=False)
    assert "S2" in report and "closed with open work: {1: ('running'" in report


def test_a_late_effect_without_its_alert_is_caught(broker_no_inline):
    recorded = closed_with_a_late_effect(broker_no_inline)
    late = row_named(recorded, "late_outcome_ignored", outcome="succeeded")
    alert = row_named(recorded, "alert_opened", kind="late_effect")
    assert late.seq < alert.seq
    recorded.rows = [r for r in recorded.rows if r is not alert]
    report = violations(recorded, quiescent=False)
    assert "an effect reported after the close without an alert" in report
    # A late-effect alert that ends without a person (the sweeper resolved it).
    recorded.rows = [
        *recorded.rows,
        alert,
        dataclasses.replace(
            alert,
            seq=alert.seq + 1000,
            transition="alert_resolved",
            data={"alert": alert.data.get("alert")},
        ),
    ]
    report = violations(recorded, quiescent=False)
    assert "a late-effect alert ended without a person" in report


def test_a_late_outcome_note_before_the_outcome_is_caught(broker_no_inline):
    recorded = closed_with_a_late_effect(broker_no_inline)
    late = row_named(recorded, "late_outcome_ignored")
    rows = [r for r in recorded.rows if r is not late]
    rows.insert(2, late)
    recorded.rows = renumbered(rows)
    assert "a late outcome before the instance's outcome" in violations(
        recorded, quiescent=False
    )


def test_a_hold_keeps_the_retry_budget(broker_no_inline):
    """A retryable failure recorded while held is retried (parked), and runs
    after Resume: a legal history. The same retry while compensating is not."""
    instance, claim = held_with_an_attempt_in_flight(broker_no_inline)
    assert attempt_record(
        instance.id,
        claim.step_id,
        "action",
        claim.context.attempt,
        Outcome("failed", error_message="the participant is unavailable"),
        actor=WORKER,
    )
    retry = TransitionLog.objects.get(instance_id=instance.id, transition="retry")
    assert retry.data.get("parked") is True
    instance_resume(instance.id, user=user_in("operator"), reason=OPERATOR_REASON)
    broker_no_inline.run()
    recorded = load(instance)
    assert recorded.persisted is not None
    assert recorded.persisted.state == "completed"
    check_history(recorded, quiescent=True)
    # The same row while the instance is compensating: an action failure is
    # final then.
    held = row_named(recorded, "hold")
    recorded.rows = [
        dataclasses.replace(r, target="compensating", transition="compensate")
        if r is held
        else r
        for r in recorded.rows
    ]
    assert "an action retried while compensating" in violations(
        recorded, quiescent=False
    )


def test_compensating_a_permanently_declined_step_is_caught(broker):
    recorded = compensated(broker)
    fail = next(r for r in recorded.rows if r.position == 3 and r.transition == "fail")
    assert fail.data.get("permanent") is True
    skip = comp_rows(recorded, 3)[0]
    assert skip.transition == "skip_compensation"
    require = dataclasses.replace(
        skip, target="pending", transition="require_compensation"
    )
    recorded.rows = [require if r is skip else r for r in recorded.rows]
    report = violations(recorded, quiescent=False)
    assert "S6" in report and "step 3's last answer was a permanent failure" in report


def test_skipping_the_undo_of_a_retryably_failed_step_is_caught(broker):
    """Out of attempts on retryable errors: it may have applied, so it is
    compensated; skipping that undo is caught (S6, S8)."""
    make_definition(steps=[{"name": "one"}, {"name": "two", "max_attempts": 1}])
    instance = start(simulate={"two": "fail_once"})
    broker.run()
    recorded = load(instance)
    check_history(recorded, quiescent=True)
    two = comp_rows(recorded, 2)
    assert [r.transition for r in two][-1] == "compensation_succeed"
    skip = dataclasses.replace(
        two[0], source="none", target="not_needed", transition="skip_compensation"
    )
    recorded.rows = [
        skip if r is two[0] else r for r in recorded.rows if r not in two[1:]
    ]
    report = violations(recorded, quiescent=False)
    assert "S6 " in report and "step 2 may have applied; its undo skipped" in report
    assert "step 2 may have applied but has no COMP_SUCCEEDED" in report


def pivot_declined(broker) -> Recorded:
    """The pivot declined for good: a failure before the pivot, compensated."""
    make_definition(steps=[{"name": "one"}, {"name": "two", "is_pivot": True}])
    instance = start(simulate={"two": "fail"})
    broker.run()
    recorded = load(instance)
    assert recorded.persisted is not None
    assert recorded.persisted.state == "compensated"
    check_history(recorded, quiescent=True)
    return recorded


def test_the_engine_compensating_past_a_pivot_that_may_apply_is_caught(broker):
    recorded = pivot_declined(broker)
    fail = next(r for r in recorded.rows if r.position == 2 and r.transition == "fail")
    # Out of attempts instead of declined: the pivot may have applied.
    maybe = dataclasses.replace(fail, data={**fail.data, "permanent": False})
    recorded.rows = [maybe if r is fail else r for r in recorded.rows]
    report = violations(recorded, quiescent=False)
    assert "the engine compensates although the pivot may apply" in report


def test_compensating_past_a_succeeded_pivot_is_caught(broker):
    recorded = pivot_declined(broker)
    rows = recorded.rows
    fail = next(r for r in rows if r.position == 2 and r.transition == "fail")
    succeed = dataclasses.replace(fail, target="succeeded", transition="succeed")
    begin = row_named(recorded, "begin_compensation")
    operator = dataclasses.replace(
        begin,
        source="needs_attention",
        transition="compensate",
        actor_kind="operator",
        user_id=1,
    )
    hold = dataclasses.replace(
        begin, target="needs_attention", transition="hold", reason="deadline"
    )
    rows = [succeed if r is fail else r for r in rows]
    at = rows.index(begin)
    rows[at : at + 1] = [hold, operator]
    recorded.rows = renumbered(rows)
    report = violations(recorded, quiescent=False)
    assert "compensating past a succeeded pivot" in report
    assert "S8" in report and "the pivot 2 is done" in report


def repaired(broker, simulate: str) -> Recorded:
    """Step two fails (``simulate``), the operator repairs the input and
    retries: a new run of step two, which completes."""
    make_definition(
        steps=[{"name": "one"}, {"name": "two", "max_attempts": 1}],
        failure_policy="hold",
    )
    instance = start(simulate={"two": simulate})
    broker.run()
    operator = user_in("operator")
    instance_repair_input(
        instance.id, user=operator, reason=OPERATOR_REASON, new_input={"fixed": 1}
    )
    instance_retry_step(instance.id, user=operator, reason=OPERATOR_REASON)
    broker.run()
    recorded = load(instance)
    assert recorded.persisted is not None
    assert recorded.persisted.state == "completed"
    assert recorded.persisted.steps[2].run == 2  # type: ignore[index]
    check_history(recorded, quiescent=True)
    return recorded


def test_a_repaired_retry_of_a_step_that_may_have_applied_is_undone_first(broker):
    recorded = repaired(broker, "fail_once")  # out of attempts: may have applied
    ask = row_named(recorded, "retry_repaired_step")
    assert ask.data["step"] == "two"
    rows = recorded.rows
    # Undone from another step than the blocked one.
    recorded.rows = [
        dataclasses.replace(r, data={**r.data, "step": "one"}) if r is ask else r
        for r in rows
    ]
    assert "step 1 is not the blocked step" in violations(recorded, quiescent=False)
    # Run again without the undo.
    recorded.rows = [
        r for r in rows if not (r.position == 2 and r.field == "compensation_state")
    ]
    report = violations(recorded, quiescent=False)
    assert "S7" in report and "step 2 runs again before it is undone" in report


def test_a_repaired_retry_of_a_declined_step_runs_at_once(broker):
    recorded = repaired(broker, "fail")  # declined for good: nothing applied
    assert not [r for r in recorded.rows if r.transition == "retry_repaired_step"]
    fail = next(r for r in recorded.rows if r.position == 2 and r.transition == "fail")
    maybe = dataclasses.replace(fail, data={**fail.data, "permanent": False})
    recorded.rows = [maybe if r is fail else r for r in recorded.rows]
    report = violations(recorded, quiescent=False)
    assert "S7" in report and "step 2 may have applied: a new run twice" in report


def test_a_history_row_naming_another_instances_step_is_caught(broker):
    """The timeline's step key has no database constraint (migration 0033):
    the checker's reading of the history refuses a row whose step belongs
    to another instance."""
    make_definition()
    first, second = start(business_key="first"), start(business_key="second")
    broker.run()
    load(first)
    other_step = second.steps.order_by("position").first()
    row = TransitionLog.objects.filter(instance=first, step__isnull=False).first()
    TransitionLog.objects.filter(pk=row.pk).update(step=other_step)
    with pytest.raises(AssertionError, match=f"history rows \\[{row.pk}\\] name no"):
        load(first)
