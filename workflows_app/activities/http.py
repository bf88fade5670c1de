"""The built-in HTTP activity: calls a participant's endpoint.

Step configuration (``action_config`` / ``compensation_config`` in the admin)::

    {"url": "https://payments.internal/charges", "method": "POST",
     "expected_status": [200, 201],
     "headers": {"Authorization": "Bearer ${env:PAYMENTS_TOKEN}"},
     "follow_redirects": false, "redact": ["card_number"]}

The body is JSON with the instance, its business key, input and previous
outputs, the step, direction, attempt, run, task token and callback URL; the
``Idempotency-Key`` header carries the stable key, so the participant can
deduplicate retries. How answers are classified:

- an ``expected_status`` answer: the step succeeded, the body is its output;
- 202: accepted, the result comes by callback to the callback URL;
- 5xx, 408, 425, 429, a refused or broken connection: retryable, no sooner
  than the participant's ``Retry-After``;
- no answer before the step's timeout: outcome unknown (timed out);
- another 2xx or an oversized success: retryable, since the effect may exist;
- anything else (4xx, a redirect not followed): permanent.
"""

from __future__ import annotations

import dataclasses
import email.utils
import json
import logging
import os
import time
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urljoin, urlsplit

import httpx
from django.conf import settings

from workflows_app.activities import activity
from workflows_app.activities.base import ActivityContext, ActivityError, Waiting
from workflows_app.activities.http_config import (
    MAX_REDIRECTS,
    RESERVED_HEADERS,
    ConfigError,
    HttpConfig,
    MissingSecret,
    host_allowed,
    host_refusal,
    parse,
    resolve_headers,
)
from workflows_app.activities.http_record import Scrubber, save_exchange

RETRYABLE_STATUSES = frozenset({408, 425, 429})
REDIRECTS = frozenset({301, 302, 303, 307, 308})
# The client's read timeout is the time left to the step deadline plus this,
# so the worker's alarm (the runner's "timed out") normally fires first.
ALARM_GRACE = 1.0
CONNECT_TIMEOUT = 10.0
NO_DEADLINE_TIMEOUT = 30.0

_client: httpx.Client | None = None
_client_pid = 0

# httpcore's DEBUG trace prints response headers, which may echo a
# credential back; its INFO and up say nothing of headers.
logging.getLogger("httpcore").setLevel(logging.INFO)


def client() -> httpx.Client:
    """One connection pool per worker process (re-made after a fork, since
    a pool's sockets must not be shared by two processes)."""
    global _client, _client_pid
    if _client is None or _client_pid != os.getpid():
        _client = httpx.Client(
            follow_redirects=False,  # redirects are decided per step below
            trust_env=False,  # no proxy or .netrc credentials from the env
            limits=httpx.Limits(max_connections=50, max_keepalive_connections=20),
            headers={"User-Agent": "saga-desk"},
        )
        _client_pid = os.getpid()
    return _client


@dataclasses.dataclass
class Answer:
    status: int
    headers: httpx.Headers
    body: bytes
    too_large: bool


@activity("http.request")
def http_request(ctx: ActivityContext) -> dict[str, Any] | Waiting:
    try:
        config = parse(ctx.config)
    except ConfigError as exc:
        raise ActivityError(f"http.request config: {exc}", permanent=True) from exc
    try:
        headers, secrets = resolve_headers(config.headers)
    except MissingSecret as exc:
        # Nothing was sent; an operator fixes the worker's environment and retries.
        raise ActivityError(f"http.request: {exc}", permanent=True) from exc
    scrub = Scrubber(secrets, config.redact)
    body = json.dumps(request_body(ctx)).encode()
    headers = {
        "Content-Type": "application/json",
        "Accept": "application/json",
        # A saved definition cannot set these; one older than that check neither.
        **{k: v for k, v in headers.items() if k.lower() not in RESERVED_HEADERS},
        "Idempotency-Key": ctx.idempotency_key,
    }
    method, url = config.method, config.url
    for hop in range(1, MAX_REDIRECTS + 2):
        if not host_allowed(url):
            raise ActivityError(host_refusal(url), permanent=True)
        answer = _exchange(ctx, config, scrub, hop, method, url, headers, body)
        location = answer.headers.get("location")
        if answer.status not in REDIRECTS or not location:
            return _classify(config, scrub, method, url, answer)
        target = urljoin(url, location)
        why_not = _redirect_refusal(config, url, target)
        if why_not:
            raise ActivityError(
                f"{method} {url} redirected ({answer.status}) to {target}: {why_not}",
                permanent=True,
            )
        if answer.status in {301, 302, 303} and method != "GET":
            method, body = "GET", b""  # what every HTTP client does
        url = target
    raise ActivityError(
        f"{config.url}: more than {MAX_REDIRECTS} redirects", permanent=True
    )


def request_body(ctx: ActivityContext) -> dict[str, Any]:
    base = settings.SAGA_HTTP_CALLBACK_BASE_URL
    return {
        "instance_id": ctx.instance_id,
        "definition": ctx.definition_key,
        "business_key": ctx.business_key,
        "step": ctx.step_name,
        "direction": ctx.direction,
        "attempt": ctx.attempt,
        "run": ctx.run,
        "task_token": ctx.task_token,
        "callback_url": f"{base}/api/v1/callbacks/{ctx.task_token}",
        "deadline": ctx.deadline.isoformat() if ctx.deadline else None,
        "input": dict(ctx.input),
        "outputs": dict(ctx.outputs),
    }


def _redirect_refusal(config: HttpConfig, url: str, target: str) -> str:
    if not config.follow_redirects:
        return "redirects are not followed unless the step sets follow_redirects"
    old, new = urlsplit(url), urlsplit(target)
    if (old.hostname, old.port) != (new.hostname, new.port) and not (
        old.hostname == new.hostname and {old.port, new.port} <= {None, 80, 443}
    ):
        return "a redirect to another host is never followed"
    if old.scheme == "https" and new.scheme != "https":
        return "a redirect from https to http is never followed"
    return ""


def _timeouts(ctx: ActivityContext) -> tuple[httpx.Timeout, float]:
    """The client's timeouts and the monotonic time past which the attempt
    is over (the step's deadline)."""
    if ctx.deadline is None:
        left = NO_DEADLINE_TIMEOUT
    else:
        left = max(0.05, (ctx.deadline - datetime.now(UTC)).total_seconds())
    return (
        httpx.Timeout(left + ALARM_GRACE, connect=min(CONNECT_TIMEOUT, left)),
        time.monotonic() + left + ALARM_GRACE,
    )


def _exchange(
    ctx: ActivityContext,
    config: HttpConfig,
    scrub: Scrubber,
    hop: int,
    method: str,
    url: str,
    headers: dict[str, str],
    body: bytes,
) -> Answer:
    """Send one request and read its answer; record both whatever happens
    (also when the worker's alarm interrupts the call)."""
    timeout, ends = _timeouts(ctx)
    started = time.monotonic()
    answer: Answer | None = None
    error = ""
    try:
        answer = _send(method, url, headers, body, timeout, ends)
        return answer
    except httpx.TimeoutException as exc:
        error = f"{type(exc).__name__}: no answer in time"
        if isinstance(exc, httpx.ConnectTimeout | httpx.PoolTimeout):
            raise ActivityError(f"{method} {url}: could not connect in time") from exc
        # The request went out: whether it applied is unknown, like the
        # worker's own timeout (the runner records it as timed out).
        from workflows_app.activities.runner import AttemptTimeout

        raise AttemptTimeout from exc
    except httpx.ConnectError as exc:
        error = f"connection failed: {exc}"
        raise ActivityError(f"{method} {url}: {error}") from exc
    except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as exc:
        error = f"connection broken after the request was sent: {exc}"
        raise ActivityError(
            f"{method} {url}: {error} (the effect may have happened)"
        ) from exc
    except httpx.HTTPError as exc:
        error = f"{type(exc).__name__}: {exc}"
        raise ActivityError(f"{method} {url}: {error}") from exc
    except BaseException as exc:  # the worker's alarm, a shutdown
        error = f"interrupted: {type(exc).__name__}"
        raise
    finally:
        save_exchange(
            ctx.task_token,
            hop=hop,
            method=method,
            url=scrub.text(url),
            request_headers=scrub.request_headers(config.headers, headers),
            request_body=scrub.body(body),
            request_bytes=len(body),
            status=answer.status if answer else None,
            response_headers=scrub.response_headers(answer.headers.multi_items())
            if answer
            else {},
            response_body=""
            if answer is None or answer.too_large
            else scrub.body(answer.body),
            response_bytes=len(answer.body) if answer else None,
            duration_ms=int((time.monotonic() - started) * 1000),
            error=scrub.text(error or _too_large_note(answer)),
        )


def _too_large_note(answer: Answer | None) -> str:
    if answer is None or not answer.too_large:
        return ""
    return f"response larger than {settings.SAGA_HTTP_MAX_RESPONSE_BYTES} bytes"


def _send(
    method: str,
    url: str,
    headers: dict[str, str],
    body: bytes,
    timeout: httpx.Timeout,
    ends: float,
) -> Answer:
    limit = settings.SAGA_HTTP_MAX_RESPONSE_BYTES
    with client().stream(
        method, url, headers=headers, content=body or None, timeout=timeout
    ) as response:
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            return Answer(response.status_code, response.headers, b"", True)
        received = bytearray()
        for chunk in response.iter_bytes():
            received += chunk
            if len(received) > limit:
                return Answer(response.status_code, response.headers, b"", True)
            if time.monotonic() > ends:
                # A server dripping bytes beats a per-read timeout.
                raise httpx.ReadTimeout("the answer did not finish in time")
        return Answer(response.status_code, response.headers, bytes(received), False)


def _classify(
    config: HttpConfig, scrub: Scrubber, method: str, url: str, answer: Answer
) -> dict[str, Any] | Waiting:
    status = answer.status
    said = f"{method} {url} answered {status}"
    if answer.too_large and (status == 202 or status in config.expected_status):
        # A success whose body cannot be kept: the effect exists, so this
        # must not read as "declined" (that would skip its compensation).
        raise ActivityError(
            f"{said} with a body over {settings.SAGA_HTTP_MAX_RESPONSE_BYTES} "
            "bytes (SAGA_HTTP_MAX_RESPONSE_BYTES); the effect may have happened"
        )
    data = None if answer.too_large else scrub.data(_decode(answer.body), fields=False)
    if status == 202:
        return Waiting(detail={"status": status, "body": data})
    if status in config.expected_status:
        return {"status": status, "body": data}
    if 200 <= status < 300:
        raise ActivityError(
            f"{said}, a success not in expected_status "
            f"{sorted(config.expected_status)}; the effect may have happened"
        )
    if status >= 500 or status in RETRYABLE_STATUSES:
        raise ActivityError(
            f"{said}{_detail(data)}",
            retry_after=retry_after(answer.headers.get("retry-after")),
        )
    if status in REDIRECTS:
        raise ActivityError(f"{said} without a Location header", permanent=True)
    raise ActivityError(f"{said}{_detail(data)}", permanent=True)


def _detail(data: Any) -> str:
    if data in (None, ""):
        return ""
    text = data if isinstance(data, str) else json.dumps(data)
    return f": {text[:300]}"


def retry_after(value: str | None) -> timedelta | None:
    """A ``Retry-After`` in seconds or as an HTTP date, capped by
    ``SAGA_HTTP_MAX_RETRY_AFTER``; None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        seconds = float(value)
    else:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - datetime.now(UTC)).total_seconds()
    seconds = min(max(0.0, seconds), settings.SAGA_HTTP_MAX_RETRY_AFTER)
    return timedelta(seconds=seconds)


def _decode(payload: bytes) -> Any:
    if not payload:
        return None
    try:
        return json.loads(payload)
    except ValueError:
        return payload.decode("utf-8", errors="replace")
