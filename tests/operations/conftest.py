"""Held instances built by the real engine (in-memory transport)."""

from __future__ import annotations

import pytest

import tests.worker_activities  # noqa: F401 - registers test.flaky_gateway
from tests.support import make_definition, start, user_in
from workflows_app.models import WorkflowInstance

STEPS = [
    {"name": "reserve"},
    # One attempt: a failure holds the instance at once.
    {"name": "charge", "action": "test.flaky_gateway", "max_attempts": 1},
    {"name": "ship"},
]


@pytest.fixture
def wf():
    return make_definition("orders", steps=STEPS, failure_policy="hold")


@pytest.fixture
def operator():
    return user_in("operator", "olga")


@pytest.fixture
def second_operator():
    return user_in("operator", "oscar")


def held(broker, key: str, outage: str = "503", **simulate: str):
    """An instance held at ``charge`` by a gateway outage (or at the step a
    ``simulate`` mode makes fail)."""
    instance = start("orders", key, outage=outage, simulate=simulate)
    broker.run()
    instance = WorkflowInstance.objects.get(pk=instance.pk)
    assert instance.state == "needs_attention", instance.state
    return instance


def finished(broker, key: str):
    instance = start("orders", key)
    broker.run()
    instance = WorkflowInstance.objects.get(pk=instance.pk)
    assert instance.state == "completed"
    return instance
