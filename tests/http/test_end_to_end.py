"""A whole workflow whose steps are HTTP services in another process: the
demo participants served by ``manage.py serve_participants``, one of them
answering 202 and reporting by callback to Saga Desk's API (a live server).
Driven once by the in-process transport and once by a real Celery worker."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
from django.test import override_settings

from tests.celery_processes import celery_processes, wait_for
from tests.http.participants import CALLBACK_TOKEN, demo_participants
from tests.support import make_definition, start
from workflows_app.demo.models import ParticipantEffect
from workflows_app.models import (
    ApiToken,
    AttemptExchange,
    TransitionLog,
    WorkflowInstance,
)
from workflows_app.models.tokens import PREFIX_LENGTH

pytestmark = pytest.mark.django_db(transaction=True)
SETTLED = {"completed", "compensated", "needs_attention", "failed", "cancelled"}


@pytest.fixture
def participants():
    with demo_participants() as base:
        yield base


@pytest.fixture
def callback_token():
    """The token the participant process reports its 202 results with."""
    ApiToken.objects.create(
        name="demo-participants",
        prefix=CALLBACK_TOKEN[3 : 3 + PREFIX_LENGTH],
        token_hash=ApiToken.hash(CALLBACK_TOKEN),
        scopes=["report"],
    )


def order_definition(base: str) -> None:
    def http(service: str, direction: str, query: str = "") -> dict[str, str]:
        return {"url": f"{base}/{service}/{direction}{query}"}

    steps = [
        {
            "name": "reserve",
            "action": "http.request",
            "action_config": http("inventory", "action"),
            "compensation": "http.request",
            "compensation_config": http("inventory", "compensation"),
        },
        {
            "name": "charge",
            "action": "http.request",
            # Accepted at once (202), the result comes by callback.
            "action_config": http("payments", "action", "?reply=async"),
            "compensation": "http.request",
            "compensation_config": http("payments", "compensation"),
        },
        {
            "name": "ship",
            "action": "http.request",
            "action_config": http("shipping", "action"),
            "compensation": "",
        },
    ]
    for step in steps:
        step["timeout"] = timedelta(seconds=10)
    make_definition("http-order", steps)


def word(instance: WorkflowInstance) -> list[str]:
    """The effects in the order the participant process applied them."""
    rows = ParticipantEffect.objects.filter(instance_id=instance.id, applied=True)
    return [
        f"{'T' if r.direction == 'action' else 'C'}:{r.step_name}"
        for r in rows.order_by("first_applied_at", "id")
    ]


def settle(instance: WorkflowInstance, broker=None, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if broker is not None:
            broker.run()  # callbacks arriving at the live server queue more
        instance.refresh_from_db()
        if instance.state in SETTLED:
            return
        time.sleep(0.1)
    raise AssertionError(f"{instance} did not settle: {instance.state}")


def assert_paths(instance_ok: WorkflowInstance, instance_fail: WorkflowInstance):
    assert instance_ok.state == "completed", instance_ok.state
    assert word(instance_ok) == ["T:reserve", "T:charge", "T:ship"]
    waits = TransitionLog.objects.filter(
        instance=instance_ok, step__name="charge", target="waiting"
    )
    assert waits.count() == 1  # the 202, then the callback completed it
    assert instance_ok.outputs["charge"]["service"] == "payments"
    assert instance_ok.outputs["ship"]["body"]["service"] == "shipping"
    assert instance_fail.state == "compensated", instance_fail.state
    assert word(instance_fail) == ["T:reserve", "T:charge", "C:charge", "C:reserve"]
    ship = AttemptExchange.objects.get(
        attempt__step__instance=instance_fail, status=422
    )
    assert "declined" in ship.response_body
    assert (
        AttemptExchange.objects.filter(
            attempt__step__instance=instance_fail, attempt__direction="compensation"
        ).count()
        == 2
    )


def test_a_workflow_of_http_services_in_another_process(
    broker, participants, callback_token, live_server
):
    order_definition(participants)
    with override_settings(SAGA_HTTP_CALLBACK_BASE_URL=live_server.url):
        ok = start("http-order", business_key="order-1")
        settle(ok, broker)
        failing = start("http-order", business_key="order-2", simulate={"ship": "fail"})
        settle(failing, broker)
        # The reply is lost on the wire (reset after the effect): the retry
        # under the same key gets the first answer, and nothing twice.
        lost = start(
            "http-order",
            business_key="order-3",
            simulate={"reserve": "lose_confirmation"},
        )
        settle(lost, broker)
    assert_paths(ok, failing)
    assert lost.state == "completed"
    assert word(lost) == ["T:reserve", "T:charge", "T:ship"]
    reserve = ParticipantEffect.objects.get(
        instance_id=lost.id, step_name="reserve", direction="action"
    )
    assert reserve.calls == 2
    broken = AttemptExchange.objects.get(
        attempt__step__instance=lost, attempt__step__name="reserve", status=None
    )
    assert "connection broken after the request was sent" in broken.error


@pytest.mark.celery_worker
def test_the_same_workflow_on_a_real_celery_worker(
    participants, callback_token, live_server
):
    from workflows_app.celery import app

    with app.connection_for_write() as conn:
        conn.default_channel.client.flushdb()  # this test's own Redis db
    order_definition(participants)
    env = {
        "SAGA_HTTP_ALLOWED_HOSTS": "127.0.0.1",
        "SAGA_HTTP_CALLBACK_BASE_URL": live_server.url,
    }
    with celery_processes(concurrency=2, beat=True, extra_env=env):
        ok = start("http-order", business_key="order-1")
        failing = start("http-order", business_key="order-2", simulate={"ship": "fail"})
        wait_for(
            lambda: (
                set(
                    WorkflowInstance.objects.filter(
                        pk__in=[ok.pk, failing.pk]
                    ).values_list("state", flat=True)
                )
                <= SETTLED
            ),
            90,
            "both instances to settle",
        )
    ok.refresh_from_db()
    failing.refresh_from_db()
    assert_paths(ok, failing)
    hosts = set(AttemptExchange.objects.values_list("attempt__worker_host", flat=True))
    assert all(host.startswith("test-worker-") for host in hosts), hosts
