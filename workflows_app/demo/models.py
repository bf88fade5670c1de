"""The demo participants' own ledger of effects.

This table belongs to the fake downstream services (inventory, payments,
shipping, ...), not to the engine: the engine never reads it. Tests compare it
with the engine's history to prove effects happened at most once and in the
saga order.
"""

from __future__ import annotations

from django.db import models


class ParticipantEffect(models.Model):
    class Direction(models.TextChoices):
        ACTION = "action", "action"
        COMPENSATION = "compensation", "compensation"

    idempotency_key = models.CharField(max_length=300, unique=True)
    instance_id = models.UUIDField(db_index=True)
    step_name = models.CharField(max_length=100)
    direction = models.CharField(max_length=20, choices=Direction.choices)
    # False for a compensation whose action never applied (a no-op).
    applied = models.BooleanField(default=False)
    calls = models.PositiveIntegerField(default=0)
    # Forward calls refused because the compensation already ran.
    late_refused = models.PositiveIntegerField(default=0)
    first_applied_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["instance_id", "first_applied_at", "id"]

    def __str__(self) -> str:
        return f"{self.idempotency_key} applied={self.applied} calls={self.calls}"
