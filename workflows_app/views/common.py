"""What every dashboard view shares: the access decorator, the request type
and the catalogue of operator actions."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from functools import wraps
from typing import Any

from django.conf import settings
from django.contrib.auth.views import redirect_to_login
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.urls import reverse
from django_htmx.middleware import HtmxDetails

from workflows_app import forms
from workflows_app.engine import commands
from workflows_app.models import StepExecution, WorkflowInstance

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


def wants_partial(request: HtmxHttpRequest) -> bool:
    """An htmx request for a page part; a history restore (the back button
    after the cache missed) needs the whole page."""
    return bool(request.htmx) and not request.htmx.history_restore_request


def forbidden(request: HttpRequest, message: str) -> HttpResponse:
    return render(request, "workflows/forbidden.html", {"message": message}, status=403)


def poll_seconds() -> float:
    return float(getattr(settings, "SAGA_DASHBOARD_POLL_SECONDS", 5))


@dataclasses.dataclass(frozen=True)
class Action:
    """One operator action: the instance transition that gates it (so the
    button shows only where django-fsm allows it for this user) and the
    engine command that performs it."""

    name: str
    label: str
    explains: str
    command: Callable[..., None]
    permission: str
    form_class: type[forms.ActionForm] = forms.ActionForm
    targets_step: bool = False
    danger: bool = False


ACTIONS = {
    action.name: action
    for action in [
        Action(
            "retry_step",
            "Retry step now",
            "Run the failed step again now, with a fresh budget of attempts.",
            commands.instance_retry_step,
            "workflows_app.retry_step",
            targets_step=True,
        ),
        Action(
            "resume",
            "Resume",
            "Accept that the deadline passed and let the workflow continue.",
            commands.instance_resume,
            "workflows_app.resume_instance",
        ),
        Action(
            "mark_step_done",
            "Mark step done by hand",
            "Record that a person did this step outside the system; the "
            "workflow continues with the next step.",
            commands.instance_mark_step_done,
            "workflows_app.mark_step_done",
            form_class=forms.MarkStepDoneForm,
            targets_step=True,
        ),
        Action(
            "retry_compensation",
            "Retry compensation",
            "Run the failed compensation again, then continue undoing.",
            commands.instance_retry_compensation,
            "workflows_app.retry_compensation",
        ),
        Action(
            "restart_from_step",
            "Restart from an earlier step",
            "Undo the steps from the chosen one up to the failed one (newest "
            "first, where they have a compensation), then run them again as a "
            "new run with new idempotency keys.",
            commands.instance_restart_from_step,
            "workflows_app.restart_instance",
            form_class=forms.RestartForm,
            targets_step=True,
            danger=True,
        ),
        Action(
            "compensate",
            "Compensate",
            "Undo the steps that took effect, newest first. Cannot be reversed.",
            commands.instance_compensate,
            "workflows_app.compensate_instance",
            danger=True,
        ),
        Action(
            "cancel",
            "Cancel",
            "Stop the workflow: if nothing ran it ends at once, otherwise the "
            "steps done are undone.",
            commands.instance_cancel,
            "workflows_app.cancel_instance",
            danger=True,
        ),
        Action(
            "close_as_failed",
            "Close as failed",
            "End the workflow as failed without undoing anything: a person "
            "takes it from here.",
            commands.instance_close_as_failed,
            "workflows_app.close_instance",
            danger=True,
        ),
    ]
}


def blocked_step(steps: list[StepExecution]) -> StepExecution | None:
    """The step that stops forward progress (what retry / mark done act on)."""
    return next((s for s in steps if s.state in {"failed", "unknown"}), None)


def available_actions(instance: WorkflowInstance, user: Any) -> list[Action]:
    """The operator actions django-fsm allows on this instance for this user,
    in display order."""
    allowed = {
        t.name
        for t in instance.get_available_user_state_transitions(user)  # type: ignore[attr-defined]
    }
    return [action for name, action in ACTIONS.items() if name in allowed]
