"""The API's single error shape, ``{"error": {"code", "message"}}``, for every
4xx and 5xx under /api/: the API's own refusals, engine errors, ninja's
validation and authentication errors, 404s, 405s and unexpected exceptions."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from django.core.exceptions import RequestDataTooBig
from django.db import InterfaceError, OperationalError
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from ninja import NinjaAPI
from ninja.errors import (
    AuthenticationError,
    AuthorizationError,
    HttpError,
    ValidationError,
)

from workflows_app import middleware
from workflows_app.engine.errors import (
    AlreadyChanged,
    DefinitionNotFound,
    EngineError,
    IdempotencyConflict,
    InvalidInput,
    NotPermitted,
    TransitionRejected,
)

log = logging.getLogger(__name__)

# Most specific first: the first class the error is an instance of wins.
ENGINE_STATUS: list[tuple[type[EngineError], int]] = [
    (DefinitionNotFound, 404),
    (InvalidInput, 422),
    (IdempotencyConflict, 409),
    (AlreadyChanged, 409),
    (TransitionRejected, 409),
    (NotPermitted, 403),
]
WWW_AUTHENTICATE = 'Bearer realm="saga-desk"'


class ApiError(Exception):
    """A refusal with its HTTP status, raised by the API's own code."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        details: list[dict[str, str]] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details


def error_response(
    status: int,
    code: str,
    message: str,
    *,
    details: list[dict[str, str]] | None = None,
) -> HttpResponse:
    error: dict[str, Any] = {"code": code, "message": message}
    if details:
        error["details"] = details
    return JsonResponse({"error": error}, status=status)


def _api_error(request: HttpRequest, exc: ApiError) -> HttpResponse:
    return error_response(exc.status, exc.code, exc.message, details=exc.details)


def _engine_error(request: HttpRequest, exc: EngineError) -> HttpResponse:
    status = next((s for cls, s in ENGINE_STATUS if isinstance(exc, cls)), 400)
    return error_response(status, exc.code, str(exc))


def _location(loc: list[Any]) -> str:
    # ninja reports ["body" | "query", "<parameter name>", field, ...]; the
    # parameter name is an implementation detail, the client knows the fields.
    parts = [str(p) for p in loc]
    if parts[:1] in (["body"], ["query"]) and len(parts) > 1:
        parts = [parts[0], *parts[2:]]
    return ".".join(parts)


def _validation_error(request: HttpRequest, exc: ValidationError) -> HttpResponse:
    details = [
        {"field": _location(list(e.get("loc", []))), "message": str(e.get("msg", ""))}
        for e in exc.errors
    ]
    if any(d["field"] == "header.Idempotency-Key" for d in details):
        return error_response(
            400,
            "idempotency_key_required",
            "the Idempotency-Key header (1 to 200 characters) is required",
            details=details,
        )
    if any(d["field"] == "body" for d in details):
        return error_response(
            422, "invalid_request", "a JSON object body is required", details=details
        )
    message = "; ".join(f"{d['field']}: {d['message']}" for d in details)
    return error_response(422, "invalid_request", message[:1000], details=details)


def _authentication_error(
    request: HttpRequest, exc: AuthenticationError
) -> HttpResponse:
    response = error_response(
        401,
        "unauthorized",
        "a valid API token is required: Authorization: Bearer <token>",
    )
    response["WWW-Authenticate"] = WWW_AUTHENTICATE
    return response


def _authorization_error(request: HttpRequest, exc: AuthorizationError) -> HttpResponse:
    return error_response(403, "forbidden", exc.message)


def _http_error(request: HttpRequest, exc: HttpError) -> HttpResponse:
    # ninja turns any error of the body parser into "Cannot parse request
    # body"; the parser's own ApiError says what was wrong.
    if isinstance(exc.__cause__, ApiError):
        return _api_error(request, exc.__cause__)
    if exc.status_code == 400:
        return error_response(400, "invalid_json", "the body is not valid JSON")
    return error_response(exc.status_code, "http_error", exc.message)


def _not_found(request: HttpRequest, exc: Exception) -> HttpResponse:
    return error_response(404, "not_found", "no such resource")


def _too_large(request: HttpRequest, exc: Exception) -> HttpResponse:
    return body_too_large()


def _unexpected(request: HttpRequest, exc: Exception) -> HttpResponse:
    log.exception("unexpected error in %s %s", request.method, request.path)
    return error_response(
        500, "internal_error", "an unexpected error occurred; it has been logged"
    )


def _database_error(request: HttpRequest, exc: Exception) -> HttpResponse:
    """503 with Retry-After while the database cannot be reached (sent
    again with the same Idempotency-Key, a start happens at most once);
    other database errors are unexpected."""
    if middleware.database_unavailable(exc):
        log.error(
            "database unavailable in %s %s: %s", request.method, request.path, exc
        )
        return middleware.unavailable_json()
    return _unexpected(request, exc)


def body_too_large() -> HttpResponse:
    from django.conf import settings

    return error_response(
        413,
        "payload_too_large",
        f"the body is larger than {settings.SAGA_API_MAX_BODY} bytes",
    )


def install(api: NinjaAPI) -> None:
    """Replace ninja's handlers (which answer {"detail": ...}, or HTML for a 500)."""
    # ninja types a handler's argument as the exception or its class; it
    # always passes the exception, so each handler takes just that.
    handlers: list[tuple[type[Exception], Callable[[HttpRequest, Any], HttpResponse]]]
    handlers = [
        (Exception, _unexpected),
        (ApiError, _api_error),
        (EngineError, _engine_error),
        (ValidationError, _validation_error),
        (HttpError, _http_error),
        (AuthenticationError, _authentication_error),
        (AuthorizationError, _authorization_error),
        (Http404, _not_found),
        (RequestDataTooBig, _too_large),
        (OperationalError, _database_error),
        (InterfaceError, _database_error),
    ]
    for exc_class, handler in handlers:
        api.add_exception_handler(exc_class, handler)
