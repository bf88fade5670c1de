"""The webhook outbox: one row per event and target, written in the
transaction that caused the event and delivered after it committed.

Alert notifications (one per alert episode, or one digest for a burst) and
state-change events (an instance completed, compensated, needs attention or
failed) are queued here. A sender claims due rows by compare-and-set on
``next_attempt_at``, POSTs them, and either stamps ``delivered_at`` or keeps
the row due with a growing backoff and the error in plain sight: a row is
never dropped, so a receiver gets every event at least once, always under the
same ``event_id``.
"""

from __future__ import annotations

import uuid

from django.db import models

from workflows_app.models.alerts import Alert
from workflows_app.models.runtime import WorkflowInstance


class WebhookDelivery(models.Model):
    class Format(models.TextChoices):
        SLACK = "slack", "Slack-compatible text"
        JSON = "json", "signed JSON"

    # The event's id, sent as X-Saga-Event-Id and Idempotency-Key: the same on
    # every retry, so a receiver can drop a repeat.
    event_id = models.UUIDField(default=uuid.uuid4)
    # alert, alert.digest, instance.completed, instance.compensated, ...
    event = models.CharField(max_length=40)
    # As configured: a URL, or a reference (env:NAME, secret:NAME, the global
    # setting's name) resolved at delivery time, so a secret URL is never
    # stored or shown.
    target = models.CharField(max_length=500)
    format = models.CharField(max_length=10, choices=Format.choices)
    definition_key = models.CharField(max_length=100)
    # Kept when the instance is purged: the payload says everything, and an
    # event not delivered yet must not be lost with it.
    instance = models.ForeignKey(
        WorkflowInstance,
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="webhook_deliveries",
    )
    alerts = models.ManyToManyField(
        Alert, blank=True, related_name="webhook_deliveries"
    )
    # The body, fixed when the event happened: a retry sends the same bytes.
    payload = models.JSONField()
    created_at = models.DateTimeField()
    # Due while set: the first try, then each retry after its backoff.
    next_attempt_at = models.DateTimeField(null=True, blank=True)
    attempts = models.PositiveIntegerField(default=0)
    last_status = models.PositiveIntegerField(null=True, blank=True)
    last_error = models.TextField(blank=True)
    last_attempt_at = models.DateTimeField(null=True, blank=True)
    delivered_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        constraints = [
            models.UniqueConstraint(
                fields=["event_id", "target"], name="webhook_one_per_event_target"
            ),
        ]
        indexes = [
            # Sender: deliveries due (first try or a retry).
            models.Index(
                fields=["next_attempt_at"],
                condition=models.Q(next_attempt_at__isnull=False),
                name="webhook_due",
            ),
            # Webhooks page: the deliveries that are failing.
            models.Index(
                fields=["-created_at"],
                condition=models.Q(delivered_at__isnull=True, attempts__gt=0),
                name="webhook_failing",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.event} -> {self.target}"

    @property
    def status(self) -> str:
        if self.delivered_at:
            return "delivered"
        return "failing" if self.attempts else "pending"
