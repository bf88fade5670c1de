"""Accepting new workflow instances."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from datetime import timedelta
from operator import attrgetter
from typing import Any

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models.functions import Now

from workflows_app.engine import dispatch, rows
from workflows_app.engine.actors import Actor
from workflows_app.engine.errors import (
    DefinitionNotFound,
    IdempotencyConflict,
    InvalidInput,
)
from workflows_app.engine.transitions import Change, step_definitions
from workflows_app.models import (
    StepExecution,
    WorkflowDefinition,
    WorkflowInstance,
)
from workflows_app.search_attributes import extract

MAX_KEY_LENGTH = 200


@dataclasses.dataclass(frozen=True)
class StartResult:
    instance: WorkflowInstance
    created: bool


def input_fingerprint(data: Any) -> str:
    canonical = json.dumps(
        data, sort_keys=True, separators=(",", ":"), ensure_ascii=False
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


def _validate(business_key: Any, data: Any, idempotency_key: Any) -> None:
    if not isinstance(business_key, str) or not business_key.strip():
        raise InvalidInput("business_key must be a non-empty string")
    if len(business_key) > MAX_KEY_LENGTH:
        raise InvalidInput(f"business_key is longer than {MAX_KEY_LENGTH} characters")
    if not isinstance(data, dict):
        raise InvalidInput("input must be a JSON object")
    try:
        json.dumps(data)
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"input is not JSON-serialisable: {exc}") from exc
    if idempotency_key is not None and (
        not isinstance(idempotency_key, str)
        or not idempotency_key.strip()
        or len(idempotency_key) > MAX_KEY_LENGTH
    ):
        raise InvalidInput(
            "the idempotency key must be a non-empty string of at most "
            f"{MAX_KEY_LENGTH} characters"
        )


def _existing(
    definition_key: str, idempotency_key: str, fingerprint: str, actor: Actor
) -> StartResult:
    """The instance a repeated start request names; the repeat is noted in
    its timeline (when, from whom) and changes nothing else."""
    instance = WorkflowInstance.objects.get(
        definition_key=definition_key, idempotency_key=idempotency_key
    )
    if instance.input_fingerprint != fingerprint:
        raise IdempotencyConflict(
            f"idempotency key {idempotency_key!r} was already used with a "
            f"different input (instance {instance.id})"
        )
    change = Change.open(instance.id, actor)
    change.note(
        "duplicate_start_ignored",
        reason=f"start repeated with idempotency key {idempotency_key!r}",
        data={"idempotency_key": idempotency_key},
    )
    change.save()
    return StartResult(instance, created=False)


# Compiled once (engine/rows.py): every start runs them.
_NEWEST_PUBLISHED = rows.CompiledSelect(
    lambda key: (
        WorkflowDefinition.objects.published()
        .filter(key=key)
        .annotate(db_now=Now())
        .order_by("-version")[:1]
    ),
    WorkflowDefinition._meta.get_field("key"),
)
_position = attrgetter("position")


def new_steps(
    instance: WorkflowInstance, definition: WorkflowDefinition
) -> list[StepExecution]:
    """The instance's step rows, one per step of its (published, so
    frozen) definition, not yet saved. Its step definitions come from the
    engine's per-process copy, not from a query per start."""
    ordered = sorted(step_definitions(definition).values(), key=_position)
    return [
        StepExecution(
            instance=instance,
            step_definition=step,
            position=step.position,
            name=step.name,
            attempts_allowed=step.max_attempts,
            compensation_attempts_allowed=step.max_attempts,
        )
        for step in ordered
    ]


def create_steps(instance: WorkflowInstance, definition: WorkflowDefinition) -> None:
    StepExecution.objects.bulk_create(new_steps(instance, definition))


@transaction.atomic(durable=True)
def instance_start(
    definition_key: str,
    *,
    business_key: str,
    input: dict[str, Any] | None = None,  # noqa: A002 - the public API's name
    idempotency_key: str | None = None,
    actor: Actor,
) -> StartResult:
    """Record a new instance as ``accepted`` and queue its start.

    1. Validate; nothing is written for bad input.
    2. With an idempotency key already used: the same input returns that
       instance, a different input raises ``IdempotencyConflict``.
    3. Otherwise insert the instance and its steps, pinned to the newest
       published version; a concurrent insert of the same key loses on the
       unique constraint and falls back to step 2.
    4. After commit, send the start to a worker.
    """
    data = {} if input is None else input
    _validate(business_key, data, idempotency_key)
    # The business key is part of the request: reusing an idempotency key for
    # another order is a conflict, not a replay.
    fingerprint = input_fingerprint({"business_key": business_key, "input": data})
    # The same query reads the database clock: one clock for every deadline.
    newest = _NEWEST_PUBLISHED.rows(definition_key)
    definition: WorkflowDefinition | None = newest[0] if newest else None
    if definition is None:
        raise DefinitionNotFound(f"no published workflow definition {definition_key!r}")
    if definition.mode != WorkflowDefinition.Mode.ORCHESTRATED:
        raise InvalidInput(
            f"{definition_key!r} is an observed workflow: "
            "its instances are created by events"
        )
    if idempotency_key is not None:
        found = WorkflowInstance.objects.filter(
            definition_key=definition_key, idempotency_key=idempotency_key
        ).exists()
        if found:
            return _existing(definition_key, idempotency_key, fingerprint, actor)

    # Annotated by the query above.
    now = definition.db_now  # type: ignore[attr-defined]
    instance = WorkflowInstance(
        definition=definition,
        definition_key=definition.key,
        business_key=business_key,
        idempotency_key=idempotency_key,
        input=data,
        input_fingerprint=fingerprint,
        search_attributes=extract(definition.search_attributes, data),
        accepted_at=now,
        last_progress_at=now,
        stuck_check_at=now + definition.stuck_after,
        deadline_at=now + definition.deadline if definition.deadline else None,
        redispatch_at=now + timedelta(seconds=settings.SAGA_REDISPATCH_AFTER),
    )
    change = Change(instance, now, actor)
    if idempotency_key is None:
        change.insert(instance)  # with its steps and history, one statement
    else:
        try:
            # A savepoint: a concurrent start with the same key may win.
            with transaction.atomic():
                instance.save(force_insert=True)
        except IntegrityError:
            return _existing(definition_key, idempotency_key, fingerprint, actor)
    # Written with the history row, in one statement.
    change.insert_all(new_steps(instance, definition))
    change.record_creation(
        reason=f"accepted for {business_key}",
        data={
            "idempotency_key": idempotency_key,
            "definition_version": definition.version,
        },
    )
    change.after_commit(dispatch.advance_sender(instance.id))
    change.save(last=True)
    return StartResult(instance, created=True)
