"""PostgreSQL connections carry TCP keepalives and a connect timeout
(settings: ``DATABASE_KEEPALIVES*``, ``DATABASE_CONNECT_TIMEOUT``).

Read back from the open connection: what libpq was given
(``get_dsn_parameters``) and what the kernel's socket has (``getsockopt`` on
the connection's own file descriptor); the timeout is seen at work against a
server that accepts the TCP connection and never answers.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from django.conf import settings
from django.db import connection

from tests.celery_processes import database_url

ROOT = Path(__file__).resolve().parent.parent

# Prints what one fresh Django process's connection got.
PROBE = """
import json, os, socket
import django
django.setup()
from django.db import connection
connection.ensure_connection()
raw = connection.connection
sock = socket.socket(fileno=os.dup(raw.fileno()))
print(json.dumps({
    "dsn": raw.get_dsn_parameters(),
    "socket": [
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
        sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
        sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
        sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
    ],
}))
"""


def _socket_options(fileno: int) -> list[int]:
    sock = socket.socket(fileno=os.dup(fileno))  # a copy: closing it is harmless
    try:
        return [
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
        ]
    finally:
        sock.close()


def _django(url: str, timeout: float, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", PROBE],
        cwd=ROOT,
        env={
            **{k: v for k, v in os.environ.items() if not k.startswith("DATABASE_")},
            "DATABASE_URL": url,
            "PYTHONPATH": str(ROOT),
            "DJANGO_SETTINGS_MODULE": "workflows_app.settings",
            **env,
        },
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def postgres_url() -> str:
    db = settings.DATABASES["default"]
    assert db["ENGINE"] == "workflows_app.postgres", "needs PostgreSQL"
    assert db.get("HOST"), "needs a TCP connection (keepalives); set HOST"
    return database_url()  # the test run's database, without the test_ prefix


@pytest.mark.django_db
def test_defaults_reach_the_connection_and_its_socket(postgres_url):
    connection.ensure_connection()
    raw = connection.connection
    dsn = raw.get_dsn_parameters()
    assert {k: dsn.get(k) for k in ("keepalives", "connect_timeout")} == {
        "keepalives": "1",
        "connect_timeout": "10",
    }
    assert dsn["keepalives_idle"] == "30"
    assert _socket_options(raw.fileno()) == [1, 30, 10, 3]


def test_environment_and_url_override_the_defaults(postgres_url):
    env = {
        "DATABASE_KEEPALIVES_IDLE": "41",
        "DATABASE_KEEPALIVES_INTERVAL": "7",
        "DATABASE_KEEPALIVES_COUNT": "5",
        "DATABASE_CONNECT_TIMEOUT": "4",
    }
    done = _django(postgres_url, 60, **env)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.splitlines()[-1])
    assert seen["dsn"]["connect_timeout"] == "4"
    assert seen["socket"] == [1, 41, 7, 5]

    # The URL's query string is the more specific: it wins over both.
    done = _django(f"{postgres_url}?keepalives_idle=53&connect_timeout=6", 60, **env)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.splitlines()[-1])
    assert seen["dsn"]["connect_timeout"] == "6"
    assert seen["socket"] == [1, 53, 7, 5]

    # Off means libpq and the kernel's defaults: no keepalive on the socket.
    done = _django(postgres_url, 60, DATABASE_KEEPALIVES="0")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1])["socket"][0] == 0


def test_a_server_that_never_answers_fails_the_connection_after_the_timeout():
    # Accepts the TCP connection (the kernel does, from the backlog) and never
    # sends a byte: a hung or half-failed-over server. Without connect_timeout
    # libpq waits for its reply forever.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        started = time.monotonic()
        done = _django(
            f"postgres://postgres@127.0.0.1:{port}/nothing",
            60,
            DATABASE_CONNECT_TIMEOUT="2",
        )
        took = time.monotonic() - started
    assert done.returncode != 0
    assert "timeout expired" in done.stderr, done.stderr[-2000:]
    # Django's start-up is about a second of it; libpq allows 2 s per
    # address tried (one here).
    assert took < 20, took
