"""A web process loads at start-up what its first request would otherwise
load (issue 15: every page within 1 s of a restart). Measured before the fix:
the first request of a fresh process imported about 145 modules (URLconf,
views, API, templates' tags) and compiled its templates, 0.5–2.2 s.

Deterministic rather than timed: a fresh Python process imports the WSGI
entry point as gunicorn does, then serves the first request of each page;
during that request no module may be imported and no template compiled."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from django.conf import settings
from django.db import connection

from tests.support import user_in
from tests.views.conftest import held, logged_in
from workflows_app.models import ApiToken

ROOT = Path(__file__).resolve().parent.parent.parent

CHILD = r"""
import json, sys
from wsgiref.util import setup_testing_defaults

import workflows_app.wsgi as entry_point
from django.template.base import Template

compiled = []
original = Template.compile_nodelist


def counting(self):
    compiled.append(self.origin.template_name)
    return original(self)


Template.compile_nodelist = counting
pages, cookie, token = json.loads(sys.argv[1])
results = {}
for path in pages:
    environ = {}
    setup_testing_defaults(environ)
    environ["PATH_INFO"], _, environ["QUERY_STRING"] = path.partition("?")
    if path != "/login/":  # signed in, the login page redirects
        environ["HTTP_COOKIE"] = cookie
    environ["HTTP_AUTHORIZATION"] = f"Bearer {token}"
    status = []
    before = set(sys.modules)
    del compiled[:]
    body = b"".join(
        entry_point.application(environ, lambda s, h, e=None: status.append(s))
    )
    results[path] = {
        "status": status[0],
        "imported": sorted(set(sys.modules) - before),
        "compiled": list(compiled),
        "tail": body[-300:].decode(errors="replace"),
    }
print(json.dumps(results))
"""


@pytest.mark.django_db(transaction=True)
def test_a_fresh_process_first_requests_import_and_compile_nothing(
    wf, broker, tmp_path
):
    instance = held(broker)
    client = logged_in(user_in("operator", "first-load"))
    cookie = f"sessionid={client.cookies['sessionid'].value}"
    _, token = ApiToken.issue("first-load", scopes=["read"])
    pages = [
        "/",
        "/instances/",
        "/instances/?q=ORD",
        f"/instances/{instance.pk}/",
        "/alerts/",
        "/webhooks/",
        "/inbox/",
        "/failures/",
        "/bulk-jobs/",
        "/definitions/",
        f"/definitions/{instance.definition_key}/",
        "/login/",
        "/metrics",
        "/api/v1/instances",
        f"/api/v1/instances/{instance.pk}",
    ]
    db = settings.DATABASES["default"]
    assert db["ENGINE"] == "workflows_app.postgres", "needs PostgreSQL"
    user = db.get("USER") or "postgres"
    host = f"{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}"
    env = {
        **os.environ,
        "DATABASE_URL": f"postgres://{user}@{host}/{db['NAME']}",
        "SECRET_KEY": settings.SECRET_KEY,  # the session's auth hash uses it
        "SAGA_DESK_VAR_DIR": str(tmp_path),
        "PYTHONPATH": str(ROOT),
    }
    connection.close()  # the child reads committed rows on its own connection
    child = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps([pages, cookie, token])],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert child.returncode == 0, child.stderr[-3000:]
    results = json.loads(child.stdout.strip().splitlines()[-1])
    for path, result in results.items():
        # A login redirect or error would prove nothing about the page.
        assert result["status"].startswith("200"), (path, result)
        assert result["imported"] == [], (path, result["imported"])
        assert result["compiled"] == [], (path, result["compiled"])
