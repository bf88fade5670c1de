"""Sending queued webhooks: claim, POST outside any transaction, record.

1. Claim due rows by compare-and-set on ``next_attempt_at`` (moved one lease
   ahead), so two senders never post the same row at once; a sender killed
   mid-way leaves its rows due again when the lease runs out.
2. POST each row, signed, with its event id as ``X-Saga-Event-Id`` and
   ``Idempotency-Key`` (a retry or a post-crash repeat carries the same id).
3. A 2xx stamps ``delivered_at``; anything else keeps the row due after a
   backoff (30 s doubling to an hour, or the receiver's Retry-After), with
   the error on the row for the alerts and webhooks pages. Nothing is
   dropped: a delivery that keeps failing keeps being retried, visibly.
"""

from __future__ import annotations

import json
import logging
import os
from datetime import datetime, timedelta
from typing import Any

import httpx
from django.conf import settings
from django.db import connection, transaction
from django.db.models import F

from workflows_app.engine.locking import db_now
from workflows_app.models import WebhookDelivery
from workflows_app.monitoring import metrics
from workflows_app.webhooks import signing
from workflows_app.webhooks.targets import TargetError, resolve_url

log = logging.getLogger(__name__)
LEASE = timedelta(minutes=2)
FIRST_RETRY = timedelta(seconds=30)
MAX_RETRY_DELAY = timedelta(hours=1)

_client: httpx.Client | None = None
_client_pid = 0


def client() -> httpx.Client:
    """One pool per process (re-made after a fork)."""
    global _client, _client_pid
    if _client is None or _client_pid != os.getpid():
        _client = httpx.Client(
            # A redirect could lead off the allow-list: it counts as a failure.
            follow_redirects=False,
            trust_env=False,
            headers={"User-Agent": "saga-desk"},
        )
        _client_pid = os.getpid()
    return _client


def retry_delay(attempts: int, retry_after: float | None = None) -> timedelta:
    backoff: timedelta = min(MAX_RETRY_DELAY, FIRST_RETRY * 2 ** max(0, attempts - 1))
    if retry_after is not None:
        return max(backoff, min(MAX_RETRY_DELAY, timedelta(seconds=retry_after)))
    return backoff


def _claim(now: datetime, batch: int) -> list[WebhookDelivery]:
    due = WebhookDelivery.objects.filter(next_attempt_at__lte=now)
    if connection.features.has_select_for_update_skip_locked:
        due = due.select_for_update(skip_locked=True, of=("self",))
    claimed = []
    with transaction.atomic():
        for row in due.order_by("next_attempt_at")[:batch]:
            won = WebhookDelivery.objects.filter(
                pk=row.pk, next_attempt_at=row.next_attempt_at
            ).update(next_attempt_at=now + LEASE)
            if won:
                claimed.append(row)
    return claimed


def deliver_due(batch: int | None = None) -> dict[str, int]:
    """Send every due delivery (first tries and retries whose time came)."""
    claimed = _claim(db_now(), batch or settings.SAGA_SWEEP_BATCH)
    delivered = failed = 0
    for row in claimed:
        ok = attempt(row)
        delivered += ok
        failed += not ok
    return {"webhooks_delivered": delivered, "webhooks_failed": failed}


def _headers(row: WebhookDelivery, body: bytes) -> dict[str, str]:
    if row.format not in WebhookDelivery.Format.values:
        raise TargetError(f"unknown webhook format {row.format!r}: slack or json")
    headers = {
        "Content-Type": "application/json",
        signing.EVENT_ID_HEADER: str(row.event_id),
        "Idempotency-Key": str(row.event_id),
        signing.EVENT_HEADER: row.event,
    }
    secret = settings.SAGA_WEBHOOK_SECRET
    if secret:
        headers.update(signing.signed_headers(secret, body))
    elif row.format == WebhookDelivery.Format.JSON:
        raise TargetError(
            "SAGA_WEBHOOK_SECRET is not set: JSON webhooks are only sent signed"
        )
    return headers


def attempt(row: WebhookDelivery) -> bool:
    """POST one delivery and record what happened; True when it arrived."""
    body = json.dumps(row.payload, separators=(",", ":")).encode()
    secrets: list[str] = []
    status: int | None = None
    retry_after: float | None = None
    try:
        url, secrets = resolve_url(row.target)
        response = client().post(
            url,
            content=body,
            headers=_headers(row, body),
            timeout=httpx.Timeout(
                settings.SAGA_WEBHOOK_TIMEOUT,
                connect=min(5.0, settings.SAGA_WEBHOOK_TIMEOUT),
            ),
        )
        status = response.status_code
        if 200 <= status < 300:
            return _record_success(row, status)
        error = f"HTTP {status}: {response.text[:200]}"
        retry_after = _retry_after(response)
    except TargetError as exc:
        error = str(exc)
    except httpx.HTTPError as exc:
        error = f"{type(exc).__name__}: {exc}"
    for secret in secrets:  # the URL may be the credential
        error = error.replace(secret, "…")
    _record_failure(row, status, error, retry_after)
    return False


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("Retry-After", "")
    return float(value) if value.isdigit() else None


def _record_success(row: WebhookDelivery, status: int) -> bool:
    now = db_now()
    WebhookDelivery.objects.filter(pk=row.pk).update(
        delivered_at=now,
        next_attempt_at=None,
        attempts=F("attempts") + 1,
        last_status=status,
        last_error="",
        last_attempt_at=now,
    )
    return True


def _record_failure(
    row: WebhookDelivery, status: int | None, error: str, retry_after: Any
) -> None:
    log.warning("webhook %s to %s failed: %s", row.event, row.target, error)
    if row.event.startswith("alert"):
        metrics.alert_delivery_failed("webhook", row.alerts.count())
    now = db_now()
    attempts = row.attempts + 1
    # A concurrent sender whose post arrived has the last word.
    WebhookDelivery.objects.filter(pk=row.pk, delivered_at__isnull=True).update(
        attempts=attempts,
        last_status=status,
        last_error=error[:2000],
        last_attempt_at=now,
        next_attempt_at=now + retry_delay(attempts, retry_after),
    )
