"""Demo participants: inventory, payments, shipping, notifications, travel.

Each behaves like a well-built downstream service: it deduplicates by
idempotency key, records every effect in its own ledger
(:class:`~workflows_app.demo.models.ParticipantEffect`), treats a compensation of
an action that never applied as a no-op, and refuses a forward call that
arrives after its compensation. The instance input's ``simulate`` object
makes a step misbehave, by step name::

    {"simulate": {"charge_payment": "fail"}}

Modes: ``fail`` (permanent error), ``fail_once`` (the first attempt fails
transiently), ``timeout`` (the first attempt hangs past the step timeout),
``lose_confirmation`` (the effect happens, then the first attempt errors),
``fail_compensation`` (the step's compensation keeps failing). A list of modes
applies them all.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from django.db import transaction
from django.utils import timezone

from workflows_app.activities import activity
from workflows_app.activities.base import (
    ActivityContext,
    ActivityError,
    step_idempotency_key,
)
from workflows_app.demo.models import ParticipantEffect

SIMULATE_MODES = frozenset(
    {"fail", "fail_once", "timeout", "lose_confirmation", "fail_compensation"}
)
# A "timeout" call hangs at most this long past the step deadline: long enough
# for the worker's time limit to fire, short enough not to pin a demo worker.
HANG_PAST_DEADLINE = 5.0


def simulated_modes(ctx: ActivityContext) -> set[str]:
    simulate = ctx.input.get("simulate") or {}
    if not isinstance(simulate, dict):
        return set()
    modes = simulate.get(ctx.step_name) or []
    if isinstance(modes, str):
        modes = [modes]
    return {m for m in modes if m in SIMULATE_MODES}


def _hang(ctx: ActivityContext) -> None:
    if ctx.deadline is None:
        wait = 60.0
    else:
        wait = (ctx.deadline - datetime.now(UTC)).total_seconds() + HANG_PAST_DEADLINE
    time.sleep(max(0.0, wait))
    raise ActivityError("the participant hung past its deadline")


def _sibling_key(ctx: ActivityContext, direction: str) -> str:
    """The other direction's key of the same run: a restarted step's new run
    is a new request, not the forward call its compensation refuses."""
    return step_idempotency_key(ctx.instance_id, ctx.step_name, direction, ctx.run)


def _ledger_row(key: str, ctx: ActivityContext, direction: str) -> ParticipantEffect:
    row, _ = ParticipantEffect.objects.select_for_update().get_or_create(
        idempotency_key=key,
        defaults={
            "instance_id": ctx.instance_id,
            "step_name": ctx.step_name,
            "direction": direction,
        },
    )
    return row


def perform_action(ctx: ActivityContext, service: str) -> dict[str, Any]:
    """Apply the forward effect once per idempotency key."""
    modes = simulated_modes(ctx)
    if "fail" in modes:
        raise ActivityError(f"{service} declined the request", permanent=True)
    if "fail_once" in modes and ctx.attempt == 1:
        raise ActivityError(f"{service} is temporarily unavailable")
    if "timeout" in modes and ctx.attempt == 1:
        _hang(ctx)
    with transaction.atomic():
        # Lock order: action row, then compensation row (same as perform_compensation).
        row = _ledger_row(ctx.idempotency_key, ctx, "action")
        undo = _ledger_row(_sibling_key(ctx, "compensation"), ctx, "compensation")
        row.calls += 1
        refused = undo.calls > 0
        if refused:
            row.late_refused += 1
        elif not row.applied:
            row.applied = True
            row.first_applied_at = timezone.now()
        row.save(update_fields=["calls", "late_refused", "applied", "first_applied_at"])
    # Raised after the block, so the refused call stays counted in the ledger.
    if refused:
        raise ActivityError(
            f"{service} refuses: this request was already compensated", permanent=True
        )
    if "lose_confirmation" in modes and ctx.attempt == 1:
        raise ActivityError(f"{service} applied the request but the reply was lost")
    return {"service": service, "reference": f"{service}-{ctx.business_key}"}


def perform_compensation(ctx: ActivityContext, service: str) -> dict[str, Any]:
    """Undo the forward effect once; a no-op if it never applied."""
    if "fail_compensation" in simulated_modes(ctx):
        raise ActivityError(f"{service} cannot undo the request right now")
    with transaction.atomic():
        forward = _ledger_row(_sibling_key(ctx, "action"), ctx, "action")
        row = _ledger_row(ctx.idempotency_key, ctx, "compensation")
        row.calls += 1
        if row.calls == 1 and forward.applied:
            row.applied = True
            row.first_applied_at = timezone.now()
        row.save(update_fields=["calls", "applied", "first_applied_at"])
        applied = row.applied
    return {"service": service, "undone": applied}


def _register(action: str, compensation: str | None, service: str) -> None:
    activity(action)(lambda ctx: perform_action(ctx, service))
    if compensation:
        activity(compensation)(lambda ctx: perform_compensation(ctx, service))


_register("demo.reserve_inventory", "demo.release_inventory", "inventory")
_register("demo.charge_payment", "demo.refund_payment", "payments")
_register("demo.create_shipment", None, "shipping")
_register("demo.notify_customer", None, "notifications")
_register("demo.book_car", "demo.cancel_car", "car-rental")
_register("demo.book_hotel", "demo.cancel_hotel", "hotels")
_register("demo.book_flight", "demo.cancel_flight", "airline")
_register("demo.step", "demo.undo_step", "generic")


@activity("demo.noop")
def noop(ctx: ActivityContext) -> None:
    """Does nothing: the benchmark's step, measuring the engine alone."""
    return None
