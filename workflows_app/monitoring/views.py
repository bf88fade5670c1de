"""``GET /metrics``: Prometheus scrapes the site here."""

from __future__ import annotations

from django.conf import settings
from django.http import HttpRequest, HttpResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET

from workflows_app.monitoring import database, exposition


@never_cache
@require_GET
def metrics(request: HttpRequest) -> HttpResponse:
    """This machine's process counters plus the database gauges. With
    ``SAGA_METRICS_TOKEN`` set, only a scraper that sends it gets them."""
    if not exposition.authorized(
        request.headers.get("Authorization"), settings.SAGA_METRICS_TOKEN
    ):
        response = HttpResponse("401 Unauthorized\n", status=401)
        response["Content-Type"] = "text/plain; charset=utf-8"
        response["WWW-Authenticate"] = 'Bearer realm="metrics"'
        return response
    registry = exposition.process_registry()
    registry.register(database.collector())
    body, content_type = exposition.render(registry, request.headers.get("Accept"))
    return HttpResponse(body, content_type=content_type)
