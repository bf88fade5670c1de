"""The operator power tools in a real browser (Playwright, Debian's headless
Chromium, a live server on the test database): a failure group retried as a
bulk job, a cancel approved by a second operator, a repair then a retry."""

from __future__ import annotations

import json
import re

import pytest

from tests.operations.conftest import held
from tests.support import user_in
from tests.views.test_browser import (  # noqa: F401 - fixtures
    TIMEOUT,
    browser,
    expect,
    open_session,
    pytestmark,
)
from workflows_app.models import BulkJob, TransitionLog, WorkflowInstance


@pytest.fixture
def four_eyes_cancel(wf):
    wf.approval_actions = ["cancel"]
    wf.save(update_fields=["approval_actions"])
    return wf


def test_outage_burst_is_one_group_retried_as_a_watched_job(
    broker,
    wf,
    open_session,  # noqa: F811
):
    for n in range(5):
        held(broker, f"ORD-{100 + n}", outage=str(500 + n))
    held(broker, "ORD-other", reserve="fail")
    page = open_session(user_in("operator", "olga"))
    page.get_by_role("link", name="Failures").click()
    rows = page.locator("tr.failure-group")
    expect(rows).to_have_count(2)
    burst = rows.filter(has_text="payments returned <n> for order <q>")
    expect(burst).to_contain_text("5 instances")
    burst.get_by_role("link", name="Retry all…").click()

    page.get_by_label("Reason").fill("payments is back after INC-42")
    page.get_by_label("Rate (instances per second, 0 for no limit)").fill("0")
    page.get_by_role("button", name="Preview").click()
    plan = page.locator("#job-plan")
    expect(plan).to_contain_text("5 instances will be acted on")
    expect(plan).to_contain_text("retry charge — 5")
    assert not TransitionLog.objects.filter(transition="retry_step").exists()

    page.get_by_role("button", name="Start the job (5 instances)").click()
    expect(page.locator(".job-status")).to_contain_text("queued")
    expect(page.locator(".job-status")).to_contain_text("a worker is starting it")
    broker.run()  # the worker runs the job, then the retried steps
    # The progress part polls itself: no reload.
    expect(page.locator(".job-status")).to_contain_text("finished", timeout=TIMEOUT)
    expect(page.locator("#job-processed")).to_contain_text("5 of 5 processed (100%)")
    # Nothing on the page still says it is queued; history in human times.
    expect(page.locator("main")).not_to_contain_text("queued")
    expect(page.locator("main")).to_contain_text("You started the job.")
    expect(page.locator("#job-log")).to_contain_text("confirm by olga")
    expect(page.locator("#job-log time")).to_have_attribute(
        "datetime", re.compile(r"^\d{4}-")
    )
    expect(page.locator("#job-log")).not_to_contain_text("T0")
    assert BulkJob.objects.get().status == "finished"
    states = WorkflowInstance.objects.filter(business_key__startswith="ORD-1")
    assert set(states.values_list("state", flat=True)) == {"completed"}

    # Each timeline names the job, the operator and the reason.
    page.locator("#job-items").get_by_role("link", name="ORD-100").click()
    row = page.locator("#timeline tr", has_text="retry_step").first
    expect(row).to_contain_text("olga")
    expect(row).to_contain_text("payments is back after INC-42")
    expect(row).to_contain_text("bulk job #")


def test_cancel_needs_a_second_operator(
    broker,
    four_eyes_cancel,
    open_session,  # noqa: F811
):
    instance = held(broker, "ORD-1")
    url = f"/instances/{instance.pk}/"
    olga = open_session(user_in("operator", "olga"))
    olga.goto(url)
    olga.locator("#action-cancel summary").click()
    expect(olga.locator("#action-cancel")).to_contain_text("needs approval")
    olga.locator("#action-cancel").get_by_label("Reason").fill("customer withdrew")
    olga.get_by_role("button", name="Confirm: cancel").click()
    expect(olga.locator("#action-message")).to_contain_text("Sent for approval")
    expect(olga.locator("#approvals")).to_contain_text("Your request")
    expect(olga.get_by_role("button", name="Approve and do it")).to_have_count(0)
    expect(olga.locator("#timeline")).to_contain_text("approval_requested")
    assert WorkflowInstance.objects.get(pk=instance.pk).state == "needs_attention"

    oscar = open_session(user_in("operator", "oscar"))
    expect(oscar.locator("#pending-approvals")).to_contain_text("ORD-1")
    oscar.locator("#pending-approvals").get_by_role("link", name="ORD-1").click()
    oscar.get_by_role("button", name="Approve and do it").click()
    expect(oscar.locator("#action-message")).to_contain_text("Approved")
    expect(oscar.locator("#instance-live")).to_have_attribute(
        "data-state", "compensating"
    )
    row = oscar.locator("#timeline tr", has_text="approval_approved")
    expect(row).to_contain_text("oscar")
    cancel = oscar.locator("#timeline tr", has_text="cancel").first
    expect(cancel).to_contain_text("olga")


@pytest.mark.expected_http_errors("422")  # the broken JSON is refused
def test_repair_a_bad_input_then_retry(broker, wf, open_session):  # noqa: F811
    instance = held(broker, "ORD-7", outage="card_number_invalid")
    page = open_session(user_in("operator", "olga"))
    page.goto(f"/instances/{instance.pk}/")
    page.locator("#repair-input summary").click()
    box = page.locator("#repair-input").get_by_label("New value (JSON object)")
    fixed = {"card": "tok_visa", "simulate": {}}
    box.fill("{broken")
    page.locator("#repair-input").get_by_label("Reason").fill("new card")
    page.get_by_role("button", name="Save the instance input").click()
    expect(page.locator("#repair-input")).to_contain_text("Not valid JSON")
    page.locator("#repair-input").get_by_label("New value (JSON object)").fill(
        json.dumps(fixed)
    )
    page.locator("#repair-input").get_by_label("Reason").fill("new card")
    page.get_by_role("button", name="Save the instance input").click()
    expect(page.locator("#action-message")).to_contain_text("Input corrected")
    diff = page.locator("#timeline tr", has_text="input_repaired")
    expect(diff).to_contain_text("$.outage")
    expect(diff).to_contain_text("removed")
    expect(diff).to_contain_text("$.card")

    page.get_by_text("Retry step now: charge").click()
    page.locator("#action-retry_step").get_by_label("Reason").fill("after repair")
    page.get_by_role("button", name="Confirm: retry step now").click()
    expect(page.locator("#action-message")).to_have_text("Retry step now: done.")
    broker.run()
    expect(page.locator("#instance-live")).to_have_attribute(
        "data-state", "completed", timeout=TIMEOUT
    )


def test_restart_from_an_earlier_step(broker, wf, open_session):  # noqa: F811
    wf.steps.filter(name="reserve").update(restart_point=True)
    instance = held(broker, "ORD-9")
    # The gateway is back; the support agent wants the order run from the start.
    WorkflowInstance.objects.filter(pk=instance.pk).update(input={})
    page = open_session(user_in("operator", "olga"))
    page.goto(f"/instances/{instance.pk}/")
    page.locator("#action-restart_from_step summary").click()
    form = page.locator("#action-restart_from_step")
    expect(form.get_by_label("Restart from")).to_have_value(
        str(instance.steps.get(name="reserve").pk)
    )
    form.get_by_label("Reason").fill("stock re-counted")
    page.get_by_role("button", name="Confirm: restart from an earlier step").click()
    expect(page.locator("#action-message")).to_have_text(
        "Restart from an earlier step: done."
    )
    broker.run()
    expect(page.locator("#instance-live")).to_have_attribute(
        "data-state", "completed", timeout=TIMEOUT
    )
    expect(page.locator("#idempotency-keys")).to_contain_text(
        f"{instance.pk}:reserve:action:2"
    )
    row = page.locator("#timeline tr", has_text="restart_from_step")
    expect(row).to_contain_text("olga")
    expect(row).to_contain_text("stock re-counted")
    assert (
        TransitionLog.objects.filter(instance=instance, transition="rerun").count() == 2
    )  # reserve and charge; ship never ran
