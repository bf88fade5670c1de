"""Scriptable HTTP servers on loopback for the HTTP activity's tests.

A ``Script`` maps a path to a list of replies, one per request (the last
one repeats). Every request is recorded with its client port, so a test can
see the headers and body that arrived and whether a connection was reused.
"""

from __future__ import annotations

import dataclasses
import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from workflows_app.demo.participants_server import reset_connection


@dataclasses.dataclass
class Reply:
    status: int = 200
    body: Any = dataclasses.field(default_factory=lambda: {"ok": True})
    headers: dict[str, str] = dataclasses.field(default_factory=dict)
    delay: float = 0.0  # seconds before answering
    # Send the headers and this many body bytes, then reset the connection.
    reset_after: int | None = None
    # Send the body without Content-Length (chunked), so only reading tells
    # its size.
    chunked: bool = False

    def payload(self) -> bytes:
        if isinstance(self.body, bytes):
            return self.body
        return json.dumps(self.body).encode()


@dataclasses.dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    client_port: int

    def json(self) -> Any:
        return json.loads(self.body)


class Script:
    def __init__(self) -> None:
        self.replies: dict[str, list[Reply]] = {}
        self.seen: list[Seen] = []
        self.lock = threading.Lock()

    def on(self, path: str, *replies: Reply) -> Script:
        self.replies[path] = list(replies)
        return self

    def next_reply(self, path: str) -> Reply:
        with self.lock:
            queue = self.replies.get(path) or [Reply(404, {"error": "no route"})]
            return queue.pop(0) if len(queue) > 1 else queue[0]


def _handler(script: Script) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            with script.lock:
                script.seen.append(
                    Seen(
                        self.command,
                        self.path,
                        dict(self.headers.items()),
                        body,
                        self.client_address[1],
                    )
                )
            reply = script.next_reply(self.path.split("?")[0])
            time.sleep(reply.delay)
            payload = reply.payload()
            self.send_response(reply.status)
            for name, value in reply.headers.items():
                self.send_header(name, value)
            self.send_header("Content-Type", "application/json")
            if reply.chunked:
                self.send_header("Transfer-Encoding", "chunked")
            else:
                self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if reply.reset_after is not None:
                self.wfile.write(payload[: reply.reset_after])
                self.wfile.flush()
                self.close_connection = True
                reset_connection(self.connection)
                return
            if reply.chunked:
                for start in range(0, len(payload), 4096):
                    chunk = payload[start : start + 4096]
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                self.wfile.write(b"0\r\n\r\n")
            else:
                self.wfile.write(payload)

        do_GET = do_POST = do_PUT = do_DELETE = _serve

    return Handler


@contextmanager
def serving(script: Script, host: str = "127.0.0.1") -> Iterator[str]:
    """Serve ``script``; yields the base URL (``http://host:port``)."""
    server = ThreadingHTTPServer((host, 0), _handler(script))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://{host}:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def closed_port() -> int:
    """A loopback port with nothing listening (connection refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
