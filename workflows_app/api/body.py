"""Strict request bodies: JSON only, bounded, and storable as it is.

The checks are the dashboard's (``workflows_app.validation``): NaN,
Infinity, ``1e999``, lone surrogates, NUL characters and deep nesting are
refused here, before any command runs, so bad input stays a 4xx that
changes nothing. A chunked body (no Content-Length) is read too, up to the
same limit.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import wraps
from typing import Any

from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.core.handlers.wsgi import LimitedStream
from django.http import HttpRequest, HttpResponse, UnreadablePostError
from ninja.parser import Parser

from workflows_app import validation
from workflows_app.api.errors import ApiError, body_too_large, error_response
from workflows_app.validation import BadInput

JSON_TYPES = ("application/json",)
log = logging.getLogger(__name__)


def refusal(exc: BadInput) -> ApiError:
    """The validator's refusal as an API error: a NUL in valid JSON is a
    value the API refuses (422); anything else is not storable JSON (400)."""
    return ApiError(422 if exc.code == "invalid_input" else 400, exc.code, exc.message)


def check_text(value: str, where: str = "a string") -> None:
    """Refuse text PostgreSQL cannot store (NUL, lone surrogates)."""
    try:
        validation.check_text(value, where)
    except BadInput as exc:
        raise refusal(exc) from None


def _chunked(request: HttpRequest) -> bool:
    return "chunked" in request.META.get("HTTP_TRANSFER_ENCODING", "").lower()


def _content_length(request: HttpRequest) -> int:
    try:
        return int(request.META.get("CONTENT_LENGTH") or 0)
    except ValueError:
        return 0


class StrictJSONParser(Parser):
    """ninja's body parser: ninja wraps anything raised here in a 400
    "Cannot parse request body"; the error handler unwraps our ApiError."""

    def parse_body(self, request: HttpRequest) -> dict[str, Any]:
        try:
            body = request.body
        except UnreadablePostError:
            # A broken chunked encoding, or a client gone mid-body.
            raise ApiError(
                400,
                "invalid_body",
                "the body could not be read (bad chunked encoding?)",
            ) from None
        if len(body) > settings.SAGA_API_MAX_BODY:
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
            # Any JSON value: ninja refuses one that is not an object (422).
            return validation.parse_json(body, "the body")  # type: ignore[no-any-return]
        except BadInput as exc:
            raise refusal(exc) from None


def _read_chunked(request: HttpRequest) -> HttpResponse | None:
    """Read a chunked body now, where a broken framing can be told apart
    (ninja reads the body before the parser and would answer 500)."""
    try:
        body = request.body
    except RequestDataTooBig:
        return body_too_large()
    except Exception:  # the server's chunk decoder raises its own types
        log.info("unreadable chunked body on %s", request.path, exc_info=True)
        return error_response(
            400, "invalid_body", "the chunked body is malformed: it could not be read"
        )
    if len(body) > settings.SAGA_API_MAX_BODY:
        return body_too_large()
    return None


def limit_body(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
    """Refuse an announced oversized body before anything reads it (and
    before authentication: rejecting it costs nothing); make a chunked body
    readable."""

    @wraps(view)
    def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        if _content_length(request) > settings.SAGA_API_MAX_BODY:
            return body_too_large()
        if _chunked(request) and not request.META.get("CONTENT_LENGTH"):
            if not request.META.get("wsgi.input_terminated"):
                # The server hands over the raw socket (runserver): there is
                # no telling where the body ends.
                return error_response(
                    411,
                    "length_required",
                    "this server cannot read a chunked body: send Content-Length",
                )
            # Django reads Content-Length bytes, none here. The server
            # (gunicorn) decodes the chunks and ends the stream with the
            # body; read it directly, one byte past the limit at most.
            # Django's WSGIRequest keeps a LimitedStream here too; the stubs
            # type the attribute as BinaryIO.
            request._stream = LimitedStream(  # type: ignore[assignment]
                request.META["wsgi.input"], settings.SAGA_API_MAX_BODY + 1
            )
            refused = _read_chunked(request)
            if refused is not None:
                return refused
        return view(request, *args, **kwargs)

    return wrapper
