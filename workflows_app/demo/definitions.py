"""The demo workflows: used by the demo, the tests and new staff's training."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.db import transaction

from workflows_app.models import StepDefinition, WorkflowDefinition

SECOND = timedelta(seconds=1)

DEMO_DEFINITIONS: list[dict[str, Any]] = [
    {
        "key": "order-fulfilment",
        "title": "Order fulfilment",
        "description": "Reserve stock while the card is charged (a parallel "
        "stage), then ship and tell the customer. Shipping is the point of no "
        "return.",
        "failure_policy": WorkflowDefinition.FailurePolicy.COMPENSATE,
        "stuck_after": timedelta(minutes=2),
        "deadline": timedelta(minutes=30),
        "alert_recipients": "orders-oncall@example.com",
        # Four eyes: giving up on an order or rewriting its data needs a
        # second operator (the demo has two: operator and operator2).
        "approval_actions": ["close_as_failed", "repair"],
        "approval_bulk_over": 20,
        # Support finds orders by customer and amount: customer:customer-42.
        "search_attributes": {"customer": "customer", "amount": "amount"},
        "steps": [
            # Support may run an order again from the start (e.g. after
            # correcting the items) or from the payment (e.g. another card:
            # only the payment branch and what follows are undone and re-run).
            {
                "name": "reserve_inventory",
                "action": "demo.reserve_inventory",
                "compensation": "demo.release_inventory",
                "retry_on_timeout": True,
                "restart_point": True,
            },
            # Payments must not be charged twice blindly: a timeout waits for a
            # person. Charged while the stock is reserved: one stage, two
            # branches; both are undone if either fails for good (the pivot,
            # shipping, comes after the stage and stands alone).
            {
                "name": "charge_payment",
                "parallel_with_previous": True,
                "action": "demo.charge_payment",
                "compensation": "demo.refund_payment",
                "retry_on_timeout": False,
                "restart_point": True,
            },
            {
                "name": "create_shipment",
                "action": "demo.create_shipment",
                "is_pivot": True,
                "retry_on_timeout": True,
            },
            {
                "name": "notify_customer",
                "action": "demo.notify_customer",
                "retry_on_timeout": True,
            },
        ],
    },
    {
        "key": "trip-booking",
        "title": "Trip booking",
        "description": "Book a car, a hotel and a flight; cancel what was booked if "
        "any booking fails.",
        "failure_policy": WorkflowDefinition.FailurePolicy.COMPENSATE,
        "stuck_after": timedelta(minutes=2),
        "deadline": None,
        "alert_recipients": "travel-oncall@example.com",
        "search_attributes": {"customer": "customer"},
        "steps": [
            {
                "name": "book_car",
                "action": "demo.book_car",
                "compensation": "demo.cancel_car",
                "retry_on_timeout": True,
                # Rebook the whole trip, e.g. after the dates were corrected.
                "restart_point": True,
            },
            {
                "name": "book_hotel",
                "action": "demo.book_hotel",
                "compensation": "demo.cancel_hotel",
                "retry_on_timeout": True,
            },
            {
                "name": "book_flight",
                "action": "demo.book_flight",
                "compensation": "demo.cancel_flight",
                "retry_on_timeout": False,
            },
        ],
    },
    {
        # A refund waits out the chargeback window (30 s in the demo, days in
        # life): a timer kept in the database and woken by the sweeper.
        "key": "refund-after-window",
        "title": "Refund after the chargeback window",
        "description": "Wait out the chargeback window, then refund and tell "
        "the customer. Operators may wake the timer early or extend it.",
        "failure_policy": WorkflowDefinition.FailurePolicy.HOLD,
        "stuck_after": timedelta(minutes=2),
        "deadline": None,
        "alert_recipients": "payments-oncall@example.com",
        "search_attributes": {"customer": "customer", "amount": "amount"},
        "steps": [
            {"name": "chargeback_window", "kind": "timer", "wait_for": 30 * SECOND},
            {
                "name": "refund_payment",
                "action": "demo.refund_payment",
                "retry_on_timeout": True,
            },
            {
                "name": "notify_customer",
                "action": "demo.notify_customer",
                "retry_on_timeout": True,
            },
        ],
    },
    {
        # Orders above the limit (the demo has no conditions: a definition of
        # their own) wait for a person's review in the inbox before payment.
        "key": "large-order",
        "title": "Large order (reviewed)",
        "description": "Reserve stock, have a person review the order, take "
        "payment, ship. A rejected review releases the stock.",
        "failure_policy": WorkflowDefinition.FailurePolicy.COMPENSATE,
        "stuck_after": timedelta(minutes=2),
        "deadline": None,
        "alert_recipients": "orders-oncall@example.com",
        "search_attributes": {"customer": "customer", "amount": "amount"},
        "steps": [
            {
                "name": "reserve_inventory",
                "action": "demo.reserve_inventory",
                "compensation": "demo.release_inventory",
                "retry_on_timeout": True,
            },
            {
                "name": "review_order",
                "kind": "human",
                # The review's time rule: waiting longer flags it stuck.
                "timeout": timedelta(minutes=10),
                "form_fields": [
                    {"name": "approved", "type": "boolean", "required": True},
                    {
                        "name": "risk",
                        "type": "choice",
                        "choices": ["low", "medium", "high"],
                        "required": True,
                    },
                    {"name": "note", "type": "text"},
                ],
            },
            {
                "name": "charge_payment",
                "action": "demo.charge_payment",
                "compensation": "demo.refund_payment",
            },
            {
                "name": "create_shipment",
                "action": "demo.create_shipment",
                "is_pivot": True,
                "retry_on_timeout": True,
            },
        ],
    },
]

STEP_DEFAULTS: dict[str, Any] = {
    "timeout": 3 * SECOND,
    "max_attempts": 3,
    "backoff_initial": 0.5 * SECOND,
    "backoff_multiplier": 2.0,
    "backoff_max": 5 * SECOND,
    "backoff_jitter": 0.1,
}


@transaction.atomic
def load_demo_definitions() -> list[WorkflowDefinition]:
    """Create and publish version 1 of each demo definition unless it exists."""
    loaded = []
    for spec in DEMO_DEFINITIONS:
        spec = dict(spec)
        steps = spec.pop("steps")
        definition, created = WorkflowDefinition.objects.get_or_create(
            key=spec["key"], version=1, defaults=spec
        )
        if created:
            for position, step in enumerate(steps, start=1):
                StepDefinition.objects.create(
                    definition=definition,
                    position=position,
                    **{**STEP_DEFAULTS, **step},
                )
            definition.publish()
        loaded.append(definition)
    return loaded
