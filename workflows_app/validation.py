"""One validator for what people and clients send: JSON documents and text.

Python's ``json`` module accepts more than PostgreSQL stores: NaN and
Infinity, numbers that overflow to infinity (``1e999``), lone UTF-16
surrogates (``"\\ud800"``) and NUL characters (``"\\u0000"``), none of which
``jsonb`` or ``text`` columns take. Its parser also recurses, so a deeply
nested document raises ``RecursionError``. Each would fail at the INSERT,
halfway through a command: a 500. The dashboard's forms and the API both call
these functions before any command runs, so the same input gets the same
refusal on both and nothing is written.

Messages are lower case without a final period (the API's style); the forms
capitalise them.
"""

from __future__ import annotations

import json
import math
from typing import Any

# Deeper than any real input or output; deep enough to refuse 5,000-deep
# bombs long before anything recursive (the parser, jsonb) gets to them.
MAX_DEPTH = 64
# Object keys and paths quoted in messages are cut to this many characters.
QUOTE = 40


class BadInput(ValueError):
    """Input that cannot be stored as it is.

    ``code`` is the API's error code: ``invalid_json`` for a document that is
    not JSON PostgreSQL can store, ``invalid_input`` for a NUL character in
    otherwise valid JSON or text."""

    def __init__(self, message: str, code: str = "invalid_json") -> None:
        super().__init__(message)
        self.message = message
        self.code = code


def check_text(value: str, where: str = "the text") -> None:
    """Refuse text PostgreSQL cannot store: NUL characters, lone surrogates."""
    if "\x00" in value:
        raise BadInput(
            f"{where} contains a NUL character (\\u0000), which cannot be stored",
            code="invalid_input",
        )
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise BadInput(
            f"{where} contains a lone UTF-16 surrogate (\\ud800 to \\udfff), "
            "which is not valid Unicode"
        ) from None


def _child(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    if key.isidentifier():
        return f"{path}.{key[:QUOTE]}"
    return f"{path}[{json.dumps(key[:QUOTE])}]"  # escapes NUL and surrogates


def check_json(value: Any, where: str = "the value") -> None:
    """Refuse a parsed document PostgreSQL's ``jsonb`` cannot store, or one
    nested deeper than ``MAX_DEPTH``. The walk is iterative: a deep document
    cannot exhaust the stack here."""
    stack: list[tuple[Any, int, str]] = [(value, 0, "")]
    while stack:
        item, depth, path = stack.pop()
        at = f"{where} at {path.lstrip('.')}" if path else where
        if depth > MAX_DEPTH:
            raise BadInput(f"{where} is nested deeper than {MAX_DEPTH} levels")
        if isinstance(item, str):
            check_text(item, at)
        elif isinstance(item, float) and not math.isfinite(item):
            raise BadInput(f"{at} is a number out of range (NaN or infinite)")
        elif isinstance(item, dict):
            for key, child in item.items():
                check_text(str(key), f"an object key in {at}")
                stack.append((child, depth + 1, _child(path, str(key))))
        elif isinstance(item, list):
            stack.extend(
                (child, depth + 1, _child(path, n)) for n, child in enumerate(item)
            )


def _constant(name: str) -> Any:
    raise BadInput(f"{name} is not a JSON number (use null or a string)")


def _float(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        raise BadInput(f"the number {text[:QUOTE]} is out of range")
    return number


def parse_json(text: str | bytes, where: str = "the value") -> Any:
    """Parse and check a JSON document; every refusal is a ``BadInput``."""
    try:
        value = json.loads(text, parse_constant=_constant, parse_float=_float)
    except BadInput as exc:
        raise BadInput(f"not valid JSON: {exc.message}") from None
    except RecursionError:
        raise BadInput(f"{where} is nested deeper than {MAX_DEPTH} levels") from None
    except json.JSONDecodeError as exc:
        raise BadInput(
            f"not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})"
        ) from None
    except ValueError as exc:
        if "digits" in str(exc):  # Python's int conversion limit (4,300 digits)
            raise BadInput("not valid JSON: a number has too many digits") from None
        raise BadInput(f"not valid JSON: {exc}"[:300]) from None  # not UTF-8
    check_json(value, where)
    return value
