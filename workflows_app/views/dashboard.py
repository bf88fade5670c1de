"""The overview: counts per state and per definition, the stuck queue and
recent failures. Its live part refreshes itself with htmx polling."""

from __future__ import annotations

from typing import Any

from django.core.cache import cache
from django.http import HttpResponse
from django.shortcuts import render
from django.views.decorators.http import require_GET

from workflows_app import activity, charts
from workflows_app.engine import four_eyes
from workflows_app.engine.locking import db_now
from workflows_app.engine.stuck import span_in_words
from workflows_app.models import (
    ApprovalRequest,
    WorkflowDefinition,
    WorkflowInstance,
)
from workflows_app.views import queries
from workflows_app.views.common import (
    HtmxHttpRequest,
    dashboard_view,
    poll_seconds,
    wants_partial,
)
from workflows_app.views.saved_views import saved_views_for

APPROVALS_SHOWN = 20
# The held-or-stuck queue shows the longest waiting; the page says how many
# there are in all and links to the full lists.
STUCK_SHOWN = 25
# The charts change by the hour; a page polled every few seconds by several
# people reads them from the cache.
CHARTS_CACHE_SECONDS = 30
CHART_TITLES = {
    "started": "Started",
    "completed": "Completed",
    "compensated": "Compensated",
    "held": "Held (moved to needs attention)",
}


def activity_charts(window_name: str) -> dict[str, Any]:
    """The overview's charts for the last 24 hours or 7 days."""
    key = f"saga:activity-charts:{window_name}"
    found = cache.get(key)
    if found is not None:
        return found  # type: ignore[no-any-return]
    window = activity.WINDOWS[window_name]
    now = db_now()
    data = activity.activity(window, now)
    hourly = window.interval == activity.HOUR
    labels = [charts.interval_label(start, hourly) for start in data.intervals]
    measures = []
    for name, title in CHART_TITLES.items():
        values = [value for _, value in data.series(name)]
        pairs = zip(labels, values, strict=True)
        bars = [charts.Bar(label, value) for label, value in pairs]
        measures.append(
            {
                "name": name,
                "title": title,
                "total": sum(values),
                "svg": charts.bar_chart(title, bars, css=name),
            }
        )
    found = {
        "window": window,
        # Cached for a while: the page says how old the figures are, so they
        # are not read against the live tiles above as if of the same moment.
        "as_of": now,
        "measures": measures,
        "missing_from": data.missing_from,
        "missing_until": data.missing_until,
        "rows": [
            (label, *[getattr(counts, name) for name in CHART_TITLES])
            for label, counts in zip(labels, data.totals, strict=True)
        ],
        "percentiles": [
            (key_, completed, charts.at_most(p50), charts.at_most(p95))
            for key_, completed, p50, p95 in data.percentiles()
        ],
    }
    cache.set(key, found, CHARTS_CACHE_SECONDS)
    return found


def _definitions() -> tuple[dict[str, str], str]:
    """Each key's title, taken from its newest version, and the definitions'
    stuck-after times in words (e.g. "2 minutes"): one read of a few hundred
    rows."""
    titles: dict[str, str] = {}
    spans = set()
    rows = WorkflowDefinition.objects.order_by("key", "-version").values_list(
        "key", "title", "stuck_after"
    )
    for key, title, stuck_after in rows:
        titles.setdefault(key, title)
        spans.add(stuck_after)
    shown = sorted(spans)
    words = ", ".join(span_in_words(span) for span in shown[:3]) + (
        ", …" if len(shown) > 3 else ""
    )
    return titles, words


@require_GET
@dashboard_view
def overview(request: HtmxHttpRequest) -> HttpResponse:
    window = request.GET.get("window", "24h")
    if window not in queries.WINDOWS:
        window = "24h"
    titles, stuck_after_words = _definitions()
    counts = queries.state_counts(queries.WINDOWS[window], keys=list(titles))
    states = queries.ACTIVE_ORDER + queries.TERMINAL_ORDER
    per_definition = [
        {
            "key": key,
            "title": title,
            "cells": [
                (state, counts.by_definition.get(key, {}).get(state, 0))
                for state in states
            ],
            "stuck": counts.stuck_by_definition.get(key, 0),
        }
        for key, title in titles.items()
    ]
    context = {
        "window": window,
        "windows": [("24h", "last 24 h"), ("7d", "last 7 days"), ("all", "all time")],
        "counts": counts,
        "states": states,
        "active_cells": [(s, counts.by_state.get(s, 0)) for s in queries.ACTIVE_ORDER],
        "finished_states": queries.TERMINAL_ORDER,
        "finished_cells": [
            (s, counts.by_state.get(s, 0)) for s in queries.TERMINAL_ORDER
        ],
        "per_definition": per_definition,
        "stuck_queue": queries.stuck_queue(STUCK_SHOWN),
        "stuck_total": WorkflowInstance.objects.filter(stuck=True).count(),
        "failures": queries.recent_failures(),
        "poll_seconds": poll_seconds(),
        # Each with why approving it could no longer act ("" while it could).
        "approvals": [
            (a, four_eyes.stale_because(a, a.instance) if a.instance else "")
            for a in ApprovalRequest.objects.filter(
                status=ApprovalRequest.Status.PENDING
            )
            .select_related("requested_by", "instance")
            .order_by("requested_at")[:APPROVALS_SHOWN]
        ],
        "saved_views": saved_views_for(request.user),
        "activity": activity_charts("24h" if window == "24h" else "7d"),
        "stuck_after_words": stuck_after_words,
    }
    template = "workflows/overview.html"
    if wants_partial(request):
        template += "#live"
    return render(request, template, context)
