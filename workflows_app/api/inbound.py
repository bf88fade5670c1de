"""Messages from participants: task-token callbacks and events.

Both carry an id; the engine records it with the message's effect, so a
replay gets the first answer back (``replay: true``) and changes nothing.
"""

from __future__ import annotations

import uuid
from typing import Any

from django.http import HttpRequest
from ninja import Router

from workflows_app.api.auth import REPORT, api_actor, event_actor
from workflows_app.api.errors import ApiError
from workflows_app.api.schemas import CallbackIn, CallbackOut, EventIn, EventOut, errors
from workflows_app.engine import commands
from workflows_app.models import Attempt

router = Router()
BODY_ERRORS = (400, 401, 403, 409, 413, 415, 422)


def _attempt_token(raw: str) -> uuid.UUID:
    """The task token, if it names an attempt; otherwise a 404 that records
    nothing (the engine would remember the message id of an unknown token)."""
    try:
        token = uuid.UUID(raw)
    except ValueError:
        token = None
    if token is None or not Attempt.objects.filter(task_token=token).exists():
        raise ApiError(404, "unknown_task_token", "no step attempt has this task token")
    return token


@router.post(
    "/callbacks/{task_token}",
    auth=REPORT,
    response={200: CallbackOut, **errors(*BODY_ERRORS, 404)},
    url_name="callback_report",
    summary="Report the result of a waiting step",
    description="Scope `report`. The task token is the one the step's "
    "activity received. A result for an attempt that no longer waits (timed "
    "out, retried, instance compensating) is noted in the history and changes "
    "nothing (`accepted: false`).",
)
def report_callback(
    request: HttpRequest, task_token: str, payload: CallbackIn
) -> dict[str, Any]:
    token = _attempt_token(task_token)
    succeeded = payload.status == "succeeded"
    result = commands.callback_report(
        str(token),
        message_id=payload.id,
        succeeded=succeeded,
        output=payload.output if succeeded else None,
        error="" if succeeded else payload.error or "reported as failed",
        permanent=payload.permanent and not succeeded,
        actor=api_actor(request),
    )
    return {**result.response, "replay": result.replay}


@router.post(
    "/events",
    auth=REPORT,
    response={200: EventOut, **errors(*BODY_ERRORS)},
    url_name="event_post",
    summary="Post an event",
    description="Scope `report`. Completes the waiting steps that await this "
    "event type for the instances whose business key is `correlation_key`, "
    "and drives observed workflows.",
)
def post_event(request: HttpRequest, payload: EventIn) -> dict[str, Any]:
    result = commands.event_ingest(
        payload.id,
        event_type=payload.type,
        correlation_key=payload.correlation_key,
        payload=payload.payload,
        actor=event_actor(request),
    )
    return {**result.response, "replay": result.replay}
