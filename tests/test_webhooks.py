"""Alert and state-change webhooks, delivered to a real HTTP receiver on loopback.

The receiver is a threaded ``http.server`` on port 0 that records every
request (headers and raw body) and answers as each test scripts it. The
signature is checked here with ``hmac`` directly, as a receiver in any
language would, not with the sender's own code.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from datetime import timedelta

import pytest
from django.contrib.auth.models import User
from django.db.models import F
from django.test import override_settings
from django.utils.html import escape

from tests.celery_processes import celery_processes, wait_for
from tests.http.servers import Reply, Script, closed_port, serving
from tests.http.test_secrets_and_exchanges import everything_stored
from tests.monitoring.scrape import parse, value
from tests.support import advance_clock, make_definition, start, user_in
from workflows_app import tasks
from workflows_app.alerts import send_due_alerts
from workflows_app.engine import commands
from workflows_app.engine.sweeps import sweep_all
from workflows_app.models import Alert, WebhookDelivery, WorkflowDefinition
from workflows_app.webhooks import signing
from workflows_app.webhooks.delivery import deliver_due

pytestmark = pytest.mark.django_db(transaction=True)
SECRET = "whsec-test-0123456789"
SITE = "https://saga.example.com"


class Receiver:
    def __init__(self, script: Script, base: str) -> None:
        self.script = script
        self.base = base

    def on(self, path: str, *replies: Reply) -> None:
        self.script.on(path, *replies)

    def requests(self, path: str):
        return [seen for seen in self.script.seen if seen.path == path]


@pytest.fixture
def receiver(monkeypatch):
    script = Script()
    with (
        serving(script) as base,
        override_settings(
            SAGA_HTTP_ALLOWED_HOSTS=["127.0.0.1"],
            SAGA_WEBHOOK_SECRET=SECRET,
            SAGA_WEBHOOK_TIMEOUT=2,
            SAGA_ALERT_GATHER=0,
            SITE_URL=SITE,
            EMAIL_BACKEND="django.core.mail.backends.locmem.EmailBackend",
        ),
    ):
        # A chat's incoming-webhook URL is a credential: only its env name
        # is stored on the definition.
        monkeypatch.setenv("ORDERS_CHAT_URL", f"{base}/chat/T0/B0/s3cr3t-path")
        script.on("/chat/T0/B0/s3cr3t-path", Reply(200, b"ok"))
        script.on("/hooks", Reply(200))
        script.on("/events", Reply(200))
        yield Receiver(script, base)


def assert_signed(seen, now=None):
    """What a receiver does: HMAC-SHA256 over "<timestamp>.<raw body>"."""
    timestamp = seen.headers["X-Saga-Timestamp"]
    expected = hmac.new(
        SECRET.encode(), timestamp.encode() + b"." + seen.body, hashlib.sha256
    ).hexdigest()
    assert seen.headers["X-Saga-Signature"] == f"sha256={expected}"
    assert abs((now or time.time()) - int(timestamp)) < 60
    assert seen.headers["Idempotency-Key"] == seen.headers["X-Saga-Event-Id"]


def stuck_instances(broker, base, count=1, key="orders"):
    make_definition(
        key,
        stuck_after=timedelta(minutes=2),
        alert_recipients="orders-team@example.com",
        alert_webhooks=f"slack env:ORDERS_CHAT_URL\njson {base}/hooks",
    )
    instances = [start(key, f"order-{n}") for n in range(count)]
    broker.queue.clear()  # every start message is lost: nothing moves
    for instance in instances:
        advance_clock(instance, 300)
    return instances


def run_alerting(rounds=1, instances=(), step=5):
    for _ in range(rounds):
        sweep_all()
        send_due_alerts()
        deliver_due()
        for instance in instances:
            advance_clock(instance, step)


def let_retries_fall_due(seconds=3600):
    WebhookDelivery.objects.filter(next_attempt_at__isnull=False).update(
        next_attempt_at=F("next_attempt_at") - timedelta(seconds=seconds)
    )


# -- alerts ---------------------------------------------------------------------


def test_alert_reaches_chat_and_signed_json_once_per_episode(broker, receiver, client):
    [instance] = stuck_instances(broker, receiver.base)
    run_alerting(rounds=6, instances=[instance])
    [chat] = receiver.requests("/chat/T0/B0/s3cr3t-path")
    body = chat.json()
    assert list(body) == ["text"]
    link = f"{SITE}/instances/{instance.id}/"
    assert f"<{link}|order-0>" in body["text"]
    assert "*orders*" in body["text"] and "no progress" in body["text"]
    assert_signed(chat)
    [hook] = receiver.requests("/hooks")
    assert_signed(hook)
    payload = hook.json()
    assert payload["event"] == "alert" == hook.headers["X-Saga-Event"]
    assert payload["event_id"] == hook.headers["X-Saga-Event-Id"]
    [item] = payload["alerts"]
    assert (item["business_key"], item["url"]) == ("order-0", link)
    # The alert page says where it went, never the secret chat URL.
    client.force_login(user_in("viewer"))
    page = client.get("/alerts/").content.decode()
    assert "env:ORDERS_CHAT_URL</span>: sent" in page
    assert "s3cr3t" not in page
    assert "s3cr3t" not in client.get("/webhooks/?status=delivered").content.decode()
    # The chat digest's link lists one definition's alerts.
    assert "order-0" in client.get("/alerts/?definition=orders").content.decode()
    assert "order-0" not in client.get("/alerts/?definition=other").content.decode()


def test_a_burst_is_one_digest_per_target_and_the_global_url_gets_it(broker, receiver):
    with override_settings(
        SAGA_ALERT_WEBHOOK_URL=f"{receiver.base}/global",
        SAGA_ALERT_WEBHOOK_FORMAT="slack",
    ):
        receiver.on("/global", Reply(200))
        stuck_instances(broker, receiver.base, count=12)
        run_alerting(rounds=3)
    [digest] = receiver.requests("/global")
    text = digest.json()["text"]
    assert text.startswith("Saga Desk: 12 instances of *orders* need attention")
    assert all(f"|order-{n}>" in text for n in range(12))
    assert f"<{SITE}/alerts/?definition=orders|All open alerts>" in text
    assert len(receiver.requests("/chat/T0/B0/s3cr3t-path")) == 1
    [hook] = receiver.requests("/hooks")
    assert hook.json()["event"] == "alert.digest" and hook.json()["count"] == 12
    assert Alert.objects.filter(hooks_queued_at__isnull=False).count() == 12


def test_receiver_500_then_200_is_retried_after_backoff_with_the_same_event_id(
    broker, receiver, client
):
    receiver.on("/hooks", Reply(500, {"error": "busy"}), Reply(200))
    [instance] = stuck_instances(broker, receiver.base)
    run_alerting()
    failing = WebhookDelivery.objects.get(target=f"{receiver.base}/hooks")
    assert (failing.status, failing.attempts, failing.last_status) == (
        "failing",
        1,
        500,
    )
    client.force_login(user_in("viewer"))
    page = client.get("/alerts/").content.decode()
    assert "<strong>not sent</strong> after 1 try: HTTP 500" in page
    assert "HTTP 500" in client.get("/webhooks/").content.decode()
    deliver_due()  # the retry waits for its backoff
    assert len(receiver.requests("/hooks")) == 1
    let_retries_fall_due(31)
    assert deliver_due()["webhooks_delivered"] == 1
    first, second = receiver.requests("/hooks")
    assert first.headers["X-Saga-Event-Id"] == second.headers["X-Saga-Event-Id"]
    assert first.body == second.body
    assert_signed(first)
    assert_signed(second)
    failing.refresh_from_db()
    assert failing.status == "delivered" and failing.last_error == ""
    run_alerting(rounds=3, instances=[instance])
    assert len(receiver.requests("/hooks")) == 2  # nothing more this episode


def test_mail_retries_do_not_repeat_the_webhook(broker, receiver):
    with override_settings(
        EMAIL_BACKEND="django.core.mail.backends.smtp.EmailBackend",
        EMAIL_HOST="127.0.0.1",
        EMAIL_PORT=closed_port(),
        EMAIL_TIMEOUT=2,
    ):
        [instance] = stuck_instances(broker, receiver.base)
        for _ in range(3):  # the mail fails each time and is retried
            run_alerting(instances=[instance], step=3600)
    alert = Alert.objects.get()
    assert alert.send_attempts == 3 and alert.notified_at is None
    assert len(receiver.requests("/hooks")) == 1
    assert len(receiver.requests("/chat/T0/B0/s3cr3t-path")) == 1


def test_recovery_before_the_notification_sends_nothing(broker, receiver):
    with override_settings(SAGA_ALERT_GATHER=60):
        [instance] = stuck_instances(broker, receiver.base)
        sweep_all()  # opens the alert; its notifications wait to gather
        advance_clock(instance, 60)
        sweep_all()
        broker.run()  # the instance moves and finishes
        advance_clock(instance, 120)
        run_alerting(rounds=2, instances=[instance])
    assert receiver.script.seen == []
    assert WebhookDelivery.objects.count() == 0


# -- state changes --------------------------------------------------------------


def test_each_state_change_is_an_event_sent_after_the_commit(broker, receiver):
    events = f"{receiver.base}/events"
    make_definition("orders", event_webhooks=f"*  {events}")
    make_definition(
        "held",
        failure_policy="hold",
        event_webhooks=f"needs_attention,failed {events}\ncompleted {events}-done",
    )
    receiver.on("/events-done", Reply(200))
    completed = start("orders", "order-ok")
    compensated = start("orders", "order-undo", simulate={"two": "fail"})
    held = start("held", "order-held", simulate={"one": "fail"})
    broker.run()
    held.refresh_from_db()
    assert held.state == "needs_attention"
    commands.instance_close_as_failed(
        held.id,
        user=user_in("operator"),
        reason="refunded by hand",
        expected_version=held.version,
    )
    # Queued with the transitions, sent only by the sender.
    assert WebhookDelivery.objects.count() == 4
    assert receiver.script.seen == []
    # The beat task the sender runs as (every SAGA_WEBHOOK_INTERVAL seconds).
    assert tasks.send_webhooks() == {"webhooks_delivered": 4, "webhooks_failed": 0}
    got = {}
    for seen in receiver.requests("/events"):
        assert_signed(seen)
        body = seen.json()
        assert body["event_id"] == seen.headers["X-Saga-Event-Id"]
        got[body["instance"]["business_key"], body["event"]] = body
    assert set(got) == {
        ("order-ok", "instance.completed"),
        ("order-undo", "instance.compensated"),
        ("order-held", "instance.needs_attention"),
        ("order-held", "instance.failed"),
    }
    assert got["order-ok", "instance.completed"]["instance"]["url"] == (
        f"{SITE}/instances/{completed.id}/"
    )
    assert got["order-held", "instance.failed"]["reason"] == "refunded by hand"
    assert got["order-undo", "instance.compensated"]["instance"]["id"] == str(
        compensated.id
    )
    # "completed" was subscribed for held instances too, but none completed.
    assert receiver.requests("/events-done") == []
    assert deliver_due() == {"webhooks_delivered": 0, "webhooks_failed": 0}


@pytest.mark.celery_worker
def test_real_worker_and_beat_deliver_the_event(receiver):
    """The production path: a worker runs the workflow, beat's
    ``workflows.send_webhooks`` delivers its event."""
    make_definition("orders", event_webhooks=f"completed {receiver.base}/events")
    env = {
        "SAGA_HTTP_ALLOWED_HOSTS": "127.0.0.1",
        "SAGA_WEBHOOK_SECRET": SECRET,
        "SAGA_WEBHOOK_INTERVAL": "0.5",
        "SITE_URL": SITE,
    }
    with celery_processes(concurrency=1, beat=True, extra_env=env):
        instance = start("orders", "order-real")
        wait_for(lambda: receiver.requests("/events"), 60, "the completed event")
    [seen] = receiver.requests("/events")
    assert_signed(seen)
    assert seen.json()["instance"]["id"] == str(instance.id)
    assert WebhookDelivery.objects.get().delivered_at is not None


def test_a_timed_out_delivery_is_repeated_under_the_same_event_id(broker, receiver):
    receiver.on("/events", Reply(200, delay=1.5), Reply(200))
    make_definition("orders", event_webhooks=f"completed {receiver.base}/events")
    start("orders", "order-1")
    broker.run()
    with override_settings(SAGA_WEBHOOK_TIMEOUT=0.5):
        assert deliver_due()["webhooks_failed"] == 1
    row = WebhookDelivery.objects.get()
    assert "ReadTimeout" in row.last_error
    let_retries_fall_due()
    assert deliver_due()["webhooks_delivered"] == 1
    first, second = receiver.requests("/events")
    # The receiver got the first one too: the repeat lets it drop the copy.
    assert first.headers["Idempotency-Key"] == second.headers["Idempotency-Key"]
    assert first.json() == second.json()


def test_a_delivery_that_keeps_failing_is_retried_with_backoff_and_shown(
    broker, receiver, client, monkeypatch
):
    monkeypatch.setenv("GONE_URL", f"http://127.0.0.1:{closed_port()}/x")
    make_definition(
        "orders",
        event_webhooks="completed env:GONE_URL\ncompleted env:NOT_SET_ANYWHERE",
    )
    start("orders", "order-1")
    broker.run()
    delays = []
    for _ in range(4):
        deliver_due()
        row = WebhookDelivery.objects.get(target="env:GONE_URL")
        delays.append(round((row.next_attempt_at - row.last_attempt_at).seconds, -1))
        let_retries_fall_due()
    assert delays == [30, 60, 120, 240]
    assert "ConnectError" in row.last_error and row.delivered_at is None
    missing = WebhookDelivery.objects.get(target="env:NOT_SET_ANYWHERE")
    assert missing.attempts == 4 and "NOT_SET_ANYWHERE is not set" in (
        missing.last_error
    )
    client.force_login(user_in("viewer"))
    page = client.get("/webhooks/").content.decode()
    assert "Failing (2)" in page and "ConnectError" in page
    assert "127.0.0.1" not in page  # the resolved URL is the secret
    client.force_login(User.objects.create_superuser("root", password="pw"))
    listed = client.get("/admin/workflows_app/webhookdelivery/").content.decode()
    assert "env:GONE_URL" in listed and "127.0.0.1" not in listed
    with override_settings(SAGA_METRICS_CACHE_SECONDS=0, SAGA_METRICS_TOKEN=""):
        metrics = parse(client.get("/metrics").content.decode())
    assert value(metrics, "saga_webhooks_failing", event="instance.completed") == 2


def test_an_error_page_echoing_the_secret_url_is_scrubbed(broker, receiver):
    receiver.on(
        "/chat/T0/B0/s3cr3t-path",
        Reply(404, {"error": f"no such hook {receiver.base}/chat/T0/B0/s3cr3t-path"}),
    )
    stuck_instances(broker, receiver.base)
    run_alerting()
    row = WebhookDelivery.objects.get(target="env:ORDERS_CHAT_URL")
    assert row.last_status == 404 and "no such hook" in row.last_error
    assert "s3cr3t" not in row.last_error
    assert "s3cr3t" not in everything_stored()


def test_a_host_taken_off_the_allow_list_is_not_called(broker, receiver):
    make_definition("orders", event_webhooks=f"completed {receiver.base}/events")
    start("orders", "order-1")
    broker.run()
    with override_settings(SAGA_HTTP_ALLOWED_HOSTS=["hooks.example.com"]):
        deliver_due()
    assert receiver.script.seen == []
    assert "not in SAGA_HTTP_ALLOWED_HOSTS" in WebhookDelivery.objects.get().last_error


# -- configuration and signing --------------------------------------------------


@override_settings(SAGA_HTTP_ALLOWED_HOSTS=["hooks.example.com"])
def test_admin_refuses_bad_targets_and_saves_good_ones(client):
    from tests.test_admin import ADD_URL, errors, form_data

    editor = user_in("workflow admin", "editor")
    editor.is_staff = True
    editor.save(update_fields=["is_staff"])
    client.force_login(editor)
    cases = {
        "alert_webhooks": [
            ("slack https://hooks.example.com/T0/B0/x", "a chat's webhook URL"),
            ("json https://elsewhere.example.org/h", "is not in SAGA_HTTP_ALLOWED"),
            ("teams env:X", "write 'slack env:NAME'"),
            ("json https://hooks.example.com/h?token=abc", "credential in its query"),
        ],
        "event_webhooks": [
            ("shipped https://hooks.example.com/h", "Unknown: shipped"),
            ("completed ftp://hooks.example.com/h", "not an absolute http(s) URL"),
        ],
    }
    for field, rejected in cases.items():
        for text, message in rejected:
            response = client.post(ADD_URL, form_data([{"name": "a"}], **{field: text}))
            assert response.status_code == 200, text
            assert escape(message) in response.content.decode(), errors(response)
    assert WorkflowDefinition.objects.count() == 0
    good = form_data(
        [{"name": "a"}],
        alert_webhooks="slack env:ORDERS_CHAT\njson https://hooks.example.com/a",
        event_webhooks="completed,failed https://hooks.example.com/e\n* secret:hook",
    )
    response = client.post(ADD_URL, good)
    assert response.status_code == 302, errors(response)
    definition = WorkflowDefinition.objects.get()
    draft = definition.new_draft()  # a new version keeps its targets
    assert draft.event_webhooks == definition.event_webhooks


def test_verify_refuses_a_changed_body_a_wrong_key_and_an_old_timestamp():
    body = json.dumps({"event": "instance.completed"}).encode()
    now = 1_800_000_000
    headers = signing.signed_headers(SECRET, body, now=now)
    assert signing.verify(SECRET, headers, body, now=now + 299)
    assert not signing.verify(SECRET, headers, body + b" ", now=now)
    assert not signing.verify("another-key", headers, body, now=now)
    assert not signing.verify(SECRET, headers, body, now=now + 301)  # a replay
    assert not signing.verify(SECRET, {}, body, now=now)
