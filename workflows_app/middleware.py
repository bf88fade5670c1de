"""Content-Security-Policy for every response (Django 5.2 has none built in).

The dashboard's templates use no inline scripts, no inline styles and no
``eval`` (htmx is configured with ``allowEval: false``), so the policy is
strict: everything from this origin only, nothing may frame the pages. A view
that needs another policy sets its own header, which is left alone.

The admin alone also accepts inline styles: a custom admin template
(``workflowdefinition/change_form.html``) carries a ``<style>`` block. Scripts
stay strict there too.
"""

from __future__ import annotations

from collections.abc import Callable

from django.conf import settings
from django.http import HttpRequest, HttpResponse

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
