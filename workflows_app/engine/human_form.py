"""The form of a step that waits for a person: what the definition declares,
and the check of what a person (or an API client) submits against it.

Pure functions: the admin validates a declaration with :func:`spec_errors`,
the engine validates a submission with :func:`clean_submission` before it
becomes the step's output, whoever sends it (page, API, approval).
"""

from __future__ import annotations

import math
import re
from typing import Any

from workflows_app.validation import BadInput, check_text

FIELD_TYPES = ("text", "number", "boolean", "choice")
NAME = re.compile(r"^[a-z][a-z0-9_]{0,49}$")
MAX_FIELDS = 30
MAX_TEXT = 5000
SPEC_KEYS = {"name", "type", "label", "required", "choices"}


def spec_errors(fields: Any) -> list[str]:
    """Every problem of a declared form (a JSON list of field objects)."""
    if not isinstance(fields, list):
        return [
            "The form must be a JSON list of fields, e.g. "
            '[{"name": "approved", "type": "boolean", "required": true}].'
        ]
    if len(fields) > MAX_FIELDS:
        return [f"At most {MAX_FIELDS} fields."]
    errors: list[str] = []
    seen: set[str] = set()
    for index, field in enumerate(fields, start=1):
        where = f"Field {index}"
        if not isinstance(field, dict):
            errors.append(f"{where}: must be an object with a name and a type.")
            continue
        name = field.get("name")
        if not isinstance(name, str) or not NAME.match(name):
            errors.append(
                f"{where}: name must be lower-case letters, digits and '_', "
                "starting with a letter (at most 50)."
            )
        else:
            where = f"Field {name!r}"
            if name in seen:
                errors.append(f"{where}: declared twice.")
            seen.add(name)
        unknown = sorted(set(field) - SPEC_KEYS)
        if unknown:
            errors.append(
                f"{where}: unknown keys {', '.join(unknown)} (allowed: "
                f"{', '.join(sorted(SPEC_KEYS))})."
            )
        kind = field.get("type")
        if kind not in FIELD_TYPES:
            errors.append(f"{where}: type must be one of {', '.join(FIELD_TYPES)}.")
        if not isinstance(field.get("required", False), bool):
            errors.append(f"{where}: required must be true or false.")
        label = field.get("label", "")
        if not isinstance(label, str) or len(label) > 200:
            errors.append(f"{where}: label must be text (at most 200 characters).")
        choices = field.get("choices")
        if kind == "choice":
            if (
                not isinstance(choices, list)
                or not choices
                or not all(isinstance(c, str) and c.strip() for c in choices)
            ):
                errors.append(f"{where}: a choice needs a list of non-empty texts.")
            elif len(set(choices)) != len(choices):
                errors.append(f"{where}: choices repeat.")
        elif choices is not None:
            errors.append(f"{where}: only a choice field has choices.")
    return errors


def label_of(field: dict[str, Any]) -> str:
    return str(field.get("label") or field["name"].replace("_", " ").capitalize())


def clean_submission(
    fields: list[dict[str, Any]], data: Any
) -> tuple[dict[str, Any], dict[str, str]]:
    """The submitted values, typed, and the errors by field name ("" for the
    whole form). Pages send text (a boolean as "on"/absent); the API sends
    JSON values; both are accepted."""
    if not isinstance(data, dict):
        return {}, {"": "the form data must be a JSON object of field values"}
    declared = {f["name"]: f for f in fields}
    errors: dict[str, str] = {}
    unknown = sorted(set(data) - set(declared))
    if unknown:
        errors[""] = f"unknown fields: {', '.join(unknown)}"
    cleaned: dict[str, Any] = {}
    for name, field in declared.items():
        raw = data.get(name)
        value, error = _clean_value(field, raw)
        if error:
            errors[name] = error
        elif value is not None:
            cleaned[name] = value
    return cleaned, errors


def _clean_value(field: dict[str, Any], raw: Any) -> tuple[Any, str]:
    kind = field["type"]
    required = bool(field.get("required"))
    if kind == "boolean":
        if raw in (None, "", False, "false", "off", "no"):
            value = False if raw is not None or not required else None
        elif raw in (True, "true", "on", "yes"):
            value = True
        else:
            return None, "must be true or false"
        if value is None:
            return None, "this field is required"
        return value, ""
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return None, "this field is required" if required else ""
    if kind == "text":
        if not isinstance(raw, str):
            return None, "must be text"
        if len(raw) > MAX_TEXT:
            return None, f"must be text of at most {MAX_TEXT} characters"
        # The shared check and its message (pages and API alike), not a
        # length complaint about a NUL.
        try:
            check_text(raw, "this text")
        except BadInput as exc:
            return None, exc.message
        return raw.strip(), ""
    if kind == "number":
        if isinstance(raw, bool):
            return None, "must be a number"
        if isinstance(raw, str):
            try:
                raw = float(raw.strip())
            except ValueError:
                return None, "must be a number"
        if not isinstance(raw, int | float) or not math.isfinite(raw):
            return None, "must be a number"
        return (int(raw) if float(raw).is_integer() else raw), ""
    # choice
    if raw not in field.get("choices", []):
        return None, f"must be one of {', '.join(field.get('choices', []))}"
    return raw, ""
