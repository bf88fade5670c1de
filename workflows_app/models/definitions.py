"""Workflow definitions: versioned, edited by workflow admins in the admin.

A definition is identified by ``key`` and ``version``. A draft may be edited;
publishing freezes it. Editing a published workflow means creating a new draft
(version + 1) from it, so running instances keep the version they pinned.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.core.exceptions import ValidationError
from django.core.validators import MinValueValidator, RegexValidator, validate_email
from django.db import models, transaction
from django.db.models import Max
from django.utils import timezone

from workflows_app.search_attributes import declaration_errors

KEY_VALIDATOR = RegexValidator(
    r"^[a-z0-9][a-z0-9_.-]*$",
    "Use lower-case letters, digits, '-', '_' and '.', "
    "starting with a letter or digit.",
)
STEP_NAME_VALIDATOR = RegexValidator(
    r"^[a-z][a-z0-9_]*$",
    "Use lower-case letters, digits and '_', starting with a letter.",
)


class DefinitionQuerySet(models.QuerySet["WorkflowDefinition"]):
    def published(self) -> DefinitionQuerySet:
        return self.filter(status=WorkflowDefinition.Status.PUBLISHED)

    def current(self, key: str) -> WorkflowDefinition | None:
        """The newest published version of ``key``: what new instances run."""
        return self.published().filter(key=key).order_by("-version").first()


# Operator actions that can be put under four-eyes approval, with labels.
APPROVABLE_ACTIONS = {
    "retry_step": "retry step",
    "resume": "resume",
    "mark_step_done": "mark step done by hand",
    "retry_compensation": "retry compensation",
    "compensate": "compensate",
    "cancel": "cancel",
    "close_as_failed": "close as failed",
    "repair": "edit input or output",
    "restart_from_step": "restart from an earlier step",
    "wake_timer": "wake a timer early",
    "extend_timer": "extend a timer",
    "complete_human_step": "complete a step that waits for a person",
}
# A timer's time from the input: "input." then a dotted path.
WAIT_UNTIL_VALIDATOR = RegexValidator(
    r"^input(\.[A-Za-z0-9_-]+)+$",
    "Write the path in the input, e.g. input.ship_by.",
)


class WorkflowDefinition(models.Model):
    class Mode(models.TextChoices):
        ORCHESTRATED = "orchestrated", "orchestrated (the engine drives the steps)"
        OBSERVED = "observed", "observed (reconstructed from service events)"

    class FailurePolicy(models.TextChoices):
        COMPENSATE = "compensate", "compensate automatically"
        HOLD = "hold", "hold for an operator"

    class Status(models.TextChoices):
        DRAFT = "draft", "draft"
        PUBLISHED = "published", "published"

    key = models.CharField(max_length=100, validators=[KEY_VALIDATOR])
    version = models.PositiveIntegerField(default=1, validators=[MinValueValidator(1)])
    title = models.CharField(max_length=200)
    description = models.TextField(blank=True)
    mode = models.CharField(
        max_length=20, choices=Mode.choices, default=Mode.ORCHESTRATED
    )
    failure_policy = models.CharField(
        max_length=20, choices=FailurePolicy.choices, default=FailurePolicy.COMPENSATE
    )
    stuck_after = models.DurationField(
        default=timedelta(minutes=15),
        help_text="An unfinished instance that made no progress for this long "
        "is stuck.",
    )
    deadline = models.DurationField(
        null=True,
        blank=True,
        help_text="Overall time limit from acceptance; empty means none.",
    )
    alert_recipients = models.TextField(
        blank=True, help_text="Email addresses, comma or newline separated."
    )
    alert_webhooks = models.TextField(
        blank=True,
        help_text="Chat or webhook targets for alerts, one per line: "
        "'slack env:NAME' (a chat's incoming-webhook URL is a credential: give "
        "the name of the environment variable or secret file holding it) or "
        "'json https://…' (signed JSON).",
    )
    event_webhooks = models.TextField(
        blank=True,
        help_text="State-change webhooks, one per line: the events "
        "(completed, compensated, needs_attention, failed, or *), a space, "
        "then the URL or env:NAME / secret:NAME. Signed JSON, at least once.",
    )
    # Four-eyes: operator actions (names as in APPROVABLE_ACTIONS) that a
    # second operator must approve first, how long a request stays open, and
    # the size above which a bulk job over this definition needs approval.
    approval_actions = models.JSONField(default=list, blank=True)
    approval_expires_after = models.DurationField(
        default=timedelta(hours=4),
        help_text="An approval request not decided within this time expires.",
    )
    approval_bulk_over = models.PositiveIntegerField(
        null=True,
        blank=True,
        help_text="Bulk jobs acting on more instances of this workflow than "
        "this need a second operator's approval; empty means never.",
    )
    # Retention: an operational setting, editable on published versions too
    # (the admin writes it to every version of the key).
    retention = models.DurationField(
        null=True,
        blank=True,
        help_text="Finished instances (completed, compensated, cancelled, "
        "failed) older than this are purged by the sweeper; empty means keep "
        "forever. Applies to every version of this workflow.",
    )
    archive_on_purge = models.BooleanField(
        default=True,
        help_text="Write purged instances to the archive folder "
        "(SAGA_ARCHIVE_DIR) first; without that folder nothing is purged.",
    )
    # Input values worth finding: {"customer": "customer.id", ...}; see
    # workflows_app.search_attributes.
    search_attributes = models.JSONField(
        default=dict,
        blank=True,
        help_text="Input values the instance list can find, as name: dotted "
        'input path, e.g. {"customer": "customer.id", "email": "contact.email"}; '
        "searched as customer:c-349 (exact, any case).",
    )
    status = models.CharField(
        max_length=20, choices=Status.choices, default=Status.DRAFT
    )
    published_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    objects = DefinitionQuerySet.as_manager()

    class Meta:
        ordering = ["key", "-version"]
        constraints = [
            models.UniqueConstraint(
                fields=["key", "version"], name="definition_key_version"
            ),
            models.CheckConstraint(
                condition=models.Q(stuck_after__gt=timedelta(0)),
                name="definition_stuck_after_positive",
            ),
            models.CheckConstraint(
                condition=models.Q(retention__isnull=True)
                | models.Q(retention__gt=timedelta(0)),
                name="definition_retention_positive",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.key} v{self.version}"

    @property
    def is_published(self) -> bool:
        return self.status == self.Status.PUBLISHED

    def recipient_list(self) -> list[str]:
        raw = self.alert_recipients.replace("\n", ",").replace(";", ",")
        return [part.strip() for part in raw.split(",") if part.strip()]

    def clean(self) -> None:
        from workflows_app.webhooks.targets import webhook_errors

        errors: dict[str, list[str]] = {}
        for address in self.recipient_list():
            try:
                validate_email(address)
            except ValidationError:
                errors.setdefault("alert_recipients", []).append(
                    f"{address!r} is not a valid email address."
                )
        for field, message in webhook_errors(self.alert_webhooks, self.event_webhooks):
            errors.setdefault(field, []).append(message)
        if self.deadline is not None and self.deadline <= timedelta(0):
            errors.setdefault("deadline", []).append("The deadline must be positive.")
        unknown = set(self.approval_actions or []) - set(APPROVABLE_ACTIONS)
        if not isinstance(self.approval_actions, list) or unknown:
            errors.setdefault("approval_actions", []).append(
                f"Unknown actions: {', '.join(sorted(map(str, unknown)))}; choose "
                f"from {', '.join(APPROVABLE_ACTIONS)}."
            )
        if self.approval_expires_after is not None and (
            self.approval_expires_after <= timedelta(0)
        ):
            errors.setdefault("approval_expires_after", []).append(
                "The approval window must be positive."
            )
        if self.stuck_after is not None and self.stuck_after <= timedelta(0):
            errors.setdefault("stuck_after", []).append("Stuck-after must be positive.")
        if self.search_attributes is None:  # a form's empty field: none declared
            self.search_attributes = {}
        for message in declaration_errors(self.search_attributes):
            errors.setdefault("search_attributes", []).append(message)
        if errors:
            raise ValidationError(errors)

    def ordered_steps(self) -> list[StepDefinition]:
        return list(self.steps.order_by("position"))

    def pivot_position(self) -> int | None:
        pivot = (
            self.steps.filter(is_pivot=True).values_list("position", flat=True).first()
        )
        return pivot

    @transaction.atomic
    def publish(self) -> None:
        """Freeze this draft. Validates the steps as a whole first."""
        if self.is_published:
            raise ValidationError(f"{self} is already published.")
        steps = self.ordered_steps()
        if self.mode == self.Mode.ORCHESTRATED and not steps:
            raise ValidationError("An orchestrated definition needs at least one step.")
        errors: list[str] = []
        try:
            self.full_clean()
        except ValidationError as exc:
            errors += exc.messages
        for step in steps:
            try:
                step.full_clean()
            except ValidationError as exc:
                errors += [f"Step {step.name!r}: {m}" for m in exc.messages]
        if sum(step.is_pivot for step in steps) > 1:
            errors.append("At most one step can be the pivot.")
        errors += restart_point_errors(
            self.mode,
            [{f: getattr(step, f) for f in RESTART_FIELDS} for step in steps],
        )
        errors += stage_errors(
            self.mode, [{f: getattr(step, f) for f in STAGE_FIELDS} for step in steps]
        )
        if errors:
            raise ValidationError(errors)
        published = WorkflowDefinition.objects.filter(
            pk=self.pk, status=self.Status.DRAFT
        ).update(status=self.Status.PUBLISHED, published_at=timezone.now())
        if not published:
            raise ValidationError(f"{self} is already published.")
        self.refresh_from_db(fields=["status", "published_at"])

    @transaction.atomic
    def new_draft(self) -> WorkflowDefinition:
        """Copy this version and its steps into a draft with the next free version."""
        # Lock every version of the key so two admins cannot mint the same number.
        list(WorkflowDefinition.objects.select_for_update().filter(key=self.key))
        top = WorkflowDefinition.objects.filter(key=self.key).aggregate(
            v=Max("version")
        )["v"]
        draft = WorkflowDefinition.objects.create(
            key=self.key,
            version=(top or 0) + 1,
            title=self.title,
            description=self.description,
            mode=self.mode,
            failure_policy=self.failure_policy,
            stuck_after=self.stuck_after,
            deadline=self.deadline,
            alert_recipients=self.alert_recipients,
            alert_webhooks=self.alert_webhooks,
            event_webhooks=self.event_webhooks,
            approval_actions=self.approval_actions,
            approval_expires_after=self.approval_expires_after,
            approval_bulk_over=self.approval_bulk_over,
            retention=self.retention,
            archive_on_purge=self.archive_on_purge,
            search_attributes=self.search_attributes,
        )
        StepDefinition.objects.bulk_create(
            [step.copy_for(draft) for step in self.steps.order_by("position")]
        )
        return draft


RESTART_FIELDS = ("name", "position", "is_pivot", "restart_point", "awaits_event")


def restart_point_errors(mode: str, steps: list[dict[str, Any]]) -> list[str]:
    """Restart points must be usable and safe. A restart re-runs the steps
    from its point up to the failed one (which is before the pivot), after
    compensating them: so a point must come before the pivot, and no step it
    may re-run may await an event (events carry no run: a late event of the
    undone run could complete the new one). ``steps``: dicts with
    ``RESTART_FIELDS``."""
    points = [step for step in steps if step.get("restart_point")]
    if not points:
        return []
    if mode != WorkflowDefinition.Mode.ORCHESTRATED:
        return ["Only orchestrated workflows can have restart points."]
    ordered = sorted(steps, key=lambda s: s.get("position") or 0)
    pivot = next((s.get("position") for s in ordered if s.get("is_pivot")), None)
    errors = []
    for point in points:
        start = point.get("position") or 0
        if pivot is not None and start >= pivot:
            errors.append(
                f"Step {point.get('name')!r}: a restart point must come before "
                "the pivot."
            )
            continue
        awaiting = [
            str(s.get("name"))
            for s in ordered
            if (s.get("position") or 0) >= start
            and (pivot is None or (s.get("position") or 0) < pivot)
            and s.get("awaits_event")
        ]
        if awaiting:
            errors.append(
                f"Step {point.get('name')!r}: a restart from here would re-run "
                f"{', '.join(awaiting)}, which awaits an event; events carry no "
                "run, so a late event of the undone run could complete the new "
                "one. Move the restart point after it."
            )
    return errors


STAGE_FIELDS = ("name", "position", "kind", "is_pivot", "parallel_with_previous")


def stage_of(steps: list[dict[str, Any]]) -> dict[Any, int]:
    """Per step name, the position of the first step of its stage.
    ``steps``: dicts with ``STAGE_FIELDS`` (any order)."""
    stage: dict[Any, int] = {}
    current: int | None = None
    for step in sorted(steps, key=lambda s: s.get("position") or 0):
        position = step.get("position") or 0
        if current is None or not step.get("parallel_with_previous"):
            current = position
        stage[step.get("name")] = current
    return stage


def stage_errors(mode: str, steps: list[dict[str, Any]]) -> list[str]:
    """Parallel stages must be runnable and keep the saga's guarantees: a
    stage is consecutive steps, the first of which is not marked "parallel
    with previous"; the pivot stands alone (a branch beside the point of no
    return could be neither only retried forward nor undone); timers and
    steps for a person stand alone too (they wait, they do not branch)."""
    ordered = sorted(steps, key=lambda s: s.get("position") or 0)
    if not any(s.get("parallel_with_previous") for s in ordered):
        return []
    if mode != WorkflowDefinition.Mode.ORCHESTRATED:
        return [
            "Only orchestrated workflows have parallel stages: an observed "
            "workflow's milestones arrive in any order anyway."
        ]
    errors = []
    if ordered[0].get("parallel_with_previous"):
        errors.append(
            f"Step {ordered[0].get('name')!r} is the first step: there is no "
            "previous step to run alongside."
        )
    members: dict[int, list[dict[str, Any]]] = {}
    stage = stage_of(ordered)
    for step in ordered:
        members.setdefault(stage[step.get("name")], []).append(step)
    for group in members.values():
        if len(group) < 2:
            continue
        names = ", ".join(repr(s.get("name")) for s in group)
        for step in group:
            if step.get("is_pivot"):
                errors.append(
                    f"Step {step.get('name')!r} is the pivot: it must be alone in "
                    f"its stage, but runs alongside {names}. A branch beside the "
                    "point of no return could be neither undone nor only "
                    "retried forward."
                )
            kind = step.get("kind") or StepDefinition.Kind.ACTIVITY
            if kind != StepDefinition.Kind.ACTIVITY:
                errors.append(
                    f"Step {step.get('name')!r} is a {kind} step: timers and steps "
                    f"for a person run alone in their stage, not alongside {names}."
                )
    return errors


class StepDefinition(models.Model):
    class Kind(models.TextChoices):
        ACTIVITY = "activity", "activity (calls a participant)"
        TIMER = "timer", "timer (waits for a duration or until a time)"
        HUMAN = "human", "waits for a person (inbox)"

    definition = models.ForeignKey(
        WorkflowDefinition, on_delete=models.CASCADE, related_name="steps"
    )
    position = models.PositiveIntegerField(help_text="Steps run in ascending position.")
    parallel_with_previous = models.BooleanField(
        default=False,
        db_default=False,
        help_text="Runs alongside the previous step: consecutive steps marked "
        "so form one stage with the step before them, whose branches start "
        "together; the next stage starts when all of them succeeded. Not for "
        "the pivot, a timer or a step for a person.",
    )
    name = models.CharField(max_length=100, validators=[STEP_NAME_VALIDATOR])
    kind = models.CharField(
        max_length=20,
        choices=Kind.choices,
        default=Kind.ACTIVITY,
        db_default=Kind.ACTIVITY,
        help_text="Timers and steps for a person call nothing and have no "
        "compensation.",
    )
    wait_for = models.DurationField(
        null=True,
        blank=True,
        help_text="Timer: wait this long from when the step starts (e.g. "
        "'3 00:00:00' for 3 days).",
    )
    wait_until = models.CharField(
        max_length=200,
        blank=True,
        validators=[WAIT_UNTIL_VALIDATOR],
        help_text="Timer: wait until the time at this path of the input, e.g. "
        "input.ship_by (ISO 8601; without a zone it is UTC).",
    )
    form_fields = models.JSONField(
        default=list,
        blank=True,
        help_text="Step for a person: the form, a JSON list of fields, e.g. "
        '[{"name": "approved", "type": "boolean", "required": true}, '
        '{"name": "note", "type": "text"}]. Types: text, number, boolean, '
        'choice (with "choices": [...]). Its time rule is the timeout: '
        "waiting longer flags the instance stuck and alerts.",
    )
    action = models.CharField(
        max_length=200,
        blank=True,
        help_text="Registered activity name, e.g. demo.charge.",
    )
    action_config = models.JSONField(default=dict, blank=True)
    compensation = models.CharField(
        max_length=200,
        blank=True,
        help_text="Activity that undoes the action; empty if none.",
    )
    compensation_config = models.JSONField(default=dict, blank=True)
    timeout = models.DurationField(
        default=timedelta(seconds=30), help_text="Time limit of one attempt."
    )
    max_attempts = models.PositiveIntegerField(default=3)
    backoff_initial = models.DurationField(default=timedelta(seconds=1))
    backoff_multiplier = models.FloatField(default=2.0)
    backoff_max = models.DurationField(default=timedelta(minutes=5))
    backoff_jitter = models.FloatField(
        default=0.1, help_text="Random spread as a fraction of the delay (0 to 1)."
    )
    retry_on_timeout = models.BooleanField(
        default=False,
        help_text="Retry a timed-out attempt automatically. Only safe when the "
        "participant deduplicates by idempotency key; otherwise a person decides.",
    )
    is_pivot = models.BooleanField(
        default=False,
        help_text="Point of no return: earlier steps are compensated on failure, "
        "this and later steps are only retried forward.",
    )
    restart_point = models.BooleanField(
        default=False,
        help_text="Operators may restart a held instance from this step: the "
        "steps from here on are compensated (newest first) where they have a "
        "compensation, then run again under new idempotency keys. Only before "
        "the pivot.",
    )
    failure_event = models.CharField(
        max_length=200,
        blank=True,
        help_text="Observed workflows: the event type that means this milestone "
        "failed and the earlier milestones need compensating.",
    )
    awaits_event = models.CharField(
        max_length=200,
        blank=True,
        help_text="Event type that completes this step (with the business key as "
        "correlation), or the milestone an observed workflow expects.",
    )

    class Meta:
        ordering = ["definition", "position"]
        constraints = [
            models.UniqueConstraint(
                fields=["definition", "name"], name="step_name_unique"
            ),
            models.UniqueConstraint(
                fields=["definition", "position"], name="step_position_unique"
            ),
            models.UniqueConstraint(
                fields=["definition"],
                condition=models.Q(is_pivot=True),
                name="step_one_pivot",
            ),
            models.CheckConstraint(
                condition=models.Q(max_attempts__gte=1), name="step_max_attempts_min"
            ),
            models.CheckConstraint(
                condition=models.Q(backoff_multiplier__gte=1),
                name="step_multiplier_min",
            ),
            models.CheckConstraint(
                condition=models.Q(backoff_jitter__gte=0, backoff_jitter__lte=1),
                name="step_jitter_range",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.definition}: {self.position}. {self.name}"

    def clean(self) -> None:
        from workflows_app.activities import registry
        from workflows_app.activities.http_config import (
            config_errors as http_config_errors,
        )

        known = registry()
        errors: dict[str, list[str]] = {}

        def err(field: str, message: str) -> None:
            errors.setdefault(field, []).append(message)

        orchestrated = (
            getattr(self, "definition", None) is None
            or self.definition.mode == WorkflowDefinition.Mode.ORCHESTRATED
        )
        if self.kind != self.Kind.ACTIVITY:
            self._engine_step_errors(orchestrated, err)
        else:
            if orchestrated and not self.action:
                err("action", "An orchestrated step needs an action activity.")
            if self.wait_for is not None or self.wait_until or self.form_fields:
                err(
                    "kind",
                    "Waits and forms belong to a timer or a step for a person: "
                    "choose that kind, or leave them empty.",
                )
        if not orchestrated and not self.awaits_event:
            err("awaits_event", "An observed step needs the event type it expects.")
        for field in ("action", "compensation"):
            name = getattr(self, field)
            if name and name not in known:
                err(
                    field,
                    f"No activity is registered as {name!r}. "
                    f"Known: {', '.join(sorted(known))}.",
                )
        for field in ("action_config", "compensation_config"):
            if not isinstance(getattr(self, field), dict):
                err(field, "Must be a JSON object.")
            elif getattr(self, field.removesuffix("_config")) == "http.request":
                # The HTTP activity's URL must be on the host allow-list, and
                # its credentials references, checked before anything runs.
                for message in http_config_errors(getattr(self, field)):
                    err(field, message)
        if self.timeout is not None and self.timeout <= timedelta(0):
            err("timeout", "The timeout must be positive.")
        if self.max_attempts is not None and not 1 <= self.max_attempts <= 100:
            err("max_attempts", "Max attempts must be between 1 and 100.")
        if self.backoff_initial is not None and self.backoff_initial < timedelta(0):
            err("backoff_initial", "The initial backoff cannot be negative.")
        if (
            self.backoff_multiplier is not None
            and not 1 <= self.backoff_multiplier <= 10
        ):
            err("backoff_multiplier", "The multiplier must be between 1 and 10.")
        if (
            self.backoff_max is not None
            and self.backoff_initial is not None
            and self.backoff_max < self.backoff_initial
        ):
            err("backoff_max", "The backoff cap must not be below the initial backoff.")
        if self.backoff_jitter is not None and not 0 <= self.backoff_jitter <= 1:
            err("backoff_jitter", "Jitter must be between 0 and 1.")
        if errors:
            raise ValidationError(errors)

    def _engine_step_errors(self, orchestrated: bool, err: Any) -> None:
        """Timers and steps for a person: the engine does them itself, so no
        activity, no compensation (nothing to undo) and not the pivot."""
        from workflows_app.engine.human_form import spec_errors

        label = self.get_kind_display()
        if not orchestrated:
            err("kind", "An observed workflow only has activity steps.")
        for field in ("action", "compensation", "awaits_event"):
            if getattr(self, field):
                err(field, f"A {self.kind} step has no {field.replace('_', ' ')}.")
        if self.is_pivot:
            err("is_pivot", f"A {label} step cannot be the pivot: it applies nothing.")
        if self.kind == self.Kind.TIMER:
            if bool(self.wait_for) == bool(self.wait_until):
                err(
                    "wait_for",
                    "A timer waits either for a duration (wait for) or until a "
                    "time from the input (wait until): give exactly one.",
                )
            if self.wait_for is not None and self.wait_for <= timedelta(0):
                err("wait_for", "The wait must be positive.")
            if self.form_fields:
                err("form_fields", "Only a step for a person has a form.")
        else:
            if self.wait_for is not None or self.wait_until:
                err("wait_for", "Only a timer waits for a duration or a time.")
            for message in spec_errors(self.form_fields):
                err("form_fields", message)

    def copy_for(self, definition: WorkflowDefinition) -> StepDefinition:
        data: dict[str, Any] = {
            f.name: getattr(self, f.name)
            for f in self._meta.concrete_fields
            if f.name not in {"id", "definition"}
        }
        return StepDefinition(definition=definition, **data)
