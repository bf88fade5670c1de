"""Fixtures for the HTTP activity: loopback hosts on the allow-list, a
one-step HTTP workflow, and scripted servers."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from django.test import override_settings

from tests.http.servers import Script, serving
from tests.support import make_definition, start
from workflows_app.models import Attempt, StepExecution, WorkflowInstance

LOOPBACK = ["127.0.0.1", "localhost"]


@pytest.fixture(autouse=True)
def _loopback_allowed() -> Iterator[None]:
    with override_settings(SAGA_HTTP_ALLOWED_HOSTS=LOOPBACK):
        yield


@pytest.fixture
def script() -> Script:
    return Script()


@pytest.fixture
def server(script: Script) -> Iterator[str]:
    with serving(script) as base:
        yield base


def http_step(url: str, **config: Any) -> dict[str, Any]:
    """A step spec calling ``url`` (no compensation), config merged in."""
    return {
        "name": "call",
        "action": "http.request",
        "action_config": {"url": url, "method": "POST", **config},
        "compensation": "",
        "timeout": timedelta(seconds=5),
    }


def run_one(
    broker: Any, url: str, *, step: dict[str, Any] | None = None, **config: Any
):
    """Run a one-step HTTP workflow to rest; the instance, step, attempts."""
    spec = {**http_step(url, **config), **(step or {})}
    make_definition("http-wf", [spec])
    instance = start("http-wf", business_key="order-1", amount=10)
    broker.run()
    return settled(instance)


def settled(instance: WorkflowInstance):
    instance.refresh_from_db()
    step = StepExecution.objects.get(instance=instance)
    attempts = list(Attempt.objects.filter(step=step).order_by("number"))
    return instance, step, attempts
