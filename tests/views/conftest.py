"""Fixtures of the dashboard tests: users per role, and instances built by
the real engine (in-memory transport) in the states the pages show."""

from __future__ import annotations

import pytest
from django.test import Client

from tests.support import make_definition, start, user_in
from workflows_app.models import WorkflowInstance

HOLD_STEPS = [
    {"name": "one"},
    # One attempt only: a transient failure exhausts it and the instance is
    # held; an operator's retry gets a fresh attempt, which succeeds.
    {"name": "two", "max_attempts": 1},
    {"name": "three"},
]


@pytest.fixture
def operator():
    return user_in("operator", "olga")


@pytest.fixture
def viewer():
    return user_in("viewer", "victor")


def logged_in(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


@pytest.fixture
def wf():
    return make_definition("wf", steps=HOLD_STEPS, failure_policy="hold")


def held(broker, business_key: str = "order-1", **simulate) -> WorkflowInstance:
    """An instance on hold: step two failed for good (needs attention)."""
    instance = start("wf", business_key, simulate=simulate or {"two": "fail_once"})
    broker.run()
    instance.refresh_from_db()
    assert instance.state == "needs_attention", instance.state
    return instance


def completed(broker, business_key: str = "done-1") -> WorkflowInstance:
    instance = start("wf", business_key)
    broker.run()
    instance.refresh_from_db()
    assert instance.state == "completed"
    return instance


def fresh(instance: WorkflowInstance) -> WorkflowInstance:
    return WorkflowInstance.objects.get(pk=instance.pk)


@pytest.fixture(autouse=True)
def fast_passwords(settings):
    """Logins in these tests need no strong hashing; keeps them fast."""
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
