"""Fixtures for the API tests: a live server (real HTTP, PostgreSQL), tokens,
the package's client helper, and the in-memory transport unless a test runs
a real Celery worker."""

from __future__ import annotations

import pytest

from tests.api.helpers import RawHttp
from tests.support import LocalBroker
from workflows_app.client import SagaDeskClient
from workflows_app.models import ApiToken

ALL_SCOPES = ["start", "read", "report"]


@pytest.fixture(autouse=True)
def _transport(request):
    """Instances started over HTTP queue their messages in memory (the live
    server runs in this process), except in tests that run a real worker."""
    if request.node.get_closest_marker("celery_worker"):
        yield None
        return
    with LocalBroker() as local:
        yield local


@pytest.fixture
def transport(_transport):
    return _transport


@pytest.fixture
def issue(transactional_db):
    def make(scopes=ALL_SCOPES, name="checkout-service"):
        return ApiToken.issue(name, list(scopes))[1]

    return make


@pytest.fixture
def token(issue):
    return issue()


@pytest.fixture
def api(live_server, token):
    return SagaDeskClient(live_server.url, token, timeout=30)


@pytest.fixture
def client_for(live_server):
    def make(token):
        return SagaDeskClient(live_server.url, token, timeout=30)

    return make


@pytest.fixture
def raw(live_server, token):
    return RawHttp(live_server.url, token)
