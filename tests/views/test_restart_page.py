"""Restart from an earlier step on the instance page: offered only where the
pinned definition has a restart point, audited, and under four eyes when the
definition asks for it."""

from __future__ import annotations

import re

import pytest
from django.urls import reverse

from tests.support import make_definition, user_in
from tests.views.conftest import HOLD_STEPS, fresh, held, logged_in
from workflows_app.demo.models import ParticipantEffect
from workflows_app.models import ApprovalRequest, TransitionLog

pytestmark = pytest.mark.django_db(transaction=True)
HTMX = {"HX-Request": "true"}
RESTARTABLE = [{**HOLD_STEPS[0], "restart_point": True}, *HOLD_STEPS[1:]]


def page(client, instance) -> str:
    return client.get(reverse("instance_detail", args=[instance.pk])).content.decode()


def restart_url(instance) -> str:
    return reverse("instance_action", args=[instance.pk, "restart_from_step"])


def test_not_offered_without_a_restart_point(broker, operator):
    make_definition("wf", steps=HOLD_STEPS, failure_policy="hold")
    instance = held(broker)
    html = page(logged_in(operator), instance)
    assert "Retry step now" in html
    assert "Restart from an earlier step" not in html


def test_restart_from_the_page_runs_the_steps_again(broker, operator):
    make_definition("wf", steps=RESTARTABLE, failure_policy="hold")
    instance = held(broker)
    client = logged_in(operator)
    html = page(client, instance)
    assert "Restart from an earlier step" in html
    one = instance.steps.get(name="one")
    assert f'<option value="{one.pk}" selected>1. one</option>' in html
    response = client.post(
        restart_url(instance),
        {
            "reason": "re-reserve <b>stock</b>",
            "version": instance.version,
            "step": one.pk,
        },
        headers=HTMX,
    )
    assert response.status_code == 200
    assert "Restart from an earlier step: done." in response.content.decode()
    # The banner names the step, not a position number.
    banner = re.search(r'id="restart-callout">(.*?)</p>', response.content.decode())
    text = " ".join(re.sub(r"<[^>]+>", " ", banner.group(1)).split())
    assert text.startswith("Restarting from one : undoing one and the steps after")
    assert "position" not in text
    broker.run()
    assert fresh(instance).state == "completed"
    html = page(client, instance)
    assert "run 2" in html
    assert f"{instance.pk}:one:action:2" in html
    assert f"{instance.pk}:one:compensation" in html  # run 1 was undone
    assert "re-reserve &lt;b&gt;stock&lt;/b&gt;" in html  # the reason, escaped
    row = TransitionLog.objects.get(instance=instance, transition="restart_from_step")
    assert row.user == operator
    assert ParticipantEffect.objects.filter(
        instance_id=instance.pk, idempotency_key=f"{instance.pk}:one:action:2"
    ).exists()


def test_a_bad_choice_is_refused_and_changes_nothing(broker, operator):
    make_definition("wf", steps=RESTARTABLE, failure_policy="hold")
    instance = held(broker)
    three = instance.steps.get(name="three")
    client = logged_in(operator)
    response = client.post(
        restart_url(instance),
        {"reason": "try", "version": instance.version, "step": three.pk},
        headers=HTMX,
    )
    assert response.status_code == 409
    assert "three is not a restart point" in response.content.decode()
    response = client.post(
        restart_url(instance),
        {"reason": "try", "version": instance.version},
        headers=HTMX,
    )
    assert response.status_code == 422
    assert fresh(instance).version == instance.version


def test_four_eyes_restart_waits_for_a_second_operator(broker, operator):
    make_definition(
        "wf",
        steps=RESTARTABLE,
        failure_policy="hold",
        approval_actions=["restart_from_step"],
    )
    instance = held(broker)
    one = instance.steps.get(name="one")
    response = logged_in(operator).post(
        restart_url(instance),
        {"reason": "rerun it", "version": instance.version, "step": one.pk},
        headers=HTMX,
    )
    assert "Sent for approval" in response.content.decode()
    assert fresh(instance).state == "needs_attention"
    request = ApprovalRequest.objects.get(instance=instance)
    assert request.params == {"step_id": one.pk}
    second = user_in("operator", "paula")
    response = logged_in(second).post(
        reverse("approval_decide", args=[request.pk, "approve"]), headers=HTMX
    )
    assert "Approved: the action was done." in response.content.decode()
    broker.run()
    assert fresh(instance).state == "completed"
    row = TransitionLog.objects.get(instance=instance, transition="restart_from_step")
    assert (row.user, row.data["approved_by"]) == (operator, "paula")
