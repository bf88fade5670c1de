"""Four eyes is enforced by the engine: an action a workflow puts under
approval gets past no entry point without a second operator — not the
engine command called directly, not the instance page, not a selection in
the list, not a bulk job, not the operator API, not the command line."""

from __future__ import annotations

from typing import Any

import pytest
from django.test import Client

from tests.operations.conftest import held
from workflows_app.engine import commands
from workflows_app.engine.commands import approvals, bulk, repair
from workflows_app.engine.four_eyes import ApprovalRequired
from workflows_app.models import (
    ApprovalRequest,
    BulkJob,
    BulkJobItem,
    TransitionLog,
    WorkflowInstance,
)

pytestmark = pytest.mark.django_db(transaction=True)

# Every approvable action a held-at-a-failed-step instance allows, with the
# engine command and its extra arguments.
DIRECT = {
    "retry_step": (commands.instance_retry_step, {}),
    "mark_step_done": (commands.instance_mark_step_done, {"output": {"by": "hand"}}),
    "compensate": (commands.instance_compensate, {}),
    "cancel": (commands.instance_cancel, {}),
    "close_as_failed": (commands.instance_close_as_failed, {}),
    "repair": (repair.instance_repair_input, {"new_input": {"fixed": True}}),
}


def guard(wf: Any, *actions: str) -> None:
    wf.approval_actions = list(actions)
    wf.save(update_fields=["approval_actions"])


def snapshot(instance: WorkflowInstance) -> tuple[Any, ...]:
    fresh = WorkflowInstance.objects.get(pk=instance.pk)
    rows = TransitionLog.objects.filter(instance=instance).exclude(
        transition="approval_requested"
    )
    return fresh.state, fresh.version, fresh.input, rows.count()


def logged_in(user: Any) -> Client:
    client = Client()
    client.force_login(user)
    return client


@pytest.mark.parametrize("action", sorted(DIRECT))
def test_the_engine_command_refuses_without_approval(broker, wf, operator, action):
    guard(wf, action)
    instance = held(broker, f"ORD-{action}")
    before = snapshot(instance)
    command, extra = DIRECT[action]
    with pytest.raises(ApprovalRequired, match="second operator"):
        command(
            instance.pk,
            user=operator,
            reason="no second pair of eyes",
            expected_version=instance.version,
            **extra,
        )
    assert snapshot(instance) == before


@pytest.mark.parametrize("action", ["retry_step", "compensate", "cancel"])
def test_the_page_asks_for_approval_and_does_nothing(broker, wf, operator, action):
    guard(wf, action)
    instance = held(broker, "ORD-page")
    before = snapshot(instance)
    response = logged_in(operator).post(
        f"/instances/{instance.pk}/actions/{action}/",
        {"reason": "please", "version": instance.version},
        headers={"HX-Request": "true"},
    )
    assert response.status_code == 200
    assert "Sent for approval" in response.content.decode()
    assert snapshot(instance) == before
    assert ApprovalRequest.objects.get().action == action


@pytest.mark.parametrize(
    ("action", "guarded"), [("retry", "retry_step"), ("compensate", "compensate")]
)
def test_a_selection_in_the_list_is_refused(broker, wf, operator, action, guarded):
    guard(wf, guarded)
    instance = held(broker, "ORD-list")
    before = snapshot(instance)
    client = logged_in(operator)
    response = client.post(
        "/instances/bulk/",
        {
            "action": action,
            "reason": "all of them",
            "selected": [f"{instance.pk}:{instance.version}"],
        },
    )
    # A selection becomes a bulk job: its preview, then the confirmation,
    # which asks a second operator.
    job = BulkJob.objects.get()
    assert response.status_code == 302
    assert response["Location"] == f"/bulk-jobs/{job.pk}/"
    response = client.post(f"/bulk-jobs/{job.pk}/confirm/", follow=True)
    assert "second operator" in response.content.decode()
    job.refresh_from_db()
    assert job.status == BulkJob.Status.DRAFT
    assert ApprovalRequest.objects.filter(bulk_job=job).exists()
    bulk.bulk_job_work(job.pk, budget=5)
    assert snapshot(instance) == before


@pytest.mark.parametrize(
    ("action", "guarded"), [("retry", "retry_step"), ("compensate", "compensate")]
)
def test_a_bulk_job_needs_approval_and_its_runner_refuses_without(
    broker, wf, operator, second_operator, action, guarded
):
    guard(wf, guarded)  # approval_bulk_over stays unset: one item is enough
    instance = held(broker, "ORD-job")
    before = snapshot(instance)
    job = bulk.bulk_job_plan(
        WorkflowInstance.objects.filter(pk=instance.pk),
        action=action,
        reason="the outage is over",
        user=operator,
        description="one group",
    )
    bulk.bulk_job_confirm(job.pk, user=operator)
    job.refresh_from_db()
    assert job.status == BulkJob.Status.DRAFT  # waits for a second operator
    request = ApprovalRequest.objects.get(bulk_job=job)

    # Forced onto a worker without the approval: the engine refuses the item.
    BulkJob.objects.filter(pk=job.pk).update(status=BulkJob.Status.QUEUED)
    bulk.bulk_job_work(job.pk, budget=5)
    item = BulkJobItem.objects.get(job=job)
    assert item.outcome == BulkJobItem.Outcome.REFUSED
    assert "second operator" in item.message
    assert snapshot(instance) == before

    # The proper way: a second operator approves the job, then it acts.
    BulkJob.objects.filter(pk=job.pk).update(status=BulkJob.Status.DRAFT)
    BulkJobItem.objects.filter(pk=item.pk).update(
        outcome=BulkJobItem.Outcome.PENDING, message=""
    )
    approvals.approval_decide(request.pk, user=second_operator, approve=True)
    bulk.bulk_job_work(job.pk, budget=5)
    assert BulkJobItem.objects.get(pk=item.pk).outcome == BulkJobItem.Outcome.DONE
    row = TransitionLog.objects.filter(instance=instance, user=operator).latest("id")
    assert row.data["bulk_job"] == job.pk
    assert row.data["approved_by"] == second_operator.get_username()


def test_an_approved_request_does_the_action_once(
    broker, wf, operator, second_operator
):
    guard(wf, "compensate")
    instance = held(broker, "ORD-ok")
    request = approvals.approval_request(
        instance.pk,
        action="compensate",
        user=operator,
        reason="customer cancelled",
        expected_version=instance.version,
    )
    approvals.approval_decide(request.pk, user=second_operator, approve=True)
    assert WorkflowInstance.objects.get(pk=instance.pk).state in {
        "compensating",
        "compensated",
    }
    row = TransitionLog.objects.get(instance=instance, transition="compensate")
    assert row.user == operator
    assert row.data["approved_by"] == second_operator.get_username()


# -- the operator API (issue 14) --------------------------------------------------

# What each approvable action sends over the API: its name and its body.
API = {
    "retry_step": ("retry_step", {}),
    "mark_step_done": ("mark_step_done", {"data": {"output": {"by": "hand"}}}),
    "compensate": ("compensate", {}),
    "cancel": ("cancel", {}),
    "close_as_failed": ("close_as_failed", {}),
    "repair": ("repair_input", {"data": {"input": {"fixed": True}}}),
}


def operate_client(live_server: Any, user: Any) -> Any:
    from tests.api.helpers import RawHttp
    from workflows_app.models import ApiToken

    token = ApiToken.issue("runbook", ["operate"], user=user)[1]
    return RawHttp(live_server.url, token)


@pytest.mark.parametrize("action", sorted(API))
def test_the_api_asks_for_approval_and_does_nothing(
    broker, live_server, wf, operator, action
):
    guard(wf, action)
    instance = held(broker, f"ORD-api-{action}")
    before = snapshot(instance)
    name, extra = API[action]
    reply = operate_client(live_server, operator)(
        "POST",
        f"/api/v1/instances/{instance.pk}/actions/{name}",
        {"reason": "please", "expected_version": instance.version, **extra},
    )
    assert reply.status == 202, reply.raw
    assert reply.json["status"] == "pending"
    assert reply.json["action"] == name
    broker.run()
    assert snapshot(instance) == before
    assert ApprovalRequest.objects.get().requested_by == operator


@pytest.mark.parametrize(
    ("action", "guarded"), [("retry", "retry_step"), ("compensate", "compensate")]
)
def test_a_bulk_job_started_through_the_api_needs_approval(
    broker, live_server, wf, operator, action, guarded
):
    guard(wf, guarded)
    instance = held(broker, "ORD-api-job")
    before = snapshot(instance)
    client = operate_client(live_server, operator)
    planned = client(
        "POST",
        "/api/v1/bulk-jobs",
        {"business_key": "ORD-api-job", "action": action, "reason": "outage over"},
    )
    assert planned.status == 201, planned.raw
    started = client("POST", f"/api/v1/bulk-jobs/{planned.json['id']}/start")
    assert started.status == 202, started.raw
    assert started.json["status"] == "draft"
    assert started.json["approval"]["status"] == "pending"
    broker.run()
    assert BulkJob.objects.get().status == BulkJob.Status.DRAFT
    assert BulkJobItem.objects.get().outcome == BulkJobItem.Outcome.PENDING
    assert snapshot(instance) == before


# -- the command line (issue 14) --------------------------------------------------

# What each approvable action adds on the command line: its name and options.
CLI = {
    "retry_step": ("retry_step", []),
    "mark_step_done": ("mark_step_done", ["--data", '{"output": {"by": "hand"}}']),
    "compensate": ("compensate", []),
    "cancel": ("cancel", []),
    "close_as_failed": ("close_as_failed", []),
    "repair": ("repair_input", ["--data", '{"input": {"fixed": true}}']),
}


def saga(*args: str) -> Any:
    """``manage.py saga`` as a real process, against the test database."""
    import subprocess
    import sys

    from tests.celery_processes import ROOT, process_env

    return subprocess.run(
        [sys.executable, "manage.py", "saga", *args],
        cwd=ROOT,
        env=process_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("action", sorted(CLI))
def test_the_command_line_asks_for_approval_and_does_nothing(
    broker, wf, operator, action
):
    guard(wf, action)
    instance = held(broker, f"ORD-cli-{action}")
    before = snapshot(instance)
    name, extra = CLI[action]
    result = saga(
        "act",
        instance.business_key,
        name,
        "--reason",
        "please",
        "--user",
        operator.get_username(),
        "--expected-version",
        str(instance.version),
        *extra,
    )
    assert result.returncode == 5, result.stderr  # sent for approval
    assert "sent for approval" in result.stdout
    assert snapshot(instance) == before
    request = ApprovalRequest.objects.get()
    assert request.action == name
    assert request.status == ApprovalRequest.Status.PENDING
    assert request.requested_by == operator


@pytest.mark.parametrize(
    ("action", "guarded"), [("retry", "retry_step"), ("compensate", "compensate")]
)
def test_a_bulk_job_from_the_command_line_waits_for_approval(
    broker, wf, operator, action, guarded
):
    guard(wf, guarded)
    instance = held(broker, "ORD-cli-job")
    before = snapshot(instance)
    result = saga(
        "bulk",
        action,
        "--business-key",
        "ORD-cli-job",
        "--reason",
        "the outage is over",
        "--user",
        operator.get_username(),
    )
    assert result.returncode == 5, result.stderr
    job = BulkJob.objects.get()
    assert job.status == BulkJob.Status.DRAFT  # not queued: nothing runs it
    request = ApprovalRequest.objects.get(bulk_job=job)
    assert request.status == ApprovalRequest.Status.PENDING
    assert f"request #{request.pk}" in result.stdout
    assert BulkJobItem.objects.get(job=job).outcome == BulkJobItem.Outcome.PENDING
    assert snapshot(instance) == before
