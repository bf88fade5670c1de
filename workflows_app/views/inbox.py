"""The inbox: steps that wait for a person, to filter, claim and complete.

The engine decides everything (permissions, claims, the form's check, four
eyes, the version fence); these views only render its answers. The list
part is swapped by htmx after a filter change or an action.
"""

from __future__ import annotations

from typing import Any

from django.http import Http404, HttpResponse
from django.shortcuts import render
from django.views.decorators.http import require_GET, require_POST

from workflows_app.engine import operate
from workflows_app.engine.commands import waits
from workflows_app.engine.errors import (
    AlreadyChanged,
    InvalidInput,
    NotPermitted,
    TransitionRejected,
)
from workflows_app.engine.human_form import clean_submission
from workflows_app.models import StepExecution, WorkflowDefinition
from workflows_app.views.common import (
    HtmxHttpRequest,
    dashboard_view,
    definition_filter,
    wants_partial,
)

PAGE_SIZE = 100
CLAIMED = {"": "all", "me": "claimed by me", "unclaimed": "unclaimed"}
CHANGED = "It changed meanwhile: the list below is current."


def _open_steps(definition: str, claimed: str, user: Any) -> list[StepExecution]:
    qs = StepExecution.objects.filter(
        state="waiting",
        wake_at__isnull=True,
        step_definition__kind="human",
        instance__state__in=["running", "needs_attention"],
    ).select_related("instance", "step_definition", "claimed_by")
    if definition:
        qs = qs.filter(instance__definition_key=definition)
    if claimed == "me":
        qs = qs.filter(claimed_by=user)
    elif claimed == "unclaimed":
        qs = qs.filter(claimed_by__isnull=True)
    return list(qs.order_by("instance__last_progress_at", "id")[:PAGE_SIZE])


def _filters(request: HtmxHttpRequest) -> tuple[str, bool, str]:
    source = request.GET if request.method == "GET" else request.POST
    definition, known = definition_filter(source.get("definition", ""))
    claimed = source.get("claimed", "")
    return definition, known, claimed if claimed in CLAIMED else ""


def _render(
    request: HtmxHttpRequest,
    *,
    status: int = 200,
    message: tuple[str, str] | None = None,
    bound: dict[str, Any] | None = None,
) -> HttpResponse:
    definition, known, claimed = _filters(request)
    context = {
        "items": _open_steps(definition, claimed, request.user) if known else [],
        "definitions": sorted(
            set(
                WorkflowDefinition.objects.filter(steps__kind="human").values_list(
                    "key", flat=True
                )
            )
        ),
        "definition": definition,
        "claimed": claimed,
        "claimed_choices": CLAIMED.items(),
        "page_size": PAGE_SIZE,
        "may_work": request.user.has_perm(waits.HUMAN_PERMISSION),
        "message": message,
        "bound": bound or {},
    }
    template = "workflows/inbox.html"
    if wants_partial(request):
        template += "#inbox-list"
    return render(request, template, context, status=status)


@require_GET
@dashboard_view
def inbox(request: HtmxHttpRequest) -> HttpResponse:
    return _render(request)


def _step_or_404(step_id: int) -> StepExecution:
    step = (
        StepExecution.objects.filter(pk=step_id)
        .select_related("step_definition", "instance")
        .first()
    )
    if step is None or step.step_definition.kind != "human":
        raise Http404("no such step for a person")
    return step


def _answer(request: HtmxHttpRequest, exc: Exception) -> HttpResponse:
    if isinstance(exc, NotPermitted):
        return _render(request, status=403, message=("error", f"Not done: {exc}."))
    if isinstance(exc, AlreadyChanged | TransitionRejected):
        return _render(
            request, status=409, message=("error", f"Not done: {exc}. {CHANGED}")
        )
    return _render(request, status=422, message=("error", f"Not done: {exc}."))


@require_POST
@dashboard_view
def inbox_claim(request: HtmxHttpRequest, step_id: int, op: str) -> HttpResponse:
    """Claim a step (others see it is yours) or give it back."""
    step = _step_or_404(step_id)
    try:
        if op == "claim":
            waits.step_claim(step.instance_id, step.pk, user=request.user)
            text = f"{step.name} of {step.instance.business_key} is yours now."
        elif op == "unclaim":
            reason = request.POST.get("reason", "")[:2000]
            waits.step_unclaim(
                step.instance_id, step.pk, user=request.user, reason=reason
            )
            text = f"{step.name} of {step.instance.business_key} is back in the inbox."
        else:
            raise Http404("no such operation")
    except (NotPermitted, AlreadyChanged, TransitionRejected, InvalidInput) as exc:
        return _answer(request, exc)
    return _render(request, message=("success", text))


@require_POST
@dashboard_view
def inbox_complete(request: HtmxHttpRequest, step_id: int) -> HttpResponse:
    """Complete (or reject) a step with its form: checked by the engine."""
    step = _step_or_404(step_id)
    fields = step.step_definition.form_fields
    # A page sends text; an unticked box is absent: that answer is "no".
    values: dict[str, Any] = {}
    for field in fields:
        key = f"field-{field['name']}"
        if field["type"] == "boolean":
            values[field["name"]] = request.POST.get(key) or "false"
        elif key in request.POST:
            values[field["name"]] = request.POST[key]
    reason = request.POST.get("reason", "").strip()
    reject = request.POST.get("decision") == "reject"
    version_text = request.POST.get("version", "")
    bound: dict[str, Any] = {
        "step": step.pk,
        "values": values,
        "reason": reason,
        "errors": {},
    }
    if not reject:
        _, errors = clean_submission(fields, values)
        bound["errors"] = errors
    if not reason:
        bound["errors"] = {**bound["errors"], "reason": "a reason is required"}
    if bound["errors"]:
        return _render(
            request,
            status=422,
            message=("error", "Not done: please correct the form below."),
            bound=bound,
        )
    try:
        outcome = operate.act(
            step.instance_id,
            "complete_human_step",
            user=request.user,
            reason=reason,
            step_id=step.pk,
            data={"reject": True} if reject else {"output": values},
            expected_version=int(version_text) if version_text.isdigit() else None,
        )
    except InvalidInput as exc:
        return _render(
            request, status=422, message=("error", f"Not done: {exc}."), bound=bound
        )
    except (NotPermitted, AlreadyChanged, TransitionRejected) as exc:
        return _answer(request, exc)
    if not outcome.done:
        text = "Sent for approval: a second operator must approve it first."
    elif reject:
        text = f"{step.name} of {step.instance.business_key} rejected."
    else:
        text = f"{step.name} of {step.instance.business_key} completed."
    return _render(request, message=("success", text))
