"""Flagging an instance stuck: the one place that writes those columns
(the sweeper's batch flag writes the same values in one UPDATE)."""

from __future__ import annotations

from datetime import datetime, timedelta

from django.db.models import Q

from workflows_app.models import AttentionKind, StuckKind, WorkflowInstance

# The alert episode a hold opens, by why the instance is held.
HOLD_KINDS: dict[str, str] = {
    AttentionKind.DEADLINE: StuckKind.DEADLINE,
    AttentionKind.COMPENSATION_FAILED: StuckKind.COMPENSATION_FAILED,
}


def mark_stuck(
    instance: WorkflowInstance,
    now: datetime,
    kind: str,
    reason: str,
    *,
    new_episode: bool = True,
) -> None:
    """Stuck now, for ``reason``; its alert is opened by the next sweep.
    ``new_episode=False`` keeps the time it first got stuck."""
    instance.stuck = True
    instance.stuck_kind = kind
    instance.stuck_reason = reason[:300]
    instance.stuck_since = now if new_episode else (instance.stuck_since or now)
    instance.alert_due = True


def mark_held(instance: WorkflowInstance, now: datetime, reason: str) -> None:
    """Held for a person (the instance's attention kind says why)."""
    kind = HOLD_KINDS.get(instance.attention_kind, StuckKind.HELD)
    mark_stuck(instance, now, kind, reason)


def clear_stuck(instance: WorkflowInstance) -> None:
    instance.stuck = False
    instance.stuck_kind = StuckKind.NONE
    instance.alert_due = False
    instance.stuck_reason = ""
    instance.stuck_since = None


# Stuck in the strict sense: nothing moved within the definition's time rule
# (``stuck_after``), or an awaited event is overdue. A hold is not stuck: it
# waits on a person (state needs_attention) and is counted apart.
NO_PROGRESS_KINDS = frozenset({StuckKind.NO_PROGRESS, StuckKind.MILESTONE_OVERDUE})
STALLED = Q(stuck=True, stuck_kind__in=NO_PROGRESS_KINDS)
HELD_RULE = "held: waits on a person to act (needs attention)"


def is_stalled(instance: WorkflowInstance) -> bool:
    return bool(instance.stuck) and instance.stuck_kind in NO_PROGRESS_KINDS


def stalled_rule(stuck_after: timedelta | None) -> str:
    """The time rule of ``stuck`` in words, for one definition's limit."""
    if stuck_after is None:
        return "stuck: no progress within its definition's stuck-after time"
    return f"stuck: no progress for more than {span_in_words(stuck_after)}"


def span_in_words(span: timedelta) -> str:
    seconds = int(span.total_seconds())
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size and seconds % size == 0:
            n = seconds // size
            return f"{n} {unit}{'s' if n != 1 else ''}"
    return f"{seconds} seconds"
