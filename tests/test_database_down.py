"""The database goes away under a running server, then comes back.

A PostgreSQL cluster of its own (initdb into a temporary folder, its own
port; the shared server on 5432 is never touched) and gunicorn serving the
app from it. While the cluster is stopped (``pg_ctl stop -m immediate``, as a
crash would), the API answers 503 with ``Retry-After`` in its error envelope
and the pages a friendly 503 page; once it is started again, the same token
and the same session work again.
"""

from __future__ import annotations

import glob
import http.client
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlencode

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
SETUP = """
import json
from django.contrib.auth.models import User
from tests.support import make_definition
from workflows_app.models import ApiToken
make_definition("wf")
User.objects.create_superuser("olga", "olga@localhost", "pw-olga-123")
print(json.dumps({"token": ApiToken.issue("client", ["start", "read"])[1]}))
"""


def _pg_bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    assert found, f"no PostgreSQL {name} under /usr/lib/postgresql/*/bin"
    return found[-1]


def _free_port(start: int) -> int:
    for port in range(start, start + 200):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError("no free port")


def _wait_for_port(port: int, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(log.read_text()[-3000:]) from None
            time.sleep(0.2)


class Cluster:
    """A throwaway PostgreSQL cluster, run by the postgres OS user when the
    tests run as root (PostgreSQL refuses to run as root)."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="saga-pg-"))
        self.data = self.dir / "data"
        self.port = _free_port(55500)
        self.as_owner: list[str] = []
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres", "postgres")
            self.as_owner = ["runuser", "-u", "postgres", "--"]
        self._run(
            _pg_bin("initdb"),
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
        )

    def _run(self, *args: str) -> None:
        subprocess.run(
            [*self.as_owner, *args], check=True, capture_output=True, timeout=120
        )

    @property
    def url(self) -> str:
        return f"postgres://postgres@127.0.0.1:{self.port}/saga"

    def start(self) -> None:
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 "
            f"-c unix_socket_directories={self.dir}"
        )
        self._run(
            _pg_bin("pg_ctl"),
            "-D",
            str(self.data),
            "-o",
            options,
            "-l",
            str(self.dir / "postgres.log"),
            "-w",
            "start",
        )

    def stop(self) -> None:
        self._run(_pg_bin("pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop")

    def remove(self) -> None:
        subprocess.run(
            [
                *self.as_owner,
                _pg_bin("pg_ctl"),
                "-D",
                str(self.data),
                "-m",
                "immediate",
                "stop",
            ],
            capture_output=True,
            timeout=60,
        )
        shutil.rmtree(self.dir, ignore_errors=True)


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode()


@dataclass
class Http:
    """Plain HTTP with a cookie jar of its own (the browser of the test)."""

    port: int
    cookies: dict[str, str] = field(default_factory=dict)

    def __call__(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> Reply:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        sent = dict(headers or {})
        if self.cookies:
            sent["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        conn.request(method, path, body=body, headers=sent)
        response = conn.getresponse()
        reply = Reply(
            response.status,
            {k.lower(): v for k, v in response.getheaders()},
            response.read(),
        )
        for name, value in response.getheaders():
            if name.lower() == "set-cookie":
                key, _, rest = value.partition("=")
                self.cookies[key] = rest.split(";", 1)[0]
        conn.close()
        return reply

    def log_in(self, username: str, password: str) -> None:
        page = self("GET", "/login/")
        token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text)
        assert token, page.text[:500]
        form = urlencode(
            {
                "username": username,
                "password": password,
                "csrfmiddlewaretoken": token.group(1),
            }
        )
        reply = self(
            "POST",
            "/login/",
            form.encode(),
            {"Content-Type": "application/x-www-form-urlencoded"},
        )
        assert reply.status == 302, reply.text[:500]
        assert "sessionid" in self.cookies


@pytest.fixture
def server() -> Iterator[tuple[Cluster, int, str, Path]]:
    """Cluster, migrated, with a definition, a superuser and an API token;
    gunicorn serving from it. Yields the cluster, gunicorn's port, the token
    and gunicorn's log."""
    cluster = Cluster()
    var = Path(tempfile.mkdtemp(prefix="saga-var-"))
    env = {
        **os.environ,
        "DATABASE_URL": cluster.url,
        # Its own filesystem broker: nothing here reaches the shared Redis.
        "CELERY_BROKER_URL": "filesystem://",
        "SAGA_DESK_VAR_DIR": str(var),
        "PYTHONPATH": str(ROOT),
        "PYTHONUNBUFFERED": "1",  # the test reads the log while it runs
    }
    log = var / "gunicorn.log"
    gunicorn = None
    try:
        cluster.start()
        subprocess.run(
            [
                *cluster.as_owner,
                _pg_bin("createdb"),
                "-h",
                "127.0.0.1",
                "-p",
                str(cluster.port),
                "-U",
                "postgres",
                "saga",
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )
        manage = [sys.executable, str(ROOT / "manage.py")]
        subprocess.run(
            [*manage, "migrate", "--no-input"],
            env=env,
            cwd=ROOT,
            check=True,
            capture_output=True,
            timeout=300,
        )
        setup = subprocess.run(
            [*manage, "shell", "-c", SETUP],
            env=env,
            cwd=ROOT,
            check=True,
            capture_output=True,
            timeout=120,
        )
        token = json.loads(setup.stdout.decode().strip().splitlines()[-1])["token"]
        port = _free_port(56000)
        with log.open("wb") as out:
            gunicorn = subprocess.Popen(
                [
                    str(BIN / "gunicorn"),
                    "workflows_app.wsgi",
                    "--bind",
                    f"127.0.0.1:{port}",
                    "--workers",
                    "1",
                ],
                env=env,
                cwd=ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        _wait_for_port(port, gunicorn, log)
        yield cluster, port, token, log
    finally:
        if gunicorn is not None:
            gunicorn.terminate()
            gunicorn.wait(timeout=30)
        cluster.remove()
        shutil.rmtree(var, ignore_errors=True)


def assert_unavailable_json(reply: Reply) -> None:
    assert reply.status == 503, (reply.status, reply.body[:300])
    assert reply.headers["content-type"].startswith("application/json")
    assert int(reply.headers["retry-after"]) > 0
    body = json.loads(reply.body)
    assert set(body) == {"error"}
    assert body["error"]["code"] == "database_unavailable"
    assert "database is unavailable" in body["error"]["message"]


def assert_unavailable_page(reply: Reply) -> None:
    assert reply.status == 503, (reply.status, reply.body[:300])
    assert reply.headers["content-type"].startswith("text/html")
    assert int(reply.headers["retry-after"]) > 0
    assert "Saga Desk is temporarily unavailable" in reply.text
    assert "Server Error" not in reply.text
    # Styled like every page, under the same strict policy.
    assert "/static/css/saga.css" in reply.text
    assert "default-src 'self'" in reply.headers["content-security-policy"]


def test_database_down_is_a_503_and_the_app_recovers(server):
    cluster, port, token, log = server
    api = Http(port)
    auth = {"Authorization": f"Bearer {token}"}
    start = {**auth, "Content-Type": "application/json", "Idempotency-Key": "k-1"}
    browser = Http(port)
    browser.log_in("olga", "pw-olga-123")

    # Up: the API, a page with the logged-in session, the health check.
    started = api(
        "POST", "/api/v1/workflows/wf/instances", b'{"business_key": "b-1"}', start
    )
    assert started.status == 202, started.text
    instance = json.loads(started.body)["id"]
    assert api("GET", "/api/v1/instances", headers=auth).status == 200
    assert browser("GET", "/").status == 200
    assert browser("GET", f"/instances/{instance}/").status == 200
    assert api("GET", "/health").status == 200

    cluster.stop()

    assert_unavailable_json(api("GET", "/api/v1/instances", headers=auth))
    assert_unavailable_json(api("GET", f"/api/v1/instances/{instance}", headers=auth))
    assert_unavailable_json(
        api(
            "POST",
            "/api/v1/workflows/wf/instances",
            b'{"business_key": "b-2"}',
            {**start, "Idempotency-Key": "k-2"},
        )
    )
    assert_unavailable_page(browser("GET", "/"))
    assert_unavailable_page(browser("GET", f"/instances/{instance}/"))
    assert_unavailable_page(
        browser("GET", f"/instances/{instance}/", headers={"HX-Request": "true"})
    )
    assert_unavailable_page(browser("GET", "/admin/"))
    # Forms too: an operator's action, and a login.
    form = {
        "Content-Type": "application/x-www-form-urlencoded",
        "X-CSRFToken": browser.cookies["csrftoken"],
    }
    action = f"/instances/{instance}/actions/cancel/"
    assert_unavailable_page(browser("POST", action, b"reason=x&version=1", form))
    visitor = Http(port)
    login = visitor("GET", "/login/")
    assert login.status == 200  # the form itself needs no database
    token_field = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', login.text)
    assert token_field
    credentials = urlencode(
        {
            "username": "olga",
            "password": "pw-olga-123",
            "csrfmiddlewaretoken": token_field.group(1),
        }
    )
    assert_unavailable_page(
        visitor(
            "POST",
            "/login/",
            credentials.encode(),
            {"Content-Type": "application/x-www-form-urlencoded"},
        )
    )
    health = api("GET", "/health")
    assert health.status == 503
    assert json.loads(health.body)["checks"]["database"].startswith("error")

    cluster.start()

    # Back: the same token and the same session (the outage logged no one out).
    assert api("GET", "/api/v1/instances", headers=auth).status == 200
    page = browser("GET", f"/instances/{instance}/")
    assert page.status == 200, page.text[:300]
    assert "b-1" in page.text
    assert browser("GET", "/").status == 200
    retried = api(
        "POST",
        "/api/v1/workflows/wf/instances",
        b'{"business_key": "b-2"}',
        {**start, "Idempotency-Key": "k-2"},
    )
    assert retried.status == 202, retried.text
    assert api("GET", "/health").status == 200
    # Logged as what it was, never as an unexpected error.
    assert "database unavailable in GET /api/v1/instances" in log.read_text()
    assert "Internal Server Error" not in log.read_text()
    assert "Traceback" not in log.read_text()
