"""The operator of the chaos run: what a person on call does with each held
instance once the infrastructure is healthy again."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable
from typing import Any

from django.contrib.auth.models import User
from django.db import transaction
from django.utils import timezone

from workflows_app.demo.models import ParticipantEffect
from workflows_app.engine import commands
from workflows_app.engine.errors import EngineError
from workflows_app.models import StepExecution, WorkflowInstance

CLOSE_SHARE = 0.2  # held instances the operator closes as failed

# Per attention kind, the actions to try in order (the first the engine
# accepts wins). Approval-gated actions (close as failed) are left out: a
# second person would have to approve them.
PLAYBOOK: dict[str, list[str]] = {
    "step_failed": ["compensate", "retry_step"],
    "step_unknown": ["retry_step", "compensate"],
    "pivot_uncertain": ["retry_step", "compensate"],
    "after_pivot": ["mark_step_done"],
    "compensation_failed": ["retry_compensation"],
    "deadline": ["resume"],
}


def do_by_hand(instance_id: Any, *, user: User, reason: str) -> None:
    """What "mark step done" means: the person performed the blocked step's
    effect in the participant's own system (its ledger shows it), then says
    so. The checker expects that effect in the ledger."""
    blocked = (
        StepExecution.objects.filter(
            instance_id=instance_id, state__in=["failed", "unknown"]
        )
        .order_by("position")
        .first()
    )
    if blocked is None:
        raise EngineError("nothing to do by hand")
    with transaction.atomic():
        row, _ = ParticipantEffect.objects.select_for_update().get_or_create(
            idempotency_key=blocked.idempotency_key("action"),
            defaults={
                "instance_id": instance_id,
                "step_name": blocked.name,
                "direction": "action",
            },
        )
        if not row.applied:
            row.applied = True
            row.first_applied_at = timezone.now()
            row.save(update_fields=["applied", "first_applied_at"])
    commands.instance_mark_step_done(
        instance_id, user=user, reason=reason, step_id=blocked.id
    )


ACTIONS: dict[str, Callable[..., None]] = {
    "close_as_failed": commands.instance_close_as_failed,
    "compensate": commands.instance_compensate,
    "retry_step": commands.instance_retry_step,
    "mark_step_done": do_by_hand,
    "retry_compensation": commands.instance_retry_compensation,
    "resume": commands.instance_resume,
}


def resolve_held(
    business_keys: list[str], user: User, tried: Counter[Any], rng: random.Random
) -> Counter[str]:
    """One round over the held instances; returns the actions taken.

    ``tried`` counts the actions per instance so far: each instance gets at
    most two, and a compensation that keeps failing is retried once, then
    left held for a person with more than a playbook. Now and then the
    operator gives up on an instance instead (close as failed), where the
    definition does not ask a second person to approve that."""
    taken: Counter[str] = Counter()
    held = WorkflowInstance.objects.filter(
        business_key__in=business_keys, state="needs_attention"
    ).values_list("id", "attention_kind", "definition__approval_actions")
    for pk, kind, gated in list(held):
        limit = 1 if kind == "compensation_failed" else 2
        if tried[pk] >= limit:
            continue
        playbook = PLAYBOOK.get(kind, [])
        share = 0.5 if kind == "deadline" else CLOSE_SHARE
        if "close_as_failed" not in gated and rng.random() < share:
            playbook = ["close_as_failed", *playbook]
        for name in playbook:
            if _try(ACTIONS[name], pk, user, f"chaos operator: {kind}"):
                taken[f"operator {name}"] += 1
                tried[pk] += 1
                break
    return taken


def cancel_one(business_keys: list[str], user: User, rng: random.Random) -> int:
    """Cancel a running instance, likely with an attempt in flight."""
    running = list(
        WorkflowInstance.objects.filter(
            business_key__in=business_keys, state="running"
        ).values_list("id", flat=True)
    )
    if not running:
        return 0
    return int(_try(commands.instance_cancel, rng.choice(running), user, "chaos"))


def _try(action: Callable[..., None], pk: Any, user: User, reason: str) -> bool:
    try:
        action(pk, user=user, reason=reason)
    except EngineError:
        return False
    return True
