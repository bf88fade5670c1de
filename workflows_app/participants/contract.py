"""The participant contract check: probe a service the way the engine calls
it and give a verdict per rule.

Every probe uses a fresh instance id and the engine's key scheme
(``<instance>:<step>:action|compensation``) and request body, so a
participant that passes here behaves the same under Saga Desk. The rules:

1. ``replay``: the same ``Idempotency-Key`` twice gives the same answer and
   (with an effects URL) one effect;
2. ``compensate_unknown``: a compensation whose action never ran answers
   success and applies nothing;
3. ``late_forward``: a forward call after its compensation is refused
   (a permanent 4xx) and applies nothing;
4. ``async_callback``: a 202 is followed by a callback to the request's
   ``callback_url``, which carries the task token (not applicable when the
   service answers at once);
5. ``unknown_fields``: extra body fields and headers are tolerated.

The optional effects URL answers ``GET <url>?idempotency_key=K`` with
``{"effects": <number of effects applied under K>}``.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx

from workflows_app.activities.base import step_idempotency_key

STEP = "contract_check"
RETRYABLE = frozenset({408, 425, 429})
PASS, FAIL, NOT_APPLICABLE = "pass", "FAIL", "n/a"


@dataclasses.dataclass(frozen=True)
class Verdict:
    rule: str
    title: str
    verdict: str
    detail: str


@dataclasses.dataclass
class Reply:
    status: int
    body: Any

    def __str__(self) -> str:
        return f"{self.status} {json.dumps(self.body)[:200]}"


class CallbackSink:
    """A loopback endpoint standing in for Saga Desk's callback API."""

    def __init__(self, host: str) -> None:
        received: dict[str, Any] = {}
        arrived = threading.Condition()

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                token = self.path.rstrip("/").rsplit("/", 1)[-1]
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = raw.decode(errors="replace")
                with arrived:
                    received[token] = body
                    arrived.notify_all()
                payload = b'{"accepted": true, "replay": false}'
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.received, self.arrived = received, arrived
        self.server = ThreadingHTTPServer((host, 0), Handler)
        self.server.daemon_threads = True
        port = self.server.server_address[1]
        self.base = f"http://{host}:{port}/api/v1/callbacks"

    def wait(self, tokens: list[str], timeout: float) -> dict[str, Any]:
        """The callbacks received once all of ``tokens`` arrived or
        ``timeout`` passed (keyed by the token in their path)."""
        with self.arrived:
            self.arrived.wait_for(
                lambda: all(t in self.received for t in tokens), timeout
            )
            return dict(self.received)


@contextmanager
def callback_sink(host: str) -> Iterator[CallbackSink]:
    sink = CallbackSink(host)
    thread = threading.Thread(target=sink.server.serve_forever, daemon=True)
    thread.start()
    try:
        yield sink
    finally:
        sink.server.shutdown()
        sink.server.server_close()


@dataclasses.dataclass
class Probe:
    action_url: str
    compensation_url: str | None
    effects_url: str | None
    headers: Mapping[str, str]
    sink: CallbackSink
    timeout: float
    callback_wait: float
    http: httpx.Client

    def call(
        self,
        url: str,
        instance: str,
        direction: str,
        *,
        attempt: int = 1,
        extra: Mapping[str, Any] | None = None,
        extra_headers: Mapping[str, str] | None = None,
    ) -> tuple[Reply, str]:
        """One call as the engine makes it; the reply and the task token."""
        token = str(uuid.uuid4())
        body = {
            "instance_id": instance,
            "definition": "contract-check",
            "business_key": f"contract-{instance[:8]}",
            "step": STEP,
            "direction": direction,
            "attempt": attempt,
            "run": 1,
            "task_token": token,
            "callback_url": f"{self.sink.base}/{token}",
            "deadline": None,
            "input": {},
            "outputs": {},
            **(extra or {}),
        }
        headers = {
            "Content-Type": "application/json",
            "Accept": "application/json",
            **self.headers,
            **(extra_headers or {}),
            "Idempotency-Key": step_idempotency_key(instance, STEP, direction),
        }
        answer = self.http.post(url, content=json.dumps(body), headers=headers)
        try:
            data = answer.json()
        except ValueError:
            data = answer.text[:500]
        return Reply(answer.status_code, data), token

    def effects(self, instance: str, direction: str) -> int | None:
        if not self.effects_url:
            return None
        key = step_idempotency_key(instance, STEP, direction)
        answer = self.http.get(
            self.effects_url, params={"idempotency_key": key}, headers=self.headers
        )
        answer.raise_for_status()
        return int(answer.json()["effects"])


def _ok(reply: Reply) -> bool:
    return 200 <= reply.status < 300


def rule_replay(p: Probe) -> Verdict:
    title = "the same Idempotency-Key twice gives the same answer and one effect"
    instance = str(uuid.uuid4())
    first, token1 = p.call(p.action_url, instance, "action", attempt=1)
    second, token2 = p.call(p.action_url, instance, "action", attempt=2)
    if not _ok(first):
        return Verdict("replay", title, FAIL, f"the action did not succeed: {first}")
    if (first.status, first.body) != (second.status, second.body):
        return Verdict(
            "replay", title, FAIL, f"first answer {first}, replay answered {second}"
        )
    effects = p.effects(instance, "action")
    if first.status == 202 and effects is not None:
        # Count the effects once the accepted work has been reported.
        p.sink.wait([token1, token2], p.callback_wait)
        effects = p.effects(instance, "action")
    if effects is not None and effects != 1:
        return Verdict("replay", title, FAIL, f"{effects} effects for one key")
    how = "one effect" if effects is not None else "no effects URL: answers compared"
    return Verdict("replay", title, PASS, f"{first.status} twice, {how}")


def rule_compensate_unknown(p: Probe) -> Verdict:
    title = "a compensation whose action never ran succeeds without an effect"
    if not p.compensation_url:
        return Verdict("compensate_unknown", title, NOT_APPLICABLE, "no --compensation")
    instance = str(uuid.uuid4())
    reply, _ = p.call(p.compensation_url, instance, "compensation")
    if not _ok(reply) or reply.status == 202:
        return Verdict(
            "compensate_unknown",
            title,
            FAIL,
            f"answered {reply}; a compensation must answer 2xx at once "
            "(it cannot wait for a callback)",
        )
    done = p.effects(instance, "compensation"), p.effects(instance, "action")
    if done[0] is not None and any(done):
        return Verdict(
            "compensate_unknown",
            title,
            FAIL,
            f"effects reported: compensation {done[0]}, action {done[1]}",
        )
    return Verdict("compensate_unknown", title, PASS, f"answered {reply.status}")


def rule_late_forward(p: Probe) -> Verdict:
    title = "a forward call after its compensation is refused"
    if not p.compensation_url:
        return Verdict("late_forward", title, NOT_APPLICABLE, "no --compensation")
    instance = str(uuid.uuid4())
    undo, _ = p.call(p.compensation_url, instance, "compensation")
    late, token = p.call(p.action_url, instance, "action")
    if not _ok(undo):
        return Verdict("late_forward", title, FAIL, f"the compensation answered {undo}")
    if late.status == 202:
        # An asynchronous service refuses in its callback instead.
        result = p.sink.wait([token], p.callback_wait).get(token)
        refused = isinstance(result, dict) and (
            result.get("status") == "failed" and result.get("permanent") is True
        )
        how = f"accepted (202), then reported {result}"
    else:
        refused = 400 <= late.status < 500 and late.status not in RETRYABLE
        how = f"the late forward call answered {late}"
    if not refused:
        return Verdict(
            "late_forward", title, FAIL, f"{how}; expected a permanent refusal"
        )
    if p.effects(instance, "action"):
        return Verdict("late_forward", title, FAIL, f"refused ({how}) but applied")
    return Verdict("late_forward", title, PASS, how)


def rule_async_callback(p: Probe) -> Verdict:
    title = "a 202 is followed by a callback carrying the task token"
    instance = str(uuid.uuid4())
    reply, token = p.call(p.action_url, instance, "action")
    if reply.status != 202:
        return Verdict(
            "async_callback",
            title,
            NOT_APPLICABLE,
            f"answered {reply.status} at once (no 202 to follow)",
        )
    received = p.sink.wait([token], p.callback_wait)
    if token not in received:
        others = ", ".join(received) or "none"
        return Verdict(
            "async_callback",
            title,
            FAIL,
            f"no callback for task token {token} within {p.callback_wait:g}s "
            f"(callbacks seen for: {others})",
        )
    body = received[token]
    if not isinstance(body, dict) or body.get("status") not in {"succeeded", "failed"}:
        return Verdict(
            "async_callback", title, FAIL, f"the callback body is not a result: {body}"
        )
    return Verdict("async_callback", title, PASS, f"callback: {body['status']}")


def rule_unknown_fields(p: Probe) -> Verdict:
    title = "unknown request fields and headers are tolerated"
    instance = str(uuid.uuid4())
    reply, _ = p.call(
        p.action_url,
        instance,
        "action",
        extra={"x_future_field": {"added": "later"}, "priority": 3},
        extra_headers={"X-Saga-Future": "1"},
    )
    if not _ok(reply):
        return Verdict("unknown_fields", title, FAIL, f"answered {reply}")
    return Verdict("unknown_fields", title, PASS, f"answered {reply.status}")


RULES: list[Callable[[Probe], Verdict]] = [
    rule_replay,
    rule_compensate_unknown,
    rule_late_forward,
    rule_async_callback,
    rule_unknown_fields,
]


def check(
    action_url: str,
    *,
    compensation_url: str | None = None,
    effects_url: str | None = None,
    headers: Mapping[str, str] | None = None,
    timeout: float = 10.0,
    callback_wait: float = 10.0,
    callback_host: str = "127.0.0.1",
) -> list[Verdict]:
    """Run every rule; a rule whose probe cannot reach the service fails."""
    verdicts = []
    with callback_sink(callback_host) as sink, httpx.Client(timeout=timeout) as http:
        probe = Probe(
            action_url,
            compensation_url,
            effects_url,
            dict(headers or {}),
            sink,
            timeout,
            callback_wait,
            http,
        )
        for rule in RULES:
            try:
                verdicts.append(rule(probe))
            except (httpx.HTTPError, ValueError, KeyError) as exc:
                name = rule.__name__.removeprefix("rule_")
                verdicts.append(
                    Verdict(name, name, FAIL, f"{type(exc).__name__}: {exc}")
                )
    return verdicts
