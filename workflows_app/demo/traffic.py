"""The demo's traffic: a realistic mix of orders and trips, some misbehaving.

Weights are chosen so that every path (completed, retried, compensated,
unknown and held, stuck) shows up within the first minute or two.
"""

from __future__ import annotations

import itertools
import random
from typing import Any

from workflows_app.engine.actors import Actor
from workflows_app.engine.commands import instance_start

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
]

_counter = itertools.count(1)


def start_one(rng: random.Random) -> str:
    weights = [weight for weight, _, _ in MIX]
    _, key, simulate = rng.choices(MIX, weights=weights)[0]
    prefix = "ORD" if key == "order-fulfilment" else "TRIP"
    business_key = f"{prefix}-{rng.randint(10000, 99999)}-{next(_counter)}"
    data: dict[str, Any] = {
        "customer": f"customer-{rng.randint(1, 500)}",
        "amount": rng.randint(5, 900),
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
