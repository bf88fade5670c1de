"""Runtime state: instances, their step executions and attempts.

Both models are django-fsm machines with protected state fields: the only
way to change a state is a ``@transition`` method, and the only caller of
those is ``workflows_app.engine``, which writes the audit row in the same
transaction. Transition methods set fields only; they do no queries and no I/O.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any, cast

from django.conf import settings
from django.db import models
from django_fsm import (
    ConcurrentTransition,
    ConcurrentTransitionMixin,
    FSMField,
    transition,
)

from workflows_app.activities.base import step_idempotency_key
from workflows_app.models.definitions import StepDefinition, WorkflowDefinition

APP = "workflows_app"


class StateField(FSMField):
    """django-fsm's state field, read straight from the object.

    django-fsm reads a state through a new ``DeferredAttribute`` each time
    (a deferred state field would load on demand); the engine reads states
    hundreds of times per workflow and loads them with the row. A deferred
    one still loads. Deconstructed as django-fsm's own field: the same
    column, so migrations see no change."""

    def get_state(self, instance: Any) -> Any:
        try:
            return instance.__dict__[self.name]
        except KeyError:
            return super().get_state(instance)

    def deconstruct(self) -> Any:
        name, _, args, kwargs = super().deconstruct()
        return name, "django_fsm.FSMField", args, kwargs


class FencedFSMMixin(ConcurrentTransitionMixin):
    """Remembers the state values the object was loaded (or last written)
    with: the fence of its next UPDATE, also when the engine writes it with
    its own compiled statement (``engine/rows.py``) instead of ``save()``."""

    @property
    def state_fields(self) -> tuple[Any, ...]:
        # django-fsm filters every field of the model on each call, and it is
        # called on every object load and write: once per class is enough.
        cls = type(self)
        fields: tuple[Any, ...] | None = cls.__dict__.get("_state_fields_cache")
        if fields is None:
            fields = tuple(super().state_fields)
            cls._state_fields_cache = fields  # type: ignore[attr-defined]
        return fields

    def _update_initial_state(self) -> None:
        # django-fsm's own version reads each state through its descriptor;
        # this runs on every load and write of every step, so the states
        # are read from the object's dict once and shared: django-fsm's
        # save() fences on the same values as the engine's writes.
        values = self.__dict__
        states = {
            field.attname: values[field.attname]
            if field.attname in values
            else field.value_from_object(self)  # a deferred field: loads it
            for field in self.state_fields
        }
        self._ConcurrentTransitionMixin__initial_states = states
        self._seen_states = states
        # The loaded values, to write only what changed (engine/rows.py).
        self._loaded_values = dict(values)

    def changed(self, attnames: Any) -> list[str]:
        """Which of ``attnames`` differ from the loaded (or last written)
        values. A JSON value may have been changed in place: always listed."""
        loaded, now = self._loaded_values, self.__dict__
        mutable = type(self)._json_attnames()
        return [
            name
            for name in attnames
            if name in mutable or now.get(name) != loaded.get(name)
        ]

    @classmethod
    def _json_attnames(cls) -> frozenset[str]:
        found: frozenset[str] | None = cls.__dict__.get("_json_attnames_cache")
        if found is None:
            found = frozenset(
                f.attname
                for f in cls._meta.concrete_fields
                if isinstance(f, models.JSONField)
            )
            cls._json_attnames_cache = found  # type: ignore[attr-defined]
        return found

    def fence(self) -> dict[str, Any]:
        return dict(self._seen_states)

    def written(self) -> None:
        """The row now holds this object's values: fence the next write on them."""
        self._update_initial_state()


class VersionedFSMMixin(FencedFSMMixin):
    """Compare-and-set on ``version`` as well as on the state fields.

    Every save that goes through the engine bumps ``version``; the UPDATE only
    matches the row version this object was loaded with, so two writers acting
    on the same state version cannot both win, on PostgreSQL and SQLite alike.
    A lost race raises ``django_fsm.ConcurrentTransition``.
    """

    version: int

    def _update_initial_state(self) -> None:
        super()._update_initial_state()
        self._seen_version = self.version

    def fence(self) -> dict[str, Any]:
        return {**super().fence(), "version": self._seen_version}

    def _do_update(
        self, base_qs: Any, using: Any, pk_val: Any, *args: Any, **kwargs: Any
    ) -> Any:
        updated = super()._do_update(
            base_qs.filter(version=self._seen_version), using, pk_val, *args, **kwargs
        )
        # The parent only sees the version-filtered rows: a row that exists at
        # another version is a lost race too, not a missing row.
        if not updated and base_qs.filter(pk=pk_val).using(using).exists():
            raise ConcurrentTransition(
                "Cannot save object! The version has changed since it was fetched "
                "from the database!"
            )
        return updated


class InstanceState(models.TextChoices):
    ACCEPTED = "accepted", "accepted"
    RUNNING = "running", "running"
    NEEDS_ATTENTION = "needs_attention", "needs attention"
    COMPENSATING = "compensating", "compensating"
    COMPLETED = "completed", "completed"
    COMPENSATED = "compensated", "compensated"
    CANCELLED = "cancelled", "cancelled"
    FAILED = "failed", "failed"


TERMINAL_STATES = frozenset(
    {
        InstanceState.COMPLETED,
        InstanceState.COMPENSATED,
        InstanceState.CANCELLED,
        InstanceState.FAILED,
    }
)
ACTIVE_STATES = frozenset(set(InstanceState) - TERMINAL_STATES)


class AttentionKind(models.TextChoices):
    NONE = "", "-"
    STEP_FAILED = "step_failed", "a step failed for good"
    STEP_UNKNOWN = "step_unknown", "a step's outcome is unknown"
    AFTER_PIVOT = "after_pivot", "a step after the pivot failed"
    PIVOT_UNCERTAIN = "pivot_uncertain", "the pivot may or may not have applied"
    COMPENSATION_FAILED = "compensation_failed", "a compensation exhausted its retries"
    DEADLINE = "deadline", "the workflow deadline passed"


class StuckKind(models.TextChoices):
    """Why a stuck instance is stuck (its alert is of the same kind)."""

    NONE = "", "-"
    NO_PROGRESS = "no_progress", "no progress"
    DEADLINE = "deadline", "deadline passed"
    HELD = "held", "waits on a person"
    COMPENSATION_FAILED = "compensation_failed", "compensation failed"
    MILESTONE_OVERDUE = "milestone_overdue", "expected event missing"
    HUMAN_STEP_OVERDUE = "human_step_overdue", "a step waits too long for a person"


def _fsm_condition(
    check: Callable[[WorkflowInstance], bool],
) -> Callable[[models.Model], bool]:
    # django-fsm types a condition as taking any model; these are attached to
    # WorkflowInstance transitions only, so they always get an instance.
    return cast("Callable[[models.Model], bool]", check)


@_fsm_condition
def _forward_blocked(instance: WorkflowInstance) -> bool:
    return instance.attention_kind in {
        AttentionKind.STEP_FAILED,
        AttentionKind.STEP_UNKNOWN,
        AttentionKind.AFTER_PIVOT,
        AttentionKind.PIVOT_UNCERTAIN,
    }


@_fsm_condition
def _compensation_blocked(instance: WorkflowInstance) -> bool:
    return instance.attention_kind == AttentionKind.COMPENSATION_FAILED


@_fsm_condition
def _can_compensate(instance: WorkflowInstance) -> bool:
    # Past the pivot nothing is undone, unless a person judges that an uncertain
    # pivot did not apply; a failed compensation is retried instead.
    before_pivot = (
        not instance.pivot_passed
        or instance.attention_kind == AttentionKind.PIVOT_UNCERTAIN
    )
    return before_pivot and not _compensation_blocked(instance)


@_fsm_condition
def _can_restart(instance: WorkflowInstance) -> bool:
    # A restart runs the steps again under new keys: never a pivot that may
    # have applied, since nothing undoes it.
    return not instance.pivot_passed and not _compensation_blocked(instance)


@_fsm_condition
def _orchestrated(instance: WorkflowInstance) -> bool:
    # Observed workflows run nothing: nothing to retry, resume or compensate.
    return instance.definition.mode == WorkflowDefinition.Mode.ORCHESTRATED


@_fsm_condition
def _deadline_hold(instance: WorkflowInstance) -> bool:
    return instance.attention_kind == AttentionKind.DEADLINE


class WorkflowInstance(VersionedFSMMixin, models.Model):
    State = InstanceState

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    definition = models.ForeignKey(
        WorkflowDefinition, on_delete=models.PROTECT, related_name="instances"
    )
    # Denormalised from the definition: idempotency and filters span versions.
    definition_key = models.CharField(max_length=100)
    business_key = models.CharField(max_length=200)
    # NULL (not "") when absent: the unique constraint then ignores the row.
    idempotency_key = models.CharField(max_length=200, null=True, blank=True)  # noqa: DJ001
    input = models.JSONField(default=dict, blank=True)
    input_fingerprint = models.CharField(max_length=64)
    outputs = models.JSONField(default=dict, blank=True)
    state = StateField(
        max_length=20,
        choices=InstanceState.choices,
        default=InstanceState.ACCEPTED,
        protected=True,
    )
    attention_kind = models.CharField(
        max_length=30, choices=AttentionKind.choices, default="", blank=True
    )
    attention_reason = models.TextField(blank=True)
    version = models.PositiveIntegerField(default=0)
    accepted_at = models.DateTimeField()
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    last_progress_at = models.DateTimeField()
    deadline_at = models.DateTimeField(null=True, blank=True)
    # Sweep bookkeeping: when this instance counts as stuck if it does not move.
    stuck_check_at = models.DateTimeField(null=True, blank=True)
    # Sweep bookkeeping: when to re-send the start of an accepted instance
    # whose message may have been lost.
    redispatch_at = models.DateTimeField(null=True, blank=True)
    # Set once the pivot (or a later step) was claimed: its effect may exist,
    # so nothing is compensated; cleared again if the pivot fails permanently.
    pivot_passed = models.BooleanField(default=False)
    # While an operator's restart undoes the steps from this position on
    # (state compensating); cleared when the instance runs forward again.
    restart_position = models.PositiveIntegerField(null=True, blank=True)
    stuck = models.BooleanField(default=False)
    # A database default too, so bulk loaders that insert rows directly
    # (generate_load) need not know every bookkeeping column.
    stuck_kind = models.CharField(
        max_length=30, choices=StuckKind.choices, default="", db_default="", blank=True
    )
    stuck_reason = models.CharField(max_length=300, blank=True)
    stuck_since = models.DateTimeField(null=True, blank=True)
    # Sweep bookkeeping: set when the instance turns stuck, cleared once its
    # alert is opened, so the alert sweep never scans all stuck instances.
    alert_due = models.BooleanField(default=False)
    # The definition's declared search attributes, read from the input at
    # start (lower-case text). Indexed on PostgreSQL (GIN, jsonb_path_ops;
    # migration 0016) for the list's "name:value" search.
    search_attributes = models.JSONField(
        default=dict, db_default=models.Value({}, models.JSONField()), blank=True
    )

    class Meta:
        ordering = ["-accepted_at"]
        constraints = [
            models.UniqueConstraint(
                fields=["definition_key", "idempotency_key"],
                condition=models.Q(idempotency_key__isnull=False),
                name="instance_idempotency_key",
            ),
        ]
        indexes = [
            # Exact business keys (events, the API). The list's case-blind
            # prefix search has an expression index, and search attributes a
            # GIN index, both PostgreSQL only (migration 0016).
            models.Index(fields=["business_key"], name="instance_business_key"),
            models.Index(
                fields=["state", "-last_progress_at"], name="instance_state_progress"
            ),
            # Counts per definition and state (index-only), and a definition
            # page's median accept-to-finish time, which reads the two times
            # from the index instead of visiting ~15,000 rows a day.
            models.Index(
                fields=["definition_key", "state", "-last_progress_at"],
                include=["accepted_at", "finished_at"],
                name="instance_def_state_times",
            ),
            models.Index(fields=["-last_progress_at"], name="instance_progress"),
            # The dashboard's counts of unfinished instances per definition
            # and state (overview, definition list and page; index-only): a
            # few percent of the rows, so a small index (42 pages for 45,000
            # of 1M) instead of a range of instance_def_state_times. With the
            # id and attention kind, a definition page's step map reads its
            # instances from the index alone too: on a cold cache (after a
            # restart) visiting their 16,000 heap pages took 1-7 s.
            models.Index(
                fields=["definition_key", "state"],
                include=["id", "attention_kind"],
                condition=models.Q(state__in=sorted(ACTIVE_STATES)),
                name="instance_active_covering",
            ),
            # The overview's activity charts (workflows_app/activity.py),
            # index-only (a cold cache made the heap visits seconds); they
            # also use instance_accepted_key (migration 0030).
            models.Index(
                fields=["finished_at"],
                include=["definition_key", "state", "accepted_at"],
                condition=models.Q(finished_at__isnull=False),
                name="instance_finished_covering",
            ),
            # Stuck in the pages' sense (engine.stuck.STALLED: no progress
            # past the rule, holds apart): its counts per definition
            # (index-only) and the stuck list in progress order. A hold is
            # stuck too for the sweeper, so instance_stuck holds ten times as
            # many rows, which the counts would have to visit.
            models.Index(
                fields=["last_progress_at", "id"],
                include=["definition_key"],
                condition=models.Q(
                    stuck=True,
                    stuck_kind__in=["milestone_overdue", "no_progress"],
                ),
                name="instance_stalled",
            ),
            # The stuck queue on the dashboard, oldest first.
            models.Index(
                fields=["stuck_since"],
                condition=models.Q(stuck=True),
                name="instance_stuck",
            ),
            # Alert sweep: stuck instances whose alert is not opened yet.
            models.Index(
                fields=["stuck_since"],
                condition=models.Q(alert_due=True),
                name="instance_alert_due",
            ),
            # Sweeper: instances that may turn stuck, or pass their deadline.
            models.Index(
                fields=["stuck_check_at"],
                condition=models.Q(stuck=False, stuck_check_at__isnull=False),
                name="instance_stuck_check",
            ),
            models.Index(
                fields=["deadline_at"],
                condition=models.Q(state__in=["accepted", "running"]),
                name="instance_deadline_due",
            ),
            # Retention: finished instances of a definition, oldest first.
            models.Index(
                fields=["definition", "finished_at", "id"],
                condition=models.Q(finished_at__isnull=False),
                name="instance_finished",
            ),
            # Sweeper: accepted instances whose start message may be lost.
            models.Index(
                fields=["redispatch_at"],
                condition=models.Q(redispatch_at__isnull=False),
                name="instance_redispatch",
            ),
        ]
        permissions = [
            ("retry_step", "Can retry a step of a workflow instance"),
            ("resume_instance", "Can resume a held workflow instance"),
            ("compensate_instance", "Can start compensation of a workflow instance"),
            (
                "mark_step_done",
                "Can mark a step of a workflow instance as done by hand",
            ),
            ("cancel_instance", "Can cancel a workflow instance"),
            ("close_instance", "Can close a workflow instance as failed"),
            ("retry_compensation", "Can retry a failed compensation"),
            ("acknowledge_alert", "Can acknowledge an alert"),
            ("edit_instance_data", "Can correct an instance's input or outputs"),
            (
                "restart_instance",
                "Can restart a workflow instance from an earlier step",
            ),
            ("operate_timer", "Can wake a timer step early or extend it"),
            (
                "complete_human_step",
                "Can claim and complete a step that waits for a person",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.definition_key}/{self.business_key} ({self.state})"

    @property
    def is_terminal(self) -> bool:
        return self.state in TERMINAL_STATES

    # -- engine transitions -------------------------------------------------
    @transition(
        field=state, source=InstanceState.ACCEPTED, target=InstanceState.RUNNING
    )
    def start(self) -> None:
        pass

    @transition(
        field=state, source=InstanceState.RUNNING, target=InstanceState.COMPLETED
    )
    def complete(self) -> None:
        pass

    @transition(
        field=state, source=InstanceState.RUNNING, target=InstanceState.COMPENSATING
    )
    def begin_compensation(self) -> None:
        pass

    @transition(
        field=state,
        source=[InstanceState.RUNNING, InstanceState.COMPENSATING],
        target=InstanceState.NEEDS_ATTENTION,
    )
    def hold(self, kind: str, reason: str) -> None:
        self.attention_kind = kind
        self.attention_reason = reason

    @transition(
        field=state, source=InstanceState.COMPENSATING, target=InstanceState.COMPENSATED
    )
    def finish_compensation(self) -> None:
        pass

    @transition(
        field=state, source=InstanceState.COMPENSATING, target=InstanceState.RUNNING
    )
    def restart(self) -> None:
        """The steps from the restart point are undone: run forward again."""
        self.restart_position = None

    # -- operator transitions -----------------------------------------------
    @transition(
        field=state,
        source=InstanceState.NEEDS_ATTENTION,
        target=InstanceState.RUNNING,
        conditions=[_deadline_hold, _orchestrated],
        permission=f"{APP}.resume_instance",
    )
    def resume(self) -> None:
        self._clear_attention()

    @transition(
        field=state,
        source=InstanceState.NEEDS_ATTENTION,
        target=InstanceState.RUNNING,
        conditions=[_forward_blocked, _orchestrated],
        permission=f"{APP}.retry_step",
    )
    def retry_step(self) -> None:
        self._clear_attention()

    @transition(
        field=state,
        source=InstanceState.NEEDS_ATTENTION,
        target=InstanceState.RUNNING,
        conditions=[_forward_blocked],
        permission=f"{APP}.mark_step_done",
    )
    def mark_step_done(self) -> None:
        self._clear_attention()

    @transition(
        field=state,
        source=InstanceState.NEEDS_ATTENTION,
        target=InstanceState.COMPENSATING,
        conditions=[_can_compensate, _orchestrated],
        permission=f"{APP}.compensate_instance",
    )
    def compensate(self) -> None:
        self._clear_attention()

    @transition(
        field=state,
        source=InstanceState.NEEDS_ATTENTION,
        target=InstanceState.COMPENSATING,
        conditions=[_forward_blocked, _can_restart, _orchestrated],
        permission=f"{APP}.restart_instance",
    )
    def restart_from_step(self, position: int) -> None:
        """Undo the steps from ``position`` on (newest first), then run them
        again; the planner reads ``restart_position``."""
        self._clear_attention()
        self.restart_position = position

    @transition(
        field=state,
        source=InstanceState.NEEDS_ATTENTION,
        target=InstanceState.COMPENSATING,
        conditions=[_forward_blocked, _can_compensate, _orchestrated],
        permission=f"{APP}.retry_step",
    )
    def retry_repaired_step(self, position: int) -> None:
        """Retry with repaired data a step whose earlier call may have applied:
        undo that call first, then run the step again as a new run."""
        self._clear_attention()
        self.restart_position = position

    @transition(
        field=state,
        source=InstanceState.ACCEPTED,
        target=InstanceState.CANCELLED,
        permission=f"{APP}.cancel_instance",
    )
    @transition(
        field=state,
        source=InstanceState.RUNNING,
        target=InstanceState.COMPENSATING,
        conditions=[_can_compensate, _orchestrated],
        permission=f"{APP}.cancel_instance",
    )
    @transition(
        field=state,
        source=InstanceState.NEEDS_ATTENTION,
        target=InstanceState.COMPENSATING,
        conditions=[_can_compensate, _orchestrated],
        permission=f"{APP}.cancel_instance",
    )
    def cancel(self) -> None:
        self._clear_attention()

    @transition(
        field=state,
        source=InstanceState.NEEDS_ATTENTION,
        target=InstanceState.COMPENSATING,
        conditions=[_compensation_blocked, _orchestrated],
        permission=f"{APP}.retry_compensation",
    )
    def retry_compensation(self) -> None:
        self._clear_attention()

    @transition(
        field=state,
        source=InstanceState.NEEDS_ATTENTION,
        target=InstanceState.FAILED,
        permission=f"{APP}.close_instance",
    )
    def close_as_failed(self) -> None:
        self.restart_position = None  # a restart left unfinished ends here too

    def _clear_attention(self) -> None:
        self.attention_kind = AttentionKind.NONE
        self.attention_reason = ""


class StepState(models.TextChoices):
    PENDING = "pending", "pending"
    SCHEDULED = "scheduled", "scheduled"
    RUNNING = "running", "running"
    RETRYING = "retrying", "retrying"
    WAITING = "waiting", "waiting"
    UNKNOWN = "unknown", "unknown"
    SUCCEEDED = "succeeded", "succeeded"
    FAILED = "failed", "failed"
    SKIPPED = "skipped", "skipped"


class CompensationState(models.TextChoices):
    NONE = "none", "none"
    PENDING = "pending", "pending"
    RUNNING = "running", "running"
    RETRYING = "retrying", "retrying"
    DONE = "done", "done"
    FAILED = "failed", "failed"
    NOT_NEEDED = "not_needed", "not needed"


# Step rows where an unfinished instance is now: at work, waiting, failed, or
# being undone. Few among millions of finished ones: the step map and its
# partial index (step_exec_active_covering) read only these.
ACTIVE_STEP = models.Q(
    state__in=[
        StepState.SCHEDULED,
        StepState.RUNNING,
        StepState.RETRYING,
        StepState.WAITING,
        StepState.FAILED,
        StepState.UNKNOWN,
    ]
) | models.Q(
    compensation_state__in=[
        CompensationState.PENDING,
        CompensationState.RUNNING,
        CompensationState.RETRYING,
        CompensationState.FAILED,
    ]
)


class StepExecution(FencedFSMMixin, models.Model):
    State = StepState
    CompensationState = CompensationState

    # Indexed by step_exec_position, whose first column it is.
    instance = models.ForeignKey(
        WorkflowInstance,
        on_delete=models.CASCADE,
        related_name="steps",
        db_index=False,
    )
    step_definition = models.ForeignKey(
        StepDefinition, on_delete=models.PROTECT, related_name="executions"
    )
    position = models.PositiveIntegerField()
    name = models.CharField(max_length=100)
    state = StateField(
        max_length=20,
        choices=StepState.choices,
        default=StepState.PENDING,
        protected=True,
    )
    compensation_state = StateField(
        max_length=20,
        choices=CompensationState.choices,
        default=CompensationState.NONE,
        protected=True,
    )
    attempt = models.PositiveIntegerField(default=0)
    # The database cap on attempts; an operator retry raises it.
    attempts_allowed = models.PositiveIntegerField(default=1)
    compensation_attempt = models.PositiveIntegerField(default=0)
    compensation_attempts_allowed = models.PositiveIntegerField(default=1)
    # A restart runs the step again as run 2, 3... (if it has a compensation):
    # new idempotency keys, and attempt numbers that keep counting (a message
    # of an earlier run stays stale). run_base_*: the attempts claimed before
    # the latest restart (backoff counts from there).
    run = models.PositiveIntegerField(default=1)
    run_base_attempt = models.PositiveIntegerField(default=0)
    run_base_compensation_attempt = models.PositiveIntegerField(default=0)
    # The last answer under the current key was a permanent failure: nothing
    # applied, so there is nothing to compensate.
    last_failure_permanent = models.BooleanField(default=False)
    # An operator corrected the data this step was called with: its next call
    # is a new run under new idempotency keys.
    data_repaired = models.BooleanField(default=False)
    # Bookkeeping shared by the action and its compensation (never both active
    # at once). next_attempt_at: the earliest start of the next attempt
    # (backoff). deadline_at: when the running attempt times out (swept).
    # redispatch_at: when claimable work still unclaimed is (re)sent to the
    # broker by the sweeper, which covers lost messages and long backoffs.
    next_attempt_at = models.DateTimeField(null=True, blank=True)
    deadline_at = models.DateTimeField(null=True, blank=True)
    redispatch_at = models.DateTimeField(null=True, blank=True)
    # How often the sweeper re-sent the work since it was last sent or
    # claimed: each re-send waits twice as long, so a backlog in the broker
    # is not multiplied by copies queued behind it.
    redispatches = models.PositiveIntegerField(default=0, db_default=0)
    last_error = models.TextField(blank=True)
    # last_error without what differs per instance: failure groups use it.
    error_signature = models.CharField(max_length=300, blank=True)
    output = models.JSONField(null=True, blank=True)
    succeeded_at = models.DateTimeField(null=True, blank=True)
    compensated_at = models.DateTimeField(null=True, blank=True)
    # A timer step waiting: when the sweeper wakes it (never a broker countdown).
    wake_at = models.DateTimeField(null=True, blank=True)
    # A step waiting for a person: who took it from the inbox, and when.
    claimed_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="claimed_steps",
        db_index=False,  # step_exec_claimed_by: only where set
    )
    claimed_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["instance", "position"]
        constraints = [
            models.UniqueConstraint(
                fields=["instance", "position"], name="step_exec_position"
            ),
        ]
        indexes = [
            # Sweeper: attempts past their deadline.
            models.Index(
                fields=["deadline_at"],
                condition=models.Q(deadline_at__isnull=False),
                name="step_exec_deadline",
            ),
            # Sweeper: retries due, and dispatched work that never started.
            models.Index(
                fields=["redispatch_at"],
                condition=models.Q(redispatch_at__isnull=False),
                name="step_exec_redispatch",
            ),
            # Sweeper: timers due.
            models.Index(
                fields=["wake_at"],
                condition=models.Q(wake_at__isnull=False),
                name="step_exec_wake",
            ),
            models.Index(
                fields=["claimed_by"],
                condition=models.Q(claimed_by__isnull=False),
                name="step_exec_claimed_by",
            ),
            # The inbox: steps waiting for a person.
            models.Index(
                fields=["step_definition"],
                condition=models.Q(state="waiting", wake_at__isnull=True),
                name="step_exec_waiting",
            ),
            # Failure groups: the few steps that block their instance.
            models.Index(
                fields=["error_signature"],
                condition=models.Q(state__in=["failed", "unknown"])
                | models.Q(compensation_state="failed"),
                name="step_exec_blocking",
            ),
            # The step map: where the unfinished instances are (index-only).
            models.Index(
                fields=["instance"],
                include=["name", "state", "compensation_state"],
                condition=ACTIVE_STEP,
                name="step_exec_active_covering",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.name} ({self.state}/{self.compensation_state})"

    def idempotency_key(self, direction: str) -> str:
        return step_idempotency_key(self.instance_id, self.name, direction, self.run)

    def keys_by_run(self) -> list[tuple[int, str, str]]:
        """(run, action key, compensation key or "") for every run so far: a
        restart compensated earlier runs where the step has a compensation."""
        has_undo = bool(self.step_definition.compensation)
        return [
            (
                run,
                step_idempotency_key(self.instance_id, self.name, "action", run),
                step_idempotency_key(self.instance_id, self.name, "compensation", run)
                if has_undo and (run < self.run or self.compensation_state != "none")
                else "",
            )
            for run in range(1, self.run + 1)
        ]

    @property
    def started(self) -> bool:
        """Whether an action attempt of this run was claimed: the effect may exist."""
        return self.attempt > self.run_base_attempt

    @property
    def may_have_applied(self) -> bool:
        """Started (or done by hand) and not answered with a permanent failure."""
        done_by_hand = self.state == StepState.SKIPPED
        return (self.started or done_by_hand) and not self.last_failure_permanent

    # -- action -----------------------------------------------------------
    @transition(field=state, source=StepState.PENDING, target=StepState.SCHEDULED)
    def schedule(self) -> None:
        pass

    @transition(
        field=state,
        source=[StepState.SCHEDULED, StepState.RETRYING],
        target=StepState.RUNNING,
    )
    def begin_attempt(self) -> None:
        self.attempt += 1
        self.last_failure_permanent = False
        self.next_attempt_at = None
        self.redispatch_at = None
        self.redispatches = 0

    @transition(
        field=state,
        source=[StepState.RUNNING, StepState.WAITING],
        target=StepState.SUCCEEDED,
    )
    def succeed(self, output: Any) -> None:
        self.output = output
        self.last_error = ""
        self.deadline_at = None

    @transition(field=state, source=StepState.RUNNING, target=StepState.WAITING)
    def wait(self) -> None:
        pass

    @transition(
        field=state,
        source=[StepState.RUNNING, StepState.WAITING, StepState.UNKNOWN],
        target=StepState.RETRYING,
    )
    def retry(self, error: str) -> None:
        self.last_error = error or self.last_error
        self.deadline_at = None

    @transition(
        field=state,
        source=[StepState.RUNNING, StepState.WAITING],
        target=StepState.FAILED,
    )
    def fail(self, error: str, permanent: bool = False) -> None:
        self.last_error = error
        self.last_failure_permanent = permanent
        self.deadline_at = None

    @transition(
        field=state,
        source=[StepState.RUNNING, StepState.WAITING],
        target=StepState.UNKNOWN,
    )
    def time_out(self, error: str) -> None:
        self.last_error = error
        self.deadline_at = None

    @transition(
        field=state,
        source=[StepState.FAILED, StepState.UNKNOWN],
        target=StepState.SCHEDULED,
        permission=f"{APP}.retry_step",
    )
    def retry_now(self, extra_attempts: int) -> None:
        self.attempts_allowed = self.attempt + extra_attempts

    @transition(
        field=state,
        source=[StepState.FAILED, StepState.UNKNOWN],
        target=StepState.SKIPPED,
        permission=f"{APP}.mark_step_done",
    )
    def mark_done(self, output: Any) -> None:
        self.output = output
        self.last_failure_permanent = False
        self.data_repaired = False
        self.deadline_at = None

    # -- steps the engine runs itself: timers and steps for a person --------
    @transition(field=state, source=StepState.SCHEDULED, target=StepState.WAITING)
    def begin_wait(self, wake_at: Any, deadline: Any) -> None:
        """A timer starts (``wake_at``), or a step opens in the inbox (its
        time rule ``deadline``). Nothing is called: no attempt, no effect."""
        self.wake_at = wake_at
        self.deadline_at = deadline
        self.redispatch_at = None
        self.next_attempt_at = None
        self.last_failure_permanent = False
        self.claimed_by = None
        self.claimed_at = None

    @transition(field=state, source=StepState.SCHEDULED, target=StepState.FAILED)
    def refuse_wait(self, error: str) -> None:
        """The timer cannot start (its time is missing or not a time): a
        permanent failure; nothing was done, nothing to undo."""
        self.last_error = error
        self.last_failure_permanent = True
        self.redispatch_at = None

    @transition(field=state, source=StepState.WAITING, target=StepState.SUCCEEDED)
    def wake(self, output: Any) -> None:
        """The timer's time came (the sweeper)."""
        self.output = output
        self.wake_at = None

    @transition(
        field=state,
        source=StepState.WAITING,
        target=StepState.SUCCEEDED,
        permission=f"{APP}.operate_timer",
    )
    def wake_early(self, output: Any) -> None:
        """An operator ends the wait now."""
        self.output = output
        self.wake_at = None

    @transition(
        field=state,
        source=StepState.WAITING,
        target=StepState.SUCCEEDED,
        permission=f"{APP}.complete_human_step",
    )
    def complete_task(self, output: Any) -> None:
        """A person did the step; the form's data is its output."""
        self.output = output
        self.last_error = ""
        self.deadline_at = None

    @transition(
        field=state,
        source=StepState.WAITING,
        target=StepState.FAILED,
        permission=f"{APP}.complete_human_step",
    )
    def reject_task(self, error: str) -> None:
        """A person decided against it (e.g. an order review said no): a
        permanent failure, so the failure policy applies."""
        self.last_error = error
        self.last_failure_permanent = True
        self.deadline_at = None

    @transition(field=state, source=StepState.WAITING, target=StepState.PENDING)
    def stop_waiting(self) -> None:
        """The instance stopped moving forward (cancel, compensate, close):
        the wait is fenced; a closed instance's timer never wakes."""
        self.wake_at = None
        self.deadline_at = None
        self.claimed_by = None
        self.claimed_at = None

    # -- observed workflows: states follow the events services report -------
    @transition(field=state, source=StepState.PENDING, target=StepState.WAITING)
    def expect(self) -> None:
        """The engine now waits for this milestone's event."""

    @transition(field=state, source=StepState.PENDING, target=StepState.SUCCEEDED)
    def observe_early(self, output: Any) -> None:
        """The milestone's event arrived before an earlier one (out of order)."""
        self.output = output

    @transition(
        field=state,
        source=[StepState.PENDING, StepState.WAITING],
        target=StepState.FAILED,
    )
    def observe_failure(self, error: str) -> None:
        self.last_error = error
        self.deadline_at = None

    @transition(field=state, source=StepState.SCHEDULED, target=StepState.PENDING)
    def unschedule(self) -> None:
        """The instance stopped moving forward before this step was claimed."""
        self.redispatch_at = None
        self.next_attempt_at = None

    @transition(field=state, source=StepState.RETRYING, target=StepState.FAILED)
    def abandon_retry(self) -> None:
        """The instance stopped moving forward while this step awaited a retry."""
        self.redispatch_at = None
        self.next_attempt_at = None

    @transition(
        field=state,
        source=[
            StepState.SUCCEEDED,
            StepState.SKIPPED,
            StepState.FAILED,
            StepState.UNKNOWN,
        ],
        target=StepState.PENDING,
    )
    def rerun(self, max_attempts: int, new_keys: bool) -> None:
        """A restart: this step runs again, from scratch. ``new_keys``: as
        the next run (its earlier run was undone); a step without a
        compensation keeps its keys, so an idempotent participant answers the
        repeat from its record instead of acting twice."""
        if new_keys:
            self.run += 1
        self.data_repaired = False
        self.last_failure_permanent = False
        self.run_base_attempt = self.attempt
        self.attempts_allowed = self.attempt + max_attempts
        self.output = None
        self.last_error = ""
        self.succeeded_at = None
        self.next_attempt_at = None
        self.deadline_at = None
        self.redispatch_at = None

    # -- compensation -------------------------------------------------------
    @transition(
        field=compensation_state,
        source=[CompensationState.DONE, CompensationState.NOT_NEEDED],
        target=CompensationState.NONE,
    )
    def reopen_compensation(self) -> None:
        """A restart: the new run will need its own compensation decision."""
        self.compensation_attempts_allowed = self.compensation_attempt
        self.run_base_compensation_attempt = self.compensation_attempt
        self.compensated_at = None

    @transition(
        field=compensation_state,
        source=CompensationState.NONE,
        target=CompensationState.PENDING,
    )
    def require_compensation(self) -> None:
        pass

    @transition(
        field=compensation_state,
        source=CompensationState.NONE,
        target=CompensationState.NOT_NEEDED,
    )
    def skip_compensation(self) -> None:
        pass

    @transition(
        field=compensation_state,
        source=[CompensationState.PENDING, CompensationState.RETRYING],
        target=CompensationState.RUNNING,
    )
    def begin_compensation_attempt(self) -> None:
        self.compensation_attempt += 1
        self.next_attempt_at = None
        self.redispatch_at = None
        self.redispatches = 0

    @transition(
        field=compensation_state,
        source=CompensationState.RUNNING,
        target=CompensationState.DONE,
    )
    def compensation_succeed(self) -> None:
        self.deadline_at = None

    @transition(
        field=compensation_state,
        source=CompensationState.RUNNING,
        target=CompensationState.RETRYING,
    )
    def compensation_retry(self, error: str) -> None:
        self.last_error = error
        self.deadline_at = None

    @transition(
        field=compensation_state,
        source=CompensationState.RUNNING,
        target=CompensationState.FAILED,
    )
    def compensation_fail(self, error: str) -> None:
        self.last_error = error
        self.deadline_at = None

    @transition(
        field=compensation_state,
        source=CompensationState.FAILED,
        target=CompensationState.PENDING,
        permission=f"{APP}.retry_compensation",
    )
    def compensation_retry_now(self, extra_attempts: int) -> None:
        self.compensation_attempts_allowed = self.compensation_attempt + extra_attempts


class Attempt(models.Model):
    """One try of an action or a compensation, claimed before the external call."""

    class Direction(models.TextChoices):
        ACTION = "action", "action"
        COMPENSATION = "compensation", "compensation"

    class Outcome(models.TextChoices):
        RUNNING = "running", "running"
        SUCCEEDED = "succeeded", "succeeded"
        WAITING = "waiting", "waiting for callback"
        FAILED = "failed", "failed (retryable)"
        FAILED_PERMANENT = "failed_permanent", "failed (permanent)"
        TIMED_OUT = "timed_out", "timed out"
        # The instance was closed while the attempt was in flight.
        ABANDONED = "abandoned", "abandoned (instance closed)"

    # Indexed by attempt_step_direction_number, whose first column it is.
    step = models.ForeignKey(
        StepExecution,
        on_delete=models.CASCADE,
        related_name="attempts",
        db_index=False,
    )
    direction = models.CharField(max_length=20, choices=Direction.choices)
    number = models.PositiveIntegerField()
    task_token = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
    # The step's run when claimed: which idempotency key the call carried.
    run = models.PositiveIntegerField(default=1)
    started_at = models.DateTimeField()
    finished_at = models.DateTimeField(null=True, blank=True)
    outcome = models.CharField(
        max_length=20, choices=Outcome.choices, default=Outcome.RUNNING
    )
    error_class = models.CharField(max_length=200, blank=True)
    error_message = models.TextField(blank=True)
    worker_host = models.CharField(max_length=200, blank=True)
    task_id = models.CharField(max_length=200, blank=True)

    class Meta:
        ordering = ["step", "started_at", "id"]
        constraints = [
            models.UniqueConstraint(
                fields=["step", "direction", "number"],
                name="attempt_step_direction_number",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.step.name} {self.direction} #{self.number}: {self.outcome}"
