"""Stuck detection and alert mail, delivered to a real SMTP server on loopback."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
from django.test import override_settings

from tests.smtp import SmtpServer, text_of
from tests.support import advance_clock, make_definition, start, user_in
from workflows_app import alerts
from workflows_app.alerts import (
    open_alerts,
    resolve_alerts,
    send_due_alerts,
    sync_alerts,
)
from workflows_app.engine.commands import alert_acknowledge
from workflows_app.engine.locking import db_now
from workflows_app.engine.sweeps import sweep_all
from workflows_app.models import Alert, TransitionLog, WorkflowInstance

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def smtp():
    server = SmtpServer()
    server.start()
    with override_settings(
        EMAIL_BACKEND="django.core.mail.backends.smtp.EmailBackend",
        EMAIL_HOST="127.0.0.1",
        EMAIL_PORT=server.port,
        EMAIL_TIMEOUT=5,
        SAGA_ALERT_GATHER=0,
        SAGA_ESCALATION_EMAIL="escalation@example.com",
        SAGA_ALERT_ESCALATE_AFTER=1800,
        SITE_URL="https://saga.example.com",
    ):
        yield server
    server.stop()


def stuck_instances(broker, count=1, key="orders"):
    make_definition(
        key,
        stuck_after=timedelta(minutes=2),
        alert_recipients="orders-team@example.com",
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
        for instance in instances:
            advance_clock(instance, step)


def test_one_message_per_episode_across_many_sweeps(broker, smtp):
    [instance] = stuck_instances(broker)
    run_alerting(rounds=8, instances=[instance])
    assert len(smtp.messages) == 1
    message = smtp.messages[0]
    assert message["To"] == "orders-team@example.com"
    assert "order-0" in message["Subject"]
    body = text_of(message)
    assert "order-0" in body
    assert f"https://saga.example.com/instances/{instance.id}/" in body
    assert "no progress since" in body
    assert message.is_multipart()  # plain text and HTML
    alert = Alert.objects.get()
    assert alert.notified_at and alert.send_attempts == 1


def test_a_burst_is_one_digest(broker, smtp):
    instances = stuck_instances(broker, count=50)
    run_alerting(rounds=3)
    assert len(smtp.messages) == 1
    body = text_of(smtp.messages[0])
    assert "50 instances need attention" in smtp.messages[0]["Subject"]
    assert all(f"order-{n}" in body for n in range(50))
    assert Alert.objects.filter(notified_in_digest=True).count() == len(instances)


def test_unacknowledged_alert_escalates_once(broker, smtp):
    [instance] = stuck_instances(broker)
    run_alerting()
    assert len(smtp.messages) == 1
    advance_clock(instance, 1801)
    run_alerting(rounds=4, instances=[instance], step=600)
    assert len(smtp.messages) == 2
    escalation = smtp.messages[1]
    assert escalation["To"] == "escalation@example.com"
    assert "ESCALATED" in escalation["Subject"]
    assert TransitionLog.objects.filter(transition="alert_escalated").count() == 1


def test_acknowledged_alert_does_not_escalate(broker, smtp):
    [instance] = stuck_instances(broker)
    run_alerting()
    operator = user_in("operator")
    alert_acknowledge(Alert.objects.get().pk, user=operator, reason="on it")
    advance_clock(instance, 4000)
    run_alerting(rounds=3, instances=[instance], step=600)
    assert len(smtp.messages) == 1
    row = TransitionLog.objects.get(transition="alert_acknowledged")
    assert (row.user, row.reason) == (operator, "on it")


def test_recovery_resolves_the_alert_and_sends_nothing_more(broker, smtp):
    [instance] = stuck_instances(broker)
    run_alerting()
    assert len(smtp.messages) == 1
    advance_clock(instance, 60)
    sweep_all()  # re-sends the lost start; the instance runs to the end
    broker.run()
    advance_clock(instance, 4000)
    run_alerting(rounds=3, instances=[instance], step=600)
    assert len(smtp.messages) == 1
    alert = Alert.objects.get()
    assert alert.resolved_at is not None and alert.escalated_at is None


def test_recovery_before_the_mail_sends_nothing(broker, smtp):
    with override_settings(SAGA_ALERT_GATHER=60):
        [instance] = stuck_instances(broker)
        sweep_all()  # opens the alert; its mail waits for the gather window
        assert Alert.objects.filter(resolved_at=None).count() == 1
        advance_clock(instance, 60)
        sweep_all()
        broker.run()  # the instance moves and finishes
        advance_clock(instance, 120)
        run_alerting(rounds=2, instances=[instance])
    assert smtp.messages == []
    assert Alert.objects.get().resolved_at is not None


def test_mail_server_down_keeps_alert_unsent_then_delivers_once(broker, smtp):
    [instance] = stuck_instances(broker)
    smtp.stop()
    counts = sweep_all()  # the sweeper does not care about mail
    assert counts["alerts_opened"] == 1
    assert send_due_alerts()["mails_failed"] == 1
    alert = Alert.objects.get()
    assert alert.notified_at is None
    assert alert.last_send_error and alert.send_attempts == 1
    smtp.start()
    run_alerting(rounds=1)
    assert smtp.messages == []  # the retry waits for its backoff
    advance_clock(instance, 60)
    run_alerting(rounds=3, instances=[instance])
    assert len(smtp.messages) == 1
    alert.refresh_from_db()
    assert alert.notified_at and alert.last_send_error == ""


def test_held_instance_alerts_as_waiting_on_a_person(broker, smtp):
    make_definition("held", failure_policy="hold")
    start("held", "order-h", simulate={"one": "fail"})
    broker.run()
    run_alerting()
    assert len(smtp.messages) == 1
    assert Alert.objects.get().kind == "held"
    # The catalogue's actions possible now (engine/actions.py).
    assert "Retry step now: Run the failed step again now" in text_of(smtp.messages[0])


def test_mail_advises_only_what_the_catalogue_allows_now(broker, smtp):
    """Past the pivot nothing is compensated, so the mail does not say to;
    before the pivot it does (issue 14)."""
    from tests.operations.held_population import SCENARIOS, make_definitions, make_held

    make_definitions()
    by_name = {s.name: s for s in SCENARIOS}
    keys = {
        "ship fails": "after-pivot",
        "ship never answers": "unknown-past-pivot",
        "pivot declined": "before-pivot",
        "pivot declined, undo of reserve fails": "undo-failed",
    }
    for name, key in keys.items():
        make_held(broker, by_name[name], key)
    run_alerting()
    mails = {}
    for message in smtp.messages:
        body = text_of(message)
        [key] = [k for k in keys.values() if f"Business key:  {k}" in body]
        advice = body.split("What you can do:")[1].split("Open it:")[0]
        mails[key] = (advice, body)
    assert set(mails) == set(keys.values())
    for key in ("after-pivot", "unknown-past-pivot"):
        advice, body = mails[key]
        assert "Retry step now" in advice and "Close as failed" in advice
        assert "compensat" not in body.lower(), body
    advice, _ = mails["before-pivot"]
    assert "Compensate:" in advice and "Retry step now" in advice
    advice, _ = mails["undo-failed"]
    assert "Retry compensation" in advice and "Compensate:" not in advice
    assert "Retry step now" not in advice


def test_check_alerts_command_sends_a_test_message(smtp):
    from django.core.management import CommandError, call_command

    make_definition("orders", alert_recipients="a@example.com, b@example.com")
    call_command("check_alerts", "orders")
    assert len(smtp.messages) == 1
    assert smtp.messages[0]["X-Envelope-To"] == "a@example.com, b@example.com"
    assert "Test alert" in smtp.messages[0]["Subject"]
    smtp.stop()
    with pytest.raises(CommandError, match="could not be sent"):
        call_command("check_alerts", "orders")


def test_the_mail_link_opens_the_instance_page(broker, smtp, client):
    [instance] = stuck_instances(broker)
    run_alerting()
    link = re.search(r"https://saga\.example\.com(/\S+)", text_of(smtp.messages[0]))
    client.force_login(user_in("viewer"))
    response = client.get(link.group(1))
    assert response.status_code == 200
    assert "order-0" in response.content.decode()


def test_alerts_page_lists_by_status_and_acknowledges(broker, smtp, client):
    [instance] = stuck_instances(broker)
    run_alerting()
    alert = Alert.objects.get()
    client.force_login(user_in("viewer"))
    page = client.get("/alerts/").content.decode()
    assert "order-0" in page and "mailed" in page
    assert "Acknowledge</button>" not in page  # viewers only look
    client.force_login(user_in("operator"))
    assert "Acknowledge</button>" in client.get("/alerts/").content.decode()
    client.post(f"/alerts/{alert.pk}/acknowledge/", {"reason": "mine"})
    alert.refresh_from_db()
    assert alert.acknowledged_at is not None
    assert "order-0" not in client.get("/alerts/?status=open").content.decode()
    assert "order-0" in client.get("/alerts/?status=acknowledged").content.decode()


def test_an_alert_is_resolved_however_many_older_ones_stay_open(broker):
    """The sweeper's resolve is the backstop for an episode that ended
    without the engine seeing it (the engine resolves alerts itself when an
    instance moves on). It looks at every open alert: with a batch of 1 the
    newest of five, whose instance is no longer stuck, is resolved (before,
    only the oldest 4 x batch open alerts were looked at)."""
    instances = stuck_instances(broker, count=5)
    sweep_all()
    assert Alert.objects.filter(resolved_at__isnull=True).count() == 5
    newest = Alert.objects.order_by("-id").first()
    # Cleared behind the engine's back (a repair in SQL, an old bug).
    WorkflowInstance.objects.filter(pk=newest.instance_id).update(stuck=False)
    assert sync_alerts(db_now(), 1)["alerts_resolved"] == 1
    newest.refresh_from_db()
    assert newest.resolved_at is not None
    still_open = Alert.objects.filter(resolved_at__isnull=True)
    assert {a.instance_id for a in still_open} == {
        i.pk for i in instances if i.pk != newest.instance_id
    }
    assert sync_alerts(db_now(), 1)["alerts_resolved"] == 0


def test_the_backstop_looks_at_a_window_of_open_alerts_per_turn(broker, monkeypatch):
    """Each turn looks at RESOLVE_WINDOW open alerts, going on where the last
    turn stopped and from the start again after the end, so a turn's cost
    does not grow with the number of open alerts and every one is looked at
    in turn."""
    stuck_instances(broker, count=5)
    sweep_all()
    first, second, third, fourth, fifth = Alert.objects.order_by("id")
    assert first.resolved_at is None and fifth.resolved_at is None
    # Cleared behind the engine's back.
    WorkflowInstance.objects.filter(
        pk__in=[first.instance_id, fourth.instance_id, fifth.instance_id]
    ).update(stuck=False)
    monkeypatch.setattr(alerts, "RESOLVE_WINDOW", 2)
    monkeypatch.setattr(alerts, "_resolve_after", 0)
    now = db_now()

    def resolved() -> set[int]:
        return set(
            Alert.objects.filter(resolved_at__isnull=False).values_list("id", flat=True)
        )

    assert resolve_alerts(now, 10) == 1  # looks at the 1st and 2nd
    assert resolved() == {first.pk}
    assert resolve_alerts(now, 10) == 1  # the 3rd and 4th
    assert resolved() == {first.pk, fourth.pk}
    assert resolve_alerts(now, 10) == 1  # the 5th, the last: then the start
    assert resolved() == {first.pk, fourth.pk, fifth.pk}
    assert resolve_alerts(now, 10) == 0  # the 2nd and 3rd

    # A full turn (batch 1) leaves the rest of its window for the next turn.
    WorkflowInstance.objects.filter(
        pk__in=[second.instance_id, third.instance_id]
    ).update(stuck=False)
    monkeypatch.setattr(alerts, "_resolve_after", 0)
    assert [resolve_alerts(now, 1) for _ in range(3)] == [1, 1, 0]
    assert not Alert.objects.filter(resolved_at__isnull=True).exists()
    notes = TransitionLog.objects.filter(transition="alert_resolved")
    assert sorted(n.data["alert"] for n in notes) == sorted(
        a.pk for a in (first, second, third, fourth, fifth)
    )


def test_flagging_and_opening_write_their_history_rows(broker):
    """The sweeper's batch notes (written as the engine writes its history
    rows) carry what the timeline and the invariant checker read."""
    (instance,) = stuck_instances(broker, count=1)
    sweep_all()
    alert = Alert.objects.get(instance=instance)
    flagged = TransitionLog.objects.get(instance=instance, transition="flag_stuck")
    opened = TransitionLog.objects.get(instance=instance, transition="alert_opened")
    assert re.fullmatch(
        r"no progress since \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC while accepted",
        flagged.reason,
    )
    assert (flagged.actor_kind, flagged.actor_label) == ("system", "system:sweep")
    assert (flagged.field, flagged.step_id, flagged.user_id, flagged.data) == (
        "",
        None,
        None,
        {},
    )
    assert (opened.actor_kind, opened.actor_label) == ("system", "system:alerts")
    assert opened.data == {"alert": alert.pk, "kind": "no_progress"}
    assert opened.reason == alert.reason == flagged.reason
    assert flagged.created_at is not None and opened.created_at is not None
    assert opened.id > flagged.id


def test_an_alert_another_sweeper_opened_is_not_opened_or_noted_again(broker):
    """Two sweepers open the same instance's alert: the partial unique
    constraint keeps one, and only the sweeper whose row it is notes it."""
    won, lost = stuck_instances(broker, count=2)
    WorkflowInstance.objects.filter(pk__in=[won.pk, lost.pk]).update(
        stuck=True, stuck_kind="no_progress", stuck_reason="why", alert_due=True
    )
    now = db_now()
    theirs = Alert.objects.create(
        instance_id=lost.pk,
        definition_key="orders",
        kind="no_progress",
        reason="why",
        opened_at=now,
    )
    assert open_alerts(now, 10) == 1
    ours = Alert.objects.get(instance_id=won.pk)
    assert (ours.kind, ours.reason, ours.opened_at) == ("no_progress", "why", now)
    assert list(Alert.objects.filter(instance_id=lost.pk)) == [theirs]
    notes = TransitionLog.objects.filter(transition="alert_opened")
    assert [(n.instance_id, n.data, n.reason) for n in notes] == [
        (won.pk, {"alert": ours.pk, "kind": "no_progress"}, "why")
    ]
    assert not WorkflowInstance.objects.filter(alert_due=True).exists()


def test_a_resolved_alert_says_when_and_why_escaped(broker, client):
    """Each way an episode ends leaves its reason on the alert, and the
    resolved list shows it (escaped: an operator's name is data)."""
    from workflows_app.engine.commands import instance_cancel

    moved, closed, backstop = stuck_instances(broker, count=3)
    run_alerting()  # opens the alerts; the sweeper re-sends the lost starts
    assert Alert.objects.filter(resolved_at=None).count() == 3
    operator = user_in("operator", "<b>olga</b>")
    instance_cancel(closed.pk, user=operator, reason="customer withdrew")
    by_cancel = Alert.objects.get(instance=closed)
    assert by_cancel.resolved_at is not None
    assert by_cancel.resolved_reason == "the instance moved on: cancel by <b>olga</b>"
    note = TransitionLog.objects.get(instance=closed, transition="alert_resolved")
    assert note.reason.endswith("is over: the instance moved on: cancel by <b>olga</b>")
    # The sweeper's backstop: an open alert whose instance is not stuck any
    # more (set by hand here: every engine path ends the episode itself).
    type(backstop).objects.filter(pk=backstop.pk).update(
        stuck=False, stuck_check_at=None
    )
    sweep_all()
    by_sweeper = Alert.objects.get(instance=backstop)
    assert by_sweeper.resolved_reason == "the instance moved on (it is accepted)"
    # A worker runs the re-sent start: the instance moves on by itself.
    broker.queue[:] = [m for m in broker.queue if m.args[0] == str(moved.pk)]
    broker.run()
    by_worker = Alert.objects.get(instance=moved)
    assert by_worker.resolved_reason.startswith("the instance moved on: start by ")
    client.force_login(user_in("viewer"))
    page = client.get("/alerts/?status=resolved").content.decode()
    assert "cancel by &lt;b&gt;olga&lt;/b&gt;" in page and "<b>olga" not in page
    assert by_worker.resolved_reason in page
    assert '<th scope="col">Resolved</th>' in page
    assert "Resolved</th>" not in client.get("/alerts/").content.decode()
