"""Queueing webhooks: rows written in the caller's transaction, sent later.

Nothing here makes a network call. ``state_event_deliveries`` and
``queue_state_events`` run inside the engine's unit of work, so an event
exists exactly when the transition it reports committed;
``queue_alert_notifications`` runs when the alert sender claims due alerts,
once per alert episode. ``delivery.deliver_due`` sends
the rows after the commit.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from django.conf import settings
from django.db import transaction

from workflows_app.models import (
    Alert,
    TransitionLog,
    WebhookDelivery,
    WorkflowDefinition,
    WorkflowInstance,
)
from workflows_app.webhooks import payloads
from workflows_app.webhooks.targets import (
    EVENTS,
    Target,
    global_alert_target,
    parse_alert_targets,
    parse_subscriptions,
)


def alert_targets(definition: WorkflowDefinition | None) -> list[Target]:
    listed = parse_alert_targets(definition.alert_webhooks)[0] if definition else []
    extra = global_alert_target()
    return listed + ([extra] if extra else [])


def queue_alert_notifications(
    definition_key: str,
    definition: WorkflowDefinition | None,
    alerts: Sequence[Alert],
    now: datetime,
) -> int:
    """One notification per target for the alerts not yet announced: one
    message per alert, or one digest when a burst is due together. Returns
    the number of deliveries queued."""
    targets = alert_targets(definition)
    with transaction.atomic():
        # Compare-and-set on hooks_queued_at: whatever happens to the mail
        # (retried, escalated), an episode is announced here once.
        fresh = list(
            Alert.objects.select_for_update(of=("self",))
            .filter(pk__in=[a.pk for a in alerts], hooks_queued_at__isnull=True)
            .select_related("instance")
            .order_by("opened_at", "id")
        )
        if not fresh:
            return 0
        Alert.objects.filter(pk__in=[a.pk for a in fresh]).update(hooks_queued_at=now)
        if not targets:
            return 0
        digest = len(fresh) >= settings.SAGA_ALERT_DIGEST_MIN
        groups = [fresh] if digest else [[a] for a in fresh]
        queued = []
        for group in groups:
            event_id = str(uuid.uuid4())
            for target in targets:
                body = (
                    payloads.alert_chat(definition_key, group, digest)
                    if target.format == "slack"
                    else payloads.alert_json(event_id, definition_key, group, digest)
                )
                queued.append(
                    (
                        _delivery(
                            event_id,
                            "alert.digest" if digest else "alert",
                            target.ref,
                            target.format,
                            definition_key,
                            body,
                            now,
                            instance_id=None if digest else group[0].instance_id,
                        ),
                        group,
                    )
                )
        WebhookDelivery.objects.bulk_create([row for row, _ in queued])
        WebhookDelivery.alerts.through.objects.bulk_create(
            WebhookDelivery.alerts.through(webhookdelivery_id=row.pk, alert_id=a.pk)
            for row, group in queued
            for a in group
        )
    return len(queued)


def queue_state_events(rows: Sequence[WebhookDelivery]) -> None:
    """Write the rows of :func:`state_event_deliveries`."""
    if rows:
        WebhookDelivery.objects.bulk_create(rows)


def state_event_deliveries(
    instance: WorkflowInstance, logs: Sequence[TransitionLog], now: datetime
) -> list[WebhookDelivery]:
    """Called by the engine's unit of work as it saves: the outbox rows (not
    yet written) for each state change it made into a subscribable state,
    one per subscribed URL."""
    reached = [
        log
        for log in logs
        if log.step_id is None and log.field == "state" and log.target in EVENTS
    ]
    if not reached:
        return []
    subscriptions = parse_subscriptions(instance.definition.event_webhooks)[0]
    rows = []
    for log in reached:
        event_id = str(uuid.uuid4())
        body = payloads.state_event(event_id, instance, log, now)
        rows += [
            _delivery(
                event_id,
                body["event"],
                sub.ref,
                WebhookDelivery.Format.JSON,
                instance.definition_key,
                body,
                now,
                instance_id=instance.id,
            )
            for sub in subscriptions
            if log.target in sub.events
        ]
    return rows


def _delivery(
    event_id: str,
    event: str,
    target: str,
    fmt: str,
    definition_key: str,
    body: dict[str, Any],
    now: datetime,
    *,
    instance_id: Any,
) -> WebhookDelivery:
    return WebhookDelivery(
        event_id=event_id,
        event=event,
        target=target,
        format=fmt,
        definition_key=definition_key,
        instance_id=instance_id,
        payload=body,
        created_at=now,
        next_attempt_at=now,
    )
