"""Operator actions: POST only, each one form, one engine command per instance.

The engine checks the transition, the permission and the version the operator
saw; these views only translate its answer into a page: the instance's fresh
state with a message, swapped in by htmx (or a redirect without htmx).
"""

from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import messages
from django.http import Http404, HttpResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.views.decorators.http import require_POST
from django_htmx.http import HttpResponseClientRedirect

from workflows_app.engine import commands, operate
from workflows_app.engine.commands import approvals, bulk, repair
from workflows_app.engine.errors import (
    AlreadyChanged,
    EngineError,
    InvalidInput,
    NotPermitted,
    TransitionRejected,
)
from workflows_app.forms import (
    ActionForm,
    BulkActionForm,
    DecisionForm,
    RepairForm,
    clean_reason,
)
from workflows_app.models import (
    Alert,
    ApprovalRequest,
    WorkflowInstance,
)
from workflows_app.views.bulk_jobs import refuse_on_job
from workflows_app.views.common import (
    ACTIONS,
    Action,
    HtmxHttpRequest,
    dashboard_view,
    forbidden,
)
from workflows_app.views.instances import detail_context

CHANGED = (
    "This instance changed meanwhile, so nothing was done. Its current state "
    "is shown below; check it and act again if it is still needed."
)
LEVELS = {200: messages.SUCCESS, 403: messages.ERROR, 409: messages.WARNING}


def _perform(
    request: HtmxHttpRequest, pk: Any, action: Action, form: ActionForm
) -> tuple[int, str]:
    """Run the action; return the HTTP status and what to tell."""
    if not form.is_valid():
        return 422, "Not done: please correct the form below."
    data = form.cleaned_data
    step = data.get("step") if action.targets_step else None
    extra = form.action_data()
    return _run(
        pk,
        action.name,
        request.user,
        data["reason"],
        data["version"],
        step=step or None,
        data=extra,
        done=f"{action.label}: done.",
    )


def _run(
    pk: Any,
    name: str,
    user: Any,
    reason: str,
    version: int | None,
    *,
    step: int | None = None,
    data: dict[str, Any] | None = None,
    done: str,
) -> tuple[int, str]:
    """Do the action through the catalogue (which asks a second operator
    where the workflow wants four eyes); return the HTTP status and text."""
    try:
        outcome = operate.act(
            pk,
            name,
            user=user,
            reason=reason,
            step_id=step,
            data=data,
            expected_version=version,
        )
    except WorkflowInstance.DoesNotExist as exc:
        raise Http404("no such instance") from exc
    except AlreadyChanged:
        return 409, CHANGED
    except NotPermitted as exc:
        return 403, f"Not done: {exc}."
    except InvalidInput as exc:
        return 422, f"Not done: {exc}."
    except TransitionRejected as exc:
        return 409, f"Not done: {exc}. {CHANGED.split('. ', 1)[1]}"
    if not outcome.done:
        return 200, (
            "Sent for approval: a second operator must approve it before "
            "anything happens."
        )
    return 200, done


@require_POST
@dashboard_view
def instance_action(request: HtmxHttpRequest, pk: Any, action: str) -> HttpResponse:
    spec = ACTIONS.get(action)
    if spec is None:
        raise Http404("no such action")
    if not request.user.has_perm(spec.permission):
        return forbidden(request, f"You are not allowed to {spec.label.lower()}.")
    form = spec.form_class(request.POST, auto_id=f"{spec.name}-%s")
    status, text = _perform(request, pk, spec, form)
    return _answer(
        request, pk, status, text, bound=(spec.name, form) if status == 422 else None
    )


def _answer(
    request: HtmxHttpRequest,
    pk: Any,
    status: int,
    text: str,
    bound: tuple[str, ActionForm] | None = None,
) -> HttpResponse:
    """The instance's fresh live part with the message (htmx), or a redirect;
    refused input (422) gets the whole page back without htmx, so that the
    form keeps what was typed and shows what is wrong with it."""
    if not request.htmx and status != 422:
        messages.add_message(request, LEVELS.get(status, messages.ERROR), text)
        return redirect("instance_detail", pk=pk)
    kind = "success" if status == 200 else "error"
    context = detail_context(request, pk, message=(kind, text), bound=bound)
    template = "workflows/instance_detail.html"
    if request.htmx:
        template += "#live"
    return render(request, template, context, status=status)


@require_POST
@dashboard_view
def instance_repair(request: HtmxHttpRequest, pk: Any) -> HttpResponse:
    """Correct the input or a finished step's output (diffed and audited)."""
    if not request.user.has_perm(repair.PERMISSION):
        return forbidden(request, "You are not allowed to edit instance data.")
    form = RepairForm(request.POST, auto_id="repair-%s")
    if not form.is_valid():
        return _answer(
            request,
            pk,
            422,
            "Not done: please correct the form below.",
            bound=("repair", form),
        )
    data = form.cleaned_data
    if data["target"] == "input":
        name, step, value = "repair_input", None, {"input": data["value"]}
        done = "Input corrected; the timeline shows the change."
    else:
        name, step, value = "repair_output", data["target"], {"output": data["value"]}
        done = "Step output corrected; the timeline shows the change."
    status, text = _run(
        pk,
        name,
        request.user,
        data["reason"],
        data["version"],
        step=step,
        data=value,
        done=done,
    )
    return _answer(
        request, pk, status, text, bound=("repair", form) if status == 422 else None
    )


@require_POST
@dashboard_view
def approval_decide(
    request: HtmxHttpRequest, approval_id: int, decision: str
) -> HttpResponse:
    """A second operator approves (the action is done now) or rejects."""
    if decision not in {"approve", "reject"}:
        raise Http404("no such decision")
    if not request.user.has_perm(approvals.APPROVE_PERMISSION):
        return forbidden(request, "You are not allowed to decide on requests.")
    target = (
        ApprovalRequest.objects.filter(pk=approval_id)
        .values("instance_id", "bulk_job_id")
        .first()
    )
    if target is None:
        raise Http404("no such request")
    form = DecisionForm(request.POST)
    status = 200
    try:
        if not form.is_valid():
            raise InvalidInput(" ".join(map(str, form.errors["note"])).rstrip("."))
        decided = approvals.approval_decide(
            approval_id,
            user=request.user,
            approve=decision == "approve",
            note=form.cleaned_data["note"],
        )
    except InvalidInput as exc:
        status, text = 422, f"Not done: {exc}."
    except NotPermitted as exc:
        status, text = 403, f"Not done: {exc}."
    except AlreadyChanged as exc:
        status, text = 409, f"Not done: {exc}."
    else:
        text = {
            "approved": "Approved: the action was done.",
            "rejected": "Rejected: nothing was done.",
            "expired": "This request had expired: nothing was done.",
            "failed": f"Approved, but not done: {decided.outcome}.",
        }[decided.status]
        if decided.status != "approved":
            status = 409 if decided.status in {"expired", "failed"} else 200
        elif target["bulk_job_id"] is not None:
            # Approving a job starts it; its instances are acted on later.
            text = "Approved: the job is started; its progress is below."
    if target["bulk_job_id"] is not None:
        if status == 403:
            return forbidden(request, text)
        if status == 422:
            return refuse_on_job(request, target["bulk_job_id"], text)
        messages.add_message(request, LEVELS.get(status, messages.ERROR), text)
        return redirect("bulk_job_detail", pk=target["bulk_job_id"])
    return _answer(request, target["instance_id"], status, text)


@require_POST
@dashboard_view
def alert_acknowledge(request: HtmxHttpRequest, alert_id: int) -> HttpResponse:
    """An operator takes an alert: it is not escalated any more."""
    if not request.user.has_perm("workflows_app.acknowledge_alert"):
        return forbidden(request, "You are not allowed to acknowledge alerts.")
    instance_id = (
        Alert.objects.filter(pk=alert_id).values_list("instance_id", flat=True).first()
    )
    if instance_id is None:
        raise Http404("no such alert")
    status, text = 200, "Alert acknowledged: it will not be escalated."
    try:
        reason = clean_reason(request.POST.get("reason", ""))
        commands.alert_acknowledge(alert_id, user=request.user, reason=reason)
    except forms.ValidationError as exc:
        status, text = 422, f"Not done: {' '.join(exc.messages)}"
    except AlreadyChanged as exc:
        status, text = 409, f"Not done: {exc}."
    except NotPermitted as exc:
        status, text = 403, f"Not done: {exc}."
    return _answer(request, instance_id, status, text)


# -- a selection in the list ---------------------------------------------------


@require_POST
@dashboard_view
def instance_bulk(request: HtmxHttpRequest) -> HttpResponse:
    """Retry or compensate the selected instances: plan a bulk job, fenced on
    the versions shown in the list, and show its preview to confirm. Nothing
    is done before the confirmation; the job's worker does the rest."""
    form = BulkActionForm(request.POST)
    if not bulk.may_run(request.user, request.POST.get("action", "retry")):
        return forbidden(request, "You are not allowed to act on instances.")
    if form.is_valid():
        seen = dict(form.cleaned_data["selected"])
        try:
            job = bulk.bulk_job_plan(
                WorkflowInstance.objects.filter(pk__in=list(seen)),
                action=form.cleaned_data["action"],
                reason=form.cleaned_data["reason"],
                user=request.user,
                description=f"{len(seen)} instances selected in the list",
                seen_versions=seen,
            )
        except EngineError as exc:
            form.add_error(None, str(exc))
        else:
            target = reverse("bulk_job_detail", args=[job.pk])
            if request.htmx:
                return HttpResponseClientRedirect(target)
            return redirect(target)
    template = "workflows/bulk_result.html"
    if request.htmx:
        template += "#bulk-result"
    return render(request, template, {"bulk_form": form}, status=422)
