"""The webhooks page: deliveries failing or waiting, and the latest sent."""

from __future__ import annotations

from typing import Any

from django.http import HttpResponse
from django.shortcuts import render
from django.views.decorators.http import require_GET

from workflows_app.models import WebhookDelivery
from workflows_app.views.common import HtmxHttpRequest, dashboard_view

PAGE_SIZE = 100
STATUSES: dict[str, dict[str, Any]] = {
    "failing": {"delivered_at__isnull": True, "attempts__gt": 0},
    "pending": {"delivered_at__isnull": True, "attempts": 0},
    "delivered": {"delivered_at__isnull": False},
}


@require_GET
@dashboard_view
def webhook_list(request: HtmxHttpRequest) -> HttpResponse:
    status = request.GET.get("status", "failing")
    if status not in STATUSES:
        status = "failing"
    deliveries = (
        WebhookDelivery.objects.filter(**STATUSES[status])
        .select_related("instance")
        .order_by("-created_at", "-id")[:PAGE_SIZE]
    )
    return render(
        request,
        "workflows/webhook_list.html",
        {
            "deliveries": deliveries,
            "status": status,
            "statuses": list(STATUSES),
            "page_size": PAGE_SIZE,
            "failing": WebhookDelivery.objects.filter(**STATUSES["failing"]).count(),
        },
    )
