"""Definitions as support staff see them: steps, time rules, versions, health."""

from __future__ import annotations

from typing import Any

from django.http import Http404, HttpResponse
from django.shortcuts import render
from django.views.decorators.http import require_GET

from workflows_app.models import WorkflowDefinition
from workflows_app.validation import BadInput, check_text
from workflows_app.views import queries
from workflows_app.views.common import HtmxHttpRequest, dashboard_view


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
    health = queries.definition_health(key)
    context = {
        "key": key,
        "definition": definition,
        "steps": definition.ordered_steps(),
        "versions": versions,
        "health": health,
        "health_cells": [
            (s, health.counts.by_state.get(s, 0))
            for s in queries.ACTIVE_ORDER + queries.TERMINAL_ORDER
        ],
        "can_edit": request.user.is_staff
        and request.user.has_perm("workflows_app.change_workflowdefinition"),
    }
    return render(request, "workflows/definition_detail.html", context)
