"""The API end to end with a real Celery worker and beat on Redis: instances
started over HTTP run, wait, and finish from a callback or an event posted
over HTTP; the client sees it all through the status and history endpoints."""

from __future__ import annotations

import pytest
from django.test import override_settings

from tests.api.helpers import event_definition, task_token, waiting_definition
from tests.celery_processes import celery_processes, wait_for

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.celery_worker]


@pytest.fixture(autouse=True)
def empty_broker():
    from workflows_app.celery import app

    with app.connection_for_write() as conn:
        conn.default_channel.client.flushdb()
    # A start message lost by the broker is re-sent after 2 s, not 30.
    with override_settings(SAGA_REDISPATCH_AFTER=2):
        yield


def test_workflows_started_over_http_finish_from_callbacks_and_events(api):
    waiting_definition("wf")
    event_definition("ev", "payment.captured")
    by_callback = api.start("wf", business_key="o-1", idempotency_key="o-1")
    by_event = api.start("ev", business_key="o-2", idempotency_key="o-2")

    def step_two(instance_id):
        return api.status(instance_id)["steps"][1]["state"]

    with celery_processes(concurrency=2):
        wait_for(lambda: step_two(by_callback.id) == "waiting", 30, "a callback wait")
        wait_for(lambda: step_two(by_event.id) == "waiting", 30, "an event wait")
        api.report_callback(
            task_token(by_callback.id),
            message_id="cb-1",
            succeeded=True,
            output={"ref": "x"},
        )
        api.post_event("ev-1", type="payment.captured", correlation_key="o-2")
        for started in (by_callback, by_event):
            wait_for(
                lambda s=started: api.status(s.id)["status"] == "completed",
                30,
                "the instance to complete",
            )

    status = api.status(by_callback.id)
    assert [s["state"] for s in status["steps"]] == ["succeeded"] * 3
    assert status["completed_at"] is not None
    history = api.history(by_callback.id)
    actors = [(row["step"], row["transition"], row["actor"]) for row in history]
    assert ("two", "succeed", "api:checkout-service") in actors
    assert any(a.startswith("worker:") for _, _, a in actors)
    assert history[-1]["target"] == "completed"
    history = api.history(by_event.id)
    assert ("two", "succeed", "event:checkout-service") in [
        (row["step"], row["transition"], row["actor"]) for row in history
    ]
