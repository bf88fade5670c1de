"""The bodies webhooks carry: chat text for people, JSON for programs.

Built once, when the event is queued, and stored with the delivery, so every
retry sends the same body.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from django.conf import settings
from django.urls import reverse

from workflows_app.models import Alert, TransitionLog, WorkflowInstance

# A chat digest lists this many instances, then links to the alerts page.
CHAT_DIGEST_LINES = 20


def instance_link(instance_id: Any) -> str:
    return settings.SITE_URL + reverse("instance_detail", kwargs={"pk": instance_id})


def alerts_link(definition_key: str) -> str:
    return f"{settings.SITE_URL}{reverse('alert_list')}?definition={definition_key}"


def _chat(text: str) -> str:
    """Slack's three control characters, escaped as its docs ask: a
    business key or reason cannot turn into a link or a mention."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _alert_item(alert: Alert) -> dict[str, Any]:
    instance = alert.instance
    return {
        "alert_id": alert.pk,
        "kind": alert.kind,
        "problem": alert.get_kind_display(),
        "reason": alert.reason,
        "instance_id": str(instance.id),
        "business_key": instance.business_key,
        "state": instance.state,
        "opened_at": alert.opened_at.isoformat(),
        "url": instance_link(instance.id),
    }


def alert_json(
    event_id: str, definition_key: str, alerts: Sequence[Alert], digest: bool
) -> dict[str, Any]:
    return {
        "event_id": event_id,
        "event": "alert.digest" if digest else "alert",
        "definition": definition_key,
        "count": len(alerts),
        "alerts_url": alerts_link(definition_key),
        "alerts": [_alert_item(a) for a in alerts],
    }


def alert_chat(
    definition_key: str, alerts: Sequence[Alert], digest: bool
) -> dict[str, Any]:
    """``{"text": ...}``: what Slack, Mattermost, Rocket.Chat and most chat
    tools accept on an incoming webhook, with links in ``<url|label>``."""

    def line(alert: Alert) -> str:
        key = _chat(alert.instance.business_key)
        return (
            f"<{instance_link(alert.instance_id)}|{key}>: "
            f"{_chat(alert.get_kind_display())} ({_chat(alert.reason)})"
        )

    if not digest:
        head = f"Saga Desk alert in *{_chat(definition_key)}*: "
        return {"text": head + line(alerts[0])}
    shown = [f"• {line(a)}" for a in alerts[:CHAT_DIGEST_LINES]]
    more = len(alerts) - len(shown)
    return {
        "text": "\n".join(
            [
                f"Saga Desk: {len(alerts)} instances of *{_chat(definition_key)}* "
                "need attention",
                *shown,
                *([f"… and {more} more"] if more else []),
                f"<{alerts_link(definition_key)}|All open alerts>",
            ]
        )
    }


def state_event(
    event_id: str, instance: WorkflowInstance, log: TransitionLog, now: datetime
) -> dict[str, Any]:
    """What a client system learns when an instance reaches a state it
    subscribed to (never the instance's input or outputs)."""
    return {
        "event_id": event_id,
        "event": f"instance.{log.target}",
        "occurred_at": now.isoformat(),
        "definition": instance.definition_key,
        "definition_version": instance.definition.version,
        "instance": {
            "id": str(instance.id),
            "business_key": instance.business_key,
            "state": log.target,
            "previous_state": log.source,
            "attention_kind": instance.attention_kind or None,
            "url": instance_link(instance.id),
        },
        "transition": log.transition,
        "reason": log.reason,
    }
