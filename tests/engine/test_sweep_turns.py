"""One sweep shares its time between the kinds of sweeper work: every kind
has a turn per sweep whatever the time, then more turns, round robin, until
SAGA_SWEEP_SECONDS are spent; so a sweep stops at its budget and a permanent
backlog in one kind never starves another."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from datetime import timedelta

import pytest

from tests.support import advance_clock, make_definition, start
from workflows_app.engine import commands, sweeps
from workflows_app.engine.actors import Actor
from workflows_app.engine.locking import db_now
from workflows_app.models import StepExecution, WorkflowInstance

TURN_SECONDS = 0.01


class Clock:
    """The sweep budget's clock: only turns make time pass."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def endless_parts(
    clock: Clock, turns: Counter[str], names: list[str]
) -> Callable[[], list[sweeps.Part]]:
    """Parts whose every turn is full (a permanent backlog) and takes
    TURN_SECONDS."""

    def part(name: str) -> sweeps.Part:
        def turn(now: object, limit: int) -> sweeps.Turn:
            clock.now += TURN_SECONDS
            turns[name] += 1
            return limit, limit

        return sweeps.Part(name, turn, size=5)

    return lambda: [part(name) for name in names]


def test_with_a_backlog_in_every_kind_each_progresses_and_a_sweep_stops_at_its_budget(
    monkeypatch, settings
):
    settings.SAGA_SWEEP_SECONDS = 0.035  # time for 3.5 turns after a start
    clock, turns = Clock(), Counter[str]()
    names = [f"kind{n}" for n in range(6)]
    monkeypatch.setattr(sweeps.Budget, "clock", clock)
    monkeypatch.setattr(sweeps, "_parts", endless_parts(clock, turns, names))
    sweeps._next_extra_turn = 0
    totals: Counter[str] = Counter()
    for _ in range(12):
        before = clock.now
        budget = sweeps.Budget()
        done = sweeps.work_due(None, 500, budget)  # type: ignore[arg-type]
        # The first round (6 turns) overruns the budget: nothing more.
        assert clock.now - before == pytest.approx(6 * TURN_SECONDS)
        assert all(done[name] == 5 for name in names)  # each progressed
        assert done["cut_short"] == 6
        totals.update({name: done[name] for name in names})
    assert set(totals.values()) == {60}

    # With time for more: one turn each, then extra turns until the budget
    # is spent, starting where the last sweep's extra turns stopped, so over
    # consecutive sweeps every kind gets the same share (within one turn).
    settings.SAGA_SWEEP_SECONDS = 0.095
    turns.clear()
    for _ in range(6):
        before = clock.now
        sweeps.work_due(None, 500, sweeps.Budget())  # type: ignore[arg-type]
        # Stopped at the budget: the last turn started before it was spent.
        assert 0.095 <= clock.now - before < 0.095 + TURN_SECONDS
    assert sum(turns.values()) == 6 * 10
    assert set(turns.values()) == {10}


def test_a_kind_stops_at_its_batch_and_one_without_more_due_has_no_extra_turn(
    monkeypatch, settings
):
    settings.SAGA_SWEEP_SECONDS = 10
    clock, turns = Clock(), Counter[str]()
    monkeypatch.setattr(sweeps.Budget, "clock", clock)

    def parts() -> list[sweeps.Part]:
        def endless(now: object, limit: int) -> sweeps.Turn:
            clock.now += TURN_SECONDS
            turns["endless"] += 1
            return limit, limit

        def few(now: object, limit: int) -> sweeps.Turn:
            turns["few"] += 1
            return 2, 2  # fewer than a turn's rows: nothing more due

        return [sweeps.Part("endless", endless, 5), sweeps.Part("few", few, 5)]

    monkeypatch.setattr(sweeps, "_parts", parts)
    done = sweeps.work_due(None, 23, sweeps.Budget())  # type: ignore[arg-type]
    assert done == {"endless": 23, "few": 2, "cut_short": 0}
    assert turns == {"endless": 5, "few": 1}  # 5 + 5 + 5 + 5 + 3


def test_an_extra_turn_takes_only_the_rows_the_time_left_allows(monkeypatch, settings):
    """Turns whose time grows with their rows (an engine command per row):
    the last extra turn is cut to what the budget has left at the kind's
    pace, so the sweep ends about one row after its budget, not a whole turn
    after it."""
    row = 0.002
    settings.SAGA_SWEEP_SECONDS = 3 * 10 * row + 0.005  # the first round + 2.5 rows
    clock, limits = Clock(), []
    monkeypatch.setattr(sweeps.Budget, "clock", clock)

    def part(name: str) -> sweeps.Part:
        def turn(now: object, limit: int) -> sweeps.Turn:
            clock.now += limit * row
            limits.append((name, limit))
            return limit, limit

        return sweeps.Part(name, turn, size=10)

    monkeypatch.setattr(sweeps, "_parts", lambda: [part(n) for n in "abc"])
    sweeps._next_extra_turn = 0
    before = clock.now
    done = sweeps.work_due(None, 500, sweeps.Budget())  # type: ignore[arg-type]
    assert limits == [("a", 10), ("b", 10), ("c", 10), ("a", 2), ("b", 1)]
    assert done == {"a": 12, "b": 11, "c": 10, "cut_short": 3}
    assert clock.now - before == pytest.approx(33 * row)  # budget: 32.5 rows


@pytest.mark.django_db
def test_real_backlogs_all_progress_in_every_sweep_past_the_budget(
    broker_no_inline, settings
):
    """Lost start messages, lost step messages, deadlines and stuck
    instances (and their alerts), all due at once: with no time at all each
    kind still does one turn per sweep."""
    settings.SAGA_SWEEP_SECONDS = 0
    settings.SAGA_SWEEP_CHUNK = 1
    settings.SAGA_SWEEP_MIN_ACTS = 1
    api = Actor.system("test")
    make_definition("plain", stuck_after=timedelta(minutes=1))
    make_definition(
        "late", stuck_after=timedelta(minutes=1), deadline=timedelta(minutes=5)
    )
    accepted = [start("plain", business_key=f"a-{n}") for n in range(3)]
    running = [start("plain", business_key=f"r-{n}") for n in range(3)]
    past_deadline = [start("late", business_key=f"d-{n}") for n in range(3)]
    for instance in [*running, *past_deadline]:
        commands.instance_advance(instance.id, actor=api)
    broker_no_inline.queue.clear()  # every message is lost
    for instance in [*accepted, *running, *past_deadline]:
        advance_clock(instance, 600)
    kinds = [
        "redispatched_instances",
        "redispatched_steps",
        "deadlines",
        "stuck",
        "alerts_opened",
    ]
    for _ in range(2):
        done = sweeps.sweep_all()
        assert {kind: done[kind] for kind in kinds} == dict.fromkeys(kinds, 1)
        assert done["cut_short"] >= len(kinds)

    # Given time, the next sweep works off what is left.
    settings.SAGA_SWEEP_SECONDS = 30
    done = sweeps.sweep_all()
    assert done["cut_short"] == 0
    assert not WorkflowInstance.objects.filter(alert_due=True).exists()
    everyone = [i.pk for i in [*accepted, *running, *past_deadline]]
    assert not WorkflowInstance.objects.filter(
        pk__in=everyone, stuck=False, state__in=["accepted", "running"]
    ).exists()
    assert set(
        WorkflowInstance.objects.filter(
            pk__in=[i.pk for i in past_deadline]
        ).values_list("state", flat=True)
    ) == {"needs_attention"}
    assert not StepExecution.objects.filter(
        instance__in=running, redispatch_at__lte=db_now()
    ).exists()
