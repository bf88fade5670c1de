"""Failure groups: what holds instances, grouped by cause, and what is known."""

from __future__ import annotations

from django.contrib import messages
from django.http import HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_GET, require_POST

from workflows_app.failure_groups import failure_groups
from workflows_app.forms import KnownFailureForm
from workflows_app.models import KnownFailure
from workflows_app.views.common import HtmxHttpRequest, dashboard_view, forbidden

MARK_PERMISSION = "workflows_app.add_knownfailure"


@require_GET
@dashboard_view
def failure_group_list(request: HtmxHttpRequest) -> HttpResponse:
    return _groups_page(request, include_known=request.GET.get("known") != "hide")


def _groups_page(
    request: HtmxHttpRequest, *, include_known: bool, status: int = 200
) -> HttpResponse:
    # Each group's bulk actions are those the catalogue allows this user on
    # some of its instances (``offers``): none that would act on nothing.
    groups = failure_groups(include_known=include_known, user=request.user)
    return render(
        request,
        "workflows/failure_groups.html",
        {
            "groups": groups,
            "include_known": include_known,
            "can_mark": request.user.has_perm(MARK_PERMISSION),
        },
        status=status,
    )


@require_POST
@dashboard_view
def failure_group_mark(request: HtmxHttpRequest) -> HttpResponse:
    """Mark a group as known with a note (or update the note); ``forget``
    removes the mark."""
    if not request.user.has_perm(MARK_PERMISSION):
        return forbidden(request, "You are not allowed to mark failure groups.")
    form = KnownFailureForm(request.POST)
    forget = "forget" in request.POST
    if not form.is_valid():
        # Refused input (NUL characters...): the page with why, nothing done.
        problems = [str(m) for errors in form.errors.values() for m in errors]
        messages.error(request, f"Not marked: {' '.join(problems)}")
        return _groups_page(request, include_known=True, status=422)
    if not (forget or form.cleaned_data["note"]):
        messages.error(request, "Not marked: a note is required.")
        return redirect("failure_group_list")
    key = {
        "definition_key": form.cleaned_data["definition_key"],
        "step_name": form.cleaned_data["step_name"],
        "signature": form.cleaned_data["signature"],
    }
    user = request.user
    assert user.is_authenticated  # dashboard_view lets only signed-in users in
    if forget:
        KnownFailure.objects.filter(**key).delete()
        messages.success(request, "The group is no longer marked as known.")
    else:
        KnownFailure.objects.update_or_create(
            **key,
            defaults={"note": form.cleaned_data["note"], "marked_by": user},
        )
        messages.success(request, "Marked as known.")
    return redirect("failure_group_list")
