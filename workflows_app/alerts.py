"""Stuck instances -> Alert rows -> one email per episode, digests, escalation.

1. ``sync_alerts`` (run by the sweeper after it flags stuck instances) opens
   one alert per stuck instance and kind, and resolves alerts whose instance
   moved on. It sends nothing.
2. ``send_due_alerts`` (its own beat task, so a slow mail server never
   delays the sweeper) claims due alerts by compare-and-set on
   ``next_send_at``, mails them (one digest per definition when a burst is
   due together), and on failure keeps them visibly unsent and retries with
   backoff. It then escalates, once, the alerts nobody acknowledged in time.
   The same claim queues each alert's chat and webhook notifications, once
   per episode, in the webhook outbox (``workflows_app.webhooks``).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.core.mail import EmailMultiAlternatives, get_connection
from django.db import connection, transaction
from django.db.models import F, Prefetch, Q, QuerySet, Value
from django.db.models.functions import Coalesce, NullIf
from django.template.loader import render_to_string
from django.urls import reverse

from workflows_app.engine import rows
from workflows_app.engine.actions import possible_now
from workflows_app.engine.locking import db_now
from workflows_app.models import (
    TERMINAL_STATES,
    ActorKind,
    Alert,
    InstanceState,
    StepExecution,
    TransitionLog,
    WorkflowDefinition,
    WorkflowInstance,
)
from workflows_app.monitoring import metrics
from workflows_app.webhooks import outbox

log = logging.getLogger(__name__)
SEND_LEASE = timedelta(minutes=2)
MAX_RETRY_DELAY = timedelta(hours=1)


def alert_kind(stuck_kind: str) -> str:
    """Which episode a stuck instance (of this ``stuck_kind``) is in: a new
    kind is a new alert."""
    return stuck_kind or Alert.Kind.NO_PROGRESS


def instance_url(instance_id: Any) -> str:
    path = reverse("instance_detail", kwargs={"pk": instance_id})
    return f"{settings.SITE_URL}{path}"


def _note(
    instance_id: Any, name: str, reason: str, data: dict[str, Any]
) -> TransitionLog:
    """A history row of the alerts' own, built as the engine builds its
    history rows (``rows.new``)."""
    return rows.new(
        TransitionLog,
        {},
        instance_id=instance_id,
        transition=name,
        reason=reason,
        data=data,
        actor_kind=ActorKind.SYSTEM,
        actor_label="system:alerts",
    )


# -- 1. opening and resolving --------------------------------------------------


def sync_alerts(now: datetime, batch: int) -> dict[str, int]:
    return {
        "alerts_resolved": resolve_alerts(now, batch),
        "alerts_opened": open_alerts(now, batch),
    }


# The backstop looks at this many open alerts per turn, each turn going on
# from where the last one stopped, and from the start again after the end:
# the cost of a turn does not grow with the number of open alerts (each is a
# visit to its instance's row: 22 ms for 1,500 at 1,000,000 instances), and
# every open alert is looked at within open / window + 1 turns.
RESOLVE_WINDOW = 500
# Per process, as the sweeper's extra turns: the last alert id looked at.
_resolve_after = 0


def resolve_alerts(now: datetime, batch: int) -> int:
    """Close open alerts whose instance moved on (or into another episode):
    the backstop for an episode that ended without the engine seeing it
    (the engine resolves an instance's alerts itself when it moves on)."""
    global _resolve_after
    # A late-effect alert is not an episode the instance can end by moving
    # (it is closed): a person acknowledging it ends it.
    window = (
        Alert.objects.filter(resolved_at__isnull=True, pk__gt=_resolve_after)
        .exclude(kind=Alert.Kind.LATE_EFFECT)
        .order_by("id")
    )
    # The window's last alert; none when fewer are left (the next turn
    # starts from the first open alert again).
    last = list(
        window.values_list("id", flat=True)[RESOLVE_WINDOW - 1 : RESOLVE_WINDOW]
    )
    if last:
        window = window.filter(pk__lte=last[0])
    # The episode is over when the instance is no longer stuck, is closed,
    # or is stuck in another kind (alert_kind, in SQL).
    episode = Coalesce(
        NullIf(F("instance__stuck_kind"), Value("")), Value(Alert.Kind.NO_PROGRESS)
    )
    resolved = list(
        window.filter(
            Q(instance__stuck=False)
            | Q(instance__state__in=TERMINAL_STATES)
            | ~Q(kind=episode)
        ).select_related("instance")[:batch]
    )
    if len(resolved) < batch:
        # Done with this window (a full turn looks at it again: the alerts
        # it resolved are not in it any more).
        _resolve_after = last[0] if last else 0
    why = {alert.pk: _why_over(alert) for alert in resolved}
    with transaction.atomic():
        for alert in resolved:
            Alert.objects.filter(pk=alert.pk, resolved_at__isnull=True).update(
                resolved_at=now,
                resolved_reason=why[alert.pk][:300],
                next_send_at=None,
                escalate_at=None,
            )
        # Still stuck, but in another episode (e.g. no progress -> held): its
        # new alert is opened right after.
        WorkflowInstance.objects.filter(
            pk__in=[a.instance_id for a in resolved if a.instance.stuck],
            stuck=True,
        ).exclude(state__in=TERMINAL_STATES).update(alert_due=True)
        rows.insert(
            _note(
                a.instance_id,
                "alert_resolved",
                f"{a.get_kind_display()} is over: {why[a.pk]}",
                {"alert": a.pk},
            )
            for a in resolved
        )
    return len(resolved)


def _why_over(alert: Alert) -> str:
    """Why the sweeper ends an alert's episode, as the alert says it."""
    instance = alert.instance
    if instance.state in TERMINAL_STATES:
        return f"the instance is {instance.state}"
    if instance.stuck:
        kind = alert_kind(instance.stuck_kind)
        new = dict(Alert.Kind.choices).get(kind, kind)
        return f"the instance is in another episode: {new}"
    return f"the instance moved on (it is {instance.state})"


def open_alerts(now: datetime, batch: int) -> int:
    """One open alert per stuck instance; the mail waits a little so a burst
    of the same definition goes out as one digest."""
    # Only the columns an alert takes: a whole instance row carries its
    # input and output documents.
    stuck = list(
        WorkflowInstance.objects.filter(alert_due=True)
        .order_by("stuck_since")
        .values("id", "definition_key", "stuck_kind", "stuck_reason")[:batch]
    )
    gather = timedelta(seconds=settings.SAGA_ALERT_GATHER)
    alerts = [
        rows.new(
            Alert,
            {},
            instance_id=i["id"],
            definition_key=i["definition_key"],
            kind=alert_kind(i["stuck_kind"]),
            reason=i["stuck_reason"][:300],
            opened_at=now,
            next_send_at=now + gather,
        )
        for i in stuck
    ]
    with transaction.atomic():
        opened = _insert_alerts(alerts, now)
        rows.insert(
            _note(instance_id, "alert_opened", reason, {"alert": pk, "kind": kind})
            for pk, instance_id, kind, reason in opened
        )
        WorkflowInstance.objects.filter(pk__in=[i["id"] for i in stuck]).update(
            alert_due=False
        )
    return len(opened)


def _insert_alerts(alerts: list[Alert], now: datetime) -> list[tuple[Any, ...]]:
    """Insert the alerts and return (id, instance, kind, reason) of those
    really opened now: a concurrent sweeper may have opened the same alert,
    the partial unique constraint keeps one and ours is skipped (that
    sweeper notes its own)."""
    if not alerts:
        return []
    if connection.vendor == "postgresql":
        # One statement, built as the engine's inserts are, that says
        # which rows it wrote (bulk_create cannot with ignore_conflicts).
        sql, params = rows.Insert(alerts).statement()
        with connection.cursor() as cursor:
            cursor.execute(
                f"{sql} ON CONFLICT DO NOTHING RETURNING id, instance_id, kind, reason",
                params,
            )
            return list(cursor.fetchall())
    Alert.objects.bulk_create(alerts, ignore_conflicts=True)
    return list(
        Alert.objects.filter(
            instance_id__in=[a.instance_id for a in alerts],
            opened_at=now,
            resolved_at__isnull=True,
        ).values_list("id", "instance_id", "kind", "reason")
    )


# -- 2. sending ----------------------------------------------------------------


def _claim(due: QuerySet[Alert], column: str, now: datetime, batch: int) -> list[Alert]:
    """Take due alerts by compare-and-set on ``column``: another sender that
    read the same rows loses the update and skips them."""
    if connection.features.has_select_for_update_skip_locked:
        due = due.select_for_update(skip_locked=True, of=("self",))
    claimed = []
    with transaction.atomic():
        for alert in due.order_by(column)[:batch]:
            won = Alert.objects.filter(
                pk=alert.pk, **{column: getattr(alert, column)}
            ).update(**{column: now + SEND_LEASE})
            if won:
                claimed.append(alert)
    return claimed


def _retry_delay(attempts: int) -> timedelta:
    return min(MAX_RETRY_DELAY, timedelta(seconds=30 * 2 ** max(0, attempts - 1)))


def recipients(definition: WorkflowDefinition | None) -> list[str]:
    listed = definition.recipient_list() if definition else []
    return listed or [settings.SAGA_ONCALL_EMAIL]


def make_message(
    template: str, to: list[str], context: dict[str, Any]
) -> EmailMultiAlternatives:
    """The one way alert mail is built: ``emails/<template>-{subject,body}``."""
    context = {**context, "site_url": settings.SITE_URL}
    subject = " ".join(
        render_to_string(f"emails/{template}-subject.txt", context).split()
    )
    message = EmailMultiAlternatives(
        subject=subject[:250],
        body=render_to_string(f"emails/{template}-body.txt", context),
        to=to,
    )
    message.attach_alternative(
        render_to_string(f"emails/{template}-body.html", context), "text/html"
    )
    return message


# What the mail needs of an alert: its instance with the definition and steps
# (the catalogue reads them to say what can be done now).
WITH_STEPS = Prefetch(
    "instance__steps",
    queryset=StepExecution.objects.select_related("step_definition").order_by(
        "position"
    ),
)


def _context(alerts: Iterable[Alert]) -> list[dict[str, Any]]:
    return [
        {
            "alert": a,
            "instance": a.instance,
            "url": instance_url(a.instance_id),
            "definition": a.instance.definition,
            "can_do": _can_do(a.instance),
        }
        for a in alerts
    ]


def _can_do(instance: WorkflowInstance) -> list[Any]:
    """What the mail advises for a held instance: the catalogue's actions
    possible now (never, say, compensate past the pivot); [] otherwise."""
    if instance.state != InstanceState.NEEDS_ATTENTION:
        return []
    return possible_now(instance, list(instance.steps.all()))


def send_due_alerts(batch: int | None = None) -> dict[str, int]:
    size = batch or settings.SAGA_SWEEP_BATCH
    now = db_now()
    due = Alert.objects.filter(next_send_at__lte=now, resolved_at__isnull=True)
    claimed = _claim(due, "next_send_at", now, size)
    by_definition: dict[str, list[Alert]] = defaultdict(list)
    for alert in (
        Alert.objects.filter(pk__in=[a.pk for a in claimed])
        .select_related("instance__definition")
        .prefetch_related(WITH_STEPS)
        .order_by("opened_at")
    ):
        by_definition[alert.definition_key].append(alert)
    # Chat and webhook notifications go to their own outbox first (once per
    # episode), so a mail server that is down does not hold them back.
    queued = sum(
        outbox.queue_alert_notifications(
            key, alerts[0].instance.definition, alerts, now
        )
        for key, alerts in by_definition.items()
    )
    sent = failed = 0
    mail = get_connection(fail_silently=False)
    for alerts in by_definition.values():
        definition = alerts[0].instance.definition
        digest = len(alerts) >= settings.SAGA_ALERT_DIGEST_MIN
        groups = [alerts] if digest else [[a] for a in alerts]
        for group in groups:
            items = _context(group)
            template = "digest" if digest else "alert"
            context = {
                "items": items,
                "item": items[0],
                "definition": definition,
                "count": len(items),
            }
            message = make_message(template, recipients(definition), context)
            ok = _deliver(mail, message, group, now, digest=digest)
            sent += ok
            failed += not ok
    escalated = _escalate(mail, now, size)
    return {
        "mails_sent": sent,
        "mails_failed": failed,
        "escalations": escalated,
        "webhooks_queued": queued,
    }


def _deliver(
    mail: Any,
    message: EmailMultiAlternatives,
    alerts: list[Alert],
    now: datetime,
    *,
    digest: bool,
) -> bool:
    try:
        mail.send_messages([message])
    except Exception as exc:  # any transport error: record it and retry later
        log.warning("alert mail to %s failed: %s", message.to, exc)
        metrics.alert_delivery_failed("email", len(alerts))
        for alert in alerts:
            attempts = alert.send_attempts + 1
            Alert.objects.filter(pk=alert.pk).update(
                send_attempts=attempts,
                last_send_error=f"{type(exc).__name__}: {exc}"[:2000],
                next_send_at=now + _retry_delay(attempts),
            )
        return False
    escalate = (
        now + timedelta(seconds=settings.SAGA_ALERT_ESCALATE_AFTER)
        if settings.SAGA_ESCALATION_EMAIL
        else None
    )
    for alert in alerts:
        Alert.objects.filter(pk=alert.pk).update(
            notified_at=now,
            notified_in_digest=digest,
            next_send_at=None,
            send_attempts=alert.send_attempts + 1,
            last_send_error="",
            escalate_at=escalate if alert.acknowledged_at is None else None,
        )
    TransitionLog.objects.bulk_create(
        _note(
            a.instance_id,
            "alert_sent",
            f"mailed to {', '.join(message.to)}",
            {"alert": a.pk, "digest": digest},
        )
        for a in alerts
    )
    return True


def _escalate(mail: Any, now: datetime, batch: int) -> int:
    due = Alert.objects.filter(
        escalate_at__lte=now, acknowledged_at__isnull=True, resolved_at__isnull=True
    )
    done = 0
    for alert in _claim(due, "escalate_at", now, batch):
        alert = (
            Alert.objects.select_related("instance__definition")
            .prefetch_related(WITH_STEPS)
            .get(pk=alert.pk)
        )
        items = _context([alert])
        message = make_message(
            "escalation",
            [settings.SAGA_ESCALATION_EMAIL],
            {
                "item": items[0],
                "alert": alert,
                "window": timedelta(seconds=settings.SAGA_ALERT_ESCALATE_AFTER),
            },
        )
        try:
            mail.send_messages([message])
        except Exception as exc:  # retried at the next run after the lease
            log.warning("escalation mail failed: %s", exc)
            Alert.objects.filter(pk=alert.pk).update(
                escalate_at=now + _retry_delay(alert.send_attempts + 1),
                last_send_error=f"escalation: {type(exc).__name__}: {exc}"[:2000],
            )
            continue
        Alert.objects.filter(pk=alert.pk).update(escalated_at=now, escalate_at=None)
        _note(
            alert.instance_id,
            "alert_escalated",
            f"not acknowledged; mailed to {settings.SAGA_ESCALATION_EMAIL}",
            {"alert": alert.pk},
        ).save()
        done += 1
    return done
