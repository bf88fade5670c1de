"""Bulk jobs over the API, as the ``operate`` token's user: plan one from the
instance list's filters (the draft and its preview), page through its items,
start, pause, resume or cancel it.

The selection is the dashboard's own filter (``filters.InstanceFilter``), fed
the same query string the list page would send, so a job planned here acts
on exactly the instances the list shows for those filters. The engine's bulk
commands check permissions, four eyes and each item's version.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from django.db.models import Count
from django.http import HttpRequest, QueryDict
from django.urls import reverse
from ninja import Field, Query, Router, Schema, Status

from workflows_app.api.auth import OPERATE, token_user
from workflows_app.api.errors import ApiError
from workflows_app.api.operator import MAX_ID, approval_body
from workflows_app.api.schemas import (
    BulkItemPage,
    BulkJobCancelIn,
    BulkJobIn,
    BulkJobOut,
    BulkJobPlanned,
    Key,
    errors,
)
from workflows_app.engine.commands import bulk
from workflows_app.filters import InstanceFilter
from workflows_app.models import BulkJob, BulkJobItem, WorkflowInstance

router = Router()

# BulkJobIn's fields that select instances, and the list's parameter each
# one is (the rest of the body says what to do).
FILTER_PARAMS = {
    "definition": "definition",
    "status": "state",
    "business_key": "q",
    "stuck": "stuck",
    "idle": "idle",
    "accepted_after": "accepted_after",
    "accepted_before": "accepted_before",
    "failed_step": "failed_step",
    "signature": "signature",
}
PREVIEW_ITEMS = 50


def _selection(payload: BulkJobIn) -> tuple[InstanceFilter, str]:
    """The list's filter for the body's filters, and its query string."""
    params = QueryDict(mutable=True)
    for field, param in FILTER_PARAMS.items():
        value = getattr(payload, field)
        if value is None:
            continue
        if isinstance(value, bool):
            value = "yes" if value else "no"
        elif hasattr(value, "isoformat"):
            value = value.isoformat()
        params[param] = str(value)
    filterset = InstanceFilter(params, queryset=WorkflowInstance.objects.all())
    if not filterset.is_valid():
        details = [
            {"field": f"body.{_field_of(param)}", "message": " ".join(messages)}
            for param, messages in filterset.errors.items()
        ]
        raise ApiError(
            422,
            "invalid_input",
            "; ".join(f"{d['field']}: {d['message']}" for d in details),
            details=details,
        )
    if not filterset.is_filtered:
        raise ApiError(
            422,
            "invalid_input",
            "give at least one filter: a bulk job acts on a filtered selection",
        )
    return filterset, params.urlencode()


def _field_of(param: str) -> str:
    return next((f for f, p in FILTER_PARAMS.items() if p == param), param)


def _describe(payload: BulkJobIn) -> str:
    """The selection in words, e.g. "definition: orders; status: failed"."""
    parts = [
        f"{field.replace('_', ' ')}: {getattr(payload, field)}"
        for field in FILTER_PARAMS
        if getattr(payload, field) is not None
    ]
    return "; ".join(parts)


def _job(job_id: int) -> BulkJob:
    job = (
        BulkJob.objects.select_related("created_by").filter(pk=job_id).first()
        if job_id <= MAX_ID
        else None
    )
    if job is None:
        raise ApiError(404, "unknown_bulk_job", f"no bulk job {job_id}")
    return job


def job_body(request: HttpRequest, job: BulkJob) -> dict[str, Any]:
    """The job with its plan and progress (three queries)."""
    outcomes = dict(job.items.order_by().values_list("outcome").annotate(n=Count("id")))
    plans = job.items.order_by().values_list("plan", "command").annotate(n=Count("id"))
    acting = sorted(((p, n) for p, c, n in plans if c), key=lambda r: -r[1])
    skips = sorted(((p, n) for p, c, n in plans if not c), key=lambda r: -r[1])
    total = sum(n for _, n in acting)
    processed = total - outcomes.get(BulkJobItem.Outcome.PENDING, 0)
    approval = bulk.pending_approval(job)
    path = reverse("api-v1:bulk_job_items", kwargs={"job_id": job.pk})
    return {
        "id": job.pk,
        "action": job.action,
        "status": job.status,
        "reason": job.reason,
        "description": job.description,
        "query": job.query,
        "rate": job.rate,
        "created_by": job.created_by.get_username(),
        "created_at": job.created_at,
        "confirmed_at": job.confirmed_at,
        "finished_at": job.finished_at,
        "progress": {
            "acting": total,
            "skipped": sum(n for _, n in skips),
            "processed": processed,
            "percent": int(100 * processed / total) if total else 100,
            "outcomes": outcomes,
            "plans": [{"plan": p, "count": n} for p, n in acting],
            "skips": [{"plan": p, "count": n} for p, n in skips],
        },
        "approval": approval_body(approval) if approval is not None else None,
        "items_url": request.build_absolute_uri(path),
    }


def _items(
    job: BulkJob, *, outcome: str | None, after: int | None, limit: int
) -> dict[str, Any]:
    qs = job.items.all()
    if outcome is not None:
        qs = qs.filter(outcome=outcome)
    if after is not None:
        qs = qs.filter(pk__gt=after)
    rows = list(
        qs.order_by("pk").values(
            "pk",
            "instance_id",
            "instance__definition_key",
            "instance__business_key",
            "instance__state",
            "command",
            "plan",
            "outcome",
            "message",
            "processed_at",
        )[: limit + 1]
    )
    more = len(rows) > limit
    rows = rows[:limit]
    return {
        "items": [
            {
                "instance": row["instance_id"],
                "definition": row["instance__definition_key"],
                "business_key": row["instance__business_key"],
                "status": row["instance__state"],
                "acts": bool(row["command"]),
                "plan": row["plan"],
                "outcome": row["outcome"],
                "message": row["message"],
                "processed_at": row["processed_at"],
            }
            for row in rows
        ],
        "next_cursor": str(rows[-1]["pk"]) if more else None,
    }


@router.post(
    "/bulk-jobs",
    auth=OPERATE,
    response={201: BulkJobPlanned, **errors(400, 401, 403, 413, 415, 422)},
    url_name="bulk_job_plan",
    summary="Plan a bulk job (the dry run)",
    description="Scope `operate`. Selects instances with the instance list's "
    "filters (at least one) and writes a draft job: for each instance what "
    "would be done, or why nothing will. Nothing is done until "
    "`POST /bulk-jobs/{id}/start`. 201 with the counts and the first items "
    "(`items_url` pages on). 422 `invalid_input` when nothing matches or "
    "too many do.",
)
def bulk_job_plan(request: HttpRequest, payload: BulkJobIn) -> Status[dict[str, Any]]:
    filterset, query = _selection(payload)
    job = bulk.bulk_job_plan(
        filterset.qs,
        action=payload.action,
        reason=payload.reason,
        rate=payload.rate,
        user=token_user(request),
        query=query,
        description=_describe(payload),
    )
    body = job_body(request, job)
    body["preview"] = _items(job, outcome=None, after=None, limit=PREVIEW_ITEMS)
    return Status(201, body)


@router.get(
    "/bulk-jobs/{int:job_id}",
    auth=OPERATE,
    response={200: BulkJobOut, **errors(401, 403, 404)},
    url_name="bulk_job_detail",
    summary="A bulk job: its plan and progress",
    description="Scope `operate`.",
)
def bulk_job_detail(request: HttpRequest, job_id: int) -> dict[str, Any]:
    return job_body(request, _job(job_id))


class ItemFilters(Schema):
    outcome: BulkJobItem.Outcome | None = Field(
        None, description="pending: not done yet; skipped: nothing to do..."
    )
    cursor: Key | None = Field(None, description="next_cursor of the last page.")
    limit: int = Field(100, ge=1, le=500)


@router.get(
    "/bulk-jobs/{int:job_id}/items",
    auth=OPERATE,
    response={200: BulkItemPage, **errors(400, 401, 403, 404, 422)},
    url_name="bulk_job_items",
    summary="A bulk job's items",
    description="Scope `operate`. In plan order, paginated by cursor.",
)
def bulk_job_items(
    request: HttpRequest, job_id: int, filters: Query[ItemFilters]
) -> dict[str, Any]:
    job = _job(job_id)
    after = None
    if filters.cursor is not None:
        if not filters.cursor.isdigit() or int(filters.cursor) > MAX_ID:
            raise ApiError(
                400, "invalid_cursor", "the cursor is not one this API returned"
            )
        after = int(filters.cursor)
    return _items(job, outcome=filters.outcome, after=after, limit=filters.limit)


def _operate(
    request: HttpRequest, job_id: int, command: Callable[..., Any], **kwargs: Any
) -> dict[str, Any]:
    _job(job_id)
    command(job_id, user=token_user(request), **kwargs)
    return job_body(request, _job(job_id))


OPERATION_DOC = (
    "Scope `operate`. 403: the token's user may not run this action; "
    "409: not possible in the job's status now."
)
OPERATION_ERRORS = errors(400, 401, 403, 404, 409, 413, 415, 422)


@router.post(
    "/bulk-jobs/{int:job_id}/start",
    auth=OPERATE,
    response={200: BulkJobOut, 202: BulkJobOut, **OPERATION_ERRORS},
    url_name="bulk_job_start",
    summary="Start a planned bulk job",
    description=f"{OPERATION_DOC} Only the operator who planned it starts "
    "it. 200: queued for a worker. 202: its workflows want a second "
    "operator's approval for it first (`approval`); it starts once approved. "
    "Starting it again changes nothing.",
)
def bulk_job_start(request: HttpRequest, job_id: int) -> Status[dict[str, Any]]:
    body = _operate(request, job_id, bulk.bulk_job_confirm)
    waiting = body["status"] == BulkJob.Status.DRAFT and body["approval"]
    return Status(202 if waiting else 200, body)


@router.post(
    "/bulk-jobs/{int:job_id}/pause",
    auth=OPERATE,
    response={200: BulkJobOut, **OPERATION_ERRORS},
    url_name="bulk_job_pause",
    summary="Pause a bulk job",
    description=f"{OPERATION_DOC} The worker stops before the next instance.",
)
def bulk_job_pause(request: HttpRequest, job_id: int) -> dict[str, Any]:
    return _operate(request, job_id, bulk.bulk_job_pause)


@router.post(
    "/bulk-jobs/{int:job_id}/resume",
    auth=OPERATE,
    response={200: BulkJobOut, **OPERATION_ERRORS},
    url_name="bulk_job_resume",
    summary="Resume a paused bulk job",
    description=OPERATION_DOC,
)
def bulk_job_resume(request: HttpRequest, job_id: int) -> dict[str, Any]:
    return _operate(request, job_id, bulk.bulk_job_resume)


@router.post(
    "/bulk-jobs/{int:job_id}/cancel",
    auth=OPERATE,
    response={200: BulkJobOut, **OPERATION_ERRORS},
    url_name="bulk_job_cancel",
    summary="Cancel a bulk job",
    description=f"{OPERATION_DOC} Instances not reached yet are left alone.",
)
def bulk_job_cancel(
    request: HttpRequest, job_id: int, payload: BulkJobCancelIn | None = None
) -> dict[str, Any]:
    reason = payload.reason if payload is not None else ""
    return _operate(request, job_id, bulk.bulk_job_cancel, reason=reason)
