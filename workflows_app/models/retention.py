"""The audit of retention purges: who purged which definition's instances,
how many, finished in which time range, and where their archive went.

A run's row is written in the same transaction as its first batch's delete
and updated with every later batch, so its counts are those of the rows
really gone, even when the run stops half-way."""

from __future__ import annotations

from django.db import models


class PurgeRun(models.Model):
    class Actor(models.TextChoices):
        SWEEPER = "sweeper", "the sweeper (retention period)"
        COMMAND = "command", "manage.py archive"

    actor_kind = models.CharField(max_length=20, choices=Actor.choices)
    # "sweeper on <host>" or "<os user> on <host>".
    actor_label = models.CharField(max_length=200)
    definition_key = models.CharField(max_length=100)
    # Instances that finished before this were due.
    cutoff = models.DateTimeField()
    # False for ``archive --no-purge``: archived only, nothing deleted.
    purged = models.BooleanField(default=True)
    instances = models.PositiveIntegerField(default=0)
    first_finished_at = models.DateTimeField(null=True, blank=True)
    last_finished_at = models.DateTimeField(null=True, blank=True)
    archive_file = models.CharField(max_length=500, blank=True)
    started_at = models.DateTimeField()
    updated_at = models.DateTimeField()

    class Meta:
        ordering = ["-started_at", "-id"]
        indexes = [models.Index(fields=["-started_at"], name="purge_run_started")]

    def __str__(self) -> str:
        verb = "purged" if self.purged else "archived"
        return f"{self.definition_key}: {self.instances} {verb} by {self.actor_label}"
