"""Server-side bulk jobs: plan from the list's filters, preview, confirm,
watch, pause, resume, cancel. The work is done by a Celery worker."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from django import forms
from django.contrib import messages
from django.db.models import Count
from django.http import Http404, HttpResponse, QueryDict
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_GET, require_http_methods, require_POST
from django_htmx.http import HttpResponseStopPolling

from workflows_app.engine.commands import bulk
from workflows_app.engine.errors import EngineError, NotPermitted
from workflows_app.filters import InstanceFilter
from workflows_app.forms import BulkJobForm, clean_reason
from workflows_app.models import BulkJob, BulkJobItem, WorkflowInstance
from workflows_app.views.common import (
    HtmxHttpRequest,
    dashboard_view,
    forbidden,
    wants_partial,
)

# Query parameters of the list that do not select instances.
NOT_FILTERS = ("cursor", "per_page", "sort")
ITEMS_SHOWN = 100
# What the operator did: an event, true for as long as the page shows it
# (the job's state is told by the progress part, which refreshes itself).
DONE = {
    "confirm": "You started the job.",
    "pause": "You paused the job.",
    "resume": "You resumed the job.",
    "cancel": "You cancelled the job.",
}
# The job's state in words, shown in the progress part.
STATUS_MEANING = {
    BulkJob.Status.DRAFT: "Preview: nothing has been done yet.",
    BulkJob.Status.QUEUED: "The job is queued; a worker is starting it.",
    BulkJob.Status.RUNNING: "A worker is acting on the instances, one at a time.",
    BulkJob.Status.PAUSED: "Paused: the worker stopped before the next instance.",
    BulkJob.Status.CANCELLED: "Cancelled: instances not reached were left alone.",
    BulkJob.Status.FINISHED: "Finished: every planned instance was processed.",
}
DISCARDED = "Discarded before it started: nothing was done."
DISCARDED_NOW = "You discarded the plan: nothing was done."
OPERATIONS = {
    "confirm": bulk.bulk_job_confirm,
    "pause": bulk.bulk_job_pause,
    "resume": bulk.bulk_job_resume,
    "cancel": bulk.bulk_job_cancel,
}


def _selection(query: str) -> tuple[InstanceFilter, str]:
    params = QueryDict(query, mutable=True)
    for name in NOT_FILTERS:
        params.pop(name, None)
    filterset = InstanceFilter(params, queryset=WorkflowInstance.objects.all())
    return filterset, params.urlencode()


def _describe(filterset: InstanceFilter) -> str:
    """The selection in words, e.g. "Definition: orders; State: needs attention"."""
    parts = []
    for name, value in filterset.form.cleaned_data.items():
        if value in (None, ""):
            continue
        field = filterset.form.fields[name]
        shown = dict(getattr(field, "choices", ())).get(value, value)
        parts.append(f"{field.label or name}: {shown}")
    return "; ".join(parts) or "every instance"


@require_http_methods(["GET", "POST"])
@dashboard_view
def bulk_job_new(request: HtmxHttpRequest) -> HttpResponse:
    """The form (GET), then the plan (POST): a draft job to preview."""
    # Not even the form for someone who may not plan one (a viewer).
    if not any(bulk.may_run(request.user, action) for action in BulkJob.Action.values):
        return forbidden(request, "You are not allowed to plan bulk jobs.")
    if request.method == "GET":
        query = request.GET.urlencode()
    else:
        query = request.POST.get("query", "")
    filterset, query = _selection(query)
    if not filterset.is_valid() or not filterset.is_filtered:
        messages.error(
            request, "Filter the list first: a bulk job acts on a filtered list."
        )
        return redirect("instance_list")
    form = BulkJobForm(
        request.POST or None, initial={"action": request.GET.get("action")}
    )
    status = 200
    if request.method == "POST" and form.is_valid():
        data = form.cleaned_data
        if not bulk.may_run(request.user, data["action"]):
            return forbidden(
                request, f"You are not allowed to {data['action']} instances."
            )
        try:
            job = bulk.bulk_job_plan(
                filterset.qs,
                action=data["action"],
                reason=data["reason"],
                rate=data["rate"],
                user=request.user,
                query=query,
                description=_describe(filterset),
            )
        except EngineError as exc:
            form.add_error(None, str(exc))
        else:
            return redirect("bulk_job_detail", pk=job.pk)
    if request.method == "POST":
        status = 422
    context = {"form": form, "query": query, "description": _describe(filterset)}
    return render(request, "workflows/bulk_job_new.html", context, status=status)


ITEM_COLUMNS = (
    "job_id",
    "instance_id",
    "instance__business_key",
    "instance__definition_key",
    "instance__state",
    "instance__version",
    "plan",
    "outcome",
    "message",
    "processed_at",
)


def job_context(job: BulkJob, user: Any) -> dict[str, Any]:
    """The plan (what will be done, what skipped and why) and the progress."""
    counts = dict(job.items.order_by().values_list("outcome").annotate(n=Count("id")))
    plans = job.items.order_by().values_list("plan", "command").annotate(n=Count("id"))
    acting = [(plan, n) for plan, command, n in plans if command]
    skipped = [(plan, n) for plan, command, n in plans if not command]
    total_acting = sum(n for _, n in acting)
    # Items a cancel left alone were not processed.
    not_reached = counts.get(BulkJobItem.Outcome.PENDING, 0) + counts.get(
        BulkJobItem.Outcome.CANCELLED, 0
    )
    processed = max(total_acting - not_reached, 0)
    discarded = job.discarded
    items = job.items.select_related("instance").only(*ITEM_COLUMNS)
    if job.status != BulkJob.Status.DRAFT:
        # Processed ones only: those a cancel left alone are counted above.
        items = items.exclude(
            outcome__in=[BulkJobItem.Outcome.PENDING, BulkJobItem.Outcome.CANCELLED]
        ).order_by("-processed_at", "-id")
    # django-fsm adds get_available_<field>_transitions when the class is built.
    allowed = {t.name for t in job.get_available_status_transitions()}  # type: ignore[attr-defined]
    return {
        "job": job,
        "discarded": discarded,
        "status_meaning": DISCARDED if discarded else STATUS_MEANING[job.status],
        "log": [_log_entry(entry, discarded) for entry in job.log],
        "acting": sorted(acting, key=lambda row: -row[1]),
        "skipped": sorted(skipped, key=lambda row: -row[1]),
        "total_acting": total_acting,
        "total_skipped": sum(n for _, n in skipped),
        "processed": processed,
        "percent": int(100 * processed / total_acting) if total_acting else 100,
        "items": list(items[:ITEMS_SHOWN]),
        "items_limit": ITEMS_SHOWN,
        "can_operate": bulk.may_run(user, job.action),
        "is_owner": job.created_by_id == user.pk,
        "operations": [n for n in ("pause", "resume", "cancel") if n in allowed],
        "approval": bulk.pending_approval(job),
        "can_approve": user.has_perm("workflows_app.approve_request"),
        "outcome_counts": [
            (value, label, counts[value])
            for value, label in BulkJobItem.Outcome.choices
            if counts.get(value)
        ],
    }


def _log_entry(entry: dict[str, Any], discarded: bool) -> dict[str, Any]:
    """A job-history entry with its time as a datetime (stored as ISO text);
    the cancel of a job never started is told as what it was, a discard."""
    try:
        at = datetime.fromisoformat(entry.get("at", ""))
    except (TypeError, ValueError):
        at = None
    what = entry.get("what")
    if discarded and what == "cancel":
        what = "discard"
    return {**entry, "what": what, "at": at}


@require_GET
@dashboard_view
def bulk_job_detail(request: HtmxHttpRequest, pk: int) -> HttpResponse:
    job = get_object_or_404(BulkJob.objects.select_related("created_by"), pk=pk)
    template = "workflows/bulk_job_detail.html"
    if not wants_partial(request):
        return render(request, template, job_context(job, request.user))
    response = render(request, f"{template}#progress", job_context(job, request.user))
    if job.status in {BulkJob.Status.FINISHED, BulkJob.Status.CANCELLED}:
        # The final state is in this answer; nothing more will change.
        response.status_code = HttpResponseStopPolling.status_code
    return response


def refuse_on_job(request: HtmxHttpRequest, pk: int, text: str) -> HttpResponse:
    """The job's page with why the input was refused (422, nothing done)."""
    job = get_object_or_404(BulkJob.objects.select_related("created_by"), pk=pk)
    messages.error(request, text)
    context = job_context(job, request.user)
    return render(request, "workflows/bulk_job_detail.html", context, status=422)


@require_POST
@dashboard_view
def bulk_job_operate(request: HtmxHttpRequest, pk: int, operation: str) -> HttpResponse:
    command = OPERATIONS.get(operation)
    if command is None:
        raise Http404("no such operation")
    action = BulkJob.objects.filter(pk=pk).values_list("action", flat=True).first()
    if action is None:
        raise Http404("no such job")
    if not bulk.may_run(request.user, action):
        return forbidden(request, f"You are not allowed to {operation} this job.")
    try:
        kwargs: dict[str, Any] = {"user": request.user}
        if operation == "cancel":
            kwargs["reason"] = clean_reason(request.POST.get("reason", ""))
        command(pk, **kwargs)
    except forms.ValidationError as exc:
        return refuse_on_job(request, pk, f"Not done: {' '.join(exc.messages)}")
    except BulkJob.DoesNotExist as exc:
        raise Http404("no such job") from exc
    except NotPermitted as exc:
        return forbidden(request, f"Not done: {exc}.")
    except EngineError as exc:
        messages.error(request, f"Not done: {exc}.")
    else:
        job = BulkJob.objects.get(pk=pk)
        if operation == "confirm" and bulk.pending_approval(job) is not None:
            messages.success(
                request,
                "Sent for approval: a second operator must approve this job "
                "before it starts.",
            )
        elif job.discarded:
            messages.success(request, DISCARDED_NOW)
        else:
            messages.success(request, DONE[operation])
    return redirect("bulk_job_detail", pk=pk)


@require_GET
@dashboard_view
def bulk_job_list(request: HtmxHttpRequest) -> HttpResponse:
    jobs = BulkJob.objects.select_related("created_by").order_by("-id")[:100]
    return render(request, "workflows/bulk_job_list.html", {"jobs": jobs})
