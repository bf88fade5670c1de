"""What every dashboard view shares: the access decorator, the request type
and the catalogue of operator actions."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from functools import wraps
from typing import Any

from django.conf import settings
from django.contrib.auth.views import redirect_to_login
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.urls import reverse
from django_htmx.middleware import HtmxDetails

from workflows_app import forms
from workflows_app.engine.actions import (
    CATALOGUE,
    TRANSITIONS,
    OperatorAction,
    availability,
)
from workflows_app.models import StepExecution, WorkflowDefinition, WorkflowInstance
from workflows_app.validation import BadInput, check_text

VIEW_PERMISSION = "workflows_app.view_workflowinstance"


class HtmxHttpRequest(HttpRequest):
    htmx: HtmxDetails


View = Callable[..., HttpResponse]


def dashboard_view(view: View) -> View:
    """Login and the viewer role required. An anonymous htmx request (an
    expired session while polling) is sent to the login page as a whole page."""

    @wraps(view)
    def wrapper(request: HtmxHttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        if not request.user.is_authenticated:
            if request.htmx:
                # Back to the page the user was on (not the part it polled).
                page = request.htmx.current_url_abs_path or reverse("overview")
                response = HttpResponse(status=401)
                response["HX-Redirect"] = redirect_to_login(page)["Location"]
                return response
            return redirect_to_login(request.get_full_path())
        if not request.user.has_perm(VIEW_PERMISSION):
            return forbidden(request, "Your account has no dashboard role yet.")
        return view(request, *args, **kwargs)

    return wrapper


def definition_filter(value: str) -> tuple[str, bool]:
    """A list's ``definition`` filter from the query string: the key, and
    whether some workflow has it. Text the database cannot compare (a NUL
    character) names none and is never sent to it."""
    key = value[:100]
    if not key:
        return "", True
    try:
        check_text(key)
    except BadInput:
        return key.replace("\x00", "\N{REPLACEMENT CHARACTER}"), False
    return key, WorkflowDefinition.objects.filter(key=key).exists()


def wants_partial(request: HtmxHttpRequest) -> bool:
    """An htmx request for a page part; a history restore (the back button
    after the cache missed) needs the whole page."""
    return bool(request.htmx) and not request.htmx.history_restore_request


def forbidden(request: HttpRequest, message: str) -> HttpResponse:
    return render(request, "workflows/forbidden.html", {"message": message}, status=403)


def poll_seconds() -> float:
    return float(getattr(settings, "SAGA_DASHBOARD_POLL_SECONDS", 5))


# The form each catalogued action's button posts (the default: a reason).
FORMS: dict[str, type[forms.ActionForm]] = {
    "mark_step_done": forms.MarkStepDoneForm,
    "restart_from_step": forms.RestartForm,
    "extend_timer": forms.ExtendTimerForm,
}
# Besides the state transitions, the page offers the timer's actions (a step
# for a person is completed from the inbox).
PAGE_ACTIONS = [*TRANSITIONS, CATALOGUE["wake_timer"], CATALOGUE["extend_timer"]]


@dataclasses.dataclass(frozen=True)
class Action:
    """One operator action as a page shows it: the engine's catalogue entry
    and the form its button posts."""

    spec: OperatorAction
    form_class: type[forms.ActionForm]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.spec, name)


ACTIONS = {
    spec.name: Action(spec, FORMS.get(spec.name, forms.ActionForm))
    for spec in PAGE_ACTIONS
}


def available_actions(
    instance: WorkflowInstance,
    user: Any,
    steps: Sequence[StepExecution],
    guarded: set[str],
) -> list[Action]:
    """The operator actions the catalogue allows on this instance for this
    user now, in display order (``guarded``: its four-eyes actions)."""
    offered = availability(instance, user, steps, guarded)
    allowed = {a.action.name for a in offered if a.allowed}
    return [action for name, action in ACTIONS.items() if name in allowed]
