"""Operator power tools: known failure groups and server-side bulk jobs.

A bulk job is planned first (a draft whose items say, per instance, what
would happen), then confirmed by the operator and run by a Celery worker
under a lease. Each item acts at most once: the engine command is fenced on
the instance version seen at planning, and its timeline row names the job,
so a runner that resumes after a crash can tell an item that was already
applied from one that was not.
"""

from __future__ import annotations

from django.conf import settings
from django.db import models
from django.db.models.functions import Now
from django_fsm import ConcurrentTransitionMixin, FSMField, transition

from workflows_app.models.runtime import WorkflowInstance


class KnownFailure(models.Model):
    """An operator's note that a failure group is understood ("payments
    outage, INC-42, retry after 14:00"); the group page shows it and can hide
    known groups."""

    definition_key = models.CharField(max_length=100)
    step_name = models.CharField(max_length=100)
    signature = models.CharField(max_length=300)
    note = models.TextField()
    marked_by = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT)
    marked_at = models.DateTimeField(db_default=Now())

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["definition_key", "step_name", "signature"],
                name="known_failure_once",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.definition_key}/{self.step_name}: {self.signature}"


class BulkJobStatus(models.TextChoices):
    DRAFT = "draft", "planned, not started"
    QUEUED = "queued", "queued"
    RUNNING = "running", "running"
    PAUSED = "paused", "paused"
    CANCELLED = "cancelled", "cancelled"
    FINISHED = "finished", "finished"


class BulkJob(ConcurrentTransitionMixin, models.Model):
    Status = BulkJobStatus

    class Action(models.TextChoices):
        RETRY = "retry", "retry"
        COMPENSATE = "compensate", "compensate"

    action = models.CharField(max_length=20, choices=Action.choices)
    reason = models.TextField()
    # The instance list's query string the job was planned from.
    query = models.TextField(blank=True)
    description = models.CharField(max_length=500)
    status = FSMField(
        max_length=20,
        choices=BulkJobStatus.choices,
        default=BulkJobStatus.DRAFT,
        protected=True,
    )
    # Items per second; 0 means as fast as the worker goes.
    rate = models.FloatField(default=0)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="+"
    )
    created_at = models.DateTimeField(db_default=Now())
    confirmed_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    # Runner bookkeeping: whoever holds an unexpired lease works the job; the
    # sweeper re-sends a queued or running job whose lease ran out.
    lease_token = models.CharField(max_length=64, blank=True)
    lease_until = models.DateTimeField(null=True, blank=True)
    redispatch_at = models.DateTimeField(null=True, blank=True)
    # Operator actions on the job itself (confirm, pause, resume, cancel).
    log = models.JSONField(default=list, blank=True)

    class Meta:
        ordering = ["-id"]
        indexes = [
            # Sweeper: jobs to (re)start.
            models.Index(
                fields=["redispatch_at"],
                condition=models.Q(status__in=["queued", "running"]),
                name="bulk_job_runnable",
            ),
        ]

    def __str__(self) -> str:
        return f"bulk job #{self.pk}: {self.action} ({self.status})"

    @property
    def is_active(self) -> bool:
        return self.status in {
            BulkJobStatus.QUEUED,
            BulkJobStatus.RUNNING,
            BulkJobStatus.PAUSED,
        }

    @property
    def discarded(self) -> bool:
        """Cancelled before anyone started it: a plan thrown away, nothing
        done (``confirmed_at`` is set when the job is started)."""
        return self.status == BulkJobStatus.CANCELLED and self.confirmed_at is None

    @property
    def status_label(self) -> str:
        """The status in words, as every page shows it."""
        return "discarded" if self.discarded else self.get_status_display()

    @property
    def has_ended(self) -> bool:
        return self.status in {BulkJobStatus.CANCELLED, BulkJobStatus.FINISHED}

    @transition(field=status, source=BulkJobStatus.DRAFT, target=BulkJobStatus.QUEUED)
    def confirm(self) -> None:
        pass

    @transition(field=status, source=BulkJobStatus.QUEUED, target=BulkJobStatus.RUNNING)
    def begin(self) -> None:
        pass

    @transition(
        field=status,
        source=[BulkJobStatus.QUEUED, BulkJobStatus.RUNNING],
        target=BulkJobStatus.PAUSED,
    )
    def pause(self) -> None:
        self.lease_until = None

    @transition(field=status, source=BulkJobStatus.PAUSED, target=BulkJobStatus.QUEUED)
    def resume(self) -> None:
        pass

    @transition(
        field=status,
        source=[
            BulkJobStatus.DRAFT,
            BulkJobStatus.QUEUED,
            BulkJobStatus.RUNNING,
            BulkJobStatus.PAUSED,
        ],
        target=BulkJobStatus.CANCELLED,
    )
    def cancel(self) -> None:
        self.lease_until = None

    @transition(
        field=status,
        source=[BulkJobStatus.QUEUED, BulkJobStatus.RUNNING],
        target=BulkJobStatus.FINISHED,
    )
    def finish(self) -> None:
        self.lease_until = None


class BulkJobItem(models.Model):
    class Outcome(models.TextChoices):
        PENDING = "pending", "pending"
        DONE = "done", "done"
        SKIPPED = "skipped", "skipped (nothing to do)"
        CHANGED = "changed", "skipped (changed meanwhile)"
        REFUSED = "refused", "refused"
        CANCELLED = "cancelled", "not done (job cancelled)"

    job = models.ForeignKey(BulkJob, on_delete=models.CASCADE, related_name="items")
    instance = models.ForeignKey(
        WorkflowInstance, on_delete=models.CASCADE, related_name="+"
    )
    # The instance version when the job was planned: the command is fenced on
    # it, so an instance that moved since is left alone, never acted on twice.
    seen_version = models.PositiveIntegerField()
    # What the plan said: the engine command to run ("" for none) and, in
    # words, what it will do or why nothing will be done.
    command = models.CharField(max_length=30, blank=True)
    plan = models.CharField(max_length=300)
    outcome = models.CharField(
        max_length=20, choices=Outcome.choices, default=Outcome.PENDING
    )
    message = models.CharField(max_length=500, blank=True)
    processed_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["id"]
        constraints = [
            models.UniqueConstraint(fields=["job", "instance"], name="bulk_item_once"),
        ]
        indexes = [
            # Runner: the next pending items; progress: counts per outcome.
            models.Index(fields=["job", "outcome", "id"], name="bulk_item_progress"),
        ]

    def __str__(self) -> str:
        return f"job #{self.job_id} {self.instance_id}: {self.outcome}"


class ApprovalStatus(models.TextChoices):
    PENDING = "pending", "waiting for approval"
    APPROVED = "approved", "approved and done"
    REJECTED = "rejected", "rejected"
    EXPIRED = "expired", "expired"
    FAILED = "failed", "approved, but could not be done"


class ApprovalRequest(ConcurrentTransitionMixin, models.Model):
    """Four-eyes: an operator's action held until a second operator approves.

    The action is done at approval, as the requester, fenced on the instance
    version the requester saw: an instance that moved meanwhile is not acted
    on with stale intent (the request fails instead)."""

    Status = ApprovalStatus

    instance = models.ForeignKey(
        WorkflowInstance,
        on_delete=models.CASCADE,
        null=True,
        blank=True,
        related_name="approval_requests",
    )
    bulk_job = models.ForeignKey(
        BulkJob,
        on_delete=models.CASCADE,
        null=True,
        blank=True,
        related_name="approval_requests",
    )
    # An operator action name (definitions.APPROVABLE_ACTIONS) or "bulk_job".
    action = models.CharField(max_length=30)
    # The action's arguments (step, output, new input), as the form gave them.
    params = models.JSONField(default=dict, blank=True)
    seen_version = models.PositiveIntegerField(null=True, blank=True)
    reason = models.TextField()
    requested_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="+"
    )
    requested_at = models.DateTimeField(db_default=Now())
    expires_at = models.DateTimeField()
    status = FSMField(
        max_length=20,
        choices=ApprovalStatus.choices,
        default=ApprovalStatus.PENDING,
        protected=True,
    )
    decided_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.PROTECT,
        null=True,
        blank=True,
        related_name="+",
    )
    decided_at = models.DateTimeField(null=True, blank=True)
    decision_note = models.TextField(blank=True)
    outcome = models.CharField(max_length=500, blank=True)

    class Meta:
        ordering = ["-requested_at"]
        constraints = [
            # One open request per instance and action: no duplicate asks.
            models.UniqueConstraint(
                fields=["instance", "action"],
                condition=models.Q(status="pending"),
                name="approval_one_pending",
            ),
        ]
        indexes = [
            # The overview's pending list and the expiry sweep.
            models.Index(
                fields=["expires_at"],
                condition=models.Q(status="pending"),
                name="approval_pending",
            ),
        ]
        permissions = [
            ("approve_request", "Can approve or reject another operator's request"),
        ]

    def __str__(self) -> str:
        return f"approval #{self.pk}: {self.action} ({self.status})"

    @transition(
        field=status, source=ApprovalStatus.PENDING, target=ApprovalStatus.APPROVED
    )
    def approve(self) -> None:
        pass

    @transition(
        field=status, source=ApprovalStatus.PENDING, target=ApprovalStatus.REJECTED
    )
    def reject(self) -> None:
        pass

    @transition(
        field=status, source=ApprovalStatus.PENDING, target=ApprovalStatus.EXPIRED
    )
    def expire(self) -> None:
        pass

    @transition(
        field=status, source=ApprovalStatus.PENDING, target=ApprovalStatus.FAILED
    )
    def fail(self, why: str) -> None:
        self.outcome = why[:500]


class SavedView(models.Model):
    """A named, filtered instance list ("payments held since the deploy"),
    private to its owner or shared with the team (listed on the overview)."""

    name = models.CharField(max_length=100)
    # The instance list's query string (filters and sort, never a cursor).
    query = models.TextField()
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="+"
    )
    shared = models.BooleanField(default=True)
    created_at = models.DateTimeField(db_default=Now())

    class Meta:
        ordering = ["name"]
        constraints = [
            models.UniqueConstraint(fields=["owner", "name"], name="saved_view_name"),
        ]

    def __str__(self) -> str:
        return self.name
