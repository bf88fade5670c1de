"""Saved views: name a filtered instance list and share it with the team."""

from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import messages
from django.db import IntegrityError, transaction
from django.db.models import Q
from django.http import HttpResponse, QueryDict
from django.shortcuts import get_object_or_404, redirect
from django.urls import reverse
from django.views.decorators.http import require_POST

from workflows_app.forms import TextField, sentence
from workflows_app.models import SavedView
from workflows_app.validation import BadInput, check_text
from workflows_app.views.common import HtmxHttpRequest, dashboard_view

# Page position is not part of a view.
NOT_SAVED = ("cursor",)


class SavedViewForm(forms.Form):
    name = TextField(what="name", max_length=100, strip=True)
    query = TextField(what="query", max_length=4000, required=False, strip=True)
    shared = forms.BooleanField(required=False, initial=True)

    def clean_query(self) -> QueryDict:
        """The list's filters, decoded: a %00 in them is refused like a NUL
        typed in (the saved list could never be shown)."""
        params = QueryDict(self.cleaned_data["query"], mutable=True)
        for name in NOT_SAVED:
            params.pop(name, None)
        for name, values in params.lists():
            for value in [name, *values]:
                try:
                    check_text(value, "a filter of the list")
                except BadInput as exc:
                    raise forms.ValidationError(sentence(exc.message)) from None
        return params


def saved_views_for(user: Any) -> list[SavedView]:
    """The team's shared views and the user's own, by name."""
    return list(
        SavedView.objects.filter(Q(shared=True) | Q(owner=user))
        .select_related("owner")
        .order_by("name", "id")[:50]
    )


def view_url(view: SavedView) -> str:
    return f"{reverse('instance_list')}?{view.query}"


@require_POST
@dashboard_view
def saved_view_create(request: HtmxHttpRequest) -> HttpResponse:
    form = SavedViewForm(request.POST)
    if not form.is_valid():
        problems = [str(m) for errors in form.errors.values() for m in errors]
        if not request.POST.get("name", "").strip():
            problems = ["the view needs a name."]
        messages.error(request, f"Not saved: {' '.join(problems)}")
        return redirect("instance_list")
    params = form.cleaned_data["query"]
    owner = request.user
    assert owner.is_authenticated  # dashboard_view lets only signed-in users in
    try:
        with transaction.atomic():
            view = SavedView.objects.create(
                name=form.cleaned_data["name"],
                query=params.urlencode(),
                owner=owner,
                shared=form.cleaned_data["shared"],
            )
    except IntegrityError:
        messages.error(request, "Not saved: you already have a view of that name.")
        return redirect(f"{reverse('instance_list')}?{params.urlencode()}")
    messages.success(
        request,
        f"Saved as “{view.name}”"
        + (", shared with the team on the overview." if view.shared else "."),
    )
    return redirect(view_url(view))


@require_POST
@dashboard_view
def saved_view_delete(request: HtmxHttpRequest, pk: int) -> HttpResponse:
    view = get_object_or_404(SavedView, pk=pk, owner=request.user)
    view.delete()
    messages.success(request, f"“{view.name}” deleted.")
    return redirect("overview")
