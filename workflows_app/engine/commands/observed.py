"""Observed (choreographed) workflows: reconstructed from service events.

The engine runs nothing for them. The first event with a new correlation key
creates the instance; each milestone's event completes its step, in whatever
order events arrive; a failure event holds the instance for a person; events
that fit nowhere are kept in the timeline with a flag. The same stuck rules
and alerts apply as for orchestrated instances.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from django.db.models import Q

from workflows_app.engine import progress
from workflows_app.engine.actors import Actor
from workflows_app.engine.commands.start import create_steps, input_fingerprint
from workflows_app.engine.transitions import Change
from workflows_app.models import (
    TERMINAL_STATES,
    StepState,
    WorkflowDefinition,
    WorkflowInstance,
)
from workflows_app.search_attributes import extract


def observed_definitions(event_type: str) -> list[WorkflowDefinition]:
    """The current version of each observed definition that knows the type."""
    keys = (
        WorkflowDefinition.objects.published()
        .filter(mode=WorkflowDefinition.Mode.OBSERVED)
        .filter(Q(steps__awaits_event=event_type) | Q(steps__failure_event=event_type))
        .values_list("key", flat=True)
        .distinct()
    )
    found = []
    for key in sorted(set(keys)):
        current = WorkflowDefinition.objects.current(key)
        # An older version may know the type while the current one does not.
        if (
            current is not None
            and current.mode == WorkflowDefinition.Mode.OBSERVED
            and (
                current.steps.filter(
                    Q(awaits_event=event_type) | Q(failure_event=event_type)
                ).exists()
            )
        ):
            found.append(current)
    return found


def flag_unmatched(event: dict[str, Any], actor: Actor) -> list[str]:
    """Note an event no definition expects on the open observed instances of
    its correlation key, so it shows in their timelines instead of vanishing."""
    flagged = []
    open_ids = (
        WorkflowInstance.objects.filter(
            business_key=event["correlation_key"],
            definition__mode=WorkflowDefinition.Mode.OBSERVED,
        )
        .exclude(state__in=TERMINAL_STATES)
        .values_list("id", flat=True)
    )
    for instance_id in list(open_ids[:20]):
        change = Change.open(instance_id, actor)
        change.note(
            "event_flagged",
            reason=f"{event['type']} is not a milestone of this workflow",
            data={"event": event["id"], "type": event["type"], "flag": "unknown"},
        )
        change.save()
        flagged.append(str(instance_id))
    return flagged


def _instance_for(
    definition: WorkflowDefinition,
    correlation_key: str,
    now: datetime,
    actor: Actor,
    event: dict[str, Any],
) -> Any:
    """The instance this event belongs to: the open one, else the newest one,
    else a new one created (and started) now."""
    existing = (
        WorkflowInstance.objects.filter(
            definition_key=definition.key, business_key=correlation_key
        )
        .order_by("-accepted_at")
        .values_list("id", "state")
    )
    rows = list(existing[:20])
    open_ids = [pk for pk, state in rows if state not in TERMINAL_STATES]
    if open_ids:
        return open_ids[0]
    if rows:
        return rows[0][0]
    instance = WorkflowInstance.objects.create(
        definition=definition,
        definition_key=definition.key,
        business_key=correlation_key,
        input={"first_event": event},
        input_fingerprint=input_fingerprint(event),
        search_attributes=extract(definition.search_attributes, {"first_event": event}),
        accepted_at=now,
        last_progress_at=now,
        stuck_check_at=now + definition.stuck_after,
        deadline_at=now + definition.deadline if definition.deadline else None,
    )
    create_steps(instance, definition)
    change = Change(instance, now, actor)
    change.record_creation(
        reason=f"created by event {event['type']} ({event['id']})",
        data={"definition_version": definition.version, "event": event["id"]},
    )
    change.save()
    return instance.id


def observe_event(
    definition: WorkflowDefinition, event: dict[str, Any], now: datetime, actor: Actor
) -> dict[str, Any]:
    """Apply one event to the observed instance of ``definition`` it names."""
    instance_id = _instance_for(definition, event["correlation_key"], now, actor, event)
    change = Change.open(instance_id, actor)
    instance = change.instance
    kind, note = _apply(change, event)
    if note:
        change.note(
            "event_flagged",
            reason=note,
            data={"event": event["id"], "type": event["type"], "flag": kind},
        )
    if instance.state not in TERMINAL_STATES:
        progress.advance(change)
    change.save()
    return {"instance": str(instance.id), "result": kind}


def _apply(change: Change, event: dict[str, Any]) -> tuple[str, str]:
    instance, event_type = change.instance, event["type"]
    data = {"event": event["id"], "type": event_type}
    if instance.state in TERMINAL_STATES:
        return (
            "after_end",
            f"{event_type} arrived after the instance ended ({instance.state})",
        )
    if instance.state == WorkflowInstance.State.ACCEPTED:
        change.fire(instance, "start", reason=f"first event {event_type}")
        instance.started_at = change.now
        progress.advance(change)  # now waiting for the first milestone
    for step in change.steps:
        definition = step.step_definition
        if definition.failure_event == event_type:
            if step.state in {StepState.PENDING, StepState.WAITING}:
                error = f"{event_type} reported by the service"
                change.fire(step, "observe_failure", error, reason=error, data=data)
                return "failure", ""
            return (
                "late_failure",
                f"{event_type} for {step.name}, which is {step.state}",
            )
        if definition.awaits_event != event_type:
            continue
        payload = event.get("payload")
        if step.state in {StepState.WAITING, StepState.PENDING}:
            early = step.state == StepState.PENDING
            change.fire(
                step, "observe_early" if early else "succeed", payload, data=data
            )
            step.succeeded_at = change.now
            instance.outputs = {**instance.outputs, step.name: payload}
            if early:
                return "out_of_order", f"{event_type} arrived before earlier milestones"
            return "milestone", ""
        return "duplicate", f"{step.name} was already {step.state}"
    return "unknown", f"{event_type} is not a milestone of this workflow"
