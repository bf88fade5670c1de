"""Pages say only what is still true (issue 15): after an action, once an
instance has finished, after a retry, for a discarded or finished bulk job."""

from __future__ import annotations

import re
from datetime import timedelta
from html.parser import HTMLParser

import pytest
from django.urls import reverse

from tests.support import make_definition, start
from tests.views.conftest import completed, held, logged_in
from workflows_app.alerts import sync_alerts
from workflows_app.engine.commands import bulk
from workflows_app.engine.locking import db_now
from workflows_app.models import Alert, BulkJob, WorkflowInstance

pytestmark = pytest.mark.django_db(transaction=True)
HTMX = {"HX-Request": "true"}


class _Element(HTMLParser):
    """The text inside the element with a given id (nesting respected)."""

    VOID = {"br", "img", "input", "meta", "link", "hr", "col", "source"}

    def __init__(self, element_id: str) -> None:
        super().__init__()
        self.element_id, self.depth, self.parts = element_id, 0, []

    def handle_starttag(self, tag, attrs):
        if tag in self.VOID:
            return
        if self.depth or dict(attrs).get("id") == self.element_id:
            self.depth += 1

    def handle_endtag(self, tag):
        if self.depth and tag not in self.VOID:
            self.depth -= 1

    def handle_data(self, data):
        if self.depth:
            self.parts.append(data)


def text_of(html: str, element_id: str | None = None) -> str:
    """The visible text (of one element, by id), whitespace collapsed."""
    if element_id is None:
        return " ".join(re.sub(r"<[^>]+>", " ", html).split())
    parser = _Element(element_id)
    parser.feed(html)
    assert parser.parts, f"no #{element_id}"
    return " ".join(" ".join(parser.parts).split())


def act(client, instance, name: str, **extra) -> str:
    response = client.post(
        reverse("instance_action", args=[instance.pk, name]),
        {"reason": "because", "version": instance.version, **extra},
        headers=HTMX,
    )
    assert response.status_code == 200, response.content.decode()[:500]
    return response.content.decode()


def test_closed_as_failed_no_longer_waits_and_shows_no_pending_steps(
    broker, wf, operator
):
    instance = held(broker)
    sync_alerts(db_now(), 100)
    assert Alert.objects.filter(resolved_at__isnull=True).count() == 1
    client = logged_in(operator)
    before = client.get(reverse("instance_detail", args=[instance.pk])).content
    assert "Why it waits" in before.decode()
    assert "Acknowledge: I am on it" in before.decode()

    # The action's own answer is already true: no old alert, no button.
    html = act(client, instance, "close_as_failed")
    assert "Close as failed: done." in html
    assert "Why it waits" not in html
    assert "Held before it was closed" in html
    assert "Acknowledge: I am on it" not in html
    assert "No open alerts." in html
    # Step three never ran and never will: not "pending", not "undo ready".
    three = text_of(html, "step-three")
    assert "not run" in three and "pending" not in three
    strip = text_of(html, "progress-strip")
    assert "undo ready" not in strip and "pending" not in strip
    assert "never ran: nothing to undo" in strip
    assert text_of(html, "instance-deadline") == "none: finished"


def test_the_answer_to_a_retry_drops_the_alert_and_counts_the_fresh_budget(
    broker, wf, operator
):
    instance = held(broker)
    sync_alerts(db_now(), 100)
    client = logged_in(operator)
    html = act(client, instance, "retry_step")
    assert "Acknowledge: I am on it" not in html and "No open alerts." in html
    broker.run()
    assert WorkflowInstance.objects.get(pk=instance.pk).state == "completed"
    page = client.get(reverse("instance_detail", args=[instance.pk])).content.decode()
    # Step two: one attempt failed, the retry granted a fresh budget of one,
    # used by the attempt that succeeded.
    two = text_of(page, "step-two")
    assert "1 of 1 (fresh budget; 1 before)" in two
    assert "2 of 2" not in two and "1 of 2" not in two
    assert "1 of 3" in text_of(page, "step-one")  # the default budget
    assert "before" not in text_of(page, "step-one")


@pytest.fixture
def plan(broker, wf, operator):
    for n in range(3):
        held(broker, f"order-{n}")
    return bulk.bulk_job_plan(
        WorkflowInstance.objects.all(),
        action="retry",
        reason="gateway back",
        user=operator,
        description="all",
    )


def test_a_discarded_plan_says_nothing_was_done(plan, operator):
    client = logged_in(operator)
    response = client.post(reverse("bulk_job_operate", args=[plan.pk, "cancel"]))
    assert response.status_code == 302
    html = client.get(response["Location"]).content.decode()
    progress = text_of(html, "job-progress")
    assert "Discarded before it started: nothing was done." in progress
    assert "The plan was to act on 3 instances." in progress
    assert "will be acted on" not in progress
    assert "processed" not in progress
    assert "You cancelled the job." in text_of(html)
    history = text_of(html, "job-log")
    assert re.fullmatch(r"cancel by olga (just now|\d+ s ago)", history), history
    assert re.search(r'<time datetime="\d{4}-\d\d-\d\dT[^"]+" title="', html)


def test_a_finished_job_does_not_say_it_is_queued(broker, plan, operator):
    client = logged_in(operator)
    response = client.post(reverse("bulk_job_operate", args=[plan.pk, "confirm"]))
    html = client.get(response["Location"]).content.decode()
    assert "The job is queued; a worker is starting it." in text_of(
        html, "job-progress"
    )
    assert "You started the job." in text_of(html)
    broker.run()
    assert BulkJob.objects.get().status == "finished"
    part = client.get(reverse("bulk_job_detail", args=[plan.pk]), headers=HTMX)
    progress = text_of(part.content.decode(), "job-progress")
    assert "Finished: every planned instance was processed." in progress
    assert "queued" not in progress
    assert "3 of 3 processed (100%)" in progress
    page = client.get(reverse("bulk_job_detail", args=[plan.pk])).content.decode()
    assert "queued" not in text_of(page)  # the flash was shown once
    assert "T" not in text_of(page, "job-log")  # no raw ISO timestamps


# -- found on a walk through README's tour (issue 15) --------------------------


def test_a_hold_older_than_stuck_after_does_not_contradict_the_stuck_rule(
    broker, wf, operator
):
    instance = held(broker)
    # Held longer than the definition's stuck-after: still not stuck, and the
    # page must not give a rule by which it would be.
    WorkflowInstance.objects.filter(pk=instance.pk).update(
        stuck_since=db_now() - timedelta(hours=2),
        last_progress_at=db_now() - timedelta(hours=2),
    )
    client = logged_in(operator)
    page = client.get(reverse("instance_detail", args=[instance.pk])).content.decode()
    held_for = text_of(page, "held-for")
    assert held_for.startswith("Held for a person for 2 h"), held_for
    assert "A hold is not counted as stuck, however long it waits" in held_for
    assert "while the engine itself works on the instance" in held_for
    assert "which means no progress" not in held_for
    rules = text_of(client.get("/").content.decode(), "held-stuck-rules")
    assert "a hold is never counted as stuck, however long it waits" in rules


def test_compensating_says_what_can_still_be_done_and_what_will_not_run(
    broker, wf, operator
):
    instance = held(broker)
    client = logged_in(operator)
    # The action's answer, before a worker starts the undo: compensating.
    html = act(client, instance, "compensate")
    assert WorkflowInstance.objects.get(pk=instance.pk).state == "compensating"
    no_action = text_of(html, "no-action")
    assert "No action on its steps is possible while the instance is compensating" in (
        no_action
    )
    assert "Its data can still be corrected under Repair data" in no_action
    assert 'id="repair"' in html  # the section it points to is there
    # Step three never ran and, on the way back, never will.
    three = text_of(html, "step-three")
    assert "not run" in three and "pending" not in three
    assert "pending" not in text_of(html, "progress-strip").split("3. three")[1]


def test_a_restart_keeps_the_steps_it_will_run_again_pending(broker, operator):
    make_definition(
        "rs",
        steps=[
            {"name": "one", "restart_point": True},
            {"name": "two", "max_attempts": 1},
            {"name": "three"},
        ],
        failure_policy="hold",
    )
    instance = start("rs", "order-r", simulate={"two": "fail_once"})
    broker.run()
    instance.refresh_from_db()
    assert instance.state == "needs_attention"
    one = instance.steps.get(name="one")
    html = act(logged_in(operator), instance, "restart_from_step", step=one.pk)
    instance.refresh_from_db()
    assert instance.state == "compensating" and instance.restart_position == 1
    assert "pending" in text_of(html, "step-three")  # it runs again after the undo
    assert "not run" not in text_of(html, "step-three")


def test_finished_tiles_open_a_list_of_the_same_window(broker, wf, viewer):
    old = completed(broker, "done-old")
    completed(broker, "done-new")
    WorkflowInstance.objects.filter(pk=old.pk).update(
        last_progress_at=db_now() - timedelta(days=2)
    )
    client = logged_in(viewer)

    def tile(html: str, state: str) -> tuple[int, str]:
        found = re.search(
            rf'<a class="tile tile--{state}" href="([^"]+)">.*?'
            r'<span class="tile__count">(\d+)</span>',
            html,
            re.S,
        )
        assert found, state
        return int(found.group(2)), found.group(1).replace("&amp;", "&")

    for window, expected in [("24h", 1), ("7d", 2), ("all", 2)]:
        html = client.get(f"/?window={window}").content.decode()
        count, href = tile(html, "completed")
        assert count == expected, window
        listed = client.get(href)
        assert listed.context["total"] == expected, (window, href)
        assert len(listed.context["page"].rows) == expected
    # The per-definition cell and the definition page's tile, too.
    html = client.get("/?window=24h").content.decode()
    cell = re.search(r'href="([^"]*definition=wf&amp;state=completed[^"]*)">1<', html)
    assert (
        cell and client.get(cell.group(1).replace("&amp;", "&")).context["total"] == 1
    )
    page = client.get(reverse("definition_detail", args=["wf"])).content.decode()
    count, href = tile(page, "completed")
    assert count == 1 and client.get(href).context["total"] == 1
    listed = client.get(href).content.decode()
    assert "Last progress within the last 24 h" in text_of(listed, "progress-within")


def test_the_held_or_stuck_queue_says_when_it_shows_only_some(
    broker, wf, operator, monkeypatch
):
    from workflows_app.views import dashboard

    monkeypatch.setattr(dashboard, "STUCK_SHOWN", 1)
    for n in range(2):
        held(broker, f"order-{n}")
    client = logged_in(operator)
    html = client.get("/").content.decode()
    assert text_of(html, "stuck-queue-more") == "The 1 longest waiting of 2."
    link = re.search(r'href="([^"]+)">All 2 held instances \(needs attention\)', html)
    assert link, text_of(html, "stuck-queue-links")
    listed = client.get(link.group(1).replace("&amp;", "&"))
    assert listed.context["total"] == 2


def test_completed_with_a_step_done_by_hand_does_not_claim_every_step_succeeded(
    broker, wf, operator
):
    instance = held(broker)
    client = logged_in(operator)
    act(client, instance, "mark_step_done", output="{}")
    broker.run()
    assert WorkflowInstance.objects.get(pk=instance.pk).state == "completed"
    page = client.get(reverse("instance_detail", args=[instance.pk])).content.decode()
    assert "done by hand" in text_of(page, "step-two")
    meaning = text_of(page, "state-meaning")
    assert "every step succeeded (or an operator marked it done by hand)" in meaning


def test_the_idempotency_table_lists_only_keys_that_were_sent(broker, wf, operator):
    instance = held(broker, two="fail")  # two declined for good, three never ran
    client = logged_in(operator)
    act(client, instance, "close_as_failed")
    page = client.get(reverse("instance_detail", args=[instance.pk])).content.decode()
    pk = instance.pk
    assert text_of(page, "keys-one") == f"one 1 / 0 {pk}:one:action"
    # Step two was called, its undo was not (not needed): no undo key.
    assert text_of(page, "keys-two") == f"two 1 / 0 {pk}:two:action"
    three = text_of(page, "keys-three")
    assert three == "three 0 / 0 none: never called"


def test_recent_failures_name_the_undo_that_holds_an_instance(broker, operator):
    make_definition("cf", steps=[{"name": "one"}, {"name": "two"}])
    instance = start(
        "cf", "order-c", simulate={"one": "fail_compensation", "two": "fail"}
    )
    broker.run()
    instance.refresh_from_db()
    assert (instance.state, instance.attention_kind) == (
        "needs_attention",
        "compensation_failed",
    )
    html = logged_in(operator).get("/").content.decode()
    row = text_of(html, "recent-failures")
    # What holds it now is one's undo, as the held queue says; not two's
    # declined action, which the undo was started for.
    assert "one (undo):" in row and "two:" not in row
    assert "one: a compensation exhausted its retries" in text_of(html, "stuck-queue")


def test_the_demo_console_counts_stuck_as_the_overview_does(broker, wf):
    from io import StringIO

    from workflows_app.demo.management.commands.demo import Command

    held(broker)
    out = StringIO()
    Command(stdout=out)._traffic(0, 0.01, {}, lambda: False)
    assert "needs_attention 1; stuck 0" in out.getvalue()


def test_a_held_instance_past_its_deadline_says_what_that_means(broker, operator):
    """The page's hint on a passed deadline is what the engine does: a hold
    is not escalated by it, running on is held for it at the next sweep, and
    Resume goes on without it."""
    from tests.support import advance_clock
    from tests.views.conftest import HOLD_STEPS
    from workflows_app.engine.sweeps import sweep_all

    make_definition(
        "wf", steps=HOLD_STEPS, failure_policy="hold", deadline=timedelta(hours=1)
    )
    instance = held(broker)
    client = logged_in(operator)
    url = reverse("instance_detail", args=[instance.pk])
    assert "deadline-outlook" not in client.get(url).content.decode()
    advance_clock(instance, 3601)
    sweep_all()
    instance.refresh_from_db()
    assert instance.attention_kind == "step_failed"  # not held again
    hint = text_of(client.get(url).content.decode(), "deadline-outlook")
    assert hint.startswith("passed while it is held: nothing enforces it")
    act(client, instance, "retry_step")
    sweep_all()  # before any worker ran the retry
    instance.refresh_from_db()
    assert (instance.state, instance.attention_kind) == ("needs_attention", "deadline")
    hint = text_of(client.get(url).content.decode(), "deadline-outlook")
    assert hint.startswith("passed: that is why it is held. Resume accepts it")
    act(client, instance, "resume")
    broker.run()
    instance.refresh_from_db()
    assert instance.state == "completed" and instance.deadline_at is None
