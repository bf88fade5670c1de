"""Signing webhook requests, and how a receiver checks them.

The signature is HMAC-SHA256, keyed with ``SAGA_WEBHOOK_SECRET``, over
``<timestamp>.<body>``: the Unix time in ``X-Saga-Timestamp``, a dot, and
the raw request body bytes. It is sent as ``X-Saga-Signature: sha256=<hex>``.
Signing the timestamp with the body lets a receiver refuse a captured
request replayed later: it accepts only timestamps within its window, and
drops an event id it has already seen within that window.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Mapping

SIGNATURE_HEADER = "X-Saga-Signature"
TIMESTAMP_HEADER = "X-Saga-Timestamp"
EVENT_ID_HEADER = "X-Saga-Event-Id"
EVENT_HEADER = "X-Saga-Event"
REPLAY_WINDOW = 300  # seconds


def signature(secret: str, timestamp: int, body: bytes) -> str:
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"sha256={mac.hexdigest()}"


def signed_headers(
    secret: str, body: bytes, now: float | None = None
) -> dict[str, str]:
    timestamp = int(time.time() if now is None else now)
    return {
        TIMESTAMP_HEADER: str(timestamp),
        SIGNATURE_HEADER: signature(secret, timestamp, body),
    }


def verify(
    secret: str,
    headers: Mapping[str, str],
    body: bytes,
    *,
    now: float | None = None,
    window: int = REPLAY_WINDOW,
) -> bool:
    """What a receiver does: the signature matches the raw body and the
    timestamp is within ``window`` seconds of its own clock."""
    lowered = {k.lower(): v for k, v in headers.items()}
    try:
        timestamp = int(lowered[TIMESTAMP_HEADER.lower()])
        sent = lowered[SIGNATURE_HEADER.lower()]
    except (KeyError, ValueError):
        return False
    if abs((time.time() if now is None else now) - timestamp) > window:
        return False
    return hmac.compare_digest(sent, signature(secret, timestamp, body))
