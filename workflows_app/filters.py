"""The instance list's filters (django-filter). Every value lives in the query
string, so a filtered list is a link that can be shared."""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

import django_filters
from django import forms
from django.db.models import Exists, OuterRef, QuerySet
from django.utils import timezone

from workflows_app.engine.blocking import (
    DEADLINE,
    HELD_BY,
    deadline_holds,
    holding_steps,
)
from workflows_app.engine.stuck import STALLED
from workflows_app.failure_groups import NO_SIGNATURE
from workflows_app.models import (
    ACTIVE_STATES,
    TERMINAL_STATES,
    InstanceState,
    WorkflowDefinition,
    WorkflowInstance,
)

ACTIVE = "active"
FINISHED = "finished"
STATE_CHOICES = [
    (ACTIVE, "unfinished (any)"),
    (FINISHED, "finished (any)"),
    *InstanceState.choices,
]
IDLE_CHOICES = [
    ("5m", "5 minutes"),
    ("1h", "1 hour"),
    ("1d", "1 day"),
    ("7d", "7 days"),
]
IDLE = {
    "5m": timedelta(minutes=5),
    "1h": timedelta(hours=1),
    "1d": timedelta(days=1),
    "7d": timedelta(days=7),
}
# Sort keys -> (model field, descending). The list pages through them by
# keyset (value, id), so each must be backed by an index.
SORTS = {
    "-progress": ("last_progress_at", True),
    "progress": ("last_progress_at", False),
    "-accepted": ("accepted_at", True),
    "accepted": ("accepted_at", False),
}
SORT_CHOICES = [
    ("-progress", "latest progress first"),
    ("progress", "oldest progress first"),
    ("-accepted", "newest accepted first"),
    ("accepted", "oldest accepted first"),
]
DATETIME_WIDGET = forms.DateTimeInput(attrs={"type": "datetime-local"})


def definition_choices() -> list[tuple[str, str]]:
    keys = (
        WorkflowDefinition.objects.order_by("key").values_list("key", flat=True)
    ).distinct()
    return [(key, key) for key in keys]


class InstanceFilter(django_filters.FilterSet):
    q = django_filters.CharFilter(
        method="search",
        label="Business key or instance id",
        widget=forms.TextInput(
            attrs={"type": "search", "placeholder": "e.g. ORD-1042 or a UUID"}
        ),
    )
    definition = django_filters.ChoiceFilter(
        field_name="definition_key",
        choices=definition_choices,
        empty_label="any",
        label="Definition",
    )
    state = django_filters.ChoiceFilter(
        method="filter_state", choices=STATE_CHOICES, empty_label="any"
    )
    stuck = django_filters.ChoiceFilter(
        method="filter_stuck",
        choices=[("yes", "stuck (no progress) only"), ("no", "not stuck")],
        empty_label="any",
    )
    idle = django_filters.ChoiceFilter(
        method="filter_idle",
        choices=IDLE_CHOICES,
        empty_label="any",
        label="No progress for at least",
    )
    accepted_after = django_filters.DateTimeFilter(
        field_name="accepted_at",
        lookup_expr="gte",
        label="Accepted from (UTC)",
        widget=DATETIME_WIDGET,
    )
    accepted_before = django_filters.DateTimeFilter(
        field_name="accepted_at",
        lookup_expr="lt",
        label="Accepted until (UTC)",
        widget=DATETIME_WIDGET,
    )
    # A failure group (see failure_groups.py): held now by this step's action
    # or compensation (or by the deadline), with this error signature.
    # Applied together in filter_queryset.
    failed_step = django_filters.CharFilter(
        method="keep", label="Blocked at step", widget=forms.HiddenInput
    )
    held_by = django_filters.ChoiceFilter(
        method="keep",
        choices=[(value, value) for value in HELD_BY],
        label="Held by",
        widget=forms.HiddenInput,
    )
    signature = django_filters.CharFilter(
        method="keep", label="Error signature", widget=forms.HiddenInput
    )
    sort = django_filters.ChoiceFilter(
        method="keep",  # applied by the keyset pager, which needs the field
        choices=SORT_CHOICES,
        empty_label="default",
        label="Sort by",
    )

    class Meta:
        model = WorkflowInstance
        fields: list[str] = []

    def filter_queryset(self, queryset: QuerySet[Any]) -> QuerySet[Any]:
        qs = super().filter_queryset(queryset)
        data = self.form.cleaned_data
        step, signature = data.get("failed_step"), data.get("signature")
        held_by = data.get("held_by")
        if held_by == DEADLINE:
            # No step holds these: a step or signature matches none of them.
            qs = qs.filter(pk__in=deadline_holds().values("pk"))
            return qs.none() if step or signature else qs
        if step or signature or held_by:
            holding = holding_steps().filter(instance=OuterRef("pk"))
            if step:
                holding = holding.filter(name=step)
            if signature:
                holding = holding.filter(
                    error_signature="" if signature == NO_SIGNATURE else signature
                )
            if held_by:
                holding = holding.filter(held_by=held_by)
            qs = qs.filter(Exists(holding))
        return qs

    def search(self, qs: QuerySet[Any], name: str, value: str) -> QuerySet[Any]:
        value = value.strip()
        try:
            return qs.filter(pk=uuid.UUID(value))
        except ValueError:
            return qs.filter(business_key=value)

    def filter_state(self, qs: QuerySet[Any], name: str, value: str) -> QuerySet[Any]:
        if value == ACTIVE:
            return qs.filter(state__in=ACTIVE_STATES)
        if value == FINISHED:
            return qs.filter(state__in=TERMINAL_STATES)
        return qs.filter(state=value)

    def filter_stuck(self, qs: QuerySet[Any], name: str, value: str) -> QuerySet[Any]:
        # Stuck means no progress past the time rule; holds are a state.
        return qs.filter(STALLED) if value == "yes" else qs.exclude(STALLED)

    def filter_idle(self, qs: QuerySet[Any], name: str, value: str) -> QuerySet[Any]:
        return qs.filter(last_progress_at__lte=timezone.now() - IDLE[value])

    def keep(self, qs: QuerySet[Any], name: str, value: str) -> QuerySet[Any]:
        return qs

    @property
    def sort_key(self) -> str:
        """The chosen sort; by default latest progress first, or newest
        accepted first when filtering on acceptance time (the index that
        serves the range then also serves the order)."""
        data = self.form.cleaned_data if self.is_bound else {}
        value = data.get("sort")
        if value in SORTS:
            return str(value)
        if data.get("accepted_after") or data.get("accepted_before"):
            return "-accepted"
        return "-progress"

    @property
    def is_filtered(self) -> bool:
        data = self.form.cleaned_data if self.form.is_valid() else {}
        return any(v not in (None, "") for k, v in data.items() if k != "sort")
