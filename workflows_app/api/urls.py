"""Routes of the JSON API (/api/v1/).

ninja's routes, each wrapped so that what ninja answers outside its exception
handlers (405 for a wrong method, 404 from its root view) uses the error
envelope too, followed by a JSON 404 for every other path under /api/v1/.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import Any

from django.http import Http404, HttpRequest, HttpResponse
from django.urls import URLPattern, include, path, re_path
from django.views.decorators.csrf import csrf_exempt

from workflows_app.api.body import limit_body
from workflows_app.api.errors import error_response
from workflows_app.api.main import api


def _not_found() -> HttpResponse:
    return error_response(404, "not_found", "no such API resource")


def json_errors(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
    @wraps(view)
    def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        try:
            response = view(request, *args, **kwargs)
        except Http404:
            return _not_found()
        if response.status_code == 405 and not response.get(
            "Content-Type", ""
        ).startswith("application/json"):
            allowed = response.get("Allow", "")
            response = error_response(
                405,
                "method_not_allowed",
                f"{request.method} is not allowed here; allowed: {allowed}",
            )
            response["Allow"] = allowed
        return response

    # Token authentication only: a session cookie is never used, so Django's
    # CSRF check must not be what refuses a request (ninja's views are exempt
    # already; the root view is not).
    return csrf_exempt(wrapper)


def _wrapped(patterns: list[Any]) -> list[Any]:
    return [
        URLPattern(
            p.pattern, json_errors(limit_body(p.callback)), p.default_args, p.name
        )
        for p in patterns
    ]


@csrf_exempt
def unknown_path(request: HttpRequest, rest: str = "") -> HttpResponse:
    return _not_found()


# Not named app_name: Django would take a module-level app_name as this
# module's namespace.
_ninja_patterns, _ninja_app, _ninja_namespace = api.urls

urlpatterns = [
    path(
        "",
        include((_wrapped(_ninja_patterns), _ninja_app), namespace=_ninja_namespace),
    ),
    re_path(r"^(?P<rest>[\s\S]*)\Z", unknown_path),
]
