"""Template helpers of the dashboard: status badges, relative times, JSON.

Status is never shown by colour alone: every badge carries its name as text
and an icon whose shape differs per state (the icon is hidden from screen
readers, the text is not).
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from typing import Any

from django import template
from django.utils import timezone
from django.utils.html import format_html
from django.utils.safestring import SafeString

from workflows_app.engine import waits
from workflows_app.engine.stuck import HELD_RULE, is_stalled, stalled_rule

register = template.Library()

# state -> (icon, label). Icons differ in shape, not only in colour.
INSTANCE_BADGES = {
    "accepted": ("◷", "accepted"),
    "running": ("▶", "running"),
    "needs_attention": ("⚠", "needs attention"),
    "compensating": ("↶", "compensating"),
    "completed": ("✔", "completed"),
    "compensated": ("↺", "compensated"),
    "cancelled": ("⊘", "cancelled"),
    "failed": ("✖", "failed"),
    "stuck": ("⚑", "stuck"),
}
STEP_BADGES = {
    "pending": ("○", "pending"),
    "scheduled": ("◔", "scheduled"),
    "running": ("▶", "running"),
    "retrying": ("↻", "retrying"),
    "waiting": ("◷", "waiting"),
    "unknown": ("?", "unknown"),
    "succeeded": ("✔", "succeeded"),
    "failed": ("✖", "failed"),
    "skipped": ("✎", "done by hand"),
    # Never ran, and never will: its instance has finished.
    "not_run": ("–", "not run"),
}
COMPENSATION_BADGES = {
    "none": ("·", "none"),
    "pending": ("○", "pending"),
    "running": ("▶", "running"),
    "retrying": ("↻", "retrying"),
    "done": ("↺", "undone"),
    "failed": ("✖", "failed"),
    "not_needed": ("–", "not needed"),
}
KINDS = {
    "instance": INSTANCE_BADGES,
    "step": STEP_BADGES,
    "compensation": COMPENSATION_BADGES,
}

# What an instance state means, in plain words (accepted is not completed).
STATE_MEANING = {
    "accepted": "Recorded and queued: no step has started yet, so nothing has "
    "happened in the business systems so far.",
    "running": "Steps are being carried out; the workflow has not finished.",
    "needs_attention": "Stopped and waiting for a person: read the reason, "
    "then choose an action.",
    "compensating": "Did not go through: the steps that took effect are being "
    "undone, newest first.",
    "completed": (
        "Finished: every step succeeded (or an operator marked it done by hand) "
        "and the business outcome happened."
    ),
    "compensated": "Did not go through: every step that had taken effect was undone.",
    "cancelled": "Cancelled before any step ran: nothing happened.",
    "failed": "Closed as failed by an operator: a person handles it from here; "
    "effects of completed steps may remain.",
}


@register.simple_tag
def badge(state: str, kind: str = "instance") -> SafeString:
    """``{% badge instance.state %}`` or ``{% badge step.state "step" %}``."""
    icon, label = KINDS[kind].get(state, ("•", state.replace("_", " ")))
    return format_html(
        '<span class="badge badge--{} badge--{}-{}">'
        '<span class="badge__icon" aria-hidden="true">{}</span> {}</span>',
        kind,
        kind,
        state,
        icon,
        label,
    )


@register.filter
def meaning(state: str) -> str:
    return STATE_MEANING.get(state, "")


@register.filter
def state_label(state: str) -> str:
    return INSTANCE_BADGES.get(state, ("", state.replace("_", " ")))[1]


def _span(seconds: float) -> str:
    seconds = abs(seconds)
    if seconds < 60:
        return f"{int(seconds)} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min"
    if seconds < 86400:
        hours, rest = divmod(int(seconds), 3600)
        return f"{hours} h {rest // 60} min" if hours < 6 else f"{hours} h"
    return f"{int(seconds // 86400)} d"


@register.filter
def reltime(value: datetime | None, now: datetime | None = None) -> SafeString | str:
    """``<time>`` with the relative time as text and the absolute one on hover."""
    if value is None:
        return "—"
    now = now or timezone.now()
    delta = (now - value).total_seconds()
    text = "just now" if abs(delta) < 1 else _span(delta)
    if abs(delta) >= 1:
        text = f"{text} ago" if delta > 0 else f"in {text}"
    absolute = timezone.localtime(value).strftime("%Y-%m-%d %H:%M:%S %Z")
    return format_html(
        '<time datetime="{}" title="{}">{}</time>', value.isoformat(), absolute, text
    )


@register.filter
def age(value: datetime | None) -> str:
    """How long ago, without "ago": for "stuck for ..." columns."""
    if value is None:
        return "—"
    return _span((timezone.now() - value).total_seconds())


@register.filter
def duration(value: timedelta | None) -> str:
    if value is None:
        return "—"
    seconds = value.total_seconds()
    if seconds and seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60 and seconds != int(seconds):
        return f"{seconds:.1f} s"
    return _span(seconds)


@register.filter
def pretty_json(value: Any) -> str:
    """Indented JSON as plain text; the template escapes it like any string."""
    return json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False, default=str)


@register.filter
def percent(value: float | None) -> str:
    return "—" if value is None else f"{value * 100:.1f} %"


@register.simple_tag(takes_context=True)
def query_with(context: template.Context, **changes: Any) -> str:
    """The current query string with some parameters replaced (or removed
    when given ``None``/``""``), for links that keep the filter state."""
    params = context["request"].GET.copy()
    for key, value in changes.items():
        params.pop(key, None)
        if value not in (None, ""):
            params[key] = value
    encoded = params.urlencode()
    return f"?{encoded}" if encoded else "?"


@register.filter
def approval_label(action: str) -> str:
    """An approval request's action in words."""
    from workflows_app.models.definitions import APPROVABLE_ACTIONS

    labels = {
        **APPROVABLE_ACTIONS,
        "repair_input": "edit the input",
        "repair_output": "edit a step's output",
        "bulk_job": "start a bulk job",
    }
    return labels.get(action, action.replace("_", " "))


@register.filter
def stalled(instance: Any) -> bool:
    """Stuck by the definition's time rule (a hold waits on a person instead)."""
    return is_stalled(instance)


@register.filter
def on_timeout(step_definition: Any) -> str:
    """What a step's time running out leads to (``engine.waits.on_timeout``)."""
    return waits.on_timeout(step_definition)


@register.filter
def waits_for(step_definition: Any) -> str:
    """What a timer or a step for a person waits for; "" for an activity."""
    return waits.wait_in_words(step_definition)


@register.filter
def stuck_rule(instance: Any) -> str:
    """Why the instance counts as held or stuck, as a rule in words."""
    if not is_stalled(instance):
        return HELD_RULE
    definition = getattr(instance, "definition", None)
    return stalled_rule(getattr(definition, "stuck_after", None))


@register.filter
def get_item(mapping: Any, key: str) -> Any:
    """``mapping[key]`` in a template (None when absent or not a mapping)."""
    return mapping.get(key) if isinstance(mapping, dict) else None


@register.filter
def field_label(field: dict[str, Any]) -> str:
    """The label of a declared form field of a step for a person."""
    from workflows_app.engine.human_form import label_of

    return label_of(field)
