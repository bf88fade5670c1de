"""The demo participants as HTTP services.

Same ledger and semantics as the in-process demo activities
(:mod:`workflows_app.demo.activities`): one effect per idempotency key, a
compensation of an action that never ran is a no-op, a forward call after
its compensation is refused, and the instance input's ``simulate`` modes
work the same way. Endpoints::

    POST /<service>/action         the forward call (http.request's body)
    POST /<service>/compensation   its undo
    GET  /effects?idempotency_key=K  {"idempotency_key", "effects", "calls"}

Answers: 200 with the result; 422 declined (permanent); 409 refused because
the call was already compensated; 503 temporarily unavailable; 400 without
an ``Idempotency-Key``. ``?reply=async`` answers 202 at once and reports the
result later to the request's ``callback_url`` with a ``report``-scope token
(``--callback-token``). ``lose_confirmation`` applies the effect and then
resets the connection: the reply is lost on the wire.

Run with ``SAGA_DEMO=1 python manage.py serve_participants --port 8001``.
"""

from __future__ import annotations

import json
import logging
import socket
import struct
import threading
import time
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
from django.db import connection

from workflows_app.activities.base import ActivityContext, ActivityError
from workflows_app.demo.activities import perform_action, perform_compensation
from workflows_app.demo.models import ParticipantEffect

log = logging.getLogger(__name__)
SERVICES = frozenset(
    {
        "inventory",
        "payments",
        "shipping",
        "notifications",
        "car-rental",
        "hotels",
        "airline",
        "generic",
    }
)
CALLBACK_TRIES = 5


def reset_connection(sock: socket.socket) -> None:
    """Close with a TCP reset instead of an orderly end: what a crashed
    service or a dropped link looks like to the caller."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def context_from(body: dict[str, Any], key: str, direction: str) -> ActivityContext:
    deadline = body.get("deadline")
    return ActivityContext(
        instance_id=str(body["instance_id"]),
        business_key=str(body.get("business_key", "")),
        definition_key=str(body.get("definition", "")),
        input=body.get("input") or {},
        outputs=body.get("outputs") or {},
        step_name=str(body["step"]),
        # do_POST accepted only "action" or "compensation".
        direction=direction,  # type: ignore[arg-type]
        attempt=int(body.get("attempt", 1)),
        idempotency_key=key,
        deadline=datetime.fromisoformat(deadline) if deadline else None,
        task_token=str(body.get("task_token", "")),
        run=int(body.get("run", 1)),
    )


def perform(service: str, direction: str, ctx: ActivityContext) -> tuple[int, Any]:
    """Run the demo participant; the HTTP status and body it answers with."""
    try:
        if direction == "action":
            return 200, perform_action(ctx, service)
        return 200, perform_compensation(ctx, service)
    except ActivityError as exc:
        if "reply was lost" in str(exc):
            raise  # lose_confirmation: the handler drops the connection
        if not exc.permanent:
            return 503, {"error": str(exc)}
        return (409 if "refuses" in str(exc) else 422), {"error": str(exc)}
    finally:
        # Each request has a thread of its own, so its connection too.
        connection.close()


class ParticipantHandler(BaseHTTPRequestHandler):
    server_version = "saga-desk-participants"
    protocol_version = "HTTP/1.1"  # keep-alive, as real services answer
    callback_token = ""

    def log_message(self, format: str, *args: Any) -> None:
        log.info("%s %s", self.address_string(), format % args)

    def _reply(self, status: int, data: Any) -> None:
        payload = json.dumps(data).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        if url.path != "/effects":
            return self._reply(404, {"error": "no such endpoint"})
        key = (parse_qs(url.query).get("idempotency_key") or [""])[0]
        try:
            row = ParticipantEffect.objects.filter(idempotency_key=key).first()
        finally:
            connection.close()
        effects = int(bool(row and row.applied))
        calls = row.calls if row else 0
        self._reply(200, {"idempotency_key": key, "effects": effects, "calls": calls})

    def do_POST(self) -> None:
        url = urlsplit(self.path)
        service, _, direction = url.path.strip("/").partition("/")
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length)
        if service not in SERVICES or direction not in {"action", "compensation"}:
            return self._reply(404, {"error": "no such endpoint"})
        key = self.headers.get("Idempotency-Key", "")
        if not key:
            return self._reply(400, {"error": "the Idempotency-Key header is missing"})
        try:
            body = json.loads(raw)
            ctx = context_from(body, key, direction)
        except (ValueError, KeyError, TypeError) as exc:
            return self._reply(400, {"error": f"unreadable request: {exc}"})
        if parse_qs(url.query).get("reply") == ["async"] and direction == "action":
            self._reply(202, {"accepted": True})
            threading.Thread(
                target=self._report_later,
                args=(service, ctx, str(body.get("callback_url", ""))),
                daemon=True,
            ).start()
            return None
        try:
            status, data = perform(service, direction, ctx)
        except ActivityError:
            self.close_connection = True
            reset_connection(self.connection)
            return None
        return self._reply(status, data)

    def _report_later(self, service: str, ctx: ActivityContext, url: str) -> None:
        """Do the work after the 202, then report it with the task token."""
        try:
            status, data = perform(service, "action", ctx)
        except ActivityError as exc:
            status, data = 503, {"error": str(exc)}
        result: dict[str, Any] = {"id": f"{ctx.idempotency_key}:{ctx.attempt}"}
        if status == 200:
            result.update(status="succeeded", output=data)
        else:
            result.update(
                status="failed", error=data["error"], permanent=status in {409, 422}
            )
        token = self.callback_token
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        for attempt in range(CALLBACK_TRIES):
            time.sleep(0.2 * attempt)
            try:
                answer = httpx.post(url, json=result, headers=headers, timeout=10)
            except httpx.HTTPError as exc:
                log.warning("callback to %s failed: %s", url, exc)
                continue
            if answer.status_code < 500:
                return
        log.error("gave up reporting %s to %s", ctx.idempotency_key, url)


def make_server(
    host: str = "127.0.0.1", port: int = 0, *, callback_token: str = ""
) -> ThreadingHTTPServer:
    handler = type("Handler", (ParticipantHandler,), {"callback_token": callback_token})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server
