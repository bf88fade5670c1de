"""The API's list filters share the dashboard's: ``status`` and ``state`` are
one filter (conflicting values are a 400), and ``q`` is the list's search."""

from __future__ import annotations

import json

import pytest
from django.test import Client

from tests.support import make_definition, start
from workflows_app.models import ApiToken, WorkflowInstance

pytestmark = pytest.mark.django_db


@pytest.fixture
def web():
    token = ApiToken.issue("reader", ["read"])[1]
    return Client(HTTP_AUTHORIZATION=f"Bearer {token}")


@pytest.fixture
def orders():
    make_definition("orders", search_attributes={"customer": "customer.id"})
    made = {
        key: start("orders", key, customer={"id": customer})
        for key, customer in (
            ("ORD-54020-76", "C-349"),
            ("ORD-54021-77", "c-350"),
            ("TRIP-1", "C-349"),
        )
    }
    # One finished: closed by hand in the database (the filter is the point).
    WorkflowInstance.objects.filter(pk=made["TRIP-1"].pk).update(state="cancelled")
    return made


def listed(web, query: str) -> list[str]:
    response = web.get(f"/api/v1/instances?{query}")
    assert response.status_code == 200, response.content
    items = json.loads(response.content)["items"]
    return sorted(item["business_key"] for item in items)


def refusal(web, query: str) -> dict:
    response = web.get(f"/api/v1/instances?{query}")
    assert response.status_code == 400, response.content
    return json.loads(response.content)["error"]


def test_status_and_state_are_one_filter(web, orders):
    accepted = ["ORD-54020-76", "ORD-54021-77"]
    assert listed(web, "status=accepted") == accepted
    assert listed(web, "state=accepted") == accepted
    assert listed(web, "state=accepted&status=accepted") == accepted
    assert listed(web, "state=cancelled&state=accepted") == [*accepted, "TRIP-1"]
    body = refusal(web, "state=accepted&status=cancelled")
    assert body["code"] == "conflicting_filters"
    assert "disagree" in body["message"]
    assert web.get("/api/v1/instances?state=bogus").status_code == 422


def test_q_searches_like_the_list(web, orders):
    assert listed(web, "q=ord-5402") == ["ORD-54020-76", "ORD-54021-77"]
    assert listed(web, "q=ORD-54020-7") == ["ORD-54020-76"]
    short = str(orders["TRIP-1"].pk)[:8]
    assert listed(web, f"q={short}") == ["TRIP-1"]
    assert listed(web, "q=customer:c-349") == ["ORD-54020-76", "TRIP-1"]
    assert listed(web, "q=customer:c-349&status=cancelled") == ["TRIP-1"]
    assert listed(web, "q=customer:C-349+ord") == ["ORD-54020-76"]
    body = refusal(web, "q=custmer:c-349")
    assert body["code"] == "invalid_search"
    assert "custmer" in body["message"]
    assert web.get("/api/v1/instances?q=%00").status_code in (400, 422)
