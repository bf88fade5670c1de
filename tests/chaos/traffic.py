"""What the chaos run starts: the demo workflows and one built here, with
misbehaving participants mixed in, and stray task messages.

Every participant fault is a ``simulate`` mode of the demo activities
(``workflows_app/demo/activities.py``), which also keep the ledger the
checker reads.
"""

from __future__ import annotations

import random
from collections import Counter
from datetime import timedelta
from typing import Any

from workflows_app import tasks
from workflows_app.demo.definitions import load_demo_definitions
from workflows_app.engine.actors import Actor
from workflows_app.engine.commands import instance_start
from workflows_app.models import StepDefinition, StepExecution, WorkflowDefinition

SECOND = timedelta(seconds=1)
CHAOS_KEY = "chaos-steps"
LATE_KEY = "chaos-late"

# (weight, definition, simulate). Faults that hang a worker (timeout) are
# rarer than the rest: with one process per worker they dominate the time;
# the three-step trip is the most common, to keep the CI form short.
MIX: list[tuple[int, str, dict[str, Any]]] = [
    (16, "order-fulfilment", {}),
    (5, "order-fulfilment", {"charge_payment": "fail_once"}),
    (5, "order-fulfilment", {"charge_payment": "fail"}),
    (4, "order-fulfilment", {"charge_payment": "lose_confirmation"}),
    (1, "order-fulfilment", {"charge_payment": "timeout"}),
    (1, "order-fulfilment", {"reserve_inventory": "timeout"}),
    (3, "order-fulfilment", {"create_shipment": "fail"}),
    (3, "order-fulfilment", {"create_shipment": "lose_confirmation"}),
    (
        1,
        "order-fulfilment",
        {"reserve_inventory": "fail_compensation", "charge_payment": "fail"},
    ),
    (22, "trip-booking", {}),
    (5, "trip-booking", {"book_flight": "fail"}),
    (3, "trip-booking", {"book_hotel": "fail_once"}),
    (3, "trip-booking", {"book_car": "lose_confirmation", "book_flight": "fail"}),
    (8, CHAOS_KEY, {}),
    (4, CHAOS_KEY, {"s2": "fail"}),
    (3, CHAOS_KEY, {"s3": "lose_confirmation"}),
    (3, CHAOS_KEY, {"s1": "fail_once", "s3": "fail"}),
    (1, CHAOS_KEY, {"s2": "timeout"}),
    (2, CHAOS_KEY, {"s2": "fail_once", "s4": "fail"}),
]
# The long form only: each pins a worker for up to its deadline and more.
LATE: tuple[int, str, dict[str, Any]] = (2, LATE_KEY, {})


def load_definitions() -> None:
    """The demo definitions, ``chaos-steps`` (four generic steps, the third
    the pivot, a failure held for an operator, who compensates) and
    ``chaos-late`` (a deadline that passes while a call is in flight)."""
    load_demo_definitions()
    if not WorkflowDefinition.objects.filter(key=CHAOS_KEY).exists():
        _definition(
            CHAOS_KEY,
            [
                {
                    "action": "demo.step",
                    # The last step has nothing to undo, as a notification.
                    "compensation": "demo.undo_step" if position < 4 else "",
                    # s2 is a call not to repeat blindly after a timeout.
                    "retry_on_timeout": position != 2,
                    "is_pivot": position == 3,
                }
                for position in range(1, 5)
            ],
            failure_policy=WorkflowDefinition.FailurePolicy.HOLD,
        )
    if not WorkflowDefinition.objects.filter(key=LATE_KEY).exists():
        _definition(
            LATE_KEY,
            [
                {"action": "demo.step", "compensation": "demo.undo_step"},
                {
                    "action": "chaos.answer_late",
                    "compensation": "chaos.undo_late",
                    "timeout": 30 * SECOND,
                },
                {"action": "demo.step", "compensation": "demo.undo_step"},
            ],
            deadline=8 * SECOND,
        )


def _definition(key: str, steps: list[dict[str, Any]], **fields: Any) -> None:
    definition = WorkflowDefinition.objects.create(
        key=key, title=key, stuck_after=timedelta(minutes=2), **fields
    )
    for position, spec in enumerate(steps, start=1):
        StepDefinition.objects.create(
            definition=definition,
            position=position,
            name=f"{'s' if key == CHAOS_KEY else 'l'}{position}",
            **{
                "timeout": 2 * SECOND,
                "max_attempts": 3,
                "backoff_initial": 0.2 * SECOND,
                "backoff_max": SECOND,
                "backoff_jitter": 0.1,
                **spec,
            },
        )
    definition.publish()


class Traffic:
    """Starts instances and sends stray messages; counts what it injected."""

    def __init__(self, rng: random.Random, run_id: str, *, late: bool) -> None:
        self.rng = rng
        self.mix = [*MIX, LATE] if late else MIX
        self.run_id = run_id
        self.started: list[str] = []  # business keys the engine accepted
        self.faults: Counter[str] = Counter()
        self._next = 0
        self._pending: tuple[str, str, dict[str, Any]] | None = None

    def start_one(self) -> None:
        """Start one instance. A start that failed (the database went away,
        perhaps after the commit) is tried again with the same idempotency
        key, so it is recorded once either way."""
        if self._pending is None:
            mix = self.mix
            _, key, simulate = self.rng.choices(mix, weights=[w for w, _, _ in mix])[0]
            self._next += 1
            data: dict[str, Any] = {"amount": self.rng.randint(5, 900)}
            if simulate:
                data["simulate"] = simulate
            self._pending = (key, f"{self.run_id}-{self._next:05d}", data)
        key, business_key, data = self._pending
        instance_start(
            key,
            business_key=business_key,
            input=data,
            idempotency_key=business_key,
            actor=Actor.api("chaos"),
        )
        self._pending = None
        self.started.append(business_key)
        for modes in data.get("simulate", {}).values():
            for mode in [modes] if isinstance(modes, str) else modes:
                self.faults[f"participant {mode}"] += 1

    def stray_messages(self, count: int) -> None:
        """Duplicate and late ``run_attempt`` messages for random steps of
        random instances, running or finished; each must change nothing."""
        ids = list(
            StepExecution.objects.filter(
                instance__business_key__in=self.rng.sample(
                    self.started, min(len(self.started), count)
                )
            ).values_list("instance_id", "id")
        )
        for instance_id, step_id in self.rng.sample(ids, min(len(ids), count)):
            direction = self.rng.choice(["action", "action", "compensation"])
            tasks.run_attempt.apply_async(args=[str(instance_id), step_id, direction])
            self.faults["stray task message"] += 1
