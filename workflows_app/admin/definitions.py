"""Admin for definitions: drafts edited with their steps inline; published
versions frozen and changed only by creating a new draft version."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.contrib.admin.utils import unquote
from django.core.exceptions import PermissionDenied, ValidationError
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db.models import CharField, Count, F, Max, QuerySet, Value
from django.db.models.functions import Cast, Concat
from django.http import (
    Http404,
    HttpRequest,
    HttpResponse,
    HttpResponseNotAllowed,
    HttpResponseRedirect,
)
from django.template.response import TemplateResponse
from django.urls import URLPattern, path, reverse

from workflows_app.activities import activity_names
from workflows_app.models import StepDefinition, WorkflowDefinition
from workflows_app.models.definitions import (
    APPROVABLE_ACTIONS,
    restart_point_errors,
    stage_errors,
)

# Keeps the temporary positions used while saving (see park_edited_rows)
# far below the largest integer the database stores.
MAX_POSITION = 1_000_000

# -- definitions -------------------------------------------------------------


def _activity_choices(current: Any) -> list[tuple[str, str]]:
    choices = [("", "---------")] + [(name, name) for name in activity_names()]
    # Keep a stored or submitted name that is no longer registered visible, so
    # the page shows what is wrong instead of silently selecting nothing.
    if current and current not in dict(choices):
        choices.append((current, f"{current} (not registered)"))
    return choices


class StepKindField(forms.TypedChoiceField):
    """The step's kind; a row that does not send one is an activity step
    (rows written before kinds existed, scripts posting the old fields)."""

    def has_changed(self, initial: Any, data: Any) -> bool:
        return super().has_changed(initial, data or StepDefinition.Kind.ACTIVITY)


class FormFieldsField(forms.JSONField):
    """The form of a step for a person; nothing sent means no form."""

    def to_python(self, value: Any) -> Any:
        if value in (None, ""):
            return []
        return super().to_python(value)

    def has_changed(self, initial: Any, data: Any) -> bool:
        if data in (None, "", "[]") and initial in (None, "", [], "[]"):
            return False
        return super().has_changed(initial, data)


class StepDefinitionForm(forms.ModelForm[StepDefinition]):
    kind = StepKindField(
        choices=StepDefinition.Kind.choices,
        required=False,
        empty_value=StepDefinition.Kind.ACTIVITY,
        initial=StepDefinition.Kind.ACTIVITY,
        help_text=StepDefinition._meta.get_field("kind").help_text,
    )
    form_fields = FormFieldsField(
        required=False,
        help_text=StepDefinition._meta.get_field("form_fields").help_text,
        widget=forms.Textarea(attrs={"rows": 3, "spellcheck": "false"}),
    )

    class Meta:
        model = StepDefinition
        fields = [
            "position",
            "parallel_with_previous",
            "name",
            "kind",
            "action",
            "action_config",
            "compensation",
            "compensation_config",
            "timeout",
            "max_attempts",
            "backoff_initial",
            "backoff_multiplier",
            "backoff_max",
            "backoff_jitter",
            "retry_on_timeout",
            "is_pivot",
            "restart_point",
            "awaits_event",
            "failure_event",
            "wait_for",
            "wait_until",
            "form_fields",
        ]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # An empty choice for the action too: observed steps have none, and a
        # select without one would make every untouched extra row "changed".
        for field in ("action", "compensation"):
            if self.is_bound:
                current = self.data.get(self.add_prefix(field))
            else:
                current = self.initial.get(field)
            self.fields[field].widget = forms.Select(choices=_activity_choices(current))
        self.fields["position"].validators.append(MaxValueValidator(MAX_POSITION))


class StepDefinitionFormSet(
    forms.BaseInlineFormSet[
        StepDefinition, WorkflowDefinition, forms.ModelForm[StepDefinition]
    ]
):
    instance: WorkflowDefinition
    # Django's own (private) test for a row marked for deletion; not in the stubs.
    _should_delete_form: Callable[[forms.BaseForm], bool]

    def clean(self) -> None:
        # Every step of the definition is a row of this formset, so checking
        # the rows against each other covers the unique constraints; Django
        # checks an inline row's UniqueConstraints only among the rows too.
        rows = [
            form.cleaned_data
            for form in self.forms
            if form.cleaned_data and not self._should_delete_form(form)
        ]
        errors = []
        for field, label in (("name", "Step names"), ("position", "Positions")):
            counts = Counter(row[field] for row in rows if row.get(field) is not None)
            for value, count in sorted(counts.items()):
                if count > 1:
                    errors.append(
                        f"{label} must be unique within a definition: "
                        f"{value!r} is used by {count} steps."
                    )
        pivots = [str(row.get("name", "?")) for row in rows if row.get("is_pivot")]
        if len(pivots) > 1:
            errors.append(
                "At most one step can be the pivot; "
                f"these steps are marked as pivot: {', '.join(pivots)}."
            )
        errors += restart_point_errors(self.instance.mode, rows)
        errors += stage_errors(self.instance.mode, rows)
        if self.instance.mode == WorkflowDefinition.Mode.ORCHESTRATED and not rows:
            errors.append("An orchestrated definition needs at least one step.")
        if errors:
            raise ValidationError(errors)
        super().clean()

    def park_edited_rows(self) -> None:
        """Move the stored rows about to be changed or deleted out of the way.

        The unique constraints on name, position and pivot are checked row by
        row, so saving a swap in form order would collide with a row not yet
        saved. Parked rows get a position above every final one, a name no
        step can have, and no pivot flag; the save then writes their final
        values. Runs inside the admin's transaction.
        """
        pks = [
            form.instance.pk
            for form in self.initial_forms
            if form.instance.pk is not None
            and (form.has_changed() or self._should_delete_form(form))
        ]
        if not pks:
            return
        offset = MAX_POSITION + 1
        stored = self.instance.steps.aggregate(top=Max("position"))["top"] or 0
        StepDefinition.objects.filter(pk__in=pks).update(
            position=F("position") + max(offset, stored + 1),
            name=Concat(Value("~parked~"), Cast("pk", CharField())),
            is_pivot=False,
        )


class StepDefinitionInline(admin.StackedInline[StepDefinition, WorkflowDefinition]):
    model = StepDefinition
    form = StepDefinitionForm
    formset = StepDefinitionFormSet
    ordering = ("position",)
    fieldsets = (
        (
            None,
            {
                "fields": (
                    ("position", "name", "kind", "is_pivot", "restart_point"),
                    "parallel_with_previous",
                    ("action", "compensation"),
                    ("awaits_event", "failure_event"),
                )
            },
        ),
        (
            "Time rules",
            {
                "fields": (
                    ("timeout", "max_attempts", "retry_on_timeout"),
                    (
                        "backoff_initial",
                        "backoff_multiplier",
                        "backoff_max",
                        "backoff_jitter",
                    ),
                )
            },
        ),
        (
            "Timer and step for a person",
            {"fields": (("wait_for", "wait_until"), "form_fields")},
        ),
        (
            "Activity configuration",
            {"fields": ("action_config", "compensation_config")},
        ),
    )

    def get_extra(self, request: HttpRequest, obj: Any = None, **kwargs: Any) -> int:
        return 1 if obj is None else 0

    # A published version is frozen: its steps are shown, never changed.
    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return _is_draft(obj) and super().has_add_permission(request, obj)

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return _is_draft(obj) and super().has_change_permission(request, obj)

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return _is_draft(obj) and super().has_delete_permission(request, obj)


def _is_draft(obj: WorkflowDefinition | None) -> bool:
    return obj is None or not obj.is_published


class WorkflowDefinitionForm(forms.ModelForm[WorkflowDefinition]):
    approval_actions = forms.MultipleChoiceField(
        choices=list(APPROVABLE_ACTIONS.items()),
        required=False,
        widget=forms.CheckboxSelectMultiple,
        label="Actions that need a second operator's approval",
    )

    class Meta:
        model = WorkflowDefinition
        fields = ["approval_actions"]  # the admin adds its fieldsets' fields

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if "approval_expires_after" in self.fields:
            # Left empty: the model's default window.
            self.fields["approval_expires_after"].required = False

    def clean_approval_expires_after(self) -> Any:
        value = self.cleaned_data.get("approval_expires_after")
        if value is None:
            return WorkflowDefinition._meta.get_field(
                "approval_expires_after"
            ).get_default()
        return value


class RetentionForm(forms.Form):
    """Retention is operational, not part of a version: it is edited here,
    published or not, and written to every version of the workflow."""

    retention_days = forms.IntegerField(
        required=False,
        label="Keep finished instances for (days)",
        validators=[MinValueValidator(1), MaxValueValidator(36_500)],
        help_text="Completed, compensated, cancelled and failed instances that "
        "finished longer ago than this are purged by the sweeper. Empty: keep "
        "them forever.",
    )
    archive_on_purge = forms.BooleanField(
        required=False,
        label="Archive before purging",
        help_text="Write each instance, with its steps, attempts and timeline, "
        "to the archive folder (SAGA_ARCHIVE_DIR) before it is deleted; "
        "without that folder nothing is purged.",
    )


def retention_text(definition: WorkflowDefinition) -> str:
    if definition.retention is None:
        return "kept forever"
    days = definition.retention / timedelta(days=1)
    archive = "archived, then " if definition.archive_on_purge else ""
    return f"{archive}purged {days:g} days after they finish"


@admin.register(WorkflowDefinition)
class WorkflowDefinitionAdmin(admin.ModelAdmin[WorkflowDefinition]):
    form = WorkflowDefinitionForm
    list_display = (
        "key",
        "version",
        "title",
        "mode",
        "status",
        "step_count",
        "published_at",
    )
    list_filter = ("status", "mode")
    search_fields = ("key", "title")
    inlines = (StepDefinitionInline,)
    actions = ("publish_selected", "new_draft_selected")
    fieldsets = (
        (None, {"fields": ("key", "version", "title", "description", "mode")}),
        (
            "Time rules and failures",
            {
                "fields": (
                    "failure_policy",
                    "stuck_after",
                    "deadline",
                )
            },
        ),
        (
            "Alerts and webhooks",
            {"fields": ("alert_recipients", "alert_webhooks", "event_webhooks")},
        ),
        (
            "Four-eyes approval",
            {
                "fields": (
                    "approval_actions",
                    "approval_expires_after",
                    "approval_bulk_over",
                )
            },
        ),
        ("Retention", {"fields": ("retention_summary",)}),
        (
            "Search",
            {
                "fields": ("search_attributes",),
                "description": "Input values the instance list finds with "
                "name:value. Instances started on this version are indexed "
                "by these; for older instances run manage.py "
                "reindex_search_attributes --definition KEY.",
            },
        ),
        ("Status", {"fields": ("status", "published_at", "created_at")}),
    )

    def get_queryset(self, request: HttpRequest) -> QuerySet[WorkflowDefinition]:
        return super().get_queryset(request).annotate(step_total=Count("steps"))

    @admin.display(description="steps", ordering="step_total")
    def step_count(self, obj: WorkflowDefinition) -> int:
        # Annotated by get_queryset; not a model field.
        return obj.step_total  # type: ignore[attr-defined,no-any-return]

    @admin.display(description="finished instances")
    def retention_summary(self, obj: WorkflowDefinition | None) -> str:
        if obj is None or obj.pk is None:
            return "kept forever (change it once the definition is saved)"
        return retention_text(obj)

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> Any:
        status = ("retention_summary", "status", "published_at", "created_at")
        # Key and version name a definition; new versions come from "new draft".
        return status if obj is None else ("key", "version", *status)

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return _is_draft(obj) and super().has_change_permission(request, obj)

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return _is_draft(obj) and super().has_delete_permission(request, obj)

    def has_new_draft_permission(self, request: HttpRequest) -> bool:
        # A new version is a new row edited afterwards: both rights are needed.
        return self.has_add_permission(request) and super().has_change_permission(
            request
        )

    def save_model(
        self, request: HttpRequest, obj: WorkflowDefinition, form: Any, change: bool
    ) -> None:
        if not change:
            obj.save()
            return
        # publish() updates the row; the lock makes it wait for this save, and
        # the re-read refuses a draft published since the form was loaded.
        if WorkflowDefinition.objects.select_for_update().get(pk=obj.pk).is_published:
            raise PermissionDenied(f"{obj} was published in the meantime.")
        if form.changed_data:
            obj.save(update_fields=form.changed_data)

    def save_formset(
        self, request: HttpRequest, form: Any, formset: Any, change: bool
    ) -> None:
        if isinstance(formset, StepDefinitionFormSet):
            formset.park_edited_rows()
        formset.save()

    # -- publish and new draft ----------------------------------------------
    def get_urls(self) -> list[URLPattern]:
        name = f"{self.opts.app_label}_{self.opts.model_name}"
        wrap = self.admin_site.admin_view
        return [
            path(
                "<path:object_id>/publish/",
                wrap(self.publish_view),
                name=f"{name}_publish",
            ),
            path(
                "<path:object_id>/new-draft/",
                wrap(self.new_draft_view),
                name=f"{name}_new_draft",
            ),
            path(
                "<path:object_id>/retention/",
                wrap(self.retention_view),
                name=f"{name}_retention",
            ),
            *super().get_urls(),
        ]

    def render_change_form(
        self,
        request: HttpRequest,
        context: dict[str, Any],
        add: bool = False,
        change: bool = False,
        form_url: str = "",
        obj: Any = None,
    ) -> HttpResponse:
        if obj is not None:
            context["can_publish"] = self.has_change_permission(request, obj)
            context["can_new_draft"] = self.has_new_draft_permission(request)
            context["can_edit_retention"] = super().has_change_permission(request)
        return super().render_change_form(request, context, add, change, form_url, obj)

    def publish_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        definition = self._object_for_post(request, object_id)
        if not isinstance(definition, WorkflowDefinition):
            return definition
        if not super().has_change_permission(request, definition):
            raise PermissionDenied
        self._publish(request, definition)
        return HttpResponseRedirect(self._change_url(definition))

    def new_draft_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        definition = self._object_for_post(request, object_id)
        if not isinstance(definition, WorkflowDefinition):
            return definition
        if not self.has_new_draft_permission(request):
            raise PermissionDenied
        draft = self._new_draft(request, definition)
        return HttpResponseRedirect(self._change_url(draft))

    def retention_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        definition = self.get_object(request, unquote(object_id))
        if definition is None:
            raise Http404("No such workflow definition.")
        # Any version's page edits the workflow's retention, published or not.
        if not super().has_change_permission(request):
            raise PermissionDenied
        if request.method == "POST":
            form = RetentionForm(request.POST)
            if form.is_valid():
                days = form.cleaned_data["retention_days"]
                retention = None if days is None else timedelta(days=days)
                WorkflowDefinition.objects.filter(key=definition.key).update(
                    retention=retention,
                    archive_on_purge=form.cleaned_data["archive_on_purge"],
                )
                definition.refresh_from_db()
                self.message_user(
                    request,
                    f"Finished {definition.key} instances (every version): "
                    f"{retention_text(definition)}.",
                    messages.SUCCESS,
                )
                return HttpResponseRedirect(self._change_url(definition))
        else:
            days = (
                None
                if definition.retention is None
                else round(definition.retention / timedelta(days=1))
            )
            form = RetentionForm(
                initial={
                    "retention_days": days,
                    "archive_on_purge": definition.archive_on_purge,
                }
            )
        context = {
            **self.admin_site.each_context(request),
            "title": f"Retention of {definition.key}",
            "opts": self.opts,
            "original": definition,
            "form": form,
            "change_url": self._change_url(definition),
        }
        return TemplateResponse(
            request, "admin/workflows_app/workflowdefinition/retention.html", context
        )

    @admin.action(description="Publish selected drafts", permissions=["change"])
    def publish_selected(
        self, request: HttpRequest, queryset: QuerySet[WorkflowDefinition]
    ) -> None:
        for definition in queryset.order_by("key", "version"):
            self._publish(request, definition)

    @admin.action(
        description="Create a new draft version of selected definitions",
        permissions=["new_draft"],
    )
    def new_draft_selected(
        self, request: HttpRequest, queryset: QuerySet[WorkflowDefinition]
    ) -> None:
        for definition in queryset.order_by("key", "version"):
            self._new_draft(request, definition)

    def _object_for_post(
        self, request: HttpRequest, object_id: str
    ) -> WorkflowDefinition | HttpResponse:
        if request.method != "POST":
            return HttpResponseNotAllowed(["POST"])
        definition = self.get_object(request, unquote(object_id))
        if definition is None:
            raise Http404("No such workflow definition.")
        return definition

    def _change_url(self, definition: WorkflowDefinition) -> str:
        return reverse(
            f"admin:{self.opts.app_label}_{self.opts.model_name}_change",
            args=[definition.pk],
            current_app=self.admin_site.name,
        )

    def _publish(self, request: HttpRequest, definition: WorkflowDefinition) -> None:
        if definition.is_published:
            self.message_user(
                request, f"{definition} is already published.", messages.WARNING
            )
            return
        try:
            # Steps may predate a registry change or come from code, not the
            # form: validate them again before the version is frozen.
            definition.full_clean()
            for step in definition.ordered_steps():
                _clean_step(step)
            definition.publish()
        except ValidationError as exc:
            self.message_user(
                request,
                f"{definition} was not published: {' '.join(exc.messages)}",
                messages.ERROR,
            )
        else:
            self.message_user(request, f"{definition} is published.", messages.SUCCESS)

    def _new_draft(
        self, request: HttpRequest, definition: WorkflowDefinition
    ) -> WorkflowDefinition:
        draft = definition.new_draft()
        self.message_user(
            request,
            f"Created draft {draft} from {definition}. "
            "Instances already started keep the version they started with.",
            messages.SUCCESS,
        )
        return draft


def _clean_step(step: StepDefinition) -> None:
    try:
        step.full_clean()
    except ValidationError as exc:
        raise ValidationError(
            [f"Step {step.name!r}: {message}" for message in exc.messages]
        ) from exc
