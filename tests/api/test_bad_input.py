"""Every class of bad input gets its 4xx with the error envelope and leaves
the database exactly as it was; unexpected errors are JSON 500s. A chunked
body is read like any other (through gunicorn, which decodes chunks)."""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from unittest import mock

import pytest
from django.conf import settings
from django.db import connection
from django.test import override_settings

from tests.api.helpers import (
    assert_envelope,
    counts,
    state_snapshot,
    task_token,
    waiting_definition,
)
from tests.support import make_definition
from workflows_app.models import WorkflowInstance

pytestmark = pytest.mark.django_db(transaction=True)

START = "/api/v1/workflows/wf/instances"
KEY = {"Idempotency-Key": "fresh-key"}
OK_START = {"business_key": "b-1", "input": {}}


def nested(depth):
    value = {}
    for _ in range(depth):
        value = {"x": value}
    return value


def start_cases():
    big = {"business_key": "b", "input": {"blob": "x" * settings.SAGA_API_MAX_BODY}}
    return [
        ("not JSON", START, b"{", KEY, "application/json", 400, "invalid_json"),
        ("not UTF-8", START, b'{"\xff"}', KEY, "application/json", 400, "invalid_json"),
        ("empty body", START, b"", KEY, "application/json", 422, "invalid_request"),
        ("array body", START, [], KEY, "application/json", 422, "invalid_request"),
        ("string body", START, '"x"', KEY, "application/json", 422, "invalid_request"),
        ("no business_key", START, {"input": {}}, KEY, None, 422, "invalid_request"),
        ("business_key int", START, {"business_key": 5}, KEY, None, 422, None),
        (
            "input list",
            START,
            {"business_key": "b", "input": [1]},
            KEY,
            None,
            422,
            None,
        ),
        ("input str", START, {"business_key": "b", "input": "x"}, KEY, None, 422, None),
        ("unknown field", START, {**OK_START, "inputs": {}}, KEY, None, 422, None),
        (
            "NaN",
            START,
            '{"business_key": "b", "input": {"x": NaN}}',
            KEY,
            None,
            400,
            "invalid_json",
        ),
        (
            "1e999",
            START,
            '{"business_key": "b", "input": {"x": 1e999}}',
            KEY,
            None,
            400,
            "invalid_json",
        ),
        (
            "NUL in input",
            START,
            {"business_key": "b", "input": {"x": "a\x00"}},
            KEY,
            None,
            422,
            "invalid_input",
        ),
        (
            "NUL in a key",
            START,
            {"business_key": "b", "input": {"a\x00": 1}},
            KEY,
            None,
            422,
            "invalid_input",
        ),
        (
            "lone surrogate",
            START,
            '{"business_key": "\\ud800"}',
            KEY,
            None,
            400,
            "invalid_json",
        ),
        (
            "too deep",
            START,
            {"business_key": "b", "input": nested(100)},
            KEY,
            None,
            400,
            "invalid_json",
        ),
        ("too large", START, big, KEY, None, 413, "payload_too_large"),
        ("text/plain", START, OK_START, KEY, "text/plain", 415, None),
        (
            "form",
            START,
            "business_key=b",
            KEY,
            "application/x-www-form-urlencoded",
            415,
            "unsupported_media_type",
        ),
        (
            "no Idempotency-Key",
            START,
            OK_START,
            {},
            None,
            400,
            "idempotency_key_required",
        ),
        (
            "Idempotency-Key too long",
            START,
            OK_START,
            {"Idempotency-Key": "k" * 201},
            None,
            400,
            "idempotency_key_required",
        ),
        ("empty business_key", START, {"business_key": ""}, KEY, None, 422, None),
        (
            "blank business_key",
            START,
            {"business_key": "  "},
            KEY,
            None,
            422,
            "invalid_input",
        ),
        ("long business_key", START, {"business_key": "b" * 201}, KEY, None, 422, None),
        (
            "unknown definition",
            "/api/v1/workflows/nope/instances",
            OK_START,
            KEY,
            None,
            404,
            "unknown_definition",
        ),
        (
            "impossible definition key",
            "/api/v1/workflows/No%00pe!/instances",
            OK_START,
            KEY,
            None,
            404,
            "unknown_definition",
        ),
        (
            "draft definition",
            "/api/v1/workflows/draft/instances",
            OK_START,
            KEY,
            None,
            404,
            "unknown_definition",
        ),
        (
            "observed definition",
            "/api/v1/workflows/obs/instances",
            OK_START,
            KEY,
            None,
            422,
            "invalid_input",
        ),
    ]


def inbound_cases(live_token):
    cb = f"/api/v1/callbacks/{live_token}"
    ok_cb = {"id": "m-1", "status": "succeeded"}
    ok_ev = {"id": "e-1", "type": "t", "correlation_key": "b-1"}
    unknown = f"/api/v1/callbacks/{uuid.uuid4()}"
    return [
        ("unknown task token", unknown, ok_cb, {}, None, 404, "unknown_task_token"),
        (
            "malformed task token",
            "/api/v1/callbacks/abc",
            ok_cb,
            {},
            None,
            404,
            "unknown_task_token",
        ),
        ("callback without id", cb, {"status": "succeeded"}, {}, None, 422, None),
        ("callback id int", cb, {**ok_cb, "id": 7}, {}, None, 422, None),
        ("callback id empty", cb, {**ok_cb, "id": ""}, {}, None, 422, None),
        ("callback bad status", cb, {**ok_cb, "status": "done"}, {}, None, 422, None),
        ("permanent as text", cb, {**ok_cb, "permanent": "yes"}, {}, None, 422, None),
        ("callback not JSON", cb, b"status=ok", {}, None, 400, "invalid_json"),
        ("callback extra field", cb, {**ok_cb, "attempt": 1}, {}, None, 422, None),
        (
            "event without type",
            "/api/v1/events",
            {"id": "e-1", "correlation_key": "b-1"},
            {},
            None,
            422,
            "invalid_request",
        ),
        (
            "correlation_key int",
            "/api/v1/events",
            {**ok_ev, "correlation_key": 1},
            {},
            None,
            422,
            None,
        ),
        (
            "payload NaN",
            "/api/v1/events",
            '{"id": "e-1", "type": "t", "correlation_key": "b", "payload": NaN}',
            {},
            None,
            400,
            "invalid_json",
        ),
        (
            "event id too long",
            "/api/v1/events",
            {**ok_ev, "id": "e" * 201},
            {},
            None,
            422,
            None,
        ),
        ("event empty body", "/api/v1/events", b"", {}, None, 422, None),
    ]


# Issue 15's inputs, as JSON text inside each endpoint's free-form value.
EXACT = [
    ("NaN", "NaN", 400, "invalid_json"),
    ("Infinity", "Infinity", 400, "invalid_json"),
    ("-Infinity", "-Infinity", 400, "invalid_json"),
    ("1e999", "1e999", 400, "invalid_json"),
    ("lone surrogate", '"\\ud800"', 400, "invalid_json"),
    ("NUL", '"\\u0000"', 422, "invalid_input"),
    ("NUL in a key", '{"a\\u0000": 1}', 422, "invalid_input"),
    ("5,000 deep", "[" * 5000 + "]" * 5000, 400, "invalid_json"),
    ("65 deep", "[" * 65 + "]" * 65, 400, "invalid_json"),
]


def exact_cases(live_token):
    """Every exact input into every API body that takes free-form JSON."""
    cb = f"/api/v1/callbacks/{live_token}"
    bodies = [
        ("start input", START, '{"business_key": "b", "input": {"a": %s}}', KEY),
        (
            "callback output",
            cb,
            '{"id": "m-9", "status": "succeeded", "output": %s}',
            {},
        ),
        (
            "event payload",
            "/api/v1/events",
            '{"id": "e-9", "type": "t", "correlation_key": "b-1", "payload": %s}',
            {},
        ),
    ]
    cases = [
        (f"{where}: {label}", path, body % value, headers, None, status, code)
        for where, path, body, headers in bodies
        for label, value, status, code in EXACT
    ]
    cases.append(
        (
            "callback error with NUL",
            cb,
            '{"id": "m-9", "status": "failed", "error": "down\\u0000"}',
            {},
            None,
            422,
            "invalid_input",
        )
    )
    return cases


@pytest.fixture
def world(api, transport):
    """A waiting instance (with a live task token), an observed definition
    and a draft; returns the live token."""
    waiting_definition("wf")
    make_definition("draft", publish=False)
    make_definition(
        "obs",
        [{"name": "seen", "action": "", "compensation": "", "awaits_event": "x"}],
        mode="observed",
    )
    started = api.start("wf", business_key="b-1", idempotency_key="first")
    transport.run()
    assert api.status(started.id)["steps"][1]["state"] == "waiting"
    return task_token(started.id)


def check(raw, cases):
    before = state_snapshot()
    failures = []
    for label, path, body, headers, content_type, status, code in cases:
        reply = raw(
            "POST",
            path,
            body,
            headers=headers,
            content_type=content_type or "application/json",
        )
        try:
            assert reply.status == status, (reply.status, reply.raw[:300])
            assert reply.headers["content-type"].startswith("application/json")
            assert_envelope(reply.status, reply.json, code)
            assert counts() == {k: before[k] for k in counts()}
        except AssertionError as exc:
            failures.append(f"{label}: {exc}")
    assert not failures, "\n".join(failures)
    assert state_snapshot() == before


def test_bad_starts_are_refused_and_change_nothing(world, raw):
    check(raw, start_cases())


def test_bad_callbacks_and_events_are_refused_and_change_nothing(world, raw):
    check(raw, inbound_cases(world))


def test_the_exact_inputs_of_issue_15_are_refused_everywhere(world, raw):
    check(raw, exact_cases(world))


def test_unknown_paths_and_methods_answer_in_the_envelope(world, raw):
    before = state_snapshot()
    instance = f"/api/v1/instances/{uuid.uuid4()}"
    cases = [
        ("GET", "/api/v1/nothing", 404, "not_found"),
        ("POST", "/api/v1/nothing", 404, "not_found"),
        ("GET", "/api/v1/", 404, "not_found"),
        ("GET", "/api/v1/instances/not-a-uuid", 404, "not_found"),
        ("GET", instance, 404, "unknown_instance"),
        ("GET", f"{instance}/history", 404, "unknown_instance"),
        ("DELETE", instance, 405, "method_not_allowed"),
        ("GET", "/api/v1/events", 405, "method_not_allowed"),
        ("PUT", "/api/v1/events", 405, "method_not_allowed"),
        ("GET", START, 405, "method_not_allowed"),
    ]
    for method, path, status, code in cases:
        reply = raw(method, path, b"{}" if method != "GET" else None)
        assert reply.status == status, (method, path, reply.raw[:200])
        assert_envelope(status, reply.json, code)
        if status == 405:
            assert reply.headers["allow"]
    assert state_snapshot() == before


def test_list_filters_are_validated(world, raw):
    for query, code in [
        ("status=bogus", "invalid_request"),
        ("limit=0", "invalid_request"),
        ("limit=1000", "invalid_request"),
        ("stuck=maybe", "invalid_request"),
        ("cursor=not-a-cursor", "invalid_cursor"),
        ("business_key=a%00b", "invalid_request"),
    ]:
        reply = raw("GET", f"/api/v1/instances?{query}")
        assert 400 <= reply.status < 500, (query, reply.raw)
        assert_envelope(reply.status, reply.json, code)


def test_an_unexpected_error_is_a_json_500(world, raw):
    def boom(*args, **kwargs):
        raise RuntimeError("database on fire")

    before = state_snapshot()
    with mock.patch("workflows_app.api.queries.instance_detail", boom):
        reply = raw("GET", f"/api/v1/instances/{uuid.uuid4()}")
    assert reply.status == 500
    assert_envelope(500, reply.json, "internal_error")
    assert "fire" not in reply.raw.decode()  # no internals leak
    assert state_snapshot() == before


def test_the_body_limit_is_the_setting(world, raw):
    small = {"id": "e-1", "type": "t", "correlation_key": "nobody"}
    large = {**small, "payload": "x" * 100}
    with override_settings(SAGA_API_MAX_BODY=100):
        refused = raw("POST", "/api/v1/events", large)
        assert refused.status == 413
        assert_envelope(413, refused.json, "payload_too_large")
        assert raw("POST", "/api/v1/events", small).status == 200


# -- chunked bodies, through a real gunicorn -------------------------------------

GUNICORN = str(Path(sys.executable).with_name("gunicorn"))
ROOT = Path(__file__).resolve().parent.parent.parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def gunicorn(transactional_db, tmp_path):
    """gunicorn serving the app from the test database (committed rows only);
    yields its port."""
    db = settings.DATABASES["default"]
    assert db["ENGINE"] == "workflows_app.postgres", "needs PostgreSQL"
    user = db.get("USER") or "postgres"
    url = f"postgres://{user}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}"
    port = _free_port()
    env = {
        **os.environ,
        "DATABASE_URL": f"{url}/{db['NAME']}",
        "SAGA_DESK_VAR_DIR": str(tmp_path),
        "PYTHONPATH": str(ROOT),
    }
    connection.close()  # the server must not share this process's connection
    log = (tmp_path / "gunicorn.log").open("wb")
    server = subprocess.Popen(
        [GUNICORN, "workflows_app.wsgi", "--bind", f"127.0.0.1:{port}", "-w", "1"],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(
                        (tmp_path / "gunicorn.log").read_text()[-2000:]
                    ) from None
                time.sleep(0.2)
        yield port
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def _chunked_post(port, token, key, chunks):
    """http.client sends an iterable body as Transfer-Encoding: chunked."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request(
        "POST",
        START,
        body=iter(chunks),
        headers={
            "Authorization": f"Bearer {token}",
            "Idempotency-Key": key,
            "Content-Type": "application/json",
        },
        encode_chunked=True,
    )
    response = conn.getresponse()
    body = response.read()
    conn.close()
    return response.status, body


def test_a_chunked_start_is_accepted(gunicorn, token):
    waiting_definition("wf")
    status, body = _chunked_post(
        gunicorn,
        token,
        "chunked-1",
        [b'{"business_key": "ch', b'unked-1", "input"', b": {}}"],
    )
    assert status == 202, body
    instance = WorkflowInstance.objects.get(business_key="chunked-1")
    assert instance.idempotency_key == "chunked-1"


def test_bad_chunked_bodies_are_4xx_and_change_nothing(gunicorn, token):
    waiting_definition("wf")
    before = counts()
    status, body = _chunked_post(
        gunicorn,
        token,
        "chunked-2",
        [b'{"business_key": "b", ', b'"input": {"a": NaN}}'],
    )
    assert status == 400, body
    assert_envelope(400, json.loads(body), "invalid_json")
    limit = settings.SAGA_API_MAX_BODY
    big = [b'{"business_key": "b", "input": {"x": "', b"x" * limit, b'"}}']
    status, body = _chunked_post(gunicorn, token, "chunked-3", big)
    assert status == 413, body
    # A chunk size that is not hexadecimal: the framing itself is broken.
    with socket.create_connection(("127.0.0.1", gunicorn), timeout=30) as sock:
        sock.sendall(
            b"POST " + START.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Authorization: Bearer " + token.encode() + b"\r\n"
            b"Idempotency-Key: chunked-4\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
            b"zz\r\n{}\r\n0\r\n\r\n"
        )
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    status_line = reply.split(b"\r\n", 1)[0]
    assert status_line.startswith(b"HTTP/1.1 4"), reply[:500]
    assert counts() == before
