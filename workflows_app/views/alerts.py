"""The alerts list: open, acknowledged and resolved alerts, newest first."""

from __future__ import annotations

from django.http import HttpResponse
from django.shortcuts import render
from django.views.decorators.http import require_GET

from workflows_app.models import Alert
from workflows_app.views.common import (
    HtmxHttpRequest,
    dashboard_view,
    definition_filter,
)

PAGE_SIZE = 100
STATUSES = {
    "open": {"resolved_at__isnull": True, "acknowledged_at__isnull": True},
    "acknowledged": {"resolved_at__isnull": True, "acknowledged_at__isnull": False},
    "resolved": {"resolved_at__isnull": False},
}


@require_GET
@dashboard_view
def alert_list(request: HtmxHttpRequest) -> HttpResponse:
    status = request.GET.get("status", "open")
    if status not in STATUSES:
        status = "open"
    alerts = Alert.objects.filter(**STATUSES[status])
    # The digest mail and chat messages link to one workflow's alerts.
    definition, known = definition_filter(request.GET.get("definition", ""))
    if not known:
        alerts = alerts.none()
    elif definition:
        alerts = alerts.filter(definition_key=definition)
    alerts = (
        alerts.select_related("instance", "acknowledged_by")
        .prefetch_related("webhook_deliveries")
        .order_by("-opened_at", "-id")[:PAGE_SIZE]
    )
    return render(
        request,
        "workflows/alert_list.html",
        {
            "alerts": alerts,
            "status": status,
            "definition": definition,
            "definition_known": known,
            "statuses": list(STATUSES),
            "page_size": PAGE_SIZE,
            "can_acknowledge": request.user.has_perm("workflows_app.acknowledge_alert"),
        },
    )
