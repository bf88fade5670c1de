"""Idempotency made visible: step keys, and each suppressed duplicate (start,
callback, delivery) with when and from whom."""

from __future__ import annotations

import pytest
from django.test import Client

from tests.operations.conftest import held
from workflows_app.engine.actors import Actor
from workflows_app.engine.commands import instance_start
from workflows_app.models import InboundMessage, TransitionLog

pytestmark = pytest.mark.django_db(transaction=True)


def test_duplicate_start_is_noted(broker, wf, operator):
    checkout = Actor.api("checkout")
    first = instance_start(
        "orders", business_key="ORD-1", input={}, idempotency_key="k-1", actor=checkout
    )
    broker.run()  # its steps are called: their keys are sent
    again = instance_start(
        "orders", business_key="ORD-1", input={}, idempotency_key="k-1", actor=checkout
    )
    assert not again.created and again.instance.pk == first.instance.pk
    note = TransitionLog.objects.get(transition="duplicate_start_ignored")
    assert note.actor_label == "checkout" and note.field == ""
    client = Client()
    client.force_login(operator)
    page = client.get(f"/instances/{first.instance.pk}/").content.decode()
    assert "a repeated start request" in page
    assert f"{first.instance.pk}:reserve:action" in page
    assert "Duplicates suppressed (1)" in page


def test_replayed_callback_is_counted_not_written(broker, wf, operator):
    from workflows_app.engine.commands import callback_report
    from workflows_app.models import Attempt

    instance = held(broker, "ORD-1")
    attempt = Attempt.objects.filter(step__instance=instance).first()
    payments = Actor.api("payments")
    for _ in range(3):
        callback_report(
            str(attempt.task_token),
            message_id="cb-9",
            succeeded=True,
            actor=payments,
        )
    message = InboundMessage.objects.get(message_id="cb-9")
    assert message.replays == 2 and str(message.instance_id) == str(instance.pk)
    client = Client()
    client.force_login(operator)
    page = client.get(f"/instances/{instance.pk}/").content.decode()
    assert "cb-9" in page and "repeated 2 times" in page
