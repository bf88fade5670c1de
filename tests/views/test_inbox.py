"""The inbox of steps that wait for a person, and a timer on the instance
page: Django's test client (filters, claim, the form's check, 403/409/422,
escaping), and one walk in a real browser (htmx)."""

from __future__ import annotations

from datetime import UTC, timedelta

import pytest

from tests.support import make_definition, start, user_in
from tests.views.conftest import fresh, logged_in
from tests.views.test_browser import TIMEOUT, browser, expect, open_session  # noqa: F401
from workflows_app.models import StepExecution, TransitionLog

pytestmark = pytest.mark.django_db(transaction=True)
REVIEW = {
    "name": "review",
    "kind": "human",
    "action": "",
    "compensation": "",
    "timeout": timedelta(hours=4),
    "form_fields": [
        {"name": "approved", "type": "boolean", "required": True},
        {"name": "limit", "type": "number", "required": True, "label": "Limit (EUR)"},
        {"name": "channel", "type": "choice", "choices": ["phone", "mail"]},
    ],
}
TIMER = {
    "name": "window",
    "kind": "timer",
    "action": "",
    "compensation": "",
    "wait_for": timedelta(days=3),
}


def _review_flow(broker, *keys):
    make_definition("orders", [{"name": "reserve"}, REVIEW, {"name": "ship"}])
    make_definition("refunds", [TIMER, {"name": "refund"}])
    instances = [start("orders", key) for key in keys]
    broker.run()
    return instances


def test_inbox_lists_filters_claims_and_completes(broker):
    a, b = _review_flow(broker, "ORD-<b>1</b>", "ORD-2")
    olga, oscar = user_in("operator", "olga"), user_in("operator", "oscar")
    client = logged_in(olga)
    page = client.get("/inbox/")
    assert page.status_code == 200
    html = page.content.decode()
    assert "ORD-&lt;b&gt;1&lt;/b&gt;" in html and "<b>1</b>" not in html
    assert "ORD-2" in html and "Limit (EUR)" in html
    # No template source leaks into the page (a multi-line {# #} did).
    assert "{#" not in html and "{%" not in html and "Not polled" not in html
    step_a = StepExecution.objects.get(instance=a, name="review")
    step_b = StepExecution.objects.get(instance=b, name="review")

    reply = client.post(f"/inbox/{step_a.pk}/claim/", HTTP_HX_REQUEST="true")
    assert reply.status_code == 200
    assert "is yours now" in reply.content.decode()
    mine = client.get("/inbox/?claimed=me", HTTP_HX_REQUEST="true").content.decode()
    assert "ORD-&lt;b&gt;1" in mine and "ORD-2" not in mine
    unclaimed = client.get("/inbox/?claimed=unclaimed").content.decode()
    assert "ORD-2" in unclaimed and "ORD-&lt;b&gt;1" not in unclaimed
    assert "ORD-2" not in client.get("/inbox/?definition=refunds").content.decode()

    # Oscar cannot take it over nor complete it: 409, nothing written.
    other = logged_in(oscar)
    assert other.post(f"/inbox/{step_a.pk}/claim/").status_code == 409
    reply = other.post(
        f"/inbox/{step_a.pk}/complete/",
        {"field-approved": "on", "field-limit": "5", "reason": "mine now"},
    )
    assert reply.status_code == 409
    assert fresh(a).state == "running"

    # A wrong form: 422 with each field's error, what was typed kept.
    reply = client.post(
        f"/inbox/{step_a.pk}/complete/",
        {"field-limit": "lots", "field-channel": "fax", "reason": "checked"},
    )
    assert reply.status_code == 422
    html = reply.content.decode()
    assert "must be a number" in html and "must be one of phone, mail" in html
    assert 'value="lots"' in html
    assert StepExecution.objects.get(pk=step_a.pk).state == "waiting"
    assert (
        client.post(
            f"/inbox/{step_a.pk}/complete/", {"field-limit": "5", "reason": ""}
        ).status_code
        == 422
    )

    version = fresh(a).version
    reply = client.post(
        f"/inbox/{step_a.pk}/complete/",
        {
            "field-approved": "on",
            "field-limit": "250",
            "field-channel": "phone",
            "reason": "called the customer",
            "version": str(version),
            "decision": "complete",
        },
        HTTP_HX_REQUEST="true",
    )
    assert reply.status_code == 200, reply.content.decode()
    assert "completed" in reply.content.decode()
    assert fresh(a).outputs["review"] == {
        "approved": True,
        "limit": 250,
        "channel": "phone",
    }
    row = TransitionLog.objects.get(instance=a, transition="complete_task")
    assert row.user == olga and row.reason == "called the customer"
    # A second completion (a double click, another tab) is a conflict.
    again = client.post(
        f"/inbox/{step_a.pk}/complete/",
        {"field-approved": "on", "field-limit": "1", "reason": "again"},
    )
    assert again.status_code == 409

    # Releasing someone else's claim needs a reason.
    assert logged_in(oscar).post(f"/inbox/{step_b.pk}/claim/").status_code == 200
    assert client.post(f"/inbox/{step_b.pk}/unclaim/").status_code == 422
    reply = client.post(f"/inbox/{step_b.pk}/unclaim/", {"reason": "oscar is away"})
    assert reply.status_code == 200
    assert StepExecution.objects.get(pk=step_b.pk).claimed_by is None


def test_a_viewer_sees_the_inbox_but_cannot_work_it(broker):
    (a,) = _review_flow(broker, "ORD-9")
    viewer = logged_in(user_in("viewer", "victor"))
    html = viewer.get("/inbox/").content.decode()
    assert "ORD-9" in html and ">Claim</button>" not in html
    step = StepExecution.objects.get(instance=a, name="review")
    assert viewer.post(f"/inbox/{step.pk}/claim/").status_code == 403
    reply = viewer.post(
        f"/inbox/{step.pk}/complete/",
        {"field-approved": "on", "field-limit": "5", "reason": "r"},
    )
    assert reply.status_code == 403
    assert fresh(a).state == "running"
    assert viewer.post("/inbox/999999/claim/").status_code == 404


def test_the_instance_page_shows_when_a_timer_wakes_and_extends_it(broker):
    make_definition("refunds", [TIMER, {"name": "refund"}])
    instance = start("refunds", "R-1")
    broker.run()
    olga = logged_in(user_in("operator", "olga"))
    timer = StepExecution.objects.get(instance=instance, name="window")
    html = olga.get(f"/instances/{instance.pk}/").content.decode()
    assert 'id="wakes-window"' in html and "wakes at" in html
    assert timer.wake_at.isoformat() in html
    # The timeline's reason reads as a time, not as ISO with microseconds.
    wakes = f"wakes at {timer.wake_at.astimezone(UTC):%Y-%m-%d %H:%M:%S} UTC"
    assert f'<td class="wrap">{wakes}</td>' in html
    assert "Extend the timer" in html and "Wake the timer now" in html
    version = fresh(instance).version
    reply = olga.post(
        f"/instances/{instance.pk}/actions/extend_timer/",
        {
            "reason": "customer asked",
            "version": version,
            "step": timer.pk,
            "by_minutes": "60",
        },
    )
    assert reply.status_code == 302
    after = StepExecution.objects.get(pk=timer.pk)
    assert after.wake_at == timer.wake_at + timedelta(hours=1)
    reply = olga.post(
        f"/instances/{instance.pk}/actions/extend_timer/",
        {"reason": "x", "version": fresh(instance).version, "by_minutes": "-5"},
    )
    assert reply.status_code == 422


def test_the_instance_page_does_not_give_waits_attempts_or_keys(broker):
    """A timer and a step for a person call no participant: the page shows
    no attempt budget and no key "to be sent" for them, and a person's step
    shows when it is due by its time rule, then that it is overdue."""
    from tests.support import advance_clock
    from workflows_app.engine.sweeps import sweep_all

    [order] = _review_flow(broker, "ORD-1")
    [refund] = [start("refunds", "R-1")]
    broker.run()
    client = logged_in(user_in("viewer"))
    for instance, name in ((order, "review"), (refund, "window")):
        html = client.get(f"/instances/{instance.pk}/").content.decode()
        row = html.split(f'id="step-{name}"')[1].split("</tr>")[0]
        assert "none: done by the engine" in row and " of 3" not in row
        keys = html.split(f'id="keys-{name}"')[1].split("</tr>")[0]
        assert "none: the engine does this step itself" in keys
        assert "none sent yet" not in keys
    row = client.get(f"/instances/{order.pk}/").content.decode()
    assert (
        'in 3 h 59 min</time> <span class="muted small">(its time rule)'
        in row.split('id="step-review"')[1].split("</tr>")[0]
    )
    advance_clock(order, 5 * 3600)
    sweep_all()
    row = client.get(f"/instances/{order.pk}/").content.decode()
    assert (
        "<strong>overdue</strong>" in row.split('id="step-review"')[1].split("</tr>")[0]
    )


@pytest.mark.expected_http_errors("422")
def test_browser_walk_of_the_inbox(broker, open_session):  # noqa: F811
    a, _ = _review_flow(broker, "ORD-31", "ORD-32")
    page = open_session(user_in("operator", "olga"))
    page.get_by_role("link", name="Inbox").click()
    page.wait_for_url("**/inbox/")
    items = page.locator(".inbox__item")
    expect(items).to_have_count(2)
    # Filter in place (htmx), the address bar keeps the filter.
    page.get_by_label("Workflow").select_option("orders")
    page.wait_for_url("**/inbox/?definition=orders&claimed=")
    item = page.locator(".inbox__item", has_text="ORD-31")
    item.get_by_role("button", name="Claim").click()
    expect(page.locator("#inbox-message")).to_contain_text("is yours now")
    item = page.locator(".inbox__item", has_text="ORD-31")
    expect(item.locator(".claimed-by")).to_have_text("olga")
    page.get_by_label("Claimed").select_option("me")
    expect(page.locator(".inbox__item")).to_have_count(1)
    item = page.locator(".inbox__item", has_text="ORD-31")
    item.get_by_text("Complete review").click()
    item.get_by_label("Limit (EUR)").fill("many")
    item.get_by_label("Reason").fill("checked the order")
    item.get_by_role("button", name="Complete", exact=True).click()
    expect(page.locator("#inbox-message")).to_contain_text("correct the form")
    item = page.locator(".inbox__item", has_text="ORD-31")
    expect(item.locator(".field__error").first).to_contain_text("must be a number")
    item.get_by_label("Limit (EUR)").fill("1200")
    item.get_by_label("Approved").check()
    item.get_by_role("button", name="Complete", exact=True).click()
    expect(page.locator("#inbox-message")).to_contain_text("completed")
    expect(page.locator(".inbox__item")).to_have_count(0)
    broker.run()
    assert fresh(a).state == "completed"
    assert fresh(a).outputs["review"] == {"approved": True, "limit": 1200}


def test_reject_in_the_browser_asks_only_for_a_reason(broker, open_session):  # noqa: F811
    """The form's required fields are for completing it: the browser must not
    refuse a rejection until they are filled (found on a walk of the tour)."""
    risky = {
        **REVIEW,
        "form_fields": [
            {
                "name": "risk",
                "type": "choice",
                "choices": ["low", "high"],
                "required": True,
            }
        ],
    }
    make_definition("orders", [{"name": "reserve"}, risky, {"name": "ship"}])
    instance = start("orders", "ORD-41")
    broker.run()
    page = open_session(user_in("operator", "olga"))
    page.goto("/inbox/")
    item = page.locator(".inbox__item", has_text="ORD-41")
    item.get_by_text("Complete review").click()
    item.get_by_label("Reason").fill("the customer withdrew it")
    item.get_by_role("button", name="Reject").click()
    expect(page.locator("#inbox-message")).to_contain_text("rejected")
    expect(page.locator(".inbox__item")).to_have_count(0)
    broker.run()
    assert fresh(instance).state == "compensated"
