"""Secrets by reference, and what each attempt sent and received: resolved
in the worker, never stored, logged or shown; exchanges redacted, shown
under their attempt on the instance page, and pruned."""

from __future__ import annotations

import logging
from datetime import timedelta

import pytest
from django.apps import apps
from django.core import serializers
from django.test import override_settings
from django.urls import reverse
from django.utils import timezone

from tests.http.conftest import run_one
from tests.http.servers import Reply
from tests.support import start, user_in
from tests.views.conftest import logged_in
from workflows_app.models import AttemptExchange

pytestmark = pytest.mark.django_db(transaction=True)
SECRET = "sk_live_5up3r-s3cr3t-v4lue"


def everything_stored() -> str:
    """Every row of every Saga Desk table, as text."""
    return "".join(
        serializers.serialize("json", model.objects.all())
        for model in apps.get_app_config("workflows_app").get_models()
    )


@pytest.fixture
def payments_token(monkeypatch):
    monkeypatch.setenv("PAYMENTS_TOKEN", SECRET)


def test_an_env_reference_is_resolved_at_call_time_and_never_kept(
    broker, script, server, payments_token, caplog
):
    caplog.set_level(logging.DEBUG)
    # A careless participant echoes the credential back in its answer.
    script.on(
        "/charge",
        Reply(
            200, {"ok": True, "echo": f"Bearer {SECRET}"}, headers={"Server": SECRET}
        ),
    )
    instance, step, attempts = run_one(
        broker,
        f"{server}/charge",
        headers={"Authorization": "Bearer ${env:PAYMENTS_TOKEN}", "X-Team": "ops"},
    )
    assert instance.state == "completed"
    [seen] = script.seen
    assert seen.headers["Authorization"] == f"Bearer {SECRET}"
    assert seen.headers["X-Team"] == "ops"
    assert instance.outputs["call"]["body"]["echo"] == "Bearer [secret]"
    exchange = AttemptExchange.objects.get(attempt=attempts[0])
    assert exchange.request_headers["Authorization"] == (
        "[redacted] (env:PAYMENTS_TOKEN)"
    )
    assert exchange.request_headers["X-Team"] == "ops"
    assert exchange.response_headers["server"] == "[secret]"
    assert SECRET not in everything_stored()
    assert SECRET not in caplog.text
    page = logged_in(user_in("viewer", "victor")).get(
        reverse("instance_detail", args=[instance.pk])
    )
    assert page.status_code == 200
    assert SECRET not in page.content.decode()
    assert "[redacted] (env:PAYMENTS_TOKEN)" in page.content.decode()


def test_a_named_secret_is_read_from_the_secrets_directory(
    broker, script, server, tmp_path
):
    (tmp_path / "payments_key").write_text(SECRET + "\n")
    script.on("/charge", Reply(200, {"ok": True}))
    with override_settings(SAGA_HTTP_SECRETS_DIR=str(tmp_path)):
        instance, step, attempts = run_one(
            broker, f"{server}/charge", headers={"X-Api-Key": "secret:payments_key"}
        )
    assert instance.state == "completed"
    assert script.seen[0].headers["X-Api-Key"] == SECRET
    assert SECRET not in everything_stored()


def test_a_missing_secret_fails_before_anything_is_sent(broker, script, server):
    script.on("/charge", Reply(200, {"ok": True}))
    instance, step, attempts = run_one(
        broker, f"{server}/charge", headers={"Authorization": "env:NOT_SET_ANYWHERE"}
    )
    assert [a.outcome for a in attempts] == ["failed_permanent"]
    assert "NOT_SET_ANYWHERE is not set" in attempts[0].error_message
    assert script.seen == []


def test_configured_and_default_fields_are_redacted_in_the_record_only(
    broker, script, server
):
    script.on("/charge", Reply(200, {"iban": "DE02120300000000202051", "pin": "1234"}))
    instance, step, attempts = run_one(
        broker, f"{server}/charge", redact=["pin", "amount"]
    )
    exchange = AttemptExchange.objects.get(attempt=attempts[0])
    assert '"amount": "[redacted]"' in exchange.request_body
    assert "DE02120300000000202051" not in exchange.response_body
    assert '"pin": "[redacted]"' in exchange.response_body
    # The participant received the real input, the next step the real output.
    assert script.seen[0].json()["input"]["amount"] == 10
    assert instance.outputs["call"]["body"]["pin"] == "1234"


def test_each_attempt_keeps_what_it_sent_and_received(broker, script, server):
    script.on("/charge", Reply(503, {"error": "busy"}), Reply(200, {"ok": True}))
    instance, step, attempts = run_one(broker, f"{server}/charge")
    first, second = (
        AttemptExchange.objects.get(attempt=attempt) for attempt in attempts
    )
    assert (first.method, first.status, second.status) == ("POST", 503, 200)
    assert first.url == f"{server}/charge"
    assert '"busy"' in first.response_body
    assert first.response_headers["content-type"] == "application/json"
    assert first.request_headers["Idempotency-Key"] == f"{instance.id}:call:action"
    assert f'"task_token": "{attempts[0].task_token}"' in first.request_body
    assert first.duration_ms >= 0 and first.request_bytes > 0
    page = logged_in(user_in("viewer", "victor")).get(
        reverse("instance_detail", args=[instance.pk])
    )
    html = page.content.decode()
    # Shown under its own attempt, in order.
    attempt_one = html.index("action #1")
    attempt_two = html.index("action #2")
    assert attempt_one < html.index(f"exchange-{first.pk}") < attempt_two
    assert attempt_two < html.index(f"exchange-{second.pk}")
    assert f"POST {server}/charge → 503" in html


@override_settings(SAGA_HTTP_EXCHANGE_BODY_BYTES=64)
def test_bodies_are_cut_to_their_first_bytes(broker, script, server):
    script.on("/charge", Reply(200, {"data": "y" * 1000}))
    instance, step, attempts = run_one(broker, f"{server}/charge")
    exchange = AttemptExchange.objects.get(attempt=attempts[0])
    assert len(exchange.response_body.encode()) <= 64 + len(" …".encode())
    assert exchange.response_body.endswith(" …")
    assert exchange.response_bytes > 1000 and exchange.body_cut
    assert instance.outputs["call"]["body"]["data"] == "y" * 1000


@override_settings(SAGA_HTTP_EXCHANGES_PER_STEP=2)
def test_retention_keeps_the_newest_per_step_and_drops_old_rows(broker, script, server):
    script.on(
        "/charge",
        Reply(503, {"n": 1}),
        Reply(503, {"n": 2}),
        Reply(503, {"n": 3}),
        Reply(200, {"n": 4}),
    )
    instance, step, attempts = run_one(
        broker, f"{server}/charge", step={"max_attempts": 4}
    )
    kept = AttemptExchange.objects.filter(attempt__step=step).order_by("created_at")
    assert [e.attempt.number for e in kept] == [3, 4]
    # Rows past the keep period go at the next write, whatever their step.
    kept.update(created_at=timezone.now() - timedelta(days=30))
    start("http-wf", business_key="order-2")
    broker.run()
    assert AttemptExchange.objects.filter(attempt__step=step).count() == 0
    assert AttemptExchange.objects.count() == 1


def test_the_instance_page_reads_exchanges_in_one_query(broker, script, server):
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    script.on("/charge", Reply(200, {"ok": True}))
    one, _, _ = run_one(broker, f"{server}/charge")
    script.on("/charge", Reply(503, {}), Reply(503, {}), Reply(200, {"ok": True}))
    three = start("http-wf", business_key="order-3")
    broker.run()
    client = logged_in(user_in("viewer", "victor"))
    client.get(reverse("instance_detail", args=[one.pk]))
    counts = []
    for instance, exchanges in ((one, 1), (three, 3)):
        with CaptureQueriesContext(connection) as queries:
            page = client.get(reverse("instance_detail", args=[instance.pk]))
        assert page.content.decode().count('class="exchange"') == exchanges
        counts.append(len(queries.captured_queries))
    assert counts[0] == counts[1]
