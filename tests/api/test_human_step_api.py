"""Completing a step that waits for a person over the API (real HTTP,
PostgreSQL): 200 done, 422 a wrong form (each field named, nothing written),
409 a second completion, 403 without the permission, 202 under four eyes;
the answers match the OpenAPI document."""

from __future__ import annotations

from datetime import timedelta

import pytest

from tests.api.helpers import RawHttp, assert_envelope, state_snapshot
from tests.api.test_openapi import response_validator
from tests.support import make_definition, start, user_in
from workflows_app.models import ApiToken, TransitionLog, WorkflowInstance

pytestmark = pytest.mark.django_db(transaction=True)
PATH = "/api/v1/instances/{instance_id}/steps/{step}/complete"
REVIEW = {
    "name": "review",
    "kind": "human",
    "action": "",
    "compensation": "",
    "timeout": timedelta(hours=4),
    "form_fields": [
        {"name": "approved", "type": "boolean", "required": True},
        {"name": "limit", "type": "number", "required": True},
    ],
}


def _client(live_server, user) -> RawHttp:
    token = ApiToken.issue(f"runbook-{user.username}", ["operate"], user=user)[1]
    return RawHttp(live_server.url, token)


def test_complete_a_human_step_over_the_api(live_server, transport, raw):
    make_definition("orders", [{"name": "reserve"}, REVIEW, {"name": "ship"}])
    document = raw("GET", "/api/v1/openapi.json", auth=False).json
    olga = user_in("operator", "olga")
    viewer = user_in("viewer", "vic")
    instance = start("orders", "ORD-1")
    transport.run()
    url = f"/api/v1/instances/{instance.pk}/steps/review/complete"
    client = _client(live_server, olga)

    before = state_snapshot()
    reply = client("POST", url, {"reason": "r", "output": {"limit": "high"}})
    assert reply.status == 422, reply.raw
    assert_envelope(422, reply.json, "invalid_input")
    assert "approved" in reply.json["error"]["message"]
    assert "limit" in reply.json["error"]["message"]
    response_validator(document, 422, PATH, "post").validate(reply.json)
    assert state_snapshot() == before

    reply = _client(live_server, viewer)(
        "POST", url, {"reason": "r", "output": {"approved": True, "limit": 5}}
    )
    assert reply.status == 403, reply.raw
    assert state_snapshot() == before

    reply = client(
        "POST", url, {"reason": "checked", "output": {"approved": True, "limit": 500}}
    )
    assert reply.status == 200, reply.raw
    response_validator(document, 200, PATH, "post").validate(reply.json)
    row = TransitionLog.objects.get(instance=instance, transition="complete_task")
    assert row.user == olga and row.data["api_token"] == "runbook-olga"
    transport.run()
    fresh = WorkflowInstance.objects.get(pk=instance.pk)
    assert fresh.state == "completed"
    assert fresh.outputs["review"] == {"approved": True, "limit": 500}

    # A second completion (a retried request) conflicts and changes nothing.
    before = state_snapshot()
    reply = client(
        "POST", url, {"reason": "again", "output": {"approved": True, "limit": 500}}
    )
    assert reply.status == 409, reply.raw
    response_validator(document, 409, PATH, "post").validate(reply.json)
    assert state_snapshot() == before
    reply = client(
        "POST", f"/api/v1/instances/{instance.pk}/steps/nope/complete", {"reason": "r"}
    )
    assert reply.status == 422, reply.raw


def test_api_completion_under_four_eyes_is_202_then_409_meanwhile(
    live_server, transport
):
    make_definition(
        "orders",
        [{"name": "reserve"}, REVIEW],
        approval_actions=["complete_human_step"],
    )
    olga = user_in("operator", "olga")
    instance = start("orders", "ORD-2")
    transport.run()
    url = f"/api/v1/instances/{instance.pk}/steps/review/complete"
    version = WorkflowInstance.objects.get(pk=instance.pk).version
    reply = _client(live_server, olga)(
        "POST",
        url,
        {
            "reason": "big order",
            "output": {"approved": True, "limit": 9000},
            "expected_version": version,
        },
    )
    assert reply.status == 202, reply.raw
    assert reply.json["action"] == "complete_human_step"
    assert WorkflowInstance.objects.get(pk=instance.pk).state == "running"
    reply = _client(live_server, olga)(
        "POST",
        url,
        {
            "reason": "x",
            "output": {"approved": True, "limit": 1},
            "expected_version": 0,
        },
    )
    assert reply.status == 409, reply.raw
