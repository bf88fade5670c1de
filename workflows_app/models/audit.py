"""The append-only audit trail and the inbound-message dedupe table."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.db import models
from django.db.models.functions import Now

from workflows_app.models.runtime import StepExecution, WorkflowInstance


class ActorKind(models.TextChoices):
    SYSTEM = "system", "system"
    WORKER = "worker", "worker"
    OPERATOR = "operator", "operator"
    API = "api", "api"
    EVENT = "event", "event"


class TransitionLog(models.Model):
    """One row per state transition, written by the engine in the same
    transaction as the change it records. Rows whose ``field`` is empty are
    notes that changed no state (a duplicate delivery ignored, a stale
    callback): the timeline shows them, the state reducer skips them."""

    Actor = ActorKind

    id = models.BigAutoField(primary_key=True)
    # The instance and step keys carry no database constraint, as audit logs
    # usually do not (Django's admin log, django-auditlog): the engine
    # writes each row under the instance's lock (or with the new instance),
    # in the statement that writes the change it records, so there the
    # constraint checked nothing, at two trigger queries per row (about 40
    # per workflow). The only other writer, alerts' notes, names instances
    # whose alert rows (keyed with a constraint) it has just read. Django's
    # cascade, the admin and retention (engine/retention.py) still follow
    # the relations.
    # Indexed by history_instance_seq, whose first column it is: a second
    # index of it alone would be one more entry to write per history row.
    instance = models.ForeignKey(
        WorkflowInstance,
        on_delete=models.CASCADE,
        related_name="history",
        db_index=False,
        db_constraint=False,
    )
    step = models.ForeignKey(
        StepExecution,
        on_delete=models.CASCADE,
        null=True,
        blank=True,
        related_name="history",
        db_constraint=False,
    )
    field = models.CharField(max_length=30, blank=True)
    source = models.CharField(max_length=30, blank=True)
    target = models.CharField(max_length=30, blank=True)
    transition = models.CharField(max_length=50)
    actor_kind = models.CharField(max_length=20, choices=ActorKind.choices)
    actor_label = models.CharField(max_length=200, blank=True)
    # Indexed only where set (history_user): most rows are a worker's.
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.PROTECT,
        null=True,
        blank=True,
        db_index=False,
    )
    reason = models.TextField(blank=True)
    data = models.JSONField(default=dict, blank=True)
    # The database clock, like every deadline the sweeper compares against.
    created_at = models.DateTimeField(db_default=Now())

    class Meta:
        ordering = ["id"]
        indexes = [
            models.Index(fields=["instance", "id"], name="history_instance_seq"),
            models.Index(
                fields=["user"],
                condition=models.Q(user__isnull=False),
                name="history_user",
            ),
            # Moves into needs attention per hour (the activity charts).
            models.Index(
                fields=["created_at"],
                condition=models.Q(field="state", target="needs_attention"),
                name="history_held",
            ),
        ]

    def __str__(self) -> str:
        where = f" {self.step.name}" if self.step is not None else ""
        return (
            f"{self.instance_id}{where}: {self.transition} {self.source}->{self.target}"
        )

    def save(self, *args: Any, **kwargs: Any) -> None:
        if self.pk is not None and not self._state.adding:
            raise ValueError("TransitionLog rows are append-only")
        super().save(*args, **kwargs)


class InboundMessage(models.Model):
    """A callback or event already handled, by (source, message id).

    Inserted in the same transaction as the effect of the message, so a replay
    finds the row and returns the stored answer without touching any state."""

    source = models.CharField(max_length=200)
    message_id = models.CharField(max_length=200)
    kind = models.CharField(max_length=30)
    received_at = models.DateTimeField(db_default=Now())
    response = models.JSONField(default=dict, blank=True)
    # The instance the message acted on (the first, for an event), and how
    # often it was sent again: the instance page lists suppressed replays.
    instance_id = models.UUIDField(null=True, blank=True)
    replays = models.PositiveIntegerField(default=0)
    last_replay_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            # Callbacks and events are separate id spaces for one client.
            models.UniqueConstraint(
                fields=["source", "kind", "message_id"], name="inbound_once"
            ),
        ]
        indexes = [
            # Retention: the messages of purged instances.
            models.Index(fields=["instance_id"], name="inbound_instance"),
            # The instance page: replays that were suppressed.
            models.Index(
                fields=["instance_id"],
                condition=models.Q(replays__gt=0),
                name="inbound_replayed",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.kind} {self.source}/{self.message_id}"
