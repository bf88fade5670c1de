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
from tests.support import make_definition, start, user_in
from workflows_app.engine.commands import instance_retry_step

pytestmark = pytest.mark.django_db(transaction=True)


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
    t3 = effect(recorded, "three", "action")
    c2 = effect(recorded, "two", "compensation")
    t2 = effect(recorded, "two", "action")
    recorded.ledger = [
        dataclasses.replace(t3, applied=True, first_applied_at=c2.first_applied_at)
        if e is t3
        else dataclasses.replace(
            e, first_applied_at=c2.first_applied_at + timedelta(seconds=1)
        )
        if e is t2
        else e
        for e in recorded.ledger
    ]
    report = violations(recorded)
    assert "S12" in report and "T applied after its compensation" in report
    assert "COMP_SUCCEEDED(3) but effT=1 effC=0" in report


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
