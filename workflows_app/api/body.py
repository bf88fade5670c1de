"""Strict request bodies: JSON only, bounded, and storable as it is.

Python's ``json`` module accepts more than PostgreSQL's ``jsonb`` stores
(NaN and Infinity, lone UTF-16 surrogates, NUL characters). Letting those
through would fail at the INSERT, halfway through a command; refusing them
here keeps bad input a 4xx that changes nothing.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from functools import wraps
from typing import Any

from django.conf import settings
from django.http import HttpRequest, HttpResponse
from ninja.parser import Parser

from workflows_app.api.errors import ApiError, body_too_large

MAX_DEPTH = 64
JSON_TYPES = ("application/json",)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def check_text(value: str, where: str = "a string") -> None:
    """Refuse text that PostgreSQL cannot store (NUL, lone surrogates)."""
    if "\x00" in value:
        raise ApiError(
            422, "invalid_input", f"{where} contains a NUL (\\u0000) character"
        )
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(
            400, "invalid_json", f"{where} is not valid Unicode (lone surrogate)"
        ) from None


def check_storable(data: Any) -> None:
    """Walk a parsed document (iteratively: no recursion limit to hit)."""
    stack: list[tuple[Any, int]] = [(data, 0)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise ApiError(
                400, "invalid_json", f"the body is nested deeper than {MAX_DEPTH}"
            )
        if isinstance(value, str):
            check_text(value)
        elif isinstance(value, float) and not math.isfinite(value):
            # json.loads reads 1e999 as infinity, which jsonb cannot store.
            raise ApiError(400, "invalid_json", "a number is out of range")
        elif isinstance(value, dict):
            for key, item in value.items():
                check_text(key, "an object key")
                stack.append((item, depth + 1))
        elif isinstance(value, list):
            stack.extend((item, depth + 1) for item in value)


def _content_length(request: HttpRequest) -> int:
    try:
        return int(request.META.get("CONTENT_LENGTH") or 0)
    except ValueError:
        return 0


class StrictJSONParser(Parser):
    """ninja's body parser: ninja wraps anything raised here in a 400
    "Cannot parse request body"; the error handler unwraps our ApiError."""

    def parse_body(self, request: HttpRequest) -> dict[str, Any]:
        if len(request.body) > settings.SAGA_API_MAX_BODY:
            raise ApiError(
                413,
                "payload_too_large",
                f"the body is larger than {settings.SAGA_API_MAX_BODY} bytes",
            )
        content_type = request.content_type or ""
        if content_type and not (
            content_type in JSON_TYPES or content_type.endswith("+json")
        ):
            raise ApiError(
                415,
                "unsupported_media_type",
                f"send JSON (Content-Type: application/json), not {content_type}",
            )
        try:
            data = json.loads(request.body, parse_constant=_refuse_constant)
        except (ValueError, RecursionError) as exc:
            raise ApiError(
                400, "invalid_json", f"the body is not valid JSON: {exc}"[:300]
            ) from None
        check_storable(data)
        return data  # type: ignore[no-any-return]


def limit_body(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
    """Refuse an announced oversized body before anything reads it (and
    before authentication: rejecting it costs nothing)."""

    @wraps(view)
    def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        if _content_length(request) > settings.SAGA_API_MAX_BODY:
            return body_too_large()
        return view(request, *args, **kwargs)

    return wrapper
