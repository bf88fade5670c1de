"""The HTTP activity against real servers on loopback, driven by the engine:
each answer a participant can give, and what the step and attempt become."""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime, timedelta

import pytest
from django.test import override_settings

from tests.http.conftest import run_one, settled
from tests.http.servers import Reply, Script, closed_port, serving
from tests.support import start
from workflows_app.activities.base import ActivityContext, ActivityError
from workflows_app.activities.http import http_request, retry_after
from workflows_app.activities.runner import call_activity
from workflows_app.engine.actors import Actor
from workflows_app.engine.commands import attempt_claim, instance_advance
from workflows_app.models import ApiToken, AttemptExchange, StepExecution

pytestmark = pytest.mark.django_db(transaction=True)


def test_expected_status_succeeds_with_the_body_as_output(broker, script, server):
    script.on("/charge", Reply(201, {"charge": "ch_1"}))
    instance, step, attempts = run_one(
        broker, f"{server}/charge", expected_status=[200, 201]
    )
    assert instance.state == "completed"
    assert instance.outputs["call"] == {"status": 201, "body": {"charge": "ch_1"}}
    [seen] = script.seen
    assert seen.method == "POST"
    assert seen.headers["Idempotency-Key"] == f"{instance.id}:call:action"
    assert seen.headers["Content-Type"] == "application/json"
    body = seen.json()
    assert body["instance_id"] == str(instance.id)
    assert body["business_key"] == "order-1"
    assert body["input"] == {"amount": 10}
    assert body["step"] == "call" and body["direction"] == "action"
    assert (body["attempt"], body["run"]) == (1, 1)
    assert body["task_token"] == str(attempts[0].task_token)
    assert body["callback_url"].endswith(f"/api/v1/callbacks/{body['task_token']}")


def test_a_success_outside_expected_status_is_retryable_not_declined(
    broker, script, server
):
    # 204 says the participant acted: reading it as "declined" would skip
    # the compensation of an effect that exists.
    script.on("/charge", Reply(204, b""))
    instance, step, attempts = run_one(
        broker, f"{server}/charge", expected_status=[200], step={"max_attempts": 2}
    )
    assert step.state == "failed"
    assert [a.outcome for a in attempts] == ["failed", "failed"]
    assert "a success not in expected_status [200]" in attempts[0].error_message
    assert len(script.seen) == 2


def test_202_waits_for_the_callback_with_the_task_token(broker, script, server, client):
    script.on("/charge", Reply(202, {"job": "j1"}))
    instance, step, attempts = run_one(broker, f"{server}/charge")
    assert step.state == "waiting"
    assert attempts[0].outcome == "waiting"
    token = script.seen[0].json()["task_token"]
    _, secret = ApiToken.issue("payments", ["report"])
    answer = client.post(
        f"/api/v1/callbacks/{token}",
        data=json.dumps({"id": "cb-1", "status": "succeeded", "output": {"ok": 1}}),
        content_type="application/json",
        HTTP_AUTHORIZATION=f"Bearer {secret}",
    )
    assert answer.status_code == 200, answer.content
    assert answer.json()["accepted"] is True
    broker.run()
    instance, step, attempts = settled(instance)
    assert instance.state == "completed"
    assert instance.outputs["call"] == {"ok": 1}


@pytest.mark.parametrize("status", [400, 401, 403, 404, 409, 422])
def test_4xx_is_permanent(broker, script, server, status):
    script.on("/charge", Reply(status, {"error": "declined"}))
    instance, step, attempts = run_one(broker, f"{server}/charge")
    assert step.state == "failed"
    assert [a.outcome for a in attempts] == ["failed_permanent"]
    assert f"answered {status}" in attempts[0].error_message
    assert "declined" in attempts[0].error_message
    assert len(script.seen) == 1  # not retried


@pytest.mark.parametrize("status", [408, 425, 429, 500, 502, 503, 504])
def test_retryable_statuses_are_retried_then_succeed(broker, script, server, status):
    script.on("/charge", Reply(status, {"error": "busy"}), Reply(200, {"ok": True}))
    instance, step, attempts = run_one(broker, f"{server}/charge")
    assert instance.state == "completed"
    assert [a.outcome for a in attempts] == ["failed", "succeeded"]
    keys = {seen.headers["Idempotency-Key"] for seen in script.seen}
    assert keys == {f"{instance.id}:call:action"}  # the same key on the retry
    assert [seen.json()["attempt"] for seen in script.seen] == [1, 2]


def context(url: str, **config) -> ActivityContext:
    return ActivityContext(
        instance_id="00000000-0000-0000-0000-000000000001",
        business_key="order-1",
        definition_key="http-wf",
        input={},
        outputs={},
        step_name="call",
        direction="action",
        attempt=1,
        idempotency_key="00000000-0000-0000-0000-000000000001:call:action",
        deadline=datetime.now(UTC) + timedelta(seconds=5),
        task_token="00000000-0000-0000-0000-00000000000f",  # no attempt row
        config={"url": url, **config},
    )


@pytest.mark.parametrize(
    ("header", "seconds"),
    [("120", 120), ("0", 0), ("999999", 3600), ("soon", None), (None, None)],
)
def test_retry_after_in_seconds_is_carried_on_the_error(
    script, server, header, seconds
):
    headers = {"Retry-After": header} if header is not None else {}
    script.on("/charge", Reply(503, {"error": "busy"}, headers=headers))
    with pytest.raises(ActivityError) as raised:
        http_request(context(f"{server}/charge"))
    assert raised.value.permanent is False
    expected = None if seconds is None else timedelta(seconds=seconds)
    assert raised.value.retry_after == expected


def test_retry_after_as_an_http_date():
    when = datetime.now(UTC) + timedelta(seconds=90)
    value = when.strftime("%a, %d %b %Y %H:%M:%S GMT")
    delay = retry_after(value)
    assert delay is not None
    assert timedelta(seconds=88) <= delay <= timedelta(seconds=90)
    assert retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == timedelta(0)  # past


def test_connection_refused_is_retryable(broker):
    url = f"http://127.0.0.1:{closed_port()}/charge"
    instance, step, attempts = run_one(broker, url, step={"max_attempts": 2})
    assert step.state == "failed"
    assert [a.outcome for a in attempts] == ["failed", "failed"]
    assert "connection failed" in attempts[0].error_message
    exchange = AttemptExchange.objects.get(attempt=attempts[0])
    assert exchange.status is None and "connection failed" in exchange.error


def test_reset_mid_response_is_retryable_and_says_the_effect_may_exist(
    broker, script, server
):
    big = {"data": "x" * 5000}
    script.on("/charge", Reply(200, big, reset_after=100), Reply(200, {"ok": True}))
    instance, step, attempts = run_one(broker, f"{server}/charge")
    assert instance.state == "completed"
    assert [a.outcome for a in attempts] == ["failed", "succeeded"]
    assert "connection broken after the request was sent" in attempts[0].error_message
    assert "may have happened" in attempts[0].error_message


def test_a_server_slower_than_the_step_timeout_is_an_unknown_outcome(
    broker, script, server
):
    script.on("/charge", Reply(200, {"ok": True}, delay=3))
    instance, step, attempts = run_one(
        broker, f"{server}/charge", step={"timeout": timedelta(seconds=1)}
    )
    assert step.state == "unknown"
    assert [a.outcome for a in attempts] == ["timed_out"]
    exchange = AttemptExchange.objects.get(attempt=attempts[0])
    assert exchange.status is None
    assert exchange.error  # interrupted or timed out, never "succeeded"


def test_without_the_worker_alarm_the_client_timeout_is_still_unknown(
    broker, script, server
):
    """A thread has no SIGALRM: the client's own read timeout must give the
    same verdict (timed out), not a definite failure."""
    from tests.http.conftest import http_step
    from tests.support import make_definition

    script.on("/charge", Reply(200, {"ok": True}, delay=4))
    spec = {**http_step(f"{server}/charge"), "timeout": timedelta(seconds=1)}
    make_definition("http-wf", [spec])
    instance = start("http-wf")
    # Schedule the step without running it, then claim it here.
    instance_advance(instance.id, actor=Actor.system("test"))
    step = StepExecution.objects.get(instance=instance)
    claim = attempt_claim(instance.id, step.id, "action", actor=Actor.system("test"))
    assert claim is not None
    outcomes = []
    thread = threading.Thread(target=lambda: outcomes.append(call_activity(claim)))
    thread.start()
    thread.join(10)
    [outcome] = outcomes
    assert outcome.kind == "timed_out"


@override_settings(SAGA_HTTP_MAX_RESPONSE_BYTES=1000)
@pytest.mark.parametrize("chunked", [False, True])
def test_an_oversized_success_is_a_clear_error_not_a_cut_string(
    broker, script, server, chunked
):
    script.on("/charge", Reply(200, {"data": "x" * 5000}, chunked=chunked))
    instance, step, attempts = run_one(
        broker, f"{server}/charge", step={"max_attempts": 1}
    )
    assert step.state == "failed"
    assert attempts[0].outcome == "failed"  # retryable: the effect may exist
    assert "body over 1000 bytes" in attempts[0].error_message
    assert "call" not in instance.outputs
    exchange = AttemptExchange.objects.get(attempt=attempts[0])
    assert exchange.response_body == ""
    assert "larger than 1000 bytes" in exchange.error


@override_settings(SAGA_HTTP_MAX_RESPONSE_BYTES=1000)
def test_an_oversized_error_page_is_classified_by_its_status(broker, script, server):
    script.on("/charge", Reply(404, b"<html>" + b"x" * 5000 + b"</html>"))
    instance, step, attempts = run_one(broker, f"{server}/charge")
    assert [a.outcome for a in attempts] == ["failed_permanent"]


def test_a_redirect_is_not_followed_by_default(broker, script, server):
    script.on("/old", Reply(302, b"", headers={"Location": "/new"}))
    script.on("/new", Reply(200, {"ok": True}))
    instance, step, attempts = run_one(broker, f"{server}/old")
    assert [a.outcome for a in attempts] == ["failed_permanent"]
    assert "redirects are not followed" in attempts[0].error_message
    assert [s.path for s in script.seen] == ["/old"]


@pytest.mark.parametrize(("status", "method"), [(307, "POST"), (302, "GET")])
def test_a_same_host_redirect_is_followed_when_the_step_allows_it(
    broker, script, server, status, method
):
    script.on("/old", Reply(status, b"", headers={"Location": "/new"}))
    script.on("/new", Reply(200, {"moved": True}))
    instance, step, attempts = run_one(broker, f"{server}/old", follow_redirects=True)
    assert instance.state == "completed"
    assert [(s.method, s.path) for s in script.seen] == [
        ("POST", "/old"),
        (method, "/new"),
    ]
    if method == "POST":
        assert script.seen[1].json()["task_token"] == str(attempts[0].task_token)
    hops = AttemptExchange.objects.filter(attempt=attempts[0]).order_by("hop")
    assert [(h.hop, h.status) for h in hops] == [(1, status), (2, 200)]


def test_a_redirect_to_another_host_is_never_followed(broker, script, server):
    other = Script().on("/steal", Reply(200, {"ok": True}))
    with serving(other, host="localhost") as elsewhere:
        script.on("/old", Reply(307, b"", headers={"Location": f"{elsewhere}/steal"}))
        instance, step, attempts = run_one(
            broker, f"{server}/old", follow_redirects=True
        )
    assert [a.outcome for a in attempts] == ["failed_permanent"]
    assert "another host is never followed" in attempts[0].error_message
    assert other.seen == []


def test_a_host_off_the_allow_list_is_refused_at_call_time(broker, script, server):
    script.on("/charge", Reply(200, {"ok": True}))
    with override_settings(SAGA_HTTP_ALLOWED_HOSTS=["127.0.0.1"]):
        from tests.http.conftest import http_step
        from tests.support import make_definition

        make_definition("http-wf", [http_step(f"{server}/charge")])
    # Removed from the list after the definition was published.
    with override_settings(SAGA_HTTP_ALLOWED_HOSTS=["payments.internal"]):
        instance = start("http-wf")
        broker.run()
        instance, step, attempts = settled(instance)
    assert [a.outcome for a in attempts] == ["failed_permanent"]
    assert "not in SAGA_HTTP_ALLOWED_HOSTS" in attempts[0].error_message
    assert script.seen == []


def test_connections_are_reused_within_a_worker_process(broker, script, server):
    script.on("/charge", Reply(200, {"ok": True}))
    run_one(broker, f"{server}/charge")
    start("http-wf", business_key="order-2")
    broker.run()
    ports = {seen.client_port for seen in script.seen}
    assert len(script.seen) == 2 and len(ports) == 1
