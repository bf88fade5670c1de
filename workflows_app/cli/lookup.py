"""What a runbook names, found in the database: an instance (by id, a
unique id prefix or its business key), a user, a step, a reason, JSON data.
Anything not found, ambiguous or malformed is an ``Exit`` with code 2."""

from __future__ import annotations

import re
import uuid
from pathlib import Path
from typing import Any

from django.contrib.auth import get_user_model

from workflows_app import validation
from workflows_app.cli.exits import BAD_INPUT, Exit, bad_input, refused
from workflows_app.models import StepExecution, WorkflowInstance

# Shorter prefixes match too much to be worth a query of their own.
MIN_PREFIX = 4
SHOWN = 10
REASON_MAX = 2000  # as on the instance page
HEX = re.compile(r"[0-9a-f]+")


def _id_range(ref: str) -> tuple[uuid.UUID, uuid.UUID] | None:
    """The range of ids starting with ``ref`` (dashes ignored), which the
    primary key index serves, or None when ``ref`` cannot start an id."""
    digits = ref.lower().replace("-", "")
    if not MIN_PREFIX <= len(digits) <= 32 or not HEX.fullmatch(digits):
        return None
    return uuid.UUID(digits.ljust(32, "0")), uuid.UUID(digits.ljust(32, "f"))


def instance(ref: str) -> WorkflowInstance:
    """The one instance ``ref`` names: its id, a unique prefix of it, or its
    business key (when no other instance has the same)."""
    ref = ref.strip()
    if not ref:
        raise bad_input("give an instance id, id prefix or business key")
    base = WorkflowInstance.objects.select_related("definition")
    found: dict[Any, WorkflowInstance] = {}
    ids = _id_range(ref)
    if ids is not None:
        for row in base.filter(pk__range=ids).order_by("pk")[: SHOWN + 1]:
            found[row.pk] = row
    for row in base.filter(business_key=ref).order_by("-accepted_at")[: SHOWN + 1]:
        found[row.pk] = row
    if not found:
        raise bad_input(f"no instance has the id, id prefix or business key {ref!r}")
    if len(found) > 1:
        rows = list(found.values())
        listed = "\n".join(
            f"  {r.pk}  {r.definition_key}  {r.business_key}  {r.state}"
            for r in rows[:SHOWN]
        )
        more = "\n  …" if len(rows) > SHOWN else ""
        raise bad_input(
            f"{ref!r} is ambiguous: it names {'more than ' if more else ''}"
            f"{min(len(rows), SHOWN)} instances; give more of the id:\n{listed}{more}"
        )
    return next(iter(found.values()))


def user(username: str) -> Any:
    """The operator the timeline will name; an inactive account may do nothing."""
    model = get_user_model()
    try:
        found = model.objects.get_by_natural_key(username)
    except model.DoesNotExist:
        raise bad_input(f"there is no user {username!r}") from None
    if not found.is_active:
        raise refused(f"the user {username!r} is inactive")
    return found


def step(instance: WorkflowInstance, ref: str) -> StepExecution:
    """A step of ``instance`` by name (or position number)."""
    steps = list(instance.steps.order_by("position"))
    for candidate in steps:
        if ref in (candidate.name, str(candidate.position)):
            return candidate
    names = ", ".join(s.name for s in steps)
    raise bad_input(f"{instance.business_key} has no step {ref!r} (its steps: {names})")


def reason(text: str) -> str:
    """A reason the engine and the database accept, or exit 2 saying why not."""
    text = text.strip()
    if not text:
        raise bad_input("a reason is required (--reason)")
    if len(text) > REASON_MAX:
        raise bad_input(f"the reason is longer than {REASON_MAX} characters")
    try:
        validation.check_text(text, "the reason")
    except validation.BadInput as exc:
        raise Exit(BAD_INPUT, exc.message, exc.code) from None
    return text


def data(text: str) -> dict[str, Any]:
    """``--data``: a JSON object, given inline or as ``@FILE``."""
    raw: str | bytes = text
    if text.startswith("@"):
        try:
            raw = Path(text[1:]).read_bytes()
        except OSError as exc:
            raise bad_input(f"cannot read {text[1:]}: {exc.strerror}") from None
    try:
        value = validation.parse_json(raw, "--data")
    except validation.BadInput as exc:
        raise Exit(BAD_INPUT, f"--data: {exc.message}", exc.code) from None
    if not isinstance(value, dict):
        raise bad_input('--data must be a JSON object, e.g. {"output": {...}}')
    return value
