"""What the HTTP activity sent and received on each attempt.

Written by the activity itself, right after its call and outside any
transaction, keyed by the attempt's task token (the attempt row is committed
before the call). Secrets and configured fields are redacted before a row is
written, bodies are cut to their first few KB, and old rows are pruned (see
``workflows_app.activities.http_record``).
"""

from __future__ import annotations

from django.db import models
from django.utils import timezone

from workflows_app.models.runtime import Attempt


class AttemptExchange(models.Model):
    attempt = models.ForeignKey(
        Attempt,
        to_field="task_token",
        on_delete=models.CASCADE,
        related_name="exchanges",
    )
    # 1, then 2, 3... for each redirect followed within the attempt.
    hop = models.PositiveSmallIntegerField(default=1)
    method = models.CharField(max_length=10)
    url = models.TextField()
    request_headers = models.JSONField(default=dict)
    request_body = models.TextField(blank=True)
    request_bytes = models.PositiveIntegerField(default=0)
    # Null when no response arrived (refused, reset, timed out).
    status = models.PositiveSmallIntegerField(null=True, blank=True)
    response_headers = models.JSONField(default=dict)
    response_body = models.TextField(blank=True)
    response_bytes = models.PositiveIntegerField(null=True, blank=True)
    duration_ms = models.PositiveIntegerField(default=0)
    error = models.TextField(blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["attempt", "hop", "id"]
        indexes = [
            # The retention prune deletes the oldest rows first.
            models.Index(fields=["created_at"], name="exchange_created"),
        ]

    def __str__(self) -> str:
        return f"{self.method} {self.url} -> {self.status or self.error[:40]}"

    @property
    def body_cut(self) -> bool:
        return (self.response_bytes or 0) > len(self.response_body.encode())
