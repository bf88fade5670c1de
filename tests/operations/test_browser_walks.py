"""The operator power tools in a real browser (Playwright, Debian's headless
Chromium, a live server on the test database): a failure group retried as a
bulk job, a cancel approved by a second operator, a repair then a retry, and
the two tour parts first walked in session 5: Resume of a deadline hold and
a repair under four eyes, each page checked against the database."""

from __future__ import annotations

import json
import re
from datetime import timedelta

import pytest

from tests.operations.conftest import STEPS, held
from tests.support import advance_clock, make_definition, start, user_in
from tests.views.test_browser import (  # noqa: F401 - fixtures
    TIMEOUT,
    browser,
    expect,
    fast_polling,
    open_session,
    pytestmark,
)
from workflows_app.alerts import sync_alerts
from workflows_app.engine.locking import db_now
from workflows_app.engine.sweeps import sweep_all
from workflows_app.models import (
    Alert,
    ApprovalRequest,
    BulkJob,
    TransitionLog,
    WorkflowInstance,
)

# An ISO 8601 time as the engine stores it ("2026-12-02T20:23:33.455390+00:00"):
# the pages say times in words ("2026-12-02 20:23:33 UTC").
RAW_ISO = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d")


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


def test_resume_of_a_deadline_hold(
    broker_no_inline,
    open_session,  # noqa: F811
    fast_polling,  # noqa: F811
):
    """Tour item 6: an order runs past its 1 h deadline, the sweeper holds
    it, an operator resumes it, and it finishes without a deadline."""
    broker = broker_no_inline
    make_definition(
        "orders", steps=STEPS, failure_policy="hold", deadline=timedelta(hours=1)
    )
    instance = start("orders", "ORD-DL")
    broker.deliver(broker.queue.pop(0))  # started: reserve's attempt is queued
    advance_clock(instance, 3601)
    sweep_all()
    sync_alerts(db_now(), 100)
    held_row = WorkflowInstance.objects.get(pk=instance.pk)
    assert (held_row.state, held_row.attention_kind) == ("needs_attention", "deadline")
    words = f"{held_row.deadline_at:%Y-%m-%d %H:%M:%S} UTC"

    page = open_session(user_in("operator", "olga"))
    page.goto(f"/instances/{instance.pk}/")
    why = page.locator("#why-it-waits")
    expect(why).to_contain_text(f"the workflow deadline {words} passed")
    expect(page.locator("#deadline-outlook")).to_contain_text(
        "passed: that is why it is held. Resume accepts it"
    )
    # What the engine allows for a deadline hold: Resume, no retry.
    expect(page.locator("#action-resume")).to_have_count(1)
    expect(page.locator("#action-retry_step")).to_have_count(0)
    alert = page.locator("#alerts")
    expect(alert).to_contain_text("deadline passed")
    expect(alert).to_contain_text(words)
    for where in (why, alert):
        assert not RAW_ISO.search(where.inner_text()), where.inner_text()
    page.goto("/failures/")
    group = page.locator("tr.failure-group")
    expect(group).to_have_count(1)
    expect(group).to_contain_text("1 instance")
    expect(group).to_contain_text("workflow deadline")
    assert not RAW_ISO.search(group.inner_text()), group.inner_text()

    page.goto(f"/instances/{instance.pk}/")
    page.locator("#action-resume summary").click()
    page.locator("#action-resume").get_by_label("Reason").fill("customer will wait")
    page.get_by_role("button", name="Confirm: resume").click()
    expect(page.locator("#action-message")).to_have_text("Resume: done.")
    expect(page.locator("#instance-live")).to_have_attribute("data-state", "running")
    resumed = WorkflowInstance.objects.get(pk=instance.pk)
    assert (resumed.state, resumed.deadline_at) == ("running", None)
    # Not a bare "—", which reads as a workflow without a deadline.
    expect(page.locator("#instance-deadline")).to_contain_text(
        "none any more: it passed and was accepted"
    )
    assert page.locator("#why-it-waits").count() == 0
    expect(page.locator("#alerts")).to_contain_text("No open alerts.")
    assert not Alert.objects.filter(instance=instance, resolved_at=None).exists()
    row = page.locator("#timeline tr", has_text="resume").first
    expect(row).to_contain_text("olga")
    expect(row).to_contain_text("customer will wait")

    broker.run()  # the held-back attempt and the rest of the order
    expect(page.locator("#instance-live")).to_have_attribute(
        "data-state", "completed", timeout=TIMEOUT
    )
    expect(page.locator("#instance-deadline")).to_have_text("none: finished")
    done = WorkflowInstance.objects.get(pk=instance.pk)
    assert done.state == "completed"
    assert list(done.steps.values_list("attempt", flat=True)) == [1, 1, 1]


def test_repair_under_four_eyes_is_asked_then_approved(
    broker,
    open_session,  # noqa: F811
    fast_polling,  # noqa: F811
):
    """Tour item 5 for *Repair data*: olga asks, nothing is written; oscar
    approves from the overview; the input is written as olga's, once."""
    wf = make_definition("orders", steps=STEPS, failure_policy="hold")
    wf.approval_actions = ["repair"]
    wf.save(update_fields=["approval_actions"])
    instance = held(broker, "ORD-RP", outage="card_number_invalid")
    fixed = {"card": "tok_visa", "simulate": {}}

    olga = open_session(user_in("operator", "olga"))
    olga.goto(f"/instances/{instance.pk}/")
    expect(olga.locator("#repair")).to_contain_text("needs approval")
    olga.locator("#repair-input summary").click()
    olga.locator("#repair-input").get_by_label("New value (JSON object)").fill(
        json.dumps(fixed)
    )
    olga.locator("#repair-input").get_by_label("Reason").fill("new card")
    olga.get_by_role("button", name="Save the instance input").click()
    # The one-off message stays: no refresh replaces an action's answer
    # (tests/views/test_refresh_race_browser.py forces that race).
    expect(olga.locator("#action-message")).to_contain_text("Sent for approval")
    expect(olga.locator("#approvals")).to_contain_text("Your request")
    expect(olga.get_by_role("button", name="Approve and do it")).to_have_count(0)
    # Nothing written yet, and the page shows the input as it still is.
    asked = WorkflowInstance.objects.get(pk=instance.pk)
    assert asked.input == instance.input and asked.version == instance.version
    expect(olga.locator("#input-json")).to_contain_text("card_number_invalid")
    request = ApprovalRequest.objects.get()
    assert (request.action, request.status) == ("repair_input", "pending")

    oscar = open_session(user_in("operator", "oscar"))
    expect(oscar.locator("#pending-approvals")).to_contain_text("edit the input")
    oscar.locator("#pending-approvals").get_by_role("link", name="ORD-RP").click()
    approval = oscar.locator(f"#approval-{request.pk}")
    approval.get_by_text("what would be written").click()
    # The change against the input now, path by path, not the raw request.
    expect(approval.locator(".diff")).to_contain_text("$.card added")
    expect(approval.locator(".diff")).to_contain_text("tok_visa")
    expect(approval).not_to_contain_text("new_input")
    oscar.get_by_role("button", name="Approve and do it").click()
    expect(oscar.locator("#action-message")).to_contain_text("Approved")
    repaired = WorkflowInstance.objects.get(pk=instance.pk)
    assert repaired.input == fixed and repaired.state == "needs_attention"
    assert ApprovalRequest.objects.get().status == "approved"
    expect(oscar.locator("#input-json")).to_contain_text("tok_visa")
    expect(oscar.locator("#approvals")).to_have_count(0)
    row = oscar.locator("#timeline tr", has_text="input_repaired")
    expect(row).to_contain_text("olga")
    expect(row).to_contain_text("approved by oscar")
    expect(row).to_contain_text("$.card")
    assert (
        TransitionLog.objects.filter(instance=instance, transition="input_repaired")
        .values_list("user__username", flat=True)
        .get()
        == "olga"
    )
    # olga's page refreshes itself: the request is gone, the new input shown.
    expect(olga.locator("#approvals")).to_have_count(0, timeout=TIMEOUT)
    expect(olga.locator("#input-json")).to_contain_text("tok_visa")
    olga.goto("/")
    expect(olga.locator("#pending-approvals")).to_contain_text(
        "Nothing waits for a second operator"
    )

    olga.goto(f"/instances/{instance.pk}/")
    olga.get_by_text("Retry step now: charge").click()
    olga.locator("#action-retry_step").get_by_label("Reason").fill("after repair")
    olga.get_by_role("button", name="Confirm: retry step now").click()
    expect(olga.locator("#action-message")).to_have_text("Retry step now: done.")
    broker.run()  # the repaired step's earlier call is undone, then run anew
    expect(olga.locator("#instance-live")).to_have_attribute(
        "data-state", "completed", timeout=TIMEOUT
    )
