"""The demo's traffic: a realistic mix of orders, trips and refunds, some
misbehaving.

Weights are chosen so that every path (completed, retried, compensated,
unknown and held) shows up within the first minute or two, and so that a
refund waits out its timer and a large order waits in the inbox for a
review. Nobody reviews them but the operator, so large orders are started
only while fewer than ``INBOX_OPEN_MAX`` reviews are open: the inbox stays
short, and the reviews nobody takes go overdue (stuck, with an alert) one
by one instead of piling up.
"""

from __future__ import annotations

import itertools
import random
from typing import Any

from workflows_app.engine.actors import Actor
from workflows_app.engine.commands import instance_start
from workflows_app.models import StepDefinition, StepExecution, StepState

# (weight, definition key, simulate object)
MIX: list[tuple[int, str, dict[str, Any]]] = [
    (30, "order-fulfilment", {}),
    (8, "order-fulfilment", {"charge_payment": "fail_once"}),
    (6, "order-fulfilment", {"charge_payment": "fail"}),
    (4, "order-fulfilment", {"charge_payment": "lose_confirmation"}),
    (3, "order-fulfilment", {"charge_payment": "timeout"}),
    (3, "order-fulfilment", {"reserve_inventory": "timeout"}),
    (2, "order-fulfilment", {"create_shipment": "fail"}),
    (
        2,
        "order-fulfilment",
        {"reserve_inventory": "fail_compensation", "charge_payment": "fail"},
    ),
    (15, "trip-booking", {}),
    (5, "trip-booking", {"book_flight": "fail"}),
    (3, "trip-booking", {"book_hotel": "fail_once"}),
    # Waits out a 30 s chargeback window (a timer the sweeper wakes).
    (6, "refund-after-window", {}),
    # Waits in the inbox for a person's review (claim, complete or reject).
    (3, "large-order", {}),
]
PREFIXES = {
    "order-fulfilment": "ORD",
    "trip-booking": "TRIP",
    "refund-after-window": "REF",
    "large-order": "BIG",
}
# Open reviews above which no new large order is started.
INBOX_OPEN_MAX = 3

_counter = itertools.count(1)


def open_reviews() -> int:
    return StepExecution.objects.filter(
        state=StepState.WAITING, step_definition__kind=StepDefinition.Kind.HUMAN
    ).count()


def start_one(rng: random.Random) -> str:
    mix = MIX
    if open_reviews() >= INBOX_OPEN_MAX:
        mix = [entry for entry in MIX if entry[1] != "large-order"]
    weights = [weight for weight, _, _ in mix]
    _, key, simulate = rng.choices(mix, weights=weights)[0]
    business_key = f"{PREFIXES[key]}-{rng.randint(10000, 99999)}-{next(_counter)}"
    data: dict[str, Any] = {
        "customer": f"customer-{rng.randint(1, 500)}",
        # Large orders are the ones above the review limit.
        "amount": rng.randint(1000, 5000)
        if key == "large-order"
        else rng.randint(5, 900),
    }
    if simulate:
        data["simulate"] = simulate
    instance_start(
        key,
        business_key=business_key,
        input=data,
        idempotency_key=business_key,
        actor=Actor.api("demo-traffic"),
    )
    return business_key
