"""Response policies for every request: the Content-Security-Policy, no
caching of signed-in pages, and a 503 (not a 500) while the database is
unreachable.

No caching: a page shown to a signed-in user (instance data, the timeline,
a form's CSRF token) is sent with ``Cache-Control: no-store``, so neither a
shared proxy nor the browser's back/forward cache keeps a copy after logout.

Content-Security-Policy (Django 5.2 has none built in).

The dashboard's templates use no inline scripts, no inline styles and no
``eval`` (htmx is configured with ``allowEval: false``), so the policy is
strict: everything from this origin only, nothing may frame the pages. A view
that needs another policy sets its own header, which is left alone.

The admin alone also accepts inline styles: a custom admin template
(``workflowdefinition/change_form.html``) carries a ``<style>`` block. Scripts
stay strict there too.

Database down: a view that cannot reach the database answers 503 with
``Retry-After``, in the API's error envelope under /api/ and as a page that
needs no database elsewhere (the session, the user and the messages live
there). ``GET /health`` answers 503 on its own. The API's exception handlers
(``api/errors.py``) use the same test, since ninja catches every exception
before this middleware sees it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from django.conf import settings
from django.db import DatabaseError, InterfaceError, OperationalError
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.template.loader import render_to_string
from django.utils.cache import patch_cache_control

log = logging.getLogger(__name__)

DEFAULT_POLICY = (
    "default-src 'self'; "
    "script-src 'self'; "
    "style-src 'self'; "
    "img-src 'self' data:; "
    "font-src 'self'; "
    "connect-src 'self'; "
    "object-src 'none'; "
    "base-uri 'self'; "
    "form-action 'self'; "
    "frame-ancestors 'none'"
)


ADMIN_POLICY = DEFAULT_POLICY.replace(
    "style-src 'self'", "style-src 'self' 'unsafe-inline'"
)


class ContentSecurityPolicyMiddleware:
    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response
        self.policy = getattr(settings, "SAGA_CSP", DEFAULT_POLICY)
        self.admin_policy = getattr(settings, "SAGA_CSP_ADMIN", ADMIN_POLICY)

    def __call__(self, request: HttpRequest) -> HttpResponse:
        response = self.get_response(request)
        if "Content-Security-Policy" in response:
            return response
        admin = request.resolver_match is not None and (
            request.resolver_match.namespace == "admin"
        )
        policy = self.admin_policy if admin else self.policy
        if policy:
            response["Content-Security-Policy"] = policy
        return response


class NoStoreWhenSignedInMiddleware:
    """``Cache-Control: no-store`` on every answer to a signed-in user."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        response = self.get_response(request)
        user = getattr(request, "user", None)
        try:
            signed_in = user is not None and user.is_authenticated
        except DatabaseError:  # the session cannot be read: do not store it
            signed_in = True
        if signed_in:
            patch_cache_control(response, no_store=True, private=True)
        return response


# Seconds a client should wait before trying again; PostgreSQL restarts or
# fails over in about this time.
RETRY_AFTER = 30
# SQLSTATEs that mean "the server is not there (yet)": connection exceptions
# (class 08), shutting down or starting up (57P01-57P03), no connection slots.
UNAVAILABLE_STATES = ("08", "57P01", "57P02", "57P03", "53300")


def database_unavailable(exc: BaseException) -> bool:
    """Whether ``exc`` says the database cannot be reached, as opposed to a
    query it refused (a deadlock, a constraint, a bug: still a 500)."""
    if isinstance(exc, InterfaceError):  # e.g. "connection already closed"
        return True
    if not isinstance(exc, OperationalError):
        return False
    state = getattr(exc.__cause__, "pgcode", None)
    # psycopg reports a refused or lost connection without a SQLSTATE; for
    # SQLite every OperationalError is about the file (missing, locked).
    return state is None or state.startswith(UNAVAILABLE_STATES)


def unavailable_json() -> HttpResponse:
    body = {
        "error": {
            "code": "database_unavailable",
            "message": "the database is unavailable, "
            f"try again in {RETRY_AFTER} seconds",
        }
    }
    response = JsonResponse(body, status=503)
    response["Retry-After"] = str(RETRY_AFTER)
    return response


def unavailable_page() -> HttpResponse:
    # No request context: the context processors would load the user and the
    # messages from the database.
    html = render_to_string("503.html", {"retry_after": RETRY_AFTER})
    response = HttpResponse(html, status=503)
    response["Retry-After"] = str(RETRY_AFTER)
    return response


class DatabaseUnavailableMiddleware:
    """503 with Retry-After, instead of a 500, while the database is down."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        return self.get_response(request)

    def process_exception(
        self, request: HttpRequest, exception: Exception
    ) -> HttpResponse | None:
        if not database_unavailable(exception):
            return None
        log.error(
            "database unavailable in %s %s: %s", request.method, request.path, exception
        )
        if request.path.startswith("/api/"):
            return unavailable_json()
        return unavailable_page()
