"""Keeping what an HTTP attempt sent and received, with secrets removed.

Three layers of redaction, applied before anything is written:
1. headers whose configured value was a secret reference, and headers with
   credential names, show only ``[redacted]`` (plus the reference's name);
2. JSON fields named in the step's ``redact`` list or
   ``SAGA_HTTP_REDACT_FIELDS`` are blanked at any depth;
3. every resolved secret value is replaced wherever it still appears
   (a participant echoing a header, a secret in a URL).
Bodies are then cut to ``SAGA_HTTP_EXCHANGE_BODY_BYTES``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Iterable, Mapping
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db import DatabaseError
from django.utils import timezone

from workflows_app.activities.http_config import SENSITIVE_HEADER, secret_references
from workflows_app.models import Attempt, AttemptExchange

log = logging.getLogger(__name__)
REDACTED = "[redacted]"
SECRET = "[secret]"
# Response headers worth keeping for a person reading the attempt.
KEPT_RESPONSE_HEADERS = frozenset(
    {"content-type", "content-length", "location", "retry-after", "date", "server"}
)
PRUNE_BATCH = 200


@dataclasses.dataclass
class Scrubber:
    secrets: list[str]
    fields: frozenset[str]

    def text(self, value: str) -> str:
        # Longest first, so a secret containing another is replaced whole.
        for secret in sorted(set(self.secrets), key=len, reverse=True):
            value = value.replace(secret, SECRET)
        return value

    def data(self, value: Any, *, fields: bool = True) -> Any:
        """A JSON value with secrets replaced and (``fields``) the redacted
        fields blanked; a step's output keeps its fields, only the record
        blanks them."""
        if isinstance(value, Mapping):
            return {
                str(k): REDACTED
                if fields and str(k).lower() in self.fields
                else self.data(v, fields=fields)
                for k, v in value.items()
            }
        if isinstance(value, list):
            return [self.data(v, fields=fields) for v in value]
        if isinstance(value, str):
            return self.text(value)
        return value

    def body(self, raw: bytes) -> str:
        """The first bytes of a body, redacted, as text."""
        limit = settings.SAGA_HTTP_EXCHANGE_BODY_BYTES
        if not raw:
            return ""
        try:
            text = json.dumps(self.data(json.loads(raw)), ensure_ascii=False)
        except ValueError:
            # Not JSON: scrub the secrets from the text as received.
            text = self.text(raw.decode("utf-8", errors="replace"))
        cut = text.encode()[:limit].decode("utf-8", errors="ignore")
        return cut if len(cut) == len(text) else cut + " …"

    def request_headers(
        self, configured: Mapping[str, str], sent: Mapping[str, str]
    ) -> dict[str, str]:
        shown = {}
        for name, value in sent.items():
            refs = secret_references(configured.get(name, ""))
            if refs:
                shown[name] = f"{REDACTED} ({', '.join(f'{k}:{n}' for k, n in refs)})"
            elif SENSITIVE_HEADER.search(name):
                shown[name] = REDACTED
            else:
                shown[name] = self.text(value)
        return shown

    def response_headers(self, headers: Iterable[tuple[str, str]]) -> dict[str, str]:
        return {
            name.lower(): self.text(value)
            for name, value in headers
            if name.lower() in KEPT_RESPONSE_HEADERS
        }


def save_exchange(task_token: str, **fields: Any) -> None:
    """Write one exchange row and prune old ones. Never fails the attempt:
    the call already happened, so a lost record is logged, not raised."""
    try:
        AttemptExchange.objects.create(attempt_id=task_token, **fields)
        prune(task_token)
    except DatabaseError:
        log.exception("could not record the HTTP exchange of attempt %s", task_token)


def prune(task_token: str) -> int:
    """Apply the retention cap: rows older than the keep period (a bounded
    batch per call, so every write pays a small share), and beyond the newest
    ``SAGA_HTTP_EXCHANGES_PER_STEP`` of this attempt's step."""
    deleted = 0
    cutoff = timezone.now() - timedelta(days=settings.SAGA_HTTP_EXCHANGE_KEEP_DAYS)
    old = AttemptExchange.objects.filter(created_at__lt=cutoff).order_by("created_at")
    old_ids = list(old.values_list("id", flat=True)[:PRUNE_BATCH])
    if old_ids:
        deleted += AttemptExchange.objects.filter(id__in=old_ids).delete()[0]
    step_id = (
        Attempt.objects.filter(task_token=task_token)
        .values_list("step_id", flat=True)
        .first()
    )
    keep = settings.SAGA_HTTP_EXCHANGES_PER_STEP
    surplus = list(
        AttemptExchange.objects.filter(attempt__step_id=step_id)
        .order_by("-created_at", "-id")
        .values_list("id", flat=True)[keep : keep + PRUNE_BATCH]
    )
    if surplus:
        deleted += AttemptExchange.objects.filter(id__in=surplus).delete()[0]
    return deleted
