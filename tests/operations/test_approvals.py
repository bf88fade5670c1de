"""Four-eyes approval: a held action happens only when a different operator
approves it; requests can be rejected, expire, and fail when the instance
moved meanwhile. Every step is in the timeline."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from django.test import Client

from tests.operations.conftest import held
from tests.support import user_in
from workflows_app.engine.commands import approvals, bulk
from workflows_app.engine.errors import AlreadyChanged, NotPermitted
from workflows_app.engine.locking import db_now
from workflows_app.models import (
    ApprovalRequest,
    BulkJob,
    TransitionLog,
    WorkflowInstance,
)

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def four_eyes(wf):
    wf.approval_actions = ["cancel", "close_as_failed", "repair"]
    wf.approval_bulk_over = 2
    wf.save(update_fields=["approval_actions", "approval_bulk_over"])
    return wf


def logged_in(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


def transitions(instance):
    return list(
        TransitionLog.objects.filter(instance=instance).values_list(
            "transition", flat=True
        )
    )


def test_cancel_waits_for_a_second_operator(
    broker, four_eyes, operator, second_operator
):
    instance = held(broker, "ORD-1")
    olga = logged_in(operator)
    response = olga.post(
        f"/instances/{instance.pk}/actions/cancel/",
        {"reason": "customer called", "version": instance.version},
        headers={"HX-Request": "true"},
    )
    assert response.status_code == 200
    assert "Sent for approval" in response.content.decode()
    assert WorkflowInstance.objects.get(pk=instance.pk).state == "needs_attention"
    request = ApprovalRequest.objects.get()
    assert (request.action, request.requested_by, request.status) == (
        "cancel",
        operator,
        "pending",
    )
    assert transitions(instance)[-1] == "approval_requested"

    # The requester cannot approve it, not even by posting directly.
    page = olga.get(f"/instances/{instance.pk}/").content.decode()
    assert "Your request: another operator must decide" in page
    assert "Approve and do it" not in page
    own = olga.post(f"/approvals/{request.pk}/approve/", headers={"HX-Request": "true"})
    assert own.status_code == 403
    assert ApprovalRequest.objects.get().status == "pending"

    oscar = logged_in(second_operator)
    assert (
        "Approve and do it" in oscar.get(f"/instances/{instance.pk}/").content.decode()
    )
    assert "ORD-1" in oscar.get("/").content.decode()  # on the overview
    done = oscar.post(
        f"/approvals/{request.pk}/approve/",
        {"note": "checked with the customer"},
        headers={"HX-Request": "true"},
    )
    assert done.status_code == 200 and "Approved" in done.content.decode()
    assert WorkflowInstance.objects.get(pk=instance.pk).state == "compensating"
    cancel = TransitionLog.objects.get(instance=instance, transition="cancel")
    assert cancel.user == operator and cancel.reason == "customer called"
    assert cancel.data["approved_by"] == "oscar"
    assert transitions(instance)[-1] == "approval_approved"
    assert ApprovalRequest.objects.get().decided_by == second_operator


def test_rejected_request_does_nothing(broker, four_eyes, operator, second_operator):
    instance = held(broker, "ORD-1")
    request = approvals.approval_request(
        instance.pk, action="close_as_failed", user=operator, reason="give up"
    )
    with pytest.raises(AlreadyChanged):  # one pending request per action
        approvals.approval_request(
            instance.pk, action="close_as_failed", user=operator, reason="again"
        )
    approvals.approval_decide(
        request.pk, user=second_operator, approve=False, note="retry first"
    )
    assert WorkflowInstance.objects.get(pk=instance.pk).state == "needs_attention"
    assert ApprovalRequest.objects.get().status == "rejected"
    note = TransitionLog.objects.filter(instance=instance).last()
    assert (note.transition, note.reason, note.user) == (
        "approval_rejected",
        "retry first",
        second_operator,
    )
    with pytest.raises(AlreadyChanged):
        approvals.approval_decide(request.pk, user=second_operator, approve=True)


def test_request_expires(broker, four_eyes, operator, second_operator):
    instance = held(broker, "ORD-1")
    request = approvals.approval_request(
        instance.pk, action="cancel", user=operator, reason="r"
    )
    ApprovalRequest.objects.filter(pk=request.pk).update(
        expires_at=db_now() - timedelta(seconds=1)
    )
    assert approvals.expire_approvals(db_now(), 10) == 1
    assert ApprovalRequest.objects.get().status == "expired"
    assert transitions(instance)[-1] == "approval_expired"
    with pytest.raises(AlreadyChanged):
        approvals.approval_decide(request.pk, user=second_operator, approve=True)
    assert WorkflowInstance.objects.get(pk=instance.pk).state == "needs_attention"


def test_stale_request_fails_instead_of_acting(
    broker, four_eyes, operator, second_operator
):
    from workflows_app.engine.commands import instance_retry_step

    instance = held(broker, "ORD-1")
    request = approvals.approval_request(
        instance.pk, action="cancel", user=operator, reason="r"
    )
    instance_retry_step(instance.pk, user=second_operator, reason="it works now")
    broker.run()
    decided = approvals.approval_decide(request.pk, user=second_operator, approve=True)
    assert decided.status == "failed" and "changed meanwhile" in decided.outcome
    assert WorkflowInstance.objects.get(pk=instance.pk).state == "completed"
    assert not TransitionLog.objects.filter(transition="cancel").exists()


def test_viewer_cannot_request_or_approve(broker, four_eyes, operator):
    instance = held(broker, "ORD-1")
    viewer = user_in("viewer", "vera")
    with pytest.raises(NotPermitted):
        approvals.approval_request(
            instance.pk, action="cancel", user=viewer, reason="r"
        )
    request = approvals.approval_request(
        instance.pk, action="cancel", user=operator, reason="r"
    )
    with pytest.raises(NotPermitted):
        approvals.approval_decide(request.pk, user=viewer, approve=True)


def test_actions_without_four_eyes_happen_at_once(broker, four_eyes, operator):
    instance = held(broker, "ORD-1")
    response = logged_in(operator).post(
        f"/instances/{instance.pk}/actions/retry_step/",
        {"reason": "gateway back", "version": instance.version},
        headers={"HX-Request": "true"},
    )
    assert "Retry step now: done." in response.content.decode()
    assert not ApprovalRequest.objects.exists()


def test_large_bulk_job_needs_approval(broker, four_eyes, operator, second_operator):
    for n in range(3):
        held(broker, f"ORD-{n}")
    job = bulk.bulk_job_plan(
        WorkflowInstance.objects.all(),
        action="retry",
        reason="gateway back",
        user=operator,
        description="all",
    )
    bulk.bulk_job_confirm(job.pk, user=operator)
    bulk.bulk_job_confirm(job.pk, user=operator)  # asks once
    assert BulkJob.objects.get().status == "draft"
    request = ApprovalRequest.objects.get()
    assert request.action == "bulk_job" and broker.queue == []
    with pytest.raises(NotPermitted):
        approvals.approval_decide(request.pk, user=operator, approve=True)
    # Through the page: approving starts the job, it does not claim the
    # instances were acted on already.
    page = logged_in(second_operator).post(
        f"/approvals/{request.pk}/approve/", follow=True
    )
    assert "Approved: the job is started; its progress is below." in (
        page.content.decode()
    )
    assert BulkJob.objects.get().status == "queued"
    broker.run()
    assert BulkJob.objects.get().status == "finished"
    assert [e["what"] for e in BulkJob.objects.get().log] == [
        "approval requested",
        "confirm",
        "approval approved",
    ]


def test_rules_of_the_newest_version_apply_to_running_instances(broker, wf, operator):
    """Four eyes is an operational control: switching it on in a new version
    covers instances pinned to the old one too."""
    instance = held(broker, "ORD-1")  # runs v1, which has no four-eyes rule
    draft = wf.new_draft()
    draft.approval_actions = ["cancel"]
    draft.save(update_fields=["approval_actions"])
    draft.publish()
    response = logged_in(operator).post(
        f"/instances/{instance.pk}/actions/cancel/",
        {"reason": "customer called", "version": instance.version},
        headers={"HX-Request": "true"},
    )
    assert "Sent for approval" in response.content.decode()
    assert WorkflowInstance.objects.get(pk=instance.pk).definition_id == wf.pk
    assert WorkflowInstance.objects.get(pk=instance.pk).state == "needs_attention"


def test_the_approver_sees_what_a_repair_would_change_path_by_path(
    broker, four_eyes, operator, second_operator
):
    """Not the request's raw parameters: the diff against the value the
    instance holds now, as the timeline shows it once done, escaped."""
    instance = held(broker, "o-diff")
    assert instance.input == {"outage": "503", "simulate": {}}
    reserve = instance.steps.get(name="reserve")
    olga = logged_in(operator)
    url = f"/instances/{instance.pk}/repair/"
    new_input = {"outage": "<b>none</b>", "simulate": {}, "card": "tok_visa"}
    new_output = {**(reserve.output or {}), "ref": "R-<i>1</i>"}
    for target, value in (("input", new_input), (reserve.pk, new_output)):
        reply = olga.post(
            url,
            {
                "target": target,
                "value": json.dumps(value),
                "reason": "new card",
                "version": instance.version,
            },
            HTTP_HX_REQUEST="true",
        )
        assert "Sent for approval" in reply.content.decode(), reply.content[:2000]
    by_action = dict(ApprovalRequest.objects.values_list("action", "pk"))

    html = logged_in(second_operator).get(f"/instances/{instance.pk}/").content
    page = html.decode()
    shown = page.split(f'id="approval-{by_action["repair_input"]}-diff"')[1]
    shown = shown.split("</details>")[0]
    assert '<span class="mono">$.card</span> added' in shown
    assert '<span class="mono">$.outage</span> changed' in shown
    assert "&quot;503&quot;" in shown and "&quot;&lt;b&gt;none&lt;/b&gt;&quot;" in shown
    assert "$.simulate" not in shown  # unchanged: not listed
    assert "new_input" not in shown and "<b>" not in shown
    shown = page.split(f'id="approval-{by_action["repair_output"]}-diff"')[1]
    shown = shown.split("</details>")[0]
    assert '<span class="mono">$.ref</span> added' in shown
    assert "R-&lt;i&gt;1&lt;/i&gt;" in shown and "new_output" not in shown
