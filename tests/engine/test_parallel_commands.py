"""Parallel stages through the engine commands on the database: operator
actions per branch, a restart from a branch, and a cancel while branches
are in flight. Every instance also passes the saga checker."""

from __future__ import annotations

import pytest

from tests.engine.test_restart import heal, ledger, operator, step
from tests.saga_invariant import check_instance
from tests.support import make_definition, start
from workflows_app.activities.base import Claim, Outcome
from workflows_app.demo.activities import perform_action
from workflows_app.engine import commands
from workflows_app.engine.blocking import blocking_branches
from workflows_app.engine.errors import TransitionRejected

pytestmark = pytest.mark.django_db(transaction=True)

STAGED = [
    {"name": "first"},
    {"name": "left", "restart_point": True},
    {"name": "right", "parallel_with_previous": True, "restart_point": True},
    {"name": "after"},
]


def test_each_failed_branch_is_retried_on_its_own(broker_no_inline):
    broker = broker_no_inline
    make_definition("fork", STAGED, failure_policy="hold")
    instance = start("fork")
    claims = _claim_both_branches(broker, instance)
    # Both branches are declined while both are in flight: the first holds
    # the instance, the second's answer is still recorded.
    for claim in claims:
        assert commands.attempt_record(
            claim.instance_id,
            claim.step_id,
            "action",
            claim.context.attempt,
            Outcome("failed", error_message="declined", permanent=True),
            actor=commands_actor(),
        )
    instance.refresh_from_db()
    assert instance.state == "needs_attention"
    blocked = blocking_branches(list(instance.steps.order_by("position")))
    assert [s.name for s in blocked] == ["left", "right"]
    heal(instance)
    with pytest.raises(TransitionRejected, match="no failed or unknown step"):
        commands.instance_retry_step(
            instance.id, user=operator(), reason="x", step_id=step(instance, "first").id
        )
    # The second branch first: it runs; the first still holds the instance.
    commands.instance_retry_step(
        instance.id, user=operator(), reason="card fixed", step_id=blocked[1].id
    )
    broker.run()
    instance.refresh_from_db()
    assert step(instance, "right").state == "succeeded"
    assert instance.state == "needs_attention"
    assert [s.name for s in blocking_branches(list(instance.steps.all()))] == ["left"]
    commands.instance_retry_step(instance.id, user=operator(), reason="stock back")
    broker.run()
    instance.refresh_from_db()
    assert instance.state == "completed"
    check_instance(instance, quiescent=True)


def test_a_restart_from_a_branch_leaves_its_earlier_sibling_alone(broker):
    make_definition("fork", STAGED, failure_policy="hold")
    instance = start("fork", simulate={"right": "fail"})
    broker.run()
    instance.refresh_from_db()
    assert instance.state == "needs_attention"
    heal(instance)
    commands.instance_restart_from_step(
        instance.id,
        user=operator(),
        reason="another card",
        step_id=step(instance, "right").id,
    )
    broker.run()
    instance.refresh_from_db()
    assert instance.state == "completed"
    # The declined charge had nothing to undo; "left" kept its one effect.
    assert sorted(ledger(instance)) == sorted(
        ["T:first", "T:left", "T:right#2", "T:after"]
    )
    assert step(instance, "left").run == 1 and step(instance, "right").run == 2
    check_instance(instance, quiescent=True)


def test_cancel_with_branches_in_flight_records_and_undoes_them(broker_no_inline):
    broker = broker_no_inline
    make_definition("fork", STAGED)
    instance = start("fork")
    claims = _claim_both_branches(broker, instance)
    commands.instance_cancel(instance.id, user=operator(), reason="changed my mind")
    instance.refresh_from_db()
    assert instance.state == "compensating"
    # Both branches report after the cancel: recorded, then undone, then first.
    for claim in claims:
        assert claim is not None
        output = perform_action(claim.context, "svc")
        assert commands.attempt_record(
            claim.instance_id,
            claim.step_id,
            "action",
            claim.context.attempt,
            Outcome("succeeded", output=output),
            actor=commands_actor(),
        )
    broker.run()
    instance.refresh_from_db()
    assert instance.state == "compensated"
    word = ledger(instance)
    assert word[0] == "T:first" and word[-1] == "C:first"
    assert sorted(word[1:3]) == ["T:left", "T:right"]
    assert sorted(word[3:5]) == ["C:left", "C:right"]
    assert step(instance, "after").compensation_state == "not_needed"
    check_instance(instance, quiescent=True)


def _claim_both_branches(broker, instance) -> list[Claim]:
    broker.deliver(broker.queue.pop(0))  # start
    broker.deliver(broker.queue.pop(0))  # first; both branches dispatched
    claims = [
        commands.attempt_claim(instance.id, m.args[1], "action", actor=commands_actor())
        for m in broker.queue
    ]
    broker.queue.clear()
    assert len(claims) == 2
    return [c for c in claims if c is not None]


def commands_actor():
    from workflows_app.engine.actors import Actor

    return Actor.worker("test-worker")


def test_the_page_offers_each_failed_branch_and_retries_the_chosen_one(
    broker_no_inline, client
):
    from django.urls import reverse

    from tests.views.conftest import logged_in

    broker = broker_no_inline
    make_definition("fork", STAGED, failure_policy="hold")
    instance = start("fork")
    for claim in _claim_both_branches(broker, instance):
        commands.attempt_record(
            claim.instance_id,
            claim.step_id,
            "action",
            claim.context.attempt,
            Outcome("failed", error_message="<b>declined</b>", permanent=True),
            actor=commands_actor(),
        )
    instance.refresh_from_db()
    web = logged_in(operator())
    page = web.get(reverse("instance_detail", args=[instance.pk])).content.decode()
    right = step(instance, "right")
    assert f'<option value="{right.id}">3. right (failed)</option>' in page
    assert "&lt;b&gt;declined&lt;/b&gt;" in page and "<b>declined" not in page
    response = web.post(
        reverse("instance_action", args=[instance.pk, "retry_step"]),
        {"reason": "try the card again", "version": instance.version, "step": right.id},
    )
    assert response.status_code in {200, 302}
    assert step(instance, "right").state == "scheduled"
    assert step(instance, "left").state == "failed"


def test_the_api_tells_each_step_its_stage(broker, client):
    from django.urls import reverse

    from workflows_app.models import ApiToken

    make_definition("fork", STAGED)
    instance = start("fork")
    broker.run()
    token = ApiToken.issue("reader", ["read"])[1]
    response = client.get(
        reverse("api-v1:instance_status", args=[instance.id]),
        headers={"Authorization": f"Bearer {token}"},
    )
    assert response.status_code == 200, response.content
    steps = response.json()["steps"]
    assert [(s["name"], s["stage"]) for s in steps] == [
        ("first", 1),
        ("left", 2),
        ("right", 2),
        ("after", 3),
    ]


def test_a_restart_from_a_branch_lets_the_earlier_branch_retry_on(broker_no_inline):
    broker = broker_no_inline
    make_definition("fork", STAGED, failure_policy="hold")
    instance = start("fork")
    left, right = _claim_both_branches(broker, instance)
    for claim, permanent in ((left, False), (right, True)):
        commands.attempt_record(
            claim.instance_id,
            claim.step_id,
            "action",
            claim.context.attempt,
            Outcome("failed", error_message="no", permanent=permanent),
            actor=commands_actor(),
        )
    instance.refresh_from_db()
    assert instance.state == "needs_attention"
    assert step(instance, "left").state == "retrying"  # parked while held
    broker.queue.clear()  # the retry's message finds the instance held
    commands.instance_restart_from_step(
        instance.id,
        user=operator(),
        reason="another card",
        step_id=step(instance, "right").id,
    )
    broker.run()
    instance.refresh_from_db()
    assert instance.state == "completed"
    assert step(instance, "left").attempt == 2  # its retry, not abandoned
    assert step(instance, "right").run == 2
    check_instance(instance, quiescent=True)
