"""The instance list (filters, search, keyset pages) and the instance page."""

from __future__ import annotations

import json
from typing import Any

from django.db.models import OuterRef, Prefetch, Subquery, prefetch_related_objects
from django.http import HttpResponse
from django.shortcuts import get_object_or_404, render
from django.utils import timezone
from django.views.decorators.http import require_GET
from django_htmx.http import HttpResponseStopPolling

from workflows_app.engine import four_eyes
from workflows_app.engine.blocking import (
    blocking_branches,
    blocking_step,
    restart_points,
)
from workflows_app.engine.commands import approvals, repair
from workflows_app.engine.outlook import deadline_outlook, step_outlooks
from workflows_app.engine.planning import stage_keys
from workflows_app.filters import SORTS, InstanceFilter
from workflows_app.forms import ActionForm, BulkActionForm, RepairForm
from workflows_app.models import (
    Alert,
    ApprovalRequest,
    InboundMessage,
    StepExecution,
    TransitionLog,
    WorkflowInstance,
)
from workflows_app.views import queries
from workflows_app.views.common import (
    HtmxHttpRequest,
    available_actions,
    dashboard_view,
    poll_seconds,
    wants_partial,
)
from workflows_app.views.pagination import keyset_page

PAGE_SIZES = (25, 50, 100)
HISTORY_LIMIT = 500
OPERATE_PERMISSIONS = (
    "workflows_app.retry_step",
    "workflows_app.retry_compensation",
    "workflows_app.compensate_instance",
)


def _page_size(request: HtmxHttpRequest) -> int:
    try:
        size = int(request.GET.get("per_page", PAGE_SIZES[0]))
    except ValueError:
        return PAGE_SIZES[0]
    return size if size in PAGE_SIZES else PAGE_SIZES[0]


@require_GET
@dashboard_view
def instance_list(request: HtmxHttpRequest) -> HttpResponse:
    base = WorkflowInstance.objects.select_related("definition").defer(*queries.HEAVY)
    filterset = InstanceFilter(request.GET or None, queryset=base)
    results_only = wants_partial(request) and request.htmx.target == "instance-results"
    if not results_only:
        filterset.show_examples()  # the search box is not in the results part
    qs = filterset.qs if filterset.is_bound else base
    # A filter the list cannot apply shows its error and no rows: a list that
    # quietly dropped it would look like the answer.
    refused = filterset.is_bound and not filterset.is_valid()
    if refused:
        qs = base.none()
    field, descending = SORTS[filterset.sort_key]
    size = _page_size(request)
    page = keyset_page(qs, field, descending, request.GET.get("cursor"), size)
    if refused or (page.is_first and page.next_cursor is None):
        total, exact = len(page.rows), True
    else:
        total, exact = queries.count_or_estimate(qs)
    can_bulk = any(request.user.has_perm(p) for p in OPERATE_PERMISSIONS)
    context = {
        "filter": filterset,
        "page": page,
        "total": total,
        "total_exact": exact,
        "page_sizes": PAGE_SIZES,
        "per_page": size,
        "can_bulk": can_bulk,
        "bulk_form": BulkActionForm() if can_bulk else None,
    }
    template = "workflows/instance_list.html"
    if results_only:
        template += "#results"
    return render(request, template, context)


def _with_change_token(qs: Any) -> Any:
    """Annotate the id of the newest timeline row: together with ``version``
    it tells a polling page whether anything new happened (notes included)."""
    newest = TransitionLog.objects.filter(instance=OuterRef("pk")).order_by("-id")
    return qs.annotate(last_log_id=Subquery(newest.values("id")[:1]))


def change_token(instance: Any) -> str:
    return f"{instance.version}-{instance.last_log_id or 0}"


def _attach_exchanges(steps: list[Any]) -> None:
    """Each attempt's HTTP exchanges as ``attempt.exchange_list``, in one
    query, and none at all for an instance without HTTP steps."""
    attempts = [attempt for step in steps for attempt in step.attempts.all()]
    definitions = [step.step_definition for step in steps]
    if any("http.request" in (d.action, d.compensation) for d in definitions):
        prefetch_related_objects(
            attempts, Prefetch("exchanges", to_attr="exchange_list")
        )
    else:
        for attempt in attempts:
            attempt.exchange_list = []


def detail_context(
    request: HtmxHttpRequest,
    pk: Any,
    *,
    message: tuple[str, str] | None = None,
    bound: tuple[str, ActionForm] | None = None,
) -> dict[str, Any]:
    """Everything the instance page shows, fresh from the database; ``bound``
    is an action form that failed validation, to show with its errors."""
    instance = get_object_or_404(
        _with_change_token(WorkflowInstance.objects.select_related("definition")),
        pk=pk,
    )
    steps = list(
        instance.steps.select_related("step_definition")
        .prefetch_related("attempts")
        .order_by("position")
    )
    _attach_exchanges(steps)
    history, older = queries.history_for(instance, HISTORY_LIMIT)
    names = {step.id: step.name for step in steps}
    for row in history:
        row.step_name = names.get(row.step_id, "")
    alerts = list(
        Alert.objects.filter(instance=instance, resolved_at__isnull=True)
        .select_related("acknowledged_by")
        .order_by("opened_at")
    )
    # What the engine says each step may still do (run, be undone, attempts).
    outlooks = step_outlooks(instance, steps)
    for step in steps:
        step.outlook = outlooks[step.id]
        step.keys_sent = _keys_sent(step)
    stages = _stages(steps)
    blocked = blocking_step(steps)
    needs_approval = set(approvals.approval_policy(instance).approval_actions or [])
    points = restart_points(steps, blocked)
    action_forms = []
    for action in available_actions(instance, request.user, steps, needs_approval):
        form = bound[1] if bound and bound[0] == action.name else None
        if form is None:
            step_id = blocked.id if action.targets_step and blocked else None
            if action.step_kind:
                step_id = next(
                    s.id
                    for s in steps
                    if s.state == "waiting"
                    and s.step_definition.kind == action.step_kind
                )
            if action.name == "restart_from_step":
                step_id = points[-1].id  # the nearest one: the least undone
            form = action.form_class(
                initial={"version": instance.version, "step": step_id},
                auto_id=f"{action.name}-%s",
            )
        action_forms.append((action, form))
    return {
        **_operator_tools(request, instance, steps, history, bound),
        "needs_approval": needs_approval,
        "instance": instance,
        "definition": instance.definition,
        "steps": steps,
        "stages": stages,
        "has_parallel": any(stage["parallel"] for stage in stages),
        "blocked": blocked,
        # Parallel stages: every failed or unknown branch of the blocked stage.
        "blocked_branches": blocking_branches(steps),
        "restart_points": points,
        "restart_step": next(
            (s for s in steps if s.position == instance.restart_position), None
        ),
        "history": history,
        "history_truncated": older,
        "history_limit": HISTORY_LIMIT,
        "actions": action_forms,
        "open_action": bound[0] if bound else None,
        "alerts": alerts,
        "can_acknowledge": request.user.has_perm("workflows_app.acknowledge_alert"),
        "message": message,
        "token": change_token(instance),
        "poll_seconds": poll_seconds(),
        "deadline_outlook": deadline_outlook(instance, timezone.now()),
    }


def _stages(steps: list[StepExecution]) -> list[dict[str, Any]]:
    """The steps grouped into their stages (parallel branches together),
    each step told its stage and branch number for the page."""
    keys = stage_keys(steps)
    stages: list[dict[str, Any]] = []
    for step in steps:
        if not stages or stages[-1]["key"] != keys[step.position]:
            stages.append({"key": keys[step.position], "steps": []})
        stages[-1]["steps"].append(step)
    for number, stage in enumerate(stages, start=1):
        stage["number"] = number
        stage["parallel"] = len(stage["steps"]) > 1
        for branch, step in enumerate(stage["steps"], start=1):
            step.stage_number = number
            step.branch_number = branch
            step.branch_of = len(stage["steps"]) if stage["parallel"] else 0
    return stages


# Compensation states in which the undo has been called (its key was sent).
UNDO_CALLED = {"running", "retrying", "done", "failed"}


def _keys_sent(step: StepExecution) -> list[tuple[int, str, str]]:
    """The idempotency keys each run has sent: the current run's action key
    once an attempt was claimed, its undo key once the undo was called;
    "" for a key not sent (earlier runs were run and undone by a restart)."""
    rows = step.keys_by_run()
    run, action_key, undo_key = rows[-1]
    rows[-1] = (
        run,
        action_key if step.started else "",
        undo_key if step.compensation_state in UNDO_CALLED else "",
    )
    return rows


# Timeline notes of messages the engine recognised as duplicates or stale and
# ignored: what answers "was it done twice?".
SUPPRESSED = {
    "duplicate_start_ignored": "a repeated start request (same idempotency key)",
    "message_ignored": "a duplicate or late task delivery",
    "stale_outcome_ignored": "a result for an attempt that was no longer live",
}


def _operator_tools(
    request: HtmxHttpRequest,
    instance: WorkflowInstance,
    steps: list[Any],
    history: list[Any],
    bound: tuple[str, Any] | None,
) -> dict[str, Any]:
    """Approvals waiting, the repair forms and the suppressed duplicates."""
    user = request.user
    pending = list(
        ApprovalRequest.objects.filter(
            instance=instance, status=ApprovalRequest.Status.PENDING
        ).select_related("requested_by")
    )
    repair_forms = []
    if user.has_perm(repair.PERMISSION) and not instance.is_terminal:
        targets = [("input", "the instance input", instance.input)] + [
            (str(s.id), f"the output of {s.name}", s.output)
            for s in steps
            if s.state in repair.WITH_OUTPUT
        ]
        failed = bound[1] if bound and bound[0] == "repair" else None
        for target, label, value in targets:
            if failed is not None and failed.data.get("target") == target:
                form = failed
            else:
                form = RepairForm(
                    initial={
                        "version": instance.version,
                        "target": target,
                        "value": json.dumps(value, indent=2, sort_keys=True),
                    },
                    auto_id=f"repair-{target}-%s",
                )
            repair_forms.append((target, label, form))
    suppressed = [
        (row, SUPPRESSED[row.transition])
        for row in history
        if row.transition in SUPPRESSED
    ]
    replayed = list(
        InboundMessage.objects.filter(instance_id=instance.pk, replays__gt=0)
        .order_by("received_at")
        .only(
            "kind", "source", "message_id", "replays", "received_at", "last_replay_at"
        )
    )
    return {
        "suppressed": suppressed,
        "replayed": replayed,
        "suppressed_count": len(suppressed) + sum(m.replays for m in replayed),
        # Each with why approving it could no longer act ("" while it could)
        # and, for a data repair, the paths it would change.
        "approvals": [
            (
                a,
                four_eyes.stale_because(a, instance),
                four_eyes.would_write(a, instance),
            )
            for a in pending
        ],
        "can_approve": user.has_perm(approvals.APPROVE_PERMISSION),
        "repair_forms": repair_forms,
        "open_repair": bound[1].data.get("target")
        if bound and bound[0] == "repair"
        else None,
    }


@require_GET
@dashboard_view
def instance_detail(request: HtmxHttpRequest, pk: Any) -> HttpResponse:
    since = request.GET.get("since")
    if request.htmx and since:
        # A poll: answer "nothing new" from one small query when possible.
        seen = get_object_or_404(
            _with_change_token(WorkflowInstance.objects.only("version", "state")),
            pk=pk,
        )
        if change_token(seen) == since:
            if seen.is_terminal:
                return HttpResponseStopPolling()
            return HttpResponse(status=204)
    context = detail_context(request, pk)
    template = "workflows/instance_detail.html"
    if wants_partial(request):
        template += "#live"
    return render(request, template, context)
