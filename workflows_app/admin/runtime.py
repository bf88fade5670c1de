"""Admin for runtime rows: read-only. Instances, steps, attempts and the
history change only through the engine, which writes the audit row."""

from __future__ import annotations

import uuid
from typing import Any

from django.contrib import admin
from django.db.models import Q, QuerySet
from django.http import (
    HttpRequest,
)

from workflows_app.models import (
    Attempt,
    InboundMessage,
    StepExecution,
    TransitionLog,
    WebhookDelivery,
    WorkflowDefinition,
    WorkflowInstance,
)

# -- runtime (read-only) -----------------------------------------------------


class ReadOnlyAdmin(admin.ModelAdmin[Any]):
    """Shows rows that only the engine writes. Search is exact, by text or id,
    so that it uses the indexes at millions of rows."""

    exact_search_uuid_fields: tuple[str, ...] = ()
    show_full_result_count = False

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> Any:
        fields = [field.name for field in self.opts.fields]
        return [*fields, *(f for f in self.readonly_fields if f not in fields)]

    def get_search_results(
        self, request: HttpRequest, queryset: QuerySet[Any], search_term: str
    ) -> tuple[QuerySet[Any], bool]:
        term = search_term.strip()
        if not term:
            return queryset, False
        query = Q()
        for field in self.search_fields:
            query |= Q(**{field: term})
        try:
            value = uuid.UUID(term)
        except ValueError:
            pass
        else:
            for field in self.exact_search_uuid_fields:
                query |= Q(**{field: value})
        return queryset.filter(query), False


class ReadOnlyInline(admin.TabularInline[Any, Any]):
    extra = 0
    can_delete = False
    show_change_link = True

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


class DefinitionKeyFilter(admin.SimpleListFilter):
    """Lists keys from the small definitions table, not a DISTINCT over instances."""

    title = "definition"
    parameter_name = "definition_key"

    def lookups(self, request: HttpRequest, model_admin: Any) -> Any:
        keys = WorkflowDefinition.objects.order_by("key").values_list("key", flat=True)
        return [(key, key) for key in keys.distinct()]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> Any:
        if self.value():
            return queryset.filter(definition_key=self.value())
        return queryset


class StepExecutionInline(ReadOnlyInline):
    model = StepExecution
    fields = (
        "position",
        "name",
        "state",
        "compensation_state",
        "run",
        "attempt",
        "attempts_allowed",
        "next_attempt_at",
        "deadline_at",
        "last_error",
    )
    readonly_fields = fields


class TransitionLogInline(ReadOnlyInline):
    model = TransitionLog
    verbose_name_plural = "history"
    show_change_link = False
    fields = (
        "created_at",
        "step_name",
        "field",
        "source",
        "target",
        "transition",
        "actor_kind",
        "actor_label",
        "reason",
    )
    readonly_fields = fields
    ordering = ("id",)

    def get_queryset(self, request: HttpRequest) -> QuerySet[TransitionLog]:
        return super().get_queryset(request).select_related("step")

    @admin.display(description="step")
    def step_name(self, obj: TransitionLog) -> str:
        return obj.step.name if obj.step else ""


@admin.register(WorkflowInstance)
class WorkflowInstanceAdmin(ReadOnlyAdmin):
    list_display = (
        "id",
        "definition_key",
        "definition_version",
        "business_key",
        "state",
        "stuck",
        "accepted_at",
        "last_progress_at",
    )
    list_filter = ("state", DefinitionKeyFilter, "stuck")
    list_select_related = ("definition",)
    search_fields = ("business_key",)
    exact_search_uuid_fields = ("id",)
    search_help_text = "An exact business key or instance id."
    # Indexed (instance_progress); Meta.ordering's accepted_at is not.
    ordering = ("-last_progress_at",)
    raw_id_fields = ("definition",)
    inlines = (StepExecutionInline, TransitionLogInline)
    fieldsets = (
        (None, {"fields": ("id", "definition", "business_key", "idempotency_key")}),
        (
            "State",
            {
                "fields": (
                    "state",
                    "attention_kind",
                    "attention_reason",
                    "stuck",
                    "stuck_reason",
                    "stuck_since",
                    "pivot_passed",
                    "restart_position",
                )
            },
        ),
        (
            "Times",
            {
                "fields": (
                    "accepted_at",
                    "started_at",
                    "finished_at",
                    "last_progress_at",
                    "deadline_at",
                )
            },
        ),
        ("Data", {"fields": ("input", "outputs")}),
        (
            "Bookkeeping",
            {
                "fields": (
                    "definition_key",
                    "version",
                    "input_fingerprint",
                    "stuck_check_at",
                    "redispatch_at",
                )
            },
        ),
    )

    @admin.display(description="version", ordering="definition__version")
    def definition_version(self, obj: WorkflowInstance) -> int:
        return obj.definition.version


class AttemptInline(ReadOnlyInline):
    model = Attempt
    show_change_link = False
    fields = (
        "direction",
        "number",
        "outcome",
        "started_at",
        "finished_at",
        "error_class",
        "error_message",
        "worker_host",
    )
    readonly_fields = fields


@admin.register(StepExecution)
class StepExecutionAdmin(ReadOnlyAdmin):
    list_display = (
        "name",
        "instance",
        "position",
        "state",
        "compensation_state",
        "attempt",
        "next_attempt_at",
    )
    list_filter = ("state", "compensation_state")
    list_select_related = ("instance",)
    search_fields = ("instance__business_key",)
    exact_search_uuid_fields = ("instance_id",)
    search_help_text = "An exact business key or instance id."
    raw_id_fields = ("instance", "step_definition")
    inlines = (AttemptInline,)


@admin.register(Attempt)
class AttemptAdmin(ReadOnlyAdmin):
    list_display = (
        "id",
        "step_name",
        "direction",
        "number",
        "outcome",
        "started_at",
        "finished_at",
        "worker_host",
    )
    list_filter = ("outcome", "direction")
    list_select_related = ("step",)
    search_fields = ("step__instance__business_key",)
    exact_search_uuid_fields = ("step__instance_id", "task_token")
    search_help_text = "An exact business key, instance id or task token."
    raw_id_fields = ("step",)

    @admin.display(description="step", ordering="step__name")
    def step_name(self, obj: Attempt) -> str:
        return obj.step.name


@admin.register(TransitionLog)
class TransitionLogAdmin(ReadOnlyAdmin):
    list_display = (
        "id",
        "created_at",
        "instance",
        "step_name",
        "transition",
        "field",
        "source",
        "target",
        "actor_kind",
        "actor_label",
    )
    list_filter = ("actor_kind", "field")
    list_select_related = ("instance", "step")
    search_fields = ("instance__business_key",)
    exact_search_uuid_fields = ("instance_id",)
    search_help_text = "An exact business key or instance id."
    raw_id_fields = ("instance", "step", "user")
    ordering = ("-id",)

    @admin.display(description="step", ordering="step__name")
    def step_name(self, obj: TransitionLog) -> str:
        return obj.step.name if obj.step else ""


@admin.register(InboundMessage)
class InboundMessageAdmin(ReadOnlyAdmin):
    list_display = ("message_id", "source", "kind", "received_at")
    list_filter = ("kind",)
    search_fields = ("message_id", "source")
    search_help_text = "An exact message id or source."


@admin.register(WebhookDelivery)
class WebhookDeliveryAdmin(ReadOnlyAdmin):
    """The webhook outbox; only the sender changes a row (no secret is in it:
    a target is a URL or a reference)."""

    list_display = (
        "event",
        "event_id",
        "definition_key",
        "target",
        "created_at",
        "attempts",
        "last_status",
        "delivered_at",
        "next_attempt_at",
    )
    list_filter = ("event", "format")
    search_fields = ("definition_key", "target")
    exact_search_uuid_fields = ("event_id", "instance_id")
    search_help_text = "An exact definition key, target, event id or instance id."
    raw_id_fields = ("instance",)
    exclude = ("alerts",)  # shown on the alerts page instead
    ordering = ("-created_at", "-id")
