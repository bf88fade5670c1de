"""A scrape endpoint on a Celery worker machine that serves no web traffic.

Counters live in the multiprocess folder of the machine where they were
incremented. Where web and workers share a machine (and the folder), the
web's ``/metrics`` already includes the workers' counters. A worker machine
of its own sets ``SAGA_METRICS_WORKER_BIND=host:port``: the worker's main
process then serves its machine's counters there (the same token applies),
without the database gauges, which the web endpoint reports once for the site.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from django.conf import settings

from workflows_app.monitoring import exposition

log = logging.getLogger(__name__)

StartResponse = Callable[..., Any]


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        """Scrapes every few seconds would drown the worker's log."""


def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
    if environ.get("PATH_INFO", "/") not in {"/", "/metrics"}:
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"404 Not Found\n"]
    if environ.get("REQUEST_METHOD") not in {"GET", "HEAD"}:
        start_response("405 Method Not Allowed", [("Allow", "GET, HEAD")])
        return [b""]
    header = environ.get("HTTP_AUTHORIZATION")
    if not exposition.authorized(header, settings.SAGA_METRICS_TOKEN):
        start_response(
            "401 Unauthorized",
            [
                ("Content-Type", "text/plain; charset=utf-8"),
                ("WWW-Authenticate", 'Bearer realm="metrics"'),
            ],
        )
        return [b"401 Unauthorized\n"]
    body, content_type = exposition.render(
        exposition.process_registry(), environ.get("HTTP_ACCEPT")
    )
    start_response(
        "200 OK", [("Content-Type", content_type), ("Cache-Control", "no-store")]
    )
    return [body]


class _Server6(_Server):
    address_family = socket.AF_INET6


def serve(host: str, port: int) -> _Server:
    """Serve :func:`app` on a daemon thread; returns the bound server."""
    server_class = _Server6 if ":" in host else _Server
    server = make_server(host, port, app, server_class, _QuietHandler)
    threading.Thread(
        target=server.serve_forever, name="saga-metrics-exporter", daemon=True
    ).start()
    return server


def start_from_settings() -> _Server | None:
    """Start the exporter if ``SAGA_METRICS_WORKER_BIND`` asks for one."""
    bind = settings.SAGA_METRICS_WORKER_BIND
    if not bind:
        return None
    host, _, port = bind.rpartition(":")
    server = serve(host.strip("[]") or "0.0.0.0", int(port))
    log.info("metrics exporter listening on %s", bind)
    return server
