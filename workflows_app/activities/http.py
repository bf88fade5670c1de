"""The built-in HTTP activity: calls a participant's endpoint.

Step configuration (``action_config`` / ``compensation_config`` in the admin)::

    {"url": "https://payments.internal/charges", "method": "POST",
     "expected_status": [200, 201], "headers": {"X-Team": "ops"}}

The body is JSON with the instance's business key, input, previous outputs and
the task token; the ``Idempotency-Key`` header carries the stable key, so the
participant can deduplicate retries. A 202 means "accepted, result later"
(the step waits for its callback); 5xx, 408, 429 and network errors are
retryable; any other unexpected status is permanent.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from datetime import UTC, datetime
from typing import Any

from workflows_app.activities import activity
from workflows_app.activities.base import ActivityContext, ActivityError, Waiting

RETRYABLE_STATUSES = frozenset({408, 425, 429})
MAX_RESPONSE_BYTES = 1_000_000


def _timeout(ctx: ActivityContext) -> float:
    if ctx.deadline is None:
        return 30.0
    return max(0.5, (ctx.deadline - datetime.now(UTC)).total_seconds())


@activity("http.request")
def http_request(ctx: ActivityContext) -> dict[str, Any] | Waiting:
    url = ctx.config.get("url")
    if not url or not str(url).startswith(("http://", "https://")):
        raise ActivityError(
            "http.request needs an http(s) 'url' in its config", permanent=True
        )
    method = str(ctx.config.get("method", "POST")).upper()
    expected = set(ctx.config.get("expected_status") or [200, 201, 204])
    body = json.dumps(
        {
            "instance_id": ctx.instance_id,
            "business_key": ctx.business_key,
            "step": ctx.step_name,
            "direction": ctx.direction,
            "attempt": ctx.attempt,
            "run": ctx.run,
            "task_token": ctx.task_token,
            "input": dict(ctx.input),
            "outputs": dict(ctx.outputs),
        }
    ).encode()
    headers = {
        "Content-Type": "application/json",
        "Accept": "application/json",
        "Idempotency-Key": ctx.idempotency_key,
        **{str(k): str(v) for k, v in (ctx.config.get("headers") or {}).items()},
    }
    request = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=_timeout(ctx)) as response:
            status = response.status
            payload = response.read(MAX_RESPONSE_BYTES)
    except urllib.error.HTTPError as exc:
        status, payload = exc.code, exc.read(MAX_RESPONSE_BYTES)
    except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
        raise ActivityError(f"{method} {url} failed: {exc}") from exc

    data = _decode(payload)
    if status == 202:
        return Waiting(detail={"status": status, "body": data})
    if status in expected:
        return {"status": status, "body": data}
    message = f"{method} {url} answered {status}"
    raise ActivityError(
        message, permanent=status < 500 and status not in RETRYABLE_STATUSES
    )


def _decode(payload: bytes) -> Any:
    if not payload:
        return None
    try:
        return json.loads(payload)
    except ValueError:
        return payload.decode("utf-8", errors="replace")[:2000]
