"""Starting instances and reading them: status, history, filtered lists."""

from __future__ import annotations

import re
import uuid
from typing import Any

from django.http import HttpRequest, HttpResponse
from django.urls import reverse
from ninja import Field, Query, Router, Schema, Status
from ninja.params.functions import Header

from workflows_app import search
from workflows_app.api import queries
from workflows_app.api.auth import READ, START, api_actor
from workflows_app.api.body import check_text
from workflows_app.api.errors import ApiError
from workflows_app.api.schemas import (
    HistoryEntry,
    InstanceOut,
    InstancePage,
    Key,
    StartIn,
    StartOut,
    errors,
)
from workflows_app.engine import commands
from workflows_app.engine.errors import DefinitionNotFound, IdempotencyConflict
from workflows_app.engine.planning import stage_keys
from workflows_app.filters import StateConflict, merge_states
from workflows_app.models import InstanceState

router = Router()

# The definition key format (models.definitions.KEY_VALIDATOR): anything else
# cannot name a definition, and never reaches the database.
DEFINITION_KEY = re.compile(r"[a-z0-9][a-z0-9_.-]{0,99}")
# ninja.params.functions.Header: ninja.Header is the same function at run time,
# but mypy sees it as an Annotated alias, which cannot be called.
IDEMPOTENCY_KEY = Header(
    ...,
    alias="Idempotency-Key",
    min_length=1,
    max_length=200,
    description="Your unique key for this start: retry with the same key.",
)
LOCATION_HEADER = {
    "Location": {
        "description": "The instance's status URL.",
        "schema": {"type": "string", "format": "uri"},
    }
}


def status_url(request: HttpRequest, instance_id: Any) -> str:
    path = reverse("api-v1:instance_status", kwargs={"instance_id": instance_id})
    return request.build_absolute_uri(path)


@router.post(
    "/workflows/{definition_key}/instances",
    auth=START,
    response={
        202: StartOut,
        200: StartOut,
        **errors(400, 401, 403, 404, 409, 413, 415, 422),
    },
    url_name="instance_start",
    summary="Start an instance",
    description="Scope `start`. Records the instance as `accepted` (202) and "
    "queues it. The same `Idempotency-Key` with the same body returns the "
    "existing instance (200, its current status); with a different body, 409.",
    openapi_extra={
        "responses": {
            202: {"headers": LOCATION_HEADER},
            200: {"headers": LOCATION_HEADER},
        }
    },
)
def start_instance(
    request: HttpRequest,
    response: HttpResponse,
    definition_key: str,
    payload: StartIn,
    idempotency_key: str = IDEMPOTENCY_KEY,
) -> Status[dict[str, Any]]:
    if not DEFINITION_KEY.fullmatch(definition_key):
        raise DefinitionNotFound(f"no published workflow definition {definition_key!r}")
    check_text(idempotency_key, "the Idempotency-Key header")
    result = commands.instance_start(
        definition_key,
        business_key=payload.business_key,
        input=payload.input,
        idempotency_key=idempotency_key,
        actor=api_actor(request),
    )
    instance = result.instance
    # The engine fingerprints the input only; for the API the request is the
    # business key and the input, so another business key is a conflict too.
    if not result.created and instance.business_key != payload.business_key:
        raise IdempotencyConflict(
            f"idempotency key {idempotency_key!r} was already used for business "
            f"key {instance.business_key!r} (instance {instance.id})"
        )
    url = status_url(request, instance.id)
    response["Location"] = url
    body = {"id": instance.id, "status": instance.state, "status_url": url}
    return Status(202 if result.created else 200, body)


@router.get(
    "/instances/{uuid:instance_id}",
    auth=READ,
    response={200: InstanceOut, **errors(401, 403, 404)},
    url_name="instance_status",
    summary="Status of an instance",
    description="Scope `read`.",
)
def instance_status(request: HttpRequest, instance_id: uuid.UUID) -> dict[str, Any]:
    instance = queries.instance_detail(instance_id)
    if instance is None:
        raise ApiError(404, "unknown_instance", f"no instance {instance_id}")
    # Prefetched by queries.instance_detail (to_attr).
    steps = instance.ordered_steps  # type: ignore[attr-defined]
    keys = stage_keys(steps)
    number = {key: n for n, key in enumerate(sorted(set(keys.values())), start=1)}
    return {
        "id": instance.id,
        "definition": instance.definition_key,
        "version": instance.definition.version,
        "business_key": instance.business_key,
        "status": instance.state,
        "stuck": instance.stuck,
        "steps": [
            {
                "name": step.name,
                "state": step.state,
                "compensation_state": step.compensation_state,
                "attempts": step.attempt_count,
                "run": step.run,
                "stage": number[keys[step.position]],
            }
            for step in steps
        ],
        "accepted_at": instance.accepted_at,
        "completed_at": queries.completed_at(instance.state, instance.finished_at),
    }


@router.get(
    "/instances/{uuid:instance_id}/history",
    auth=READ,
    response={200: list[HistoryEntry], **errors(401, 403, 404)},
    url_name="instance_history",
    summary="Audited timeline of an instance",
    description="Scope `read`. Every transition in order, with notes that "
    "changed no state (ignored duplicates, stale results) as empty `field`.",
)
def instance_history(
    request: HttpRequest, instance_id: uuid.UUID
) -> list[dict[str, Any]]:
    rows = queries.history(instance_id)
    if rows is None:
        raise ApiError(404, "unknown_instance", f"no instance {instance_id}")
    return rows


class InstanceFilters(Schema):
    definition: Key | None = Field(None, description="A definition key.")
    status: list[InstanceState] = Field(
        default_factory=list, description="Repeat for several statuses."
    )
    state: list[InstanceState] = Field(
        default_factory=list,
        description="The same filter as `status` (the dashboard's name); "
        "giving both with different values is a 400.",
    )
    q: str | None = Field(
        None,
        max_length=500,
        description="The dashboard's search: business-key or instance-id "
        "prefixes (any case) and `name:value` search attributes, e.g. "
        "`ORD-5402 customer:c-349`.",
    )
    business_key: Key | None = None
    stuck: bool | None = None
    cursor: Key | None = Field(None, description="next_cursor of the last page.")
    limit: int = Field(50, ge=1, le=200)


@router.get(
    "/instances",
    auth=READ,
    response={200: InstancePage, **errors(400, 401, 403, 422)},
    url_name="instance_list",
    summary="List instances",
    description="Scope `read`. Most recently progressed first, paginated by "
    "cursor (no total count: it stays fast at millions of instances).",
)
def instance_list(
    request: HttpRequest, filters: Query[InstanceFilters]
) -> dict[str, Any]:
    try:
        statuses = merge_states(
            [str(s) for s in filters.state], [str(s) for s in filters.status]
        )
    except StateConflict as exc:
        raise ApiError(400, "conflicting_filters", str(exc)) from None
    query = None
    if filters.q:
        check_text(filters.q, "q")
        try:
            query = search.parse(filters.q)
        except search.SearchError as exc:
            raise ApiError(400, "invalid_search", str(exc)) from None
    rows, following = queries.instance_page(
        definition=filters.definition,
        statuses=statuses,
        search=query,
        business_key=filters.business_key,
        stuck=filters.stuck,
        cursor=filters.cursor,
        limit=filters.limit,
    )
    items = [
        {
            "id": row["id"],
            "definition": row["definition_key"],
            "version": row["definition__version"],
            "business_key": row["business_key"],
            "status": row["state"],
            "stuck": row["stuck"],
            "accepted_at": row["accepted_at"],
            "completed_at": queries.completed_at(row["state"], row["finished_at"]),
            "last_progress_at": row["last_progress_at"],
            "status_url": status_url(request, row["id"]),
        }
        for row in rows
    ]
    return {"items": items, "next_cursor": following}
