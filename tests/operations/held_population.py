"""Held instances of every kind, built by the real engine (in-memory transport,
real PostgreSQL, real sweeper functions and the worker's real time limit).

Each scenario makes one instance that ends held, and says what must hold it
then: (step, held by, attention kind). The failure-group tests draw random
populations of them.
"""

from __future__ import annotations

import dataclasses
import time
from datetime import timedelta
from typing import Any

from tests.support import advance_clock, make_definition, start
from workflows_app.activities import activity
from workflows_app.activities.base import ActivityContext, Waiting
from workflows_app.demo.activities import perform_action, perform_compensation
from workflows_app.engine.locking import db_now
from workflows_app.engine.sweeps import enforce_deadlines, time_out_attempts
from workflows_app.models import WorkflowInstance

HOLD, UNDO, SLOW = "hold_orders", "undo_orders", "slow_orders"
# The slow definition's last step's timeout, and how long a hanging
# participant hangs (past it: the worker's alarm interrupts the call).
SLOW_TIMEOUT = timedelta(milliseconds=300)
HANG = 3.0


def _modes(ctx: ActivityContext) -> set[str]:
    modes = (ctx.input.get("simulate") or {}).get(ctx.step_name) or []
    return {modes} if isinstance(modes, str) else set(modes)


@activity("test.groups_participant")
def participant(ctx: ActivityContext) -> Any:
    """The demo participant, plus ``never_answers``: it accepts the request
    and never reports the outcome (the sweeper times the step out), and
    ``hang``: it hangs past the step's timeout (the worker's alarm fires)."""
    modes = _modes(ctx)
    if "never_answers" in modes:
        return Waiting({"accepted": True})
    if "hang" in modes:
        time.sleep(HANG)
    return perform_action(ctx, "groups")


@activity("test.groups_undo")
def undo(ctx: ActivityContext) -> Any:
    return perform_compensation(ctx, "groups")


def _steps(last: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    common = {
        "action": "test.groups_participant",
        "compensation": "test.groups_undo",
        # One attempt, no retry of a timeout: every failure holds at once.
        "max_attempts": 1,
        "retry_on_timeout": False,
    }
    return [
        {"name": "reserve", **common},
        {"name": "charge", **common, "is_pivot": True},
        {"name": "ship", **common, **(last or {})},
    ]


def make_definitions() -> None:
    make_definition(
        HOLD, steps=_steps(), failure_policy="hold", deadline=timedelta(hours=1)
    )
    make_definition(UNDO, steps=_steps(), failure_policy="compensate")
    make_definition(
        SLOW,
        steps=_steps({"timeout": SLOW_TIMEOUT}),
        failure_policy="hold",
    )


@dataclasses.dataclass(frozen=True)
class Scenario:
    name: str
    definition: str
    simulate: dict[str, Any]
    # What must hold the instance: step ("" for the deadline), held by, kind.
    step: str
    held_by: str
    kind: str
    # After the messages ran: let time pass and run these sweeps.
    sweep: tuple[str, ...] = ()


SCENARIOS = [
    Scenario(
        "reserve fails", HOLD, {"reserve": "fail"}, "reserve", "action", "step_failed"
    ),
    Scenario(
        "pivot declined", HOLD, {"charge": "fail"}, "charge", "action", "step_failed"
    ),
    Scenario(
        "pivot reply lost",
        HOLD,
        {"charge": "lose_confirmation"},
        "charge",
        "action",
        "pivot_uncertain",
    ),
    Scenario("ship fails", HOLD, {"ship": "fail"}, "ship", "action", "after_pivot"),
    Scenario(
        "reserve never answers",
        HOLD,
        {"reserve": "never_answers"},
        "reserve",
        "action",
        "step_unknown",
        sweep=("time_out",),
    ),
    Scenario(
        "pivot never answers",
        HOLD,
        {"charge": "never_answers"},
        "charge",
        "action",
        "pivot_uncertain",
        sweep=("time_out",),
    ),
    Scenario(
        "ship never answers",
        HOLD,
        {"ship": "never_answers"},
        "ship",
        "action",
        "step_unknown",
        sweep=("time_out",),
    ),
    Scenario(
        "deadline while waiting",
        HOLD,
        {"ship": "never_answers"},
        "",
        "deadline",
        "deadline",
        sweep=("deadline",),
    ),
    Scenario(
        "deadline before the pivot",
        HOLD,
        {"reserve": "never_answers"},
        "",
        "deadline",
        "deadline",
        sweep=("deadline",),
    ),
    Scenario(
        # Held for the deadline, then the step times out too: still the
        # deadline holds it (the step's timeout is not a second group).
        "deadline, then the step times out",
        HOLD,
        {"charge": "never_answers"},
        "",
        "deadline",
        "deadline",
        sweep=("deadline", "time_out"),
    ),
    Scenario(
        # The case: charge failed, then undoing reserve failed. The
        # compensation holds it; charge's older failure does not.
        "pivot declined, undo of reserve fails",
        UNDO,
        {"charge": "fail", "reserve": "fail_compensation"},
        "reserve",
        "compensation",
        "compensation_failed",
    ),
    Scenario(
        # reserve failed in a way that may have applied: it is undone itself,
        # and that undo fails (the step's action and compensation both failed).
        "reserve unsure, its own undo fails",
        UNDO,
        {"reserve": ["fail_once", "fail_compensation"]},
        "reserve",
        "compensation",
        "compensation_failed",
    ),
    Scenario(
        "ship fails past the pivot (compensate policy)",
        UNDO,
        {"ship": "fail"},
        "ship",
        "action",
        "after_pivot",
    ),
    # The same step timed out by the worker and by the sweeper: one cause.
    Scenario(
        "ship interrupted by the worker",
        SLOW,
        {"ship": "hang"},
        "ship",
        "action",
        "step_unknown",
    ),
    Scenario(
        "ship never answers (short timeout)",
        SLOW,
        {"ship": "never_answers"},
        "ship",
        "action",
        "step_unknown",
        sweep=("time_out",),
    ),
]


def make_held(broker: Any, scenario: Scenario, business_key: str) -> WorkflowInstance:
    instance = start(scenario.definition, business_key, simulate=scenario.simulate)
    broker.run()
    if scenario.sweep:
        # Past the step's 5 s timeout; past the 1 h deadline when swept for it.
        advance_clock(instance, 7300 if "deadline" in scenario.sweep else 30)
        for sweep in scenario.sweep:
            run = enforce_deadlines if sweep == "deadline" else time_out_attempts
            run(db_now(), 100)
        broker.run()
    instance = WorkflowInstance.objects.get(pk=instance.pk)
    assert instance.state == "needs_attention", (scenario.name, instance.state)
    assert instance.attention_kind == scenario.kind, (
        scenario.name,
        instance.attention_kind,
    )
    return instance
