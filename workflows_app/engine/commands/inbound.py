"""Messages from participants: callbacks by task token, and events.

Both carry an id. The id is recorded (``InboundMessage``) in the same
transaction as the message's effect, so a replay finds it and gets the stored
answer back without changing anything.
"""

from __future__ import annotations

import dataclasses
import uuid
from typing import Any

from django.db import IntegrityError, transaction
from django.db.models import F, Q
from django.db.models.functions import Now

from workflows_app.activities.base import Outcome
from workflows_app.engine.actors import Actor
from workflows_app.engine.commands import observed
from workflows_app.engine.commands.execution import record_outcome
from workflows_app.engine.errors import InvalidInput
from workflows_app.engine.locking import db_now
from workflows_app.engine.transitions import Change
from workflows_app.models import (
    TERMINAL_STATES,
    Attempt,
    InboundMessage,
    StepExecution,
    StepState,
)

MAX_ID_LENGTH = 200


@dataclasses.dataclass(frozen=True)
class InboundResult:
    response: dict[str, Any]
    replay: bool


def _remember(source: str, message_id: str, kind: str) -> InboundMessage | None:
    """Insert the dedupe row; None when this (source, id) was handled before."""
    if not message_id or len(message_id) > MAX_ID_LENGTH:
        raise InvalidInput(
            f"a message id of 1 to {MAX_ID_LENGTH} characters is required"
        )
    try:
        with transaction.atomic():
            return InboundMessage.objects.create(
                source=source[:200], message_id=message_id, kind=kind
            )
    except IntegrityError:
        return None


def _replay(source: str, message_id: str, kind: str) -> InboundResult:
    """The stored answer; the replay is counted (not written to any timeline:
    a replay leaves the instance's history as it was)."""
    stored = InboundMessage.objects.get(
        source=source[:200], message_id=message_id, kind=kind
    )
    InboundMessage.objects.filter(pk=stored.pk).update(
        replays=F("replays") + 1, last_replay_at=Now()
    )
    return InboundResult(stored.response, replay=True)


def _instance_of(response: dict[str, Any]) -> Any:
    """The instance an answer names (a callback's, or an event's first)."""
    if response.get("instance"):
        return response["instance"]
    for part in ("completed", "observed", "flagged"):
        for entry in response.get(part) or []:
            if isinstance(entry, dict) and entry.get("instance"):
                return entry["instance"]
    return None


def _answer(row: InboundMessage, response: dict[str, Any]) -> InboundResult:
    row.response = response
    row.instance_id = _instance_of(response)
    row.save(update_fields=["response", "instance_id"])
    return InboundResult(response, replay=False)


@transaction.atomic(durable=True)
def callback_report(
    task_token: str,
    *,
    message_id: str,
    succeeded: bool,
    output: Any = None,
    error: str = "",
    permanent: bool = False,
    actor: Actor,
) -> InboundResult:
    """A participant reports the result of the attempt it was given
    ``task_token`` for. A result for an attempt that is no longer live
    (timed out, retried, instance compensating) is noted and changes nothing."""
    row = _remember(actor.label, message_id, "callback")
    if row is None:
        return _replay(actor.label, message_id, "callback")
    attempt = (
        Attempt.objects.filter(task_token=_uuid(task_token))
        .select_related("step")
        .first()
    )
    if attempt is None:
        return _answer(row, {"accepted": False, "reason": "unknown task token"})
    change = Change.open(attempt.step.instance_id, actor)
    outcome = (
        Outcome("succeeded", output=output)
        if succeeded
        else Outcome(
            "failed",
            error_class="ReportedFailure",
            error_message=error,
            permanent=permanent,
        )
    )
    recorded = record_outcome(
        change,
        attempt.step_id,
        attempt.direction,
        attempt.number,
        outcome,
        source="callback",
    )
    return _answer(
        row,
        {
            "accepted": recorded,
            "instance": str(attempt.step.instance_id),
            "step": attempt.step.name,
            "reason": ""
            if recorded
            else "the attempt is no longer waiting for this result",
        },
    )


@transaction.atomic(durable=True)
def event_ingest(
    event_id: str,
    *,
    event_type: str,
    correlation_key: str,
    payload: Any = None,
    actor: Actor,
) -> InboundResult:
    """Complete the running or waiting steps that await ``event_type`` for the
    instances whose business key is ``correlation_key``."""
    row = _remember(actor.label, event_id, "event")
    if row is None:
        return _replay(actor.label, event_id, "event")
    event = {
        "id": event_id,
        "type": event_type,
        "correlation_key": correlation_key,
        "payload": payload,
    }
    completed = _complete_waiting_steps(event, actor)
    now = db_now()
    definitions = observed.observed_definitions(event_type)
    tracked = [observed.observe_event(d, event, now, actor) for d in definitions]
    flagged = [] if completed or tracked else observed.flag_unmatched(event, actor)
    return _answer(
        row,
        {
            "accepted": True,
            "completed": completed,
            "observed": tracked,
            "flagged": flagged,
        },
    )


def _complete_waiting_steps(
    event: dict[str, Any], actor: Actor
) -> list[dict[str, Any]]:
    """Orchestrated steps that await this event type for this business key;
    and steps whose wait a close cut short (the engine then only notes the
    event, and raises an alert: the effect came after the close)."""
    awaiting = Q(state__in=[StepState.RUNNING, StepState.WAITING]) | Q(
        state=StepState.UNKNOWN, instance__state__in=TERMINAL_STATES
    )
    waiting = list(
        StepExecution.objects.filter(
            awaiting,
            instance__business_key=event["correlation_key"],
            instance__definition__mode="orchestrated",
            step_definition__awaits_event=event["type"],
        )
        .order_by("instance_id", "position")
        .values_list("instance_id", "id", "attempt")
    )
    completed = []
    for instance_id, step_id, number in waiting:
        change = Change.open(instance_id, actor)
        outcome = Outcome("succeeded", output=event["payload"])
        if record_outcome(
            change, step_id, "action", number, outcome, source=f"event {event['id']}"
        ):
            completed.append({"instance": str(instance_id), "step_id": step_id})
    return completed


def _uuid(token: str) -> uuid.UUID:
    try:
        return uuid.UUID(str(token))
    except ValueError:
        raise InvalidInput("the task token is not a valid token") from None
