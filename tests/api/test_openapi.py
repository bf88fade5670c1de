"""The OpenAPI description served by the app is valid, lists every route with
the responses it really gives, and its docs page works offline."""

from __future__ import annotations

import re
import uuid

import pytest
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate

from tests.api.helpers import assert_envelope, task_token, waiting_definition

pytestmark = pytest.mark.django_db(transaction=True)

# The public contract (DESIGN section 6, issue #7): method, path, scope.
ROUTES = {
    ("post", "/api/v1/workflows/{definition_key}/instances"),
    ("get", "/api/v1/instances"),
    ("get", "/api/v1/instances/{instance_id}"),
    ("get", "/api/v1/instances/{instance_id}/history"),
    ("post", "/api/v1/callbacks/{task_token}"),
    ("post", "/api/v1/events"),
    # The operator API (issue 14): scope operate.
    ("get", "/api/v1/instances/{instance_id}/actions"),
    ("post", "/api/v1/instances/{instance_id}/actions/{name}"),
    # Steps that wait for a person (issue 19).
    ("post", "/api/v1/instances/{instance_id}/steps/{step}/complete"),
    ("get", "/api/v1/approvals"),
    ("post", "/api/v1/approvals/{approval_id}/approve"),
    ("post", "/api/v1/approvals/{approval_id}/reject"),
    ("post", "/api/v1/bulk-jobs"),
    ("get", "/api/v1/bulk-jobs/{job_id}"),
    ("get", "/api/v1/bulk-jobs/{job_id}/items"),
    ("post", "/api/v1/bulk-jobs/{job_id}/start"),
    ("post", "/api/v1/bulk-jobs/{job_id}/pause"),
    ("post", "/api/v1/bulk-jobs/{job_id}/resume"),
    ("post", "/api/v1/bulk-jobs/{job_id}/cancel"),
}


@pytest.fixture
def document(raw):
    reply = raw("GET", "/api/v1/openapi.json", auth=False)
    assert reply.status == 200
    return reply.json


def operations(document):
    for path, item in document["paths"].items():
        for method, operation in item.items():
            yield method, path, operation


def response_validator(document, status, path, method):
    """A JSON Schema validator for the documented body of one response."""
    content = document["paths"][path][method]["responses"][str(status)]["content"]
    schema = content["application/json"]["schema"]
    return Draft202012Validator({**schema, "components": document["components"]})


def test_the_document_is_valid_and_lists_every_route(document):
    validate(document)
    assert {(m, p) for m, p, _ in operations(document)} == ROUTES
    for method, _path, operation in operations(document):
        assert operation["security"], "every operation needs a token"
        responses = set(operation["responses"])
        assert {"401", "403"} <= responses
        if method == "post":
            assert {"400", "413", "415", "422"} <= responses
    start = document["paths"]["/api/v1/workflows/{definition_key}/instances"]["post"]
    assert {"200", "202", "404", "409"} <= set(start["responses"])
    assert "Location" in start["responses"]["202"]["headers"]
    params = {p["name"]: p for p in start["parameters"]}
    assert params["Idempotency-Key"]["in"] == "header"
    assert params["Idempotency-Key"]["required"] is True
    schemes = document["components"]["securitySchemes"]
    assert [s["scheme"] for s in schemes.values()] == ["bearer"]


def test_every_documented_route_is_served(document, raw):
    """Each documented operation exists (an unauthenticated call gets the
    401 the document promises, not a 404 or 405)."""
    values = {
        "definition_key": "wf",
        "instance_id": str(uuid.uuid4()),
        "task_token": str(uuid.uuid4()),
        "name": "retry_step",
        "step": "review",
        "approval_id": "1",
        "job_id": "1",
    }
    for method, path, _ in operations(document):
        url = re.sub(r"{(\w+)}", lambda m: values[m.group(1)], path)
        reply = raw(method.upper(), url, {} if method == "post" else None, auth=False)
        assert reply.status == 401, (method, path)
        response_validator(document, 401, path, method).validate(reply.json)


def test_real_responses_match_the_documented_schemas(document, api, raw, transport):
    waiting_definition("wf")
    start_path = "/api/v1/workflows/{definition_key}/instances"
    reply = raw(
        "POST",
        "/api/v1/workflows/wf/instances",
        {"business_key": "b-1", "input": {"x": [1, None]}},
        headers={"Idempotency-Key": "k"},
    )
    response_validator(document, 202, start_path, "post").validate(reply.json)
    instance = reply.json["id"]
    transport.run()
    token = task_token(instance)
    checks = [
        (
            "GET",
            f"/api/v1/instances/{instance}",
            None,
            200,
            "/api/v1/instances/{instance_id}",
        ),
        (
            "GET",
            f"/api/v1/instances/{instance}/history",
            None,
            200,
            "/api/v1/instances/{instance_id}/history",
        ),
        ("GET", "/api/v1/instances?limit=1", None, 200, "/api/v1/instances"),
        (
            "POST",
            f"/api/v1/callbacks/{token}",
            {"id": "m", "status": "succeeded", "output": {"ok": True}},
            200,
            "/api/v1/callbacks/{task_token}",
        ),
        (
            "POST",
            "/api/v1/events",
            {"id": "e", "type": "t", "correlation_key": "b-1", "payload": None},
            200,
            "/api/v1/events",
        ),
        ("POST", "/api/v1/events", {"id": 1}, 422, "/api/v1/events"),
        ("POST", "/api/v1/events", b"[", 400, "/api/v1/events"),
        (
            "GET",
            f"/api/v1/instances/{uuid.uuid4()}",
            None,
            404,
            "/api/v1/instances/{instance_id}",
        ),
    ]
    for method, url, body, status, path in checks:
        reply = raw(method, url, body)
        assert reply.status == status, (url, reply.raw[:300])
        response_validator(document, status, path, method.lower()).validate(reply.json)
        if status >= 400:
            assert_envelope(status, reply.json)


def test_the_docs_page_works_offline(raw):
    reply = raw("GET", "/api/v1/docs", auth=False)
    assert reply.status == 200
    html = reply.raw.decode()
    assets = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert "/static/ninja/swagger-ui-bundle.js" in assets
    for asset in assets:
        assert asset.startswith("/"), f"{asset} is not served by the app"
        assert raw("GET", asset, auth=False).status == 200, asset
