"""Search attributes: input values a definition declares worth finding.

A definition version declares ``{"customer": "customer.id", "email":
"contact.email"}``: a name (an identifier, what people type before the colon
in the search box) and a dotted path into the instance input. At start the
engine copies each declared value into the instance's ``search_attributes``
(a JSON object indexed on PostgreSQL, see migration 0016), as lower-case
text: the list then finds ``customer:C-349`` and ``customer:c-349`` alike
with one indexed containment test.
"""

from __future__ import annotations

import json
import re
from typing import Any

NAME = re.compile(r"[a-z][a-z0-9_]{0,39}")
PATH = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*(\.[A-Za-z0-9_-]+)*")
MAX_ATTRIBUTES = 20
MAX_PATH = 200
# Longer values (free text) are not indexed: they make big index entries and
# nobody types them as an exact match.
MAX_VALUE = 200


def declaration_errors(declared: Any) -> list[str]:
    """What is wrong with a declaration, as sentences for the admin form."""
    if not isinstance(declared, dict):
        return [
            'Must be a JSON object of name to input path, e.g. {"customer": '
            '"customer.id"}.'
        ]
    errors = []
    if len(declared) > MAX_ATTRIBUTES:
        errors.append(f"At most {MAX_ATTRIBUTES} search attributes.")
    for name, path in declared.items():
        if not NAME.fullmatch(name):
            errors.append(
                f"{name!r} is not a valid attribute name: use lower-case letters, "
                "digits and '_', starting with a letter (at most 40)."
            )
        if (
            not isinstance(path, str)
            or len(path) > MAX_PATH
            or not PATH.fullmatch(path)
        ):
            errors.append(
                f"The path of {name!r} must be a dotted input path such as "
                f"'customer.id' (letters, digits, '_', '-'), not {path!r}."
            )
    return errors


def text_of(value: Any) -> str | None:
    """A scalar as the text it is searched by; None for objects, lists,
    nulls and long text (not indexed)."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, (int, float)):
        text = json.dumps(value)
    elif isinstance(value, str):
        text = value
    else:
        return None
    text = text.strip().lower()
    if not text or len(text) > MAX_VALUE:
        return None
    return text


def extract(declared: dict[str, str] | None, data: Any) -> dict[str, str]:
    """The declared attributes found in ``data`` (an instance input)."""
    found: dict[str, str] = {}
    for name, path in (declared or {}).items():
        value = data
        for part in path.split("."):
            if isinstance(value, dict) and part in value:
                value = value[part]
            elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
                value = value[int(part)]
            else:
                value = None
                break
        text = text_of(value)
        if text is not None:
            found[name] = text
    return found
