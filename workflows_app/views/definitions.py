"""Definitions as support staff see them: steps, time rules, versions, health."""

from __future__ import annotations

from typing import Any

from django.core.cache import cache
from django.http import Http404, HttpResponse
from django.shortcuts import render
from django.views.decorators.http import require_GET

from workflows_app import activity
from workflows_app.models import WorkflowDefinition
from workflows_app.validation import BadInput, check_text
from workflows_app.views import queries
from workflows_app.views.common import (
    HtmxHttpRequest,
    dashboard_view,
    poll_seconds,
    wants_partial,
)


@require_GET
@dashboard_view
def definition_list(request: HtmxHttpRequest) -> HttpResponse:
    newest: dict[str, WorkflowDefinition] = {}
    for definition in WorkflowDefinition.objects.order_by("key", "-version"):
        # The newest published version is what new instances run.
        current = newest.get(definition.key)
        if current is None or (not current.is_published and definition.is_published):
            newest[definition.key] = definition
    counts = queries.state_counts(queries.WINDOWS["24h"])
    rows = [
        {
            "definition": definition,
            "active": sum(
                counts.by_definition.get(key, {}).get(s, 0)
                for s in queries.ACTIVE_ORDER
            ),
            "attention": counts.by_definition.get(key, {}).get("needs_attention", 0),
            "stuck": counts.stuck_by_definition.get(key, 0),
        }
        for key, definition in newest.items()
    ]
    return render(request, "workflows/definition_list.html", {"rows": rows})


def step_map(key: str, step_names: list[str]) -> list[dict[str, Any]]:
    """The version's steps in order (then steps only older versions have),
    each with where the unfinished instances are now; ``heat`` (0-3) says
    how much a person is needed there, for the eye: the counts are text."""
    # Several people polling one definition share one count per interval.
    cache_key = f"saga:step-places:{key}"
    places = cache.get(cache_key)
    if places is None:
        places = activity.step_places(key)
        cache.set(cache_key, places, poll_seconds())
    names = step_names + sorted(set(places) - set(step_names))
    most_held = max((p["held"] for p in places.values()), default=0)
    cells = []
    for name in names:
        counts = places.get(name, dict.fromkeys(activity.STEP_PLACES, 0))
        held = counts["held"]
        heat = 0
        if held and held == most_held:
            heat = 3
        elif held:
            heat = 2
        elif any(counts.values()):
            heat = 1
        cells.append(
            {
                "name": name,
                "counts": [(place, counts[place]) for place in activity.STEP_PLACES],
                "heat": heat,
                "other_version": name not in step_names,
            }
        )
    return cells


def _selected(versions: list[WorkflowDefinition], wanted: str | None) -> Any:
    if wanted:
        for definition in versions:
            if str(definition.version) == wanted:
                return definition
        raise Http404("no such version")
    published = [d for d in versions if d.is_published]
    return (published or versions)[0]


@require_GET
@dashboard_view
def definition_detail(request: HtmxHttpRequest, key: str) -> HttpResponse:
    try:
        check_text(key)  # %00 names no definition; PostgreSQL refuses NUL
    except BadInput:
        raise Http404("no such definition") from None
    versions = queries.definition_versions(key)
    if not versions:
        raise Http404("no such definition")
    definition = _selected(versions, request.GET.get("version"))
    steps = definition.ordered_steps()
    places = step_map(key, [step.name for step in steps])
    if wants_partial(request):
        context = {"key": key, "places": places, "poll_seconds": poll_seconds()}
        return render(request, "workflows/definition_detail.html#step-map", context)
    health = queries.definition_health(key)
    context = {
        "key": key,
        "definition": definition,
        "steps": steps,
        "places": places,
        "poll_seconds": poll_seconds(),
        "versions": versions,
        "health": health,
        "finished_states": queries.TERMINAL_ORDER,
        "health_cells": [
            (s, health.counts.by_state.get(s, 0))
            for s in queries.ACTIVE_ORDER + queries.TERMINAL_ORDER
        ],
        "can_edit": request.user.is_staff
        and request.user.has_perm("workflows_app.change_workflowdefinition"),
    }
    return render(request, "workflows/definition_detail.html", context)
