"""SAGA_METRICS_TOKEN: a scraper without the bearer token gets nothing."""

from __future__ import annotations

import pytest
from django.test import override_settings

from workflows_app.monitoring.exposition import authorized

pytestmark = pytest.mark.django_db

TOKEN = "s3cret-metrics-token"


@override_settings(SAGA_METRICS_TOKEN=TOKEN)
@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "Bearer",
        "Bearer ",
        "Bearer wrong",
        f"Bearer {TOKEN}x",
        f"Bearer {TOKEN[:-1]}",
        f"Basic {TOKEN}",
        TOKEN,
    ],
)
def test_without_the_token_the_answer_is_401(client, header):
    headers = {} if header is None else {"Authorization": header}
    response = client.get("/metrics", headers=headers)
    assert response.status_code == 401
    assert response["WWW-Authenticate"] == 'Bearer realm="metrics"'
    assert b"saga_" not in response.content


@override_settings(SAGA_METRICS_TOKEN=TOKEN, SAGA_METRICS_CACHE_SECONDS=0)
@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER"])
def test_with_the_token_the_metrics_come(client, scheme):
    response = client.get("/metrics", headers={"Authorization": f"{scheme} {TOKEN}"})
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/plain; version=0.0.4")
    assert b"saga_metrics_database_up 1.0" in response.content
    assert b"# TYPE saga_instances gauge" in response.content
    assert "no-cache" in response["Cache-Control"]


@override_settings(SAGA_METRICS_TOKEN="")
def test_without_a_configured_token_the_endpoint_is_open(client):
    assert client.get("/metrics").status_code == 200


@override_settings(SAGA_METRICS_TOKEN=TOKEN)
def test_only_get(client):
    headers = {"Authorization": f"Bearer {TOKEN}"}
    assert client.post("/metrics", headers=headers).status_code == 405


@override_settings(SAGA_METRICS_TOKEN="")
def test_openmetrics_when_the_scraper_asks_for_it(client):
    response = client.get(
        "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"}
    )
    assert response["Content-Type"].startswith("application/openmetrics-text")
    assert response.content.rstrip().endswith(b"# EOF")


def test_the_comparison_needs_the_whole_token():
    assert authorized(f"Bearer {TOKEN}", TOKEN)
    assert authorized(f"  bearer   {TOKEN}  ", TOKEN)
    assert not authorized(f"Bearer {TOKEN} extra", TOKEN)
    assert not authorized("Bearer " + "é", TOKEN)
    assert authorized(None, "")
