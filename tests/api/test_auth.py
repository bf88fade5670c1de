"""Machine clients authenticate with scoped, revocable API tokens; nothing
else authenticates (a browser session gets a 401, never a CSRF 403)."""

from __future__ import annotations

import io
import uuid

import pytest
from django.contrib.auth.models import User
from django.core.management import CommandError, call_command
from django.http import HttpRequest
from django.test import Client

from tests.api.helpers import assert_envelope, counts, waiting_definition
from tests.support import make_definition
from workflows_app.client import ApiError
from workflows_app.models import ApiToken

pytestmark = pytest.mark.django_db(transaction=True)

START = "/api/v1/workflows/wf/instances"
BODY = {"business_key": "b-1"}
KEY = {"Idempotency-Key": "k-1"}


def test_requests_without_a_valid_token_get_401(raw):
    make_definition("wf")
    before = counts()
    for headers in [
        {},
        {"Authorization": "Basic dXNlcjpwdw=="},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer sd_not-a-real-token-at-all"},
        {"Authorization": "Bearer sd_"},
        {"Authorization": "Token whatever"},
    ]:
        reply = raw("POST", START, BODY, headers={**KEY, **headers}, auth=False)
        assert reply.status == 401, headers
        assert_envelope(401, reply.json, "unauthorized")
        assert reply.headers["www-authenticate"].startswith("Bearer")
        reply = raw("GET", "/api/v1/instances", headers=headers, auth=False)
        assert reply.status == 401, headers
    assert counts() == before


def test_each_endpoint_needs_its_scope(live_server, issue, client_for):
    make_definition("wf")
    reader = client_for(issue(["read"], name="dashboard"))
    starter = client_for(issue(["start"], name="checkout"))
    reporter = client_for(issue(["report"], name="payments"))

    started = starter.start("wf", business_key="b-1", idempotency_key="k")
    before = counts()
    refused = [
        lambda: reader.start("wf", business_key="b-2", idempotency_key="k2"),
        lambda: reporter.start("wf", business_key="b-2", idempotency_key="k2"),
        lambda: starter.status(started.id),
        lambda: reporter.history(started.id),
        lambda: starter.instances(),
        lambda: reader.post_event("e-1", type="t", correlation_key="b-1"),
        lambda: starter.report_callback(
            str(uuid.uuid4()), message_id="m", succeeded=True
        ),
    ]
    for call in refused:
        with pytest.raises(ApiError) as caught:
            call()
        assert caught.value.status == 403
        assert caught.value.code == "forbidden"
        assert "scope" in caught.value.message
    assert counts() == before

    assert reader.status(started.id)["status"] == "accepted"
    assert reader.history(started.id)[0]["transition"] == "accept"
    assert reader.instances()["items"][0]["id"] == started.id
    event = reporter.post_event("e-1", type="t", correlation_key="b-1")
    assert event["accepted"] is True


def test_a_revoked_token_is_refused(api, token):
    make_definition("wf")
    started = api.start("wf", business_key="b-1", idempotency_key="k")
    ApiToken.authenticate(token).revoke()
    before = counts()
    with pytest.raises(ApiError) as caught:
        api.status(started.id)
    assert caught.value.status == 401
    with pytest.raises(ApiError) as caught:
        api.start("wf", business_key="b-2", idempotency_key="k2")
    assert caught.value.status == 401
    assert counts() == before


def test_use_is_recorded_as_last_used(api, token):
    make_definition("wf")
    row = ApiToken.objects.get()
    assert row.last_used_at is None
    api.instances()
    row.refresh_from_db()
    assert row.last_used_at is not None


def test_a_browser_session_does_not_authenticate_api_writes(live_server, raw):
    waiting_definition("wf")
    User.objects.create_superuser("admin", password="pw")
    browser = Client()
    # django-axes checks every password login against its request.
    assert browser.login(request=HttpRequest(), username="admin", password="pw")
    session = browser.cookies["sessionid"].value
    # The session is valid: the same cookie opens the admin.
    admin_page = raw(
        "GET", "/admin/", headers={"Cookie": f"sessionid={session}"}, auth=False
    )
    assert admin_page.status == 200
    before = counts()
    for extra in [{}, {"Cookie": f"sessionid={session}; csrftoken=abc"}]:
        headers = {**KEY, "Cookie": f"sessionid={session}", **extra}
        reply = raw("POST", START, BODY, headers=headers, auth=False)
        # Refused for the missing token, not by the CSRF check.
        assert reply.status == 401
        assert_envelope(401, reply.json, "unauthorized")
        reply = raw(
            "POST",
            "/api/v1/events",
            {"id": "e", "type": "t", "correlation_key": "b"},
            headers=headers,
            auth=False,
        )
        assert reply.status == 401
        reply = raw("GET", "/api/v1/instances", headers=headers, auth=False)
        assert reply.status == 401
    assert counts() == before


def test_a_token_works_without_any_csrf_token(raw):
    # A token-authenticated POST carries no CSRF cookie or header at all.
    make_definition("wf")
    reply = raw("POST", START, BODY, headers=KEY)
    assert reply.status == 202


def test_create_api_token_prints_the_token_once_and_stores_its_hash(
    transactional_db, client_for
):
    out, err = io.StringIO(), io.StringIO()
    call_command(
        "create_api_token",
        "nightly-job",
        "--scopes",
        "read,start",
        stdout=out,
        stderr=err,
    )
    token = out.getvalue().strip()
    assert token.startswith("sd_") and "\n" not in token
    row = ApiToken.objects.get()
    assert (row.name, row.scopes) == ("nightly-job", ["read", "start"])
    assert row.token_hash == ApiToken.hash(token) != token
    assert token not in str(ApiToken.objects.values().get())
    assert row.prefix in err.getvalue() and token not in err.getvalue()
    assert ApiToken.authenticate(token) == row


def test_create_api_token_refuses_unknown_scopes(transactional_db):
    with pytest.raises(CommandError, match="unknown scopes: admin"):
        call_command("create_api_token", "x", "--scopes", "read,admin")
    with pytest.raises(CommandError):
        call_command("create_api_token", "x", "--scopes", ",")
    assert not ApiToken.objects.exists()
