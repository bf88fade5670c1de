"""The operator API: an ``operate`` token acts as its user, through the
engine's catalogue of actions, over real HTTP against PostgreSQL. Actions
answer 200 (done), 202 (sent for approval), 409 (changed meanwhile or not
possible now), 403 (not permitted), 404 and 400/422 with the envelope, and
change nothing unless they answer 200. Approvals and bulk jobs too."""

from __future__ import annotations

import io
import uuid
from typing import Any
from urllib.parse import urlsplit

import pytest
from django.contrib.auth.models import User
from django.core.management import CommandError, call_command
from django.test import Client
from django.urls import reverse

from tests.api.helpers import RawHttp, assert_envelope, state_snapshot
from tests.api.test_openapi import response_validator
from tests.operations.conftest import STEPS, finished, held
from tests.support import make_definition, user_in
from workflows_app.api.schemas import StateFilter
from workflows_app.engine import actions
from workflows_app.filters import STATE_CHOICES
from workflows_app.models import (
    ApiToken,
    ApprovalRequest,
    BulkJob,
    BulkJobItem,
    StepExecution,
    TransitionLog,
    WorkflowInstance,
)

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def wf():
    return make_definition("orders", steps=STEPS, failure_policy="hold")


@pytest.fixture
def olga():
    return user_in("operator", "olga")


@pytest.fixture
def oscar():
    return user_in("operator", "oscar")


@pytest.fixture
def operate(live_server):
    """A raw HTTP client with an ``operate`` token acting as ``user``."""

    def make(user: Any, name: str | None = None) -> RawHttp:
        token = ApiToken.issue(
            name or f"runbook-{user.get_username()}", ["operate"], user=user
        )[1]
        return RawHttp(live_server.url, token)

    return make


@pytest.fixture
def document(raw):
    return raw("GET", "/api/v1/openapi.json", auth=False).json


def guard(wf: Any, *names: str) -> None:
    wf.approval_actions = list(names)
    wf.save(update_fields=["approval_actions"])


def acts_url(instance: Any, name: str = "") -> str:
    base = f"/api/v1/instances/{instance.pk}/actions"
    return f"{base}/{name}" if name else base


def fresh(instance: Any) -> WorkflowInstance:
    return WorkflowInstance.objects.get(pk=instance.pk)


# -- listing -------------------------------------------------------------------


def test_the_list_says_what_the_tokens_user_may_do_and_why_not(
    wf, transport, olga, operate, document
):
    guard(wf, "compensate")
    instance = held(transport, "ORD-1")
    reply = operate(olga)("GET", acts_url(instance))
    assert reply.status == 200, reply.raw
    response_validator(
        document, 200, "/api/v1/instances/{instance_id}/actions", "get"
    ).validate(reply.json)
    body = reply.json
    assert body["instance"] == str(instance.pk)
    assert body["status"] == "needs_attention"
    assert body["version"] == instance.version
    assert body["blocked_step"] == "charge"
    listed = {a["name"]: a for a in body["actions"]}
    assert list(listed) == list(actions.CATALOGUE)
    assert listed["retry_step"]["allowed"] is True
    assert listed["retry_step"]["why_not"] == ""
    assert listed["retry_step"]["label"] == "Retry step now"
    assert listed["resume"]["allowed"] is False
    assert "deadline" in listed["resume"]["why_not"]
    assert listed["compensate"]["needs_approval"] is True
    assert listed["retry_step"]["needs_approval"] is False
    assert listed["mark_step_done"]["data_keys"] == ["output"]

    viewer = user_in("viewer", "vera")
    seen = operate(viewer)("GET", acts_url(instance)).json["actions"]
    assert not any(a["allowed"] for a in seen)
    assert all("not allowed" in a["why_not"] for a in seen)


# -- doing an action -------------------------------------------------------------


def test_an_action_is_done_as_the_tokens_user_and_answers_the_status(
    wf, transport, olga, operate, raw, document
):
    instance = held(transport, "ORD-2")
    client = operate(olga, name="runbook")
    reply = client(
        "POST",
        acts_url(instance, "retry_step"),
        {"reason": "gateway is back", "expected_version": instance.version},
    )
    assert reply.status == 200, reply.raw
    path = "/api/v1/instances/{instance_id}/actions/{name}"
    response_validator(document, 200, path, "post").validate(reply.json)
    # The same body as GET /instances/{id} at that moment.
    assert reply.json == raw("GET", f"/api/v1/instances/{instance.pk}").json
    assert reply.json["status"] == "running"

    row = TransitionLog.objects.get(instance=instance, transition="retry_step")
    assert row.user == olga
    assert row.reason == "gateway is back"
    assert row.data["api_token"] == "runbook"
    history = raw("GET", f"/api/v1/instances/{instance.pk}/history").json
    assert any(
        h["transition"] == "retry_step" and h["actor"] == "operator:olga"
        for h in history
    )
    transport.run()
    assert fresh(instance).state == "completed"


def test_a_step_is_named_and_data_is_passed_through(wf, transport, olga, operate):
    instance = held(transport, "ORD-3")
    client = operate(olga)
    reply = client(
        "POST",
        acts_url(instance, "mark_step_done"),
        {"reason": "charged by phone", "step": "charge", "data": {"output": {"ok": 1}}},
    )
    assert reply.status == 200, reply.raw
    # Done by hand: recorded as skipped, with the output later steps read.
    charge = StepExecution.objects.get(instance=instance, name="charge")
    assert charge.state == "skipped"
    assert fresh(instance).outputs["charge"] == {"ok": 1}

    other = held(transport, "ORD-4")
    reply = client(
        "POST",
        acts_url(other, "repair_input"),
        {"reason": "typo in the amount", "data": {"input": {"amount": 12}}},
    )
    assert reply.status == 200, reply.raw
    assert fresh(other).input == {"amount": 12}


def test_a_stale_version_is_409_and_changes_nothing(
    wf, transport, olga, operate, document
):
    instance = held(transport, "ORD-5")
    before = state_snapshot()
    reply = operate(olga)(
        "POST",
        acts_url(instance, "retry_step"),
        {"reason": "retry", "expected_version": instance.version - 1},
    )
    assert reply.status == 409
    assert_envelope(409, reply.json, "already_changed")
    path = "/api/v1/instances/{instance_id}/actions/{name}"
    response_validator(document, 409, path, "post").validate(reply.json)
    assert state_snapshot() == before


def test_an_action_not_possible_now_is_409(wf, transport, olga, operate):
    instance = held(transport, "ORD-6")
    before = state_snapshot()
    reply = operate(olga)("POST", acts_url(instance, "resume"), {"reason": "go on"})
    assert reply.status == 409
    assert_envelope(409, reply.json, "transition_not_allowed")
    assert state_snapshot() == before


def test_a_user_without_the_operator_role_gets_403(wf, transport, operate):
    instance = held(transport, "ORD-7")
    viewer = user_in("viewer", "vera")
    before = state_snapshot()
    for name in ("retry_step", "compensate", "repair_input"):
        body: dict[str, Any] = {"reason": "let me"}
        if name == "repair_input":
            body["data"] = {"input": {}}
        reply = operate(viewer)("POST", acts_url(instance, name), body)
        assert reply.status == 403, (name, reply.raw)
        assert_envelope(403, reply.json, "forbidden")
    assert state_snapshot() == before


def test_unknown_instances_and_actions_are_404(wf, transport, olga, operate):
    instance = held(transport, "ORD-8")
    client = operate(olga)
    missing = uuid.uuid4()
    for method, url, body in [
        ("GET", f"/api/v1/instances/{missing}/actions", None),
        ("POST", f"/api/v1/instances/{missing}/actions/retry_step", {"reason": "x"}),
        (
            "POST",
            f"/api/v1/instances/{missing}/actions/retry_step",
            {"reason": "x", "step": "charge"},
        ),
        ("POST", acts_url(instance, "explode"), {"reason": "x"}),
        ("POST", "/api/v1/instances/not-a-uuid/actions/retry_step", {"reason": "x"}),
    ]:
        reply = client(method, url, body)
        assert reply.status == 404, (url, reply.raw)
        assert_envelope(404, reply.json)
    assert client("POST", acts_url(instance, "explode"), {"reason": "x"}).json["error"][
        "code"
    ] == ("unknown_action")
    reply = client("GET", f"/api/v1/instances/{missing}/actions")
    assert reply.json["error"]["code"] == "unknown_instance"


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (b"{", 400, "invalid_json"),
        (b'{"reason": NaN}', 400, "invalid_json"),
        ({}, 422, "invalid_request"),
        ({"reason": ""}, 422, "invalid_request"),
        ({"reason": "x", "extra": 1}, 422, "invalid_request"),
        ({"reason": "x", "expected_version": "3"}, 422, "invalid_request"),
        ({"reason": "x", "step": 2}, 422, "invalid_request"),
        ({"reason": "x", "data": []}, 422, "invalid_request"),
        ({"reason": "nul \u0000 here"}, 422, "invalid_input"),
        ({"reason": "x", "step": "nowhere"}, 422, "invalid_input"),
        ({"reason": "x", "data": {"colour": "red"}}, 422, "invalid_input"),
        ("[1, 2]", 422, "invalid_request"),
    ],
)
def test_bad_input_is_refused_with_the_envelope_and_changes_nothing(
    wf, transport, olga, operate, body, status, code
):
    instance = held(transport, "ORD-9")
    before = state_snapshot()
    reply = operate(olga)("POST", acts_url(instance, "retry_step"), body)
    assert reply.status == status, reply.raw
    assert_envelope(status, reply.json, code)
    assert state_snapshot() == before


def test_an_operate_scope_is_needed_and_a_token_acts_for_an_active_user(
    wf, transport, olga, operate, raw
):
    instance = held(transport, "ORD-10")
    reply = raw("GET", acts_url(instance))  # start, read and report scopes
    assert reply.status == 403
    assert "'operate'" in reply.json["error"]["message"]

    client = operate(olga)
    assert client("GET", acts_url(instance)).status == 200
    olga.is_active = False
    olga.save(update_fields=["is_active"])
    before = state_snapshot()
    reply = client("POST", acts_url(instance, "retry_step"), {"reason": "x"})
    assert reply.status == 403
    assert "no active user" in reply.json["error"]["message"]
    assert state_snapshot() == before


# -- four eyes -------------------------------------------------------------------


def test_an_action_under_four_eyes_answers_202_and_waits_for_a_second_operator(
    wf, transport, olga, oscar, operate, document
):
    guard(wf, "compensate")
    instance = held(transport, "ORD-11")
    before = fresh(instance)
    olga_api, oscar_api = operate(olga), operate(oscar)
    reply = olga_api(
        "POST",
        acts_url(instance, "compensate"),
        {"reason": "customer cancelled", "expected_version": instance.version},
    )
    assert reply.status == 202, reply.raw
    path = "/api/v1/instances/{instance_id}/actions/{name}"
    response_validator(document, 202, path, "post").validate(reply.json)
    request = reply.json
    assert request["action"] == "compensate"
    assert request["status"] == "pending"
    assert request["requested_by"] == "olga"
    assert request["instance"] == str(instance.pk)
    assert request["expires_at"]
    now = fresh(instance)
    assert (now.state, now.version) == (before.state, before.version)

    # Asking again while it waits: 409, still one request.
    again = olga_api("POST", acts_url(instance, "compensate"), {"reason": "again"})
    assert again.status == 409
    assert ApprovalRequest.objects.count() == 1

    pending = oscar_api("GET", "/api/v1/approvals?status=pending")
    assert pending.status == 200
    response_validator(document, 200, "/api/v1/approvals", "get").validate(pending.json)
    assert [r["id"] for r in pending.json["items"]] == [request["id"]]

    own = olga_api("POST", f"/api/v1/approvals/{request['id']}/approve")
    assert own.status == 403
    assert_envelope(403, own.json, "forbidden")

    decided = oscar_api(
        "POST", f"/api/v1/approvals/{request['id']}/approve", {"note": "checked"}
    )
    assert decided.status == 200, decided.raw
    path = "/api/v1/approvals/{approval_id}/approve"
    response_validator(document, 200, path, "post").validate(decided.json)
    assert decided.json["status"] == "approved"
    assert decided.json["decided_by"] == "oscar"
    assert fresh(instance).state in {"compensating", "compensated"}
    row = TransitionLog.objects.get(instance=instance, transition="compensate")
    assert row.user == olga
    assert row.data["approved_by"] == "oscar"

    twice = oscar_api("POST", f"/api/v1/approvals/{request['id']}/approve")
    assert twice.status == 409
    assert_envelope(409, twice.json, "already_changed")
    assert oscar_api("GET", "/api/v1/approvals?status=pending").json["items"] == []


def test_a_rejected_request_changes_nothing(wf, transport, olga, oscar, operate):
    guard(wf, "cancel")
    instance = held(transport, "ORD-12")
    before = fresh(instance)
    request = operate(olga)(
        "POST", acts_url(instance, "cancel"), {"reason": "customer called"}
    ).json
    reply = operate(oscar)("POST", f"/api/v1/approvals/{request['id']}/reject")
    assert reply.status == 200, reply.raw
    assert reply.json["status"] == "rejected"
    now = fresh(instance)
    assert (now.state, now.version) == (before.state, before.version)
    assert not TransitionLog.objects.filter(instance=instance, transition="cancel")


def test_approvals_are_paged_and_unknown_ones_are_404(
    wf, transport, olga, oscar, operate
):
    guard(wf, "cancel")
    for key in ("ORD-13", "ORD-14", "ORD-15"):
        instance = held(transport, key)
        operate(olga)("POST", acts_url(instance, "cancel"), {"reason": "called"})
    client = operate(oscar)
    first = client("GET", "/api/v1/approvals?limit=2").json
    assert len(first["items"]) == 2 and first["next_cursor"]
    rest = client("GET", f"/api/v1/approvals?limit=2&cursor={first['next_cursor']}")
    ids = [r["id"] for r in first["items"] + rest.json["items"]]
    assert ids == sorted(ApprovalRequest.objects.values_list("pk", flat=True))[::-1]
    assert rest.json["next_cursor"] is None
    assert client("GET", "/api/v1/approvals?cursor=x").status == 400
    assert client("GET", "/api/v1/approvals?status=maybe").status == 422
    for approval in ("999999", str(2**70)):
        reply = client("POST", f"/api/v1/approvals/{approval}/approve")
        assert reply.status == 404
        assert_envelope(404, reply.json, "unknown_approval")


# -- bulk jobs -------------------------------------------------------------------


def test_a_bulk_job_is_planned_previewed_started_and_followed(
    wf, transport, olga, operate, document
):
    held_ones = [held(transport, f"ORD-B{n}") for n in range(3)]
    done = finished(transport, "ORD-DONE")
    client = operate(olga)
    before = state_snapshot()
    reply = client(
        "POST",
        "/api/v1/bulk-jobs",
        {
            "definition": "orders",
            "failed_step": "charge",
            "action": "retry",
            "reason": "gateway is back",
            "rate": 0,
        },
    )
    assert reply.status == 201, reply.raw
    response_validator(document, 201, "/api/v1/bulk-jobs", "post").validate(reply.json)
    job = reply.json
    assert job["status"] == "draft"
    assert job["created_by"] == "olga"
    assert job["progress"]["acting"] == 3
    assert job["progress"]["outcomes"] == {"pending": 3}
    assert job["approval"] is None
    assert job["query"] == "definition=orders&failed_step=charge"
    preview = {i["instance"] for i in job["preview"]["items"]}
    assert preview == {str(i.pk) for i in held_ones}
    assert str(done.pk) not in preview
    assert all(i["acts"] and i["outcome"] == "pending" for i in job["preview"]["items"])
    assert state_snapshot() == before  # planning does nothing to instances

    # Items, paged.
    items = urlsplit(job["items_url"]).path
    assert items == f"/api/v1/bulk-jobs/{job['id']}/items"
    first = client("GET", f"{items}?limit=2").json
    assert len(first["items"]) == 2 and first["next_cursor"]
    rest = client("GET", f"{items}?limit=2&cursor={first['next_cursor']}")
    path = "/api/v1/bulk-jobs/{job_id}/items"
    response_validator(document, 200, path, "get").validate(rest.json)
    assert len(rest.json["items"]) == 1 and rest.json["next_cursor"] is None
    assert client("GET", f"{items}?cursor=abc").status == 400
    assert client("GET", f"{items}?outcome=done").json["items"] == []

    started = client("POST", f"/api/v1/bulk-jobs/{job['id']}/start")
    assert started.status == 200, started.raw
    assert started.json["status"] == "queued"
    # Starting again changes nothing.
    assert client("POST", f"/api/v1/bulk-jobs/{job['id']}/start").status == 200
    transport.run()
    progress = client("GET", f"/api/v1/bulk-jobs/{job['id']}")
    assert progress.status == 200
    path = "/api/v1/bulk-jobs/{job_id}"
    response_validator(document, 200, path, "get").validate(progress.json)
    assert progress.json["status"] == "finished"
    assert progress.json["progress"]["outcomes"] == {"done": 3}
    assert progress.json["progress"]["percent"] == 100
    assert all(fresh(i).state == "completed" for i in held_ones)
    rows = TransitionLog.objects.filter(transition="retry_step")
    assert {r.user for r in rows} == {olga}


def test_a_bulk_job_is_paused_resumed_and_cancelled(wf, transport, olga, operate):
    instance = held(transport, "ORD-P")
    client = operate(olga)
    job = client(
        "POST",
        "/api/v1/bulk-jobs",
        {"business_key": "ORD-P", "action": "compensate", "reason": "undo"},
    ).json
    url = f"/api/v1/bulk-jobs/{job['id']}"
    assert client("POST", f"{url}/pause").status == 409  # a draft is not running
    assert client("POST", f"{url}/start").json["status"] == "queued"
    assert client("POST", f"{url}/pause").json["status"] == "paused"
    assert client("POST", f"{url}/resume").json["status"] == "queued"
    cancelled = client("POST", f"{url}/cancel", {"reason": "not today"})
    assert cancelled.status == 200, cancelled.raw
    assert cancelled.json["status"] == "cancelled"
    assert cancelled.json["progress"]["outcomes"] == {"cancelled": 1}
    reply = client("POST", f"{url}/resume")
    assert reply.status == 409
    assert_envelope(409, reply.json, "transition_not_allowed")
    transport.run()
    assert fresh(instance).state == "needs_attention"
    assert BulkJobItem.objects.get().outcome == "cancelled"


def test_bulk_job_refusals(wf, transport, olga, oscar, operate):
    held(transport, "ORD-R")
    client = operate(olga)
    before = state_snapshot()
    cases: list[tuple[dict[str, Any], int, str]] = [
        ({"action": "retry", "reason": "x"}, 422, "invalid_input"),  # no filter
        (
            {"definition": "nope", "action": "retry", "reason": "x"},
            422,
            "invalid_input",
        ),
        (
            {"business_key": "ORD-NONE", "action": "retry", "reason": "x"},
            422,
            "invalid_input",
        ),
        ({"definition": "orders", "action": "restart", "reason": "x"}, 422, ""),
        ({"definition": "orders", "action": "retry"}, 422, "invalid_request"),
        (
            {"definition": "orders", "action": "retry", "reason": "x", "rate": -1},
            422,
            "",
        ),
        ({"status": "asleep", "action": "retry", "reason": "x"}, 422, ""),
    ]
    for body, status, code in cases:
        reply = client("POST", "/api/v1/bulk-jobs", body)
        assert reply.status == status, (body, reply.raw)
        assert_envelope(status, reply.json, code or None)
    assert not BulkJob.objects.exists()
    unknown = client("POST", "/api/v1/bulk-jobs", {**cases[1][0]}).json["error"]
    assert unknown["details"][0]["field"] == "body.definition"

    viewer = user_in("viewer", "vera")
    reply = operate(viewer)(
        "POST",
        "/api/v1/bulk-jobs",
        {"definition": "orders", "action": "retry", "reason": "x"},
    )
    assert reply.status == 403

    job = client(
        "POST",
        "/api/v1/bulk-jobs",
        {"definition": "orders", "action": "retry", "reason": "x"},
    ).json
    # Only its planner starts it.
    reply = operate(oscar)("POST", f"/api/v1/bulk-jobs/{job['id']}/start")
    assert reply.status == 403
    assert BulkJob.objects.get().status == "draft"
    for url in ("/api/v1/bulk-jobs/999999", f"/api/v1/bulk-jobs/{2**70}/items"):
        reply = client("GET", url)
        assert reply.status == 404
        assert_envelope(404, reply.json, "unknown_bulk_job")
    assert client("POST", "/api/v1/bulk-jobs/999999/start").status == 404
    assert state_snapshot() == before


def test_the_state_filter_offers_the_lists_choices():
    assert set(StateFilter.__args__) == {value for value, _ in STATE_CHOICES}


# -- tokens ----------------------------------------------------------------------


def test_create_api_token_names_the_user_of_an_operate_token(olga):
    out, err = io.StringIO(), io.StringIO()
    call_command(
        "create_api_token",
        "runbook",
        "--scopes",
        "operate,read",
        "--user",
        "olga",
        stdout=out,
        stderr=err,
    )
    token = out.getvalue().strip()
    row = ApiToken.authenticate(token)
    assert row is not None and row.user == olga
    assert row.scopes == ["operate", "read"]
    assert "acting as olga" in err.getvalue()

    for args, message in [
        (["--scopes", "operate"], "acts as a user"),
        (["--scopes", "read", "--user", "olga"], "only an operate token"),
        (["--scopes", "operate", "--user", "nobody"], "no user 'nobody'"),
    ]:
        with pytest.raises(CommandError, match=message):
            call_command("create_api_token", "x", *args, stdout=io.StringIO())
    assert ApiToken.objects.count() == 1


def test_the_admin_picks_the_user_of_an_operate_token(olga):
    admin = User.objects.create_superuser("root", password="pw")
    client = Client()
    client.force_login(admin)
    add = reverse("admin:workflows_app_apitoken_add")
    refused = client.post(add, {"name": "runbook", "scopes": ["operate"]})
    assert refused.status_code == 200
    assert "acts as a user" in refused.content.decode()
    refused = client.post(add, {"name": "svc", "scopes": ["read"], "user": olga.pk})
    assert refused.status_code == 200
    assert not ApiToken.objects.exists()

    page = client.get(add).content.decode()
    assert 'name="user"' in page and "olga" in page
    response = client.post(
        add, {"name": "runbook", "scopes": ["operate"], "user": olga.pk}
    )
    assert response.status_code == 302
    row = ApiToken.objects.get()
    assert (row.user, row.scopes, row.created_by) == (olga, ["operate"], admin)
    listed = client.get(reverse("admin:workflows_app_apitoken_changelist"))
    assert "olga" in listed.content.decode()
