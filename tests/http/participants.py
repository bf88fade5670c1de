"""Participants for the contract check and the end-to-end test: the demo
participants in their own process, and a deliberately broken one in memory
that breaks one rule of the saga contract at a time."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx

from tests.celery_processes import ROOT, process_env

# The callback token the demo participant process uses (a row with this
# token is created by the tests that need callbacks to be accepted).
CALLBACK_TOKEN = "sd_participants-callback-token-for-the-tests-0001"
KNOWN_FIELDS = {
    "instance_id",
    "definition",
    "business_key",
    "step",
    "direction",
    "attempt",
    "run",
    "task_token",
    "callback_url",
    "deadline",
    "input",
    "outputs",
}


@contextmanager
def demo_participants() -> Iterator[str]:
    """``manage.py serve_participants`` on a free port, against the test
    database; yields its base URL."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "manage.py",
            "serve_participants",
            "--port",
            "0",
            "--callback-token",
            CALLBACK_TOKEN,
        ],
        cwd=ROOT,
        env=process_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()
        assert "listening on" in line, f"serve_participants said {line!r}"
        yield line.rsplit(" ", 1)[-1].strip()
    finally:
        proc.terminate()
        proc.wait(10)


class BrokenLedger:
    """An in-memory participant; each flag breaks one rule."""

    FLAGS = frozenset(
        {
            "no_dedupe",  # every call applies again and answers differently
            "compensation_needs_action",  # 404 when there is nothing to undo
            "accepts_late_forward",  # applies a forward call after its undo
            "callback_wrong_token",  # 202, then reports to another token
            "strict_fields",  # 400 on fields it does not know
        }
    )

    def __init__(self, *flags: str) -> None:
        assert set(flags) <= self.FLAGS, flags
        self.flags = set(flags)
        self.effects: dict[str, int] = {}
        self.lock = threading.Lock()

    def action(self, key: str, body: dict[str, Any]) -> tuple[int, Any]:
        if "strict_fields" in self.flags and set(body) - KNOWN_FIELDS:
            return 400, {"error": f"unknown fields {sorted(set(body) - KNOWN_FIELDS)}"}
        undo = key.rsplit(":", 1)[0] + ":compensation"
        with self.lock:
            if undo in self.effects and "accepts_late_forward" not in self.flags:
                return 409, {"error": "already compensated"}
            if "no_dedupe" in self.flags:
                self.effects[key] = self.effects.get(key, 0) + 1
                return 200, {"reference": str(uuid.uuid4())}
            self.effects[key] = 1
            return 200, {"reference": f"ref-{key}"}

    def compensation(self, key: str) -> tuple[int, Any]:
        forward = key.rsplit(":", 1)[0] + ":action"
        with self.lock:
            applied = self.effects.get(forward, 0) > 0
            if not applied and "compensation_needs_action" in self.flags:
                return 404, {"error": "no such charge"}
            # The undo is remembered (so a late forward call is refused) but
            # counts as an effect only when something was undone.
            self.effects.setdefault(key, 0)
            if applied:
                self.effects[key] = 1
            return 200, {"undone": applied}


def _post_quietly(url: str, result: dict[str, Any]) -> None:
    # The check may have finished (and closed its receiver) already.
    with suppress(httpx.HTTPError):
        httpx.post(url, json=result, timeout=5)


def _handler(ledger: BrokenLedger) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _reply(self, status: int, data: Any) -> None:
            payload = json.dumps(data).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def do_GET(self) -> None:
            query = parse_qs(urlsplit(self.path).query)
            key = query["idempotency_key"][0]
            with ledger.lock:
                self._reply(200, {"effects": ledger.effects.get(key, 0)})

        def do_POST(self) -> None:
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            body, key = json.loads(raw), self.headers["Idempotency-Key"]
            path = urlsplit(self.path).path
            if path == "/compensation":
                return self._reply(*ledger.compensation(key))
            status, data = ledger.action(key, body)
            if status == 200 and "callback_wrong_token" in ledger.flags:
                self._reply(202, {"accepted": True})
                base = body["callback_url"].rsplit("/", 1)[0]
                wrong = f"{base}/{uuid.uuid4()}"
                result = {"id": key, "status": "succeeded", "output": data}
                threading.Thread(target=_post_quietly, args=(wrong, result)).start()
                return None
            return self._reply(status, data)

    return Handler


@contextmanager
def broken_participant(*flags: str) -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(BrokenLedger(*flags)))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
