"""Reading instances: the exact status body of DESIGN section 6, the audited
history, filtered keyset-paginated lists, and a fixed number of queries."""

from __future__ import annotations

import json

import pytest
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext

from tests.support import make_definition, start
from workflows_app.models import ApiToken, WorkflowInstance

STATUS_FIELDS = {
    "id",
    "definition",
    "version",
    "business_key",
    "status",
    "stuck",
    "steps",
    "accepted_at",
    "completed_at",
}
STEP_FIELDS = {"name", "state", "compensation_state", "attempts", "run", "stage"}
HISTORY_FIELDS = {
    "at",
    "step",
    "field",
    "source",
    "target",
    "transition",
    "actor",
    "reason",
}


@pytest.mark.django_db(transaction=True)
def test_status_and_history_have_the_contract_fields(api, transport):
    make_definition("wf", [{"name": "one"}, {"name": "two"}])
    started = api.start(
        "wf",
        business_key="o-1",
        idempotency_key="k",
        input={"simulate": {"two": "fail"}},
    )
    transport.run()

    status = api.status(started.id)
    assert set(status) == STATUS_FIELDS
    assert status["id"] == started.id
    assert (status["definition"], status["version"]) == ("wf", 1)
    assert (status["business_key"], status["stuck"]) == ("o-1", False)
    # A compensated instance finished, but never completed.
    assert status["status"] == "compensated"
    assert status["completed_at"] is None
    assert status["accepted_at"].endswith("Z")
    for step in status["steps"]:
        assert set(step) == STEP_FIELDS
    assert [
        (s["name"], s["state"], s["compensation_state"], s["attempts"])
        for s in status["steps"]
    ] == [
        ("one", "succeeded", "done", 2),  # its action and its compensation
        ("two", "failed", "not_needed", 1),  # declined for good: not undone
    ]

    history = api.history(started.id)
    assert all(set(row) == HISTORY_FIELDS for row in history)
    assert history[0] == {
        "at": history[0]["at"],
        "step": None,
        "field": "state",
        "source": "",
        "target": "accepted",
        "transition": "accept",
        "actor": "api:checkout-service",
        "reason": "accepted for o-1",
    }
    assert history[-1]["target"] == "compensated"
    assert [r["at"] for r in history] == sorted(r["at"] for r in history)
    assert {r["actor"].split(":")[0] for r in history} >= {"api", "worker"}
    steps = [(r["step"], r["transition"]) for r in history if r["step"]]
    assert ("two", "fail") in steps
    assert ("one", "compensation_succeed") in steps


@pytest.mark.django_db(transaction=True)
def test_list_filters_and_walks_pages_without_duplicates(api, transport):
    make_definition("alpha")
    make_definition("beta")
    ids = {}
    for n in range(7):
        key = "alpha" if n % 2 == 0 else "beta"
        started = api.start(key, business_key=f"b-{n % 3}", idempotency_key=f"k{n}")
        ids[started.id] = (key, f"b-{n % 3}")
    some = next(iter(ids))
    api.start("alpha", business_key="done", idempotency_key="done")
    transport.run()  # all complete; then one more stays accepted
    fresh = api.start("alpha", business_key="new", idempotency_key="new")

    seen, cursor, pages = [], None, 0
    while True:
        page = api.instances(limit=3, cursor=cursor)
        pages += 1
        seen += [item["id"] for item in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert pages == 3 and len(seen) == len(set(seen)) == 9
    # Most recently progressed first.
    assert seen[0] == fresh.id

    items = api.instances(definition="beta")["items"]
    assert {i["id"] for i in items} == {i for i, (k, _) in ids.items() if k == "beta"}
    items = api.instances(business_key="b-1")["items"]
    assert {i["id"] for i in items} == {i for i, (_, b) in ids.items() if b == "b-1"}
    assert [i["id"] for i in api.instances(status="accepted")["items"]] == [fresh.id]
    both = api.instances(status=["accepted", "completed"], definition="alpha")
    assert len(both["items"]) == 6
    assert api.instances(stuck=True)["items"] == []
    assert len(api.instances(stuck=False, limit=200)["items"]) == 9

    item = next(i for i in api.instances(limit=200)["items"] if i["id"] == some)
    assert item["status"] == "completed" and item["completed_at"]
    assert item["status_url"].endswith(f"/api/v1/instances/{some}")
    assert api.instances(definition="nope") == {"items": [], "next_cursor": None}


@pytest.mark.django_db(transaction=True)
def test_reads_take_a_fixed_number_of_queries(transport):
    """No N+1: the status of a 2-step and of a 12-step instance, and a page
    of 2 or of 12 instances, cost the same queries."""
    token = ApiToken.issue("reader", ["read"])[1]
    web = Client(HTTP_AUTHORIZATION=f"Bearer {token}")
    web.get("/api/v1/instances")  # first use: last_used_at is written once
    make_definition("short", [{"name": "a"}, {"name": "b"}])
    make_definition("long", [{"name": f"s{i}"} for i in range(12)])
    small, large = start("short", "s-1"), start("long", "l-1")
    transport.run()

    def queries(path):
        with CaptureQueriesContext(connection) as ctx:
            response = web.get(path)
        assert response.status_code == 200, response.content
        return len(ctx.captured_queries), json.loads(response.content)

    n_small, body = queries(f"/api/v1/instances/{small.id}")
    n_large, body_large = queries(f"/api/v1/instances/{large.id}")
    assert len(body_large["steps"]) == 12
    assert n_small == n_large <= 3  # token, instance + definition, steps
    assert body_large["steps"][0]["attempts"] == 1

    n_two, _ = queries("/api/v1/instances?limit=2")
    for i in range(10):
        start("short", f"more-{i}")
    n_twelve, page = queries("/api/v1/instances?limit=12")
    assert len(page["items"]) == 12
    assert n_two == n_twelve <= 2  # token, page

    n_history, rows = queries(f"/api/v1/instances/{large.id}/history")
    assert n_history <= 2 and len(rows) > 12
    assert WorkflowInstance.objects.count() == 12
