"""The instance list's filters (django-filter). Every value lives in the query
string, so a filtered list is a link that can be shared."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import django_filters
from django import forms
from django.db.models import Exists, OuterRef, QuerySet
from django.http import QueryDict
from django.utils import timezone

from workflows_app import search as instance_search
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
# The overview's windows of finished instances: its tiles link to the list
# with the same window, so a tile's count is the size of the list it opens.
PROGRESS_WITHIN = {"24h": timedelta(hours=24), "7d": timedelta(days=7)}
PROGRESS_WITHIN_CHOICES = [("24h", "the last 24 h"), ("7d", "the last 7 days")]
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


class StateConflict(ValueError):
    """``state`` and ``status`` name different states."""


def merge_states(state: list[str], status: list[str]) -> list[str]:
    """``state`` and ``status`` are one filter under two names (the pages
    said ``state``, the API ``status``): either may be given, or both with
    the same values; anything else is refused, never silently ignored."""
    if state and status and sorted(set(state)) != sorted(set(status)):
        raise StateConflict(
            f"state={','.join(state)} and status={','.join(status)} disagree: "
            "give one of them (they are the same filter)."
        )
    return list(dict.fromkeys(state or status))


def definition_choices() -> list[tuple[str, str]]:
    keys = (
        WorkflowDefinition.objects.order_by("key").values_list("key", flat=True)
    ).distinct()
    return [(key, key) for key in keys]


class InstanceFilterForm(forms.Form):
    """Parses the search box and folds ``status`` into ``state``."""

    parsed_search = instance_search.Search()

    def clean_q(self) -> str:
        text = self.cleaned_data.get("q") or ""
        try:
            self.parsed_search = instance_search.parse(text)
        except instance_search.SearchError as exc:
            raise forms.ValidationError(str(exc)) from None
        return text

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean() or {}
        # A QueryDict (one key may repeat); a plain mapping from the API.
        getlist = getattr(self.data, "getlist", lambda key: [self.data.get(key)])
        states = [v for v in getlist("state") if v]
        statuses = [v for v in getlist("status") if v]
        try:
            merged = merge_states(states, statuses)
        except StateConflict as exc:
            raise forms.ValidationError(str(exc)) from None
        if len(merged) > 1:
            raise forms.ValidationError(
                "The list filters on one state at a time (or 'unfinished' / "
                "'finished'); the API takes several."
            )
        return cleaned


class InstanceFilter(django_filters.FilterSet):
    q = django_filters.CharFilter(
        method="search",
        label="Search",
        help_text="Business key or id prefix, any case; name:value for a "
        "search attribute.",
        widget=forms.TextInput(
            attrs={"type": "search", "placeholder": "business key, id or name:value"}
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
    progress_within = django_filters.ChoiceFilter(
        method="filter_progress_within",
        choices=PROGRESS_WITHIN_CHOICES,
        label="Last progress within",
        widget=forms.HiddenInput,
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
        form = InstanceFilterForm

    def __init__(self, data: Any = None, *args: Any, **kwargs: Any) -> None:
        if data is not None and not isinstance(data, QueryDict):
            query = QueryDict(mutable=True)
            for key, value in data.items():
                query.setlist(key, value if isinstance(value, list) else [value])
            data = query
        if data is not None and data.get("status") and not data.get("state"):
            # ?status= is the API's name of the state filter: the same filter
            # (and the form shows it as the state chosen).
            data = data.copy()
            data.setlist("state", data.getlist("status"))
            data.pop("status")
        super().__init__(data, *args, **kwargs)

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
                # ``held_by`` is an annotation of holding_steps().
                holding = holding.filter(held_by=held_by)  # type: ignore[misc]
            qs = qs.filter(Exists(holding))
        return qs

    def search(self, qs: QuerySet[Any], name: str, value: str) -> QuerySet[Any]:
        # Parsed once, by the form's clean_q.
        parsed = self.form.parsed_search  # type: ignore[attr-defined]
        return instance_search.apply(qs, parsed)

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

    def filter_progress_within(
        self, qs: QuerySet[Any], name: str, value: str
    ) -> QuerySet[Any]:
        return qs.filter(last_progress_at__gte=timezone.now() - PROGRESS_WITHIN[value])

    def keep(self, qs: QuerySet[Any], name: str, value: str) -> QuerySet[Any]:
        return qs

    def show_examples(self) -> None:
        """Put search terms that find something in this database into the
        search box's hint (see ``search.examples``)."""
        terms = instance_search.examples()
        if not terms:
            return
        field = self.form.fields["q"]
        field.help_text = (
            "Business key or id prefix, any case; name:value for a search "
            f"attribute (e.g. {', '.join(terms)})."
        )
        field.widget.attrs["placeholder"] = "e.g. " + " or ".join(terms)

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
