"""Hourly activity per definition, for the overview's charts.

An hour is rolled up once it is over (the sweeper does it): its counts no
longer change, so the charts read a few hundred small rows instead of
scanning a week of instances and history. The hour still running is counted
live (``workflows_app.activity``)."""

from __future__ import annotations

from django.db import models


class ActivityHour(models.Model):
    definition_key = models.CharField(max_length=100)
    hour = models.DateTimeField(help_text="Start of the hour (UTC).")
    started = models.PositiveIntegerField(default=0)
    completed = models.PositiveIntegerField(default=0)
    compensated = models.PositiveIntegerField(default=0)
    held = models.PositiveIntegerField(
        default=0, help_text="Moves into needs attention during the hour."
    )
    # Accept-to-complete durations of the instances completed in the hour:
    # counts per bucket of workflows_app.activity.DURATION_BOUNDS.
    durations = models.JSONField(default=list)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["hour", "definition_key"], name="activity_hour_unique"
            )
        ]

    def __str__(self) -> str:
        return f"{self.definition_key} @ {self.hour:%Y-%m-%d %H:00}"


class ActivityRollup(models.Model):
    """One row: every hour before ``rolled_until`` is in ActivityHour."""

    rolled_until = models.DateTimeField(null=True)

    def __str__(self) -> str:
        return f"rolled up until {self.rolled_until}"
