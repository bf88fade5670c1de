"""Alerts: one per instance and kind per episode, mailed once, escalated once.

The sweeper opens an alert when an instance turns stuck and resolves it when
the instance moves again. A sender claims due alerts by compare-and-set on
``next_send_at`` (retrying failed deliveries with backoff) and stamps
``notified_at``; an alert nobody acknowledged within the escalation window is
sent once more to the escalation address (``escalate_at``).
"""

from __future__ import annotations

from django.conf import settings
from django.db import models

from workflows_app.models.runtime import WorkflowInstance


class Alert(models.Model):
    class Kind(models.TextChoices):
        NO_PROGRESS = "no_progress", "no progress"
        DEADLINE = "deadline", "deadline passed"
        HELD = "held", "waits on a person"
        COMPENSATION_FAILED = "compensation_failed", "compensation failed"
        MILESTONE_OVERDUE = "milestone_overdue", "expected event missing"
        HUMAN_STEP_OVERDUE = "human_step_overdue", "a step waits too long for a person"
        # A participant reported an effect after the instance was closed: money
        # may have moved, a person must look. Resolved by acknowledging it.
        LATE_EFFECT = "late_effect", "effect reported after the instance was closed"

    instance = models.ForeignKey(
        WorkflowInstance, on_delete=models.CASCADE, related_name="alerts"
    )
    # Denormalised so the sender can batch a definition's alerts into a digest.
    definition_key = models.CharField(max_length=100)
    kind = models.CharField(max_length=30, choices=Kind.choices)
    reason = models.CharField(max_length=300)
    opened_at = models.DateTimeField()
    resolved_at = models.DateTimeField(null=True, blank=True)
    # Why it ended: what moved the instance on (and who), or who took it.
    resolved_reason = models.CharField(max_length=300, blank=True, default="")
    acknowledged_at = models.DateTimeField(null=True, blank=True)
    acknowledged_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.PROTECT, null=True, blank=True
    )
    # Delivery: due while next_send_at is set; notified_at once a mail went out.
    next_send_at = models.DateTimeField(null=True, blank=True)
    notified_at = models.DateTimeField(null=True, blank=True)
    notified_in_digest = models.BooleanField(default=False)
    send_attempts = models.PositiveIntegerField(default=0)
    last_send_error = models.TextField(blank=True)
    escalate_at = models.DateTimeField(null=True, blank=True)
    escalated_at = models.DateTimeField(null=True, blank=True)
    # Set when the alert's webhook notifications were queued (once per
    # episode, whatever happens to the mail).
    hooks_queued_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-opened_at"]
        constraints = [
            models.UniqueConstraint(
                fields=["instance", "kind"],
                condition=models.Q(resolved_at__isnull=True),
                name="alert_one_open_per_kind",
            ),
        ]
        indexes = [
            # Sender: alerts whose mail is due (first try or a retry).
            models.Index(
                fields=["next_send_at"],
                condition=models.Q(next_send_at__isnull=False),
                name="alert_send_due",
            ),
            # Sender: unacknowledged alerts whose escalation is due.
            models.Index(
                fields=["escalate_at"],
                condition=models.Q(escalate_at__isnull=False),
                name="alert_escalation_due",
            ),
            # Sweeper and dashboard: the open alerts.
            models.Index(
                fields=["instance"],
                condition=models.Q(resolved_at__isnull=True),
                name="alert_open",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.get_kind_display()}: {self.instance_id}"

    @property
    def is_open(self) -> bool:
        return self.resolved_at is None

    @property
    def status(self) -> str:
        if self.resolved_at:
            return "resolved"
        if self.acknowledged_at:
            return "acknowledged"
        return "open"
