"""Flagging an instance stuck: the one place that writes those columns
(the sweeper's batch flag writes the same values in one UPDATE)."""

from __future__ import annotations

from datetime import datetime

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
