"""Pages say only what is still true (issue 15): after an action, once an
instance has finished, after a retry, for a discarded or finished bulk job."""

from __future__ import annotations

import re
from datetime import timedelta
from html.parser import HTMLParser

import pytest
from django.urls import reverse

from tests.support import make_definition, start, user_in
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
    assert "You discarded the plan: nothing was done." in text_of(html)
    history = text_of(html, "job-log")
    assert re.fullmatch(r"discard by olga (just now|\d+ s ago)", history), history
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
    # Over: what the plan was, not what is still "to act on".
    assert "The plan was to act on 3 instances." in progress
    assert "to act on" not in progress.replace("plan was to act on", "")
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


def test_recent_failures_name_the_step_that_went_wrong(broker, wf, operator):
    """A held instance shows the step whose action holds it; one that was
    undone (not held) its failed step; neither an undo."""
    held(broker, "order-held")  # two failed for good: its action holds it
    make_definition("cp", steps=[{"name": "one"}, {"name": "two"}])
    undone = start("cp", "order-undone", simulate={"two": "fail"})
    broker.run()
    undone.refresh_from_db()
    assert undone.state == "compensated"
    rows = text_of(logged_in(operator).get("/").content.decode(), "recent-failures")
    # Newest first: each row's text runs from its key to the next row's.
    first, second = rows.index("order-undone"), rows.index("order-held")
    assert first < second
    assert " two : " in rows[first:second] and " two : " in rows[second:]
    assert "(undo)" not in rows and " one " not in rows


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
    # Not "at once": a run that finishes before the next sweep is not held.
    assert "the next sweep holds it for the deadline unless it has finished" in hint
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


# -- found on a second walk through the tour (issue 15) -------------------------

# Timers and steps for a person call nothing and undo nothing.
ENGINE_STEP = {"action": "", "compensation": ""}


def test_the_steps_table_says_what_the_strip_says_about_each_undo(broker, operator):
    make_definition("cf", steps=[{"name": "one"}, {"name": "two"}, {"name": "three"}])
    instance = start(
        "cf", "order-c", simulate={"one": "fail_compensation", "two": "fail"}
    )
    broker.run()
    instance.refresh_from_db()
    assert instance.attention_kind == "compensation_failed"
    client = logged_in(operator)
    page = client.get(reverse("instance_detail", args=[instance.pk])).content.decode()
    # On its way back with no restart: three never ran and never will, so
    # no key is "sent yet"; its undo is "not needed", not a bare "none".
    assert text_of(page, "keys-three") == "three 0 / 0 none: never called"
    assert "failed" in text_of(page, "step-one")  # one's undo failed

    running = start("cf", "order-r")
    page = client.get(reverse("instance_detail", args=[running.pk])).content.decode()
    # Before anything ran: the table says what the strip says, not "none"
    # (which read as "this step has no undo").
    one = text_of(page, "step-one")
    assert "never ran: nothing to undo" in one and " none " not in f" {one} "
    broker.run()
    page = client.get(reverse("instance_detail", args=[running.pk])).content.decode()
    assert "not undone (finished)" in text_of(page, "step-one")
    assert "not undone (finished)" in text_of(page, "strip-one")


def test_a_discarded_plan_is_discarded_on_every_page(plan, operator):
    client = logged_in(operator)
    response = client.post(reverse("bulk_job_operate", args=[plan.pk, "cancel"]))
    html = client.get(response["Location"]).content.decode()
    assert "You discarded the plan: nothing was done." in text_of(html)
    assert "cancelled" not in text_of(html)
    listed = text_of(client.get(reverse("bulk_job_list")).content.decode())
    assert "discarded" in listed and "cancelled" not in listed


def test_a_resolved_alert_never_mailed_does_not_say_it_will_be(broker, wf, operator):
    instance = held(broker)
    sync_alerts(db_now(), 100)  # opened, its mail not yet due
    client = logged_in(operator)
    assert "not mailed yet" in text_of(client.get("/alerts/").content.decode())
    act(client, instance, "retry_step")
    resolved = text_of(client.get("/alerts/?status=resolved").content.decode())
    assert "not mailed: resolved before it was sent" in resolved
    assert "not mailed yet" not in resolved


def test_a_workflow_filter_of_the_alerts_and_inbox_is_said_and_never_a_500(
    broker, wf, operator
):
    held(broker)
    sync_alerts(db_now(), 100)
    client = logged_in(operator)
    one = client.get("/alerts/?definition=wf").content.decode()
    assert "Only the alerts of the workflow wf" in text_of(one, "alerts-definition")
    assert "order-1" in text_of(one)
    for url in ["/alerts/?definition=%00", "/alerts/?definition=nope"]:
        response = client.get(url)
        assert response.status_code == 200, url
        page = response.content.decode()
        assert "No workflow is called" in text_of(page, "alerts-definition")
        assert "order-1" not in text_of(page)
    response = client.get("/inbox/?definition=%00&claimed=%00")
    assert response.status_code == 200
    assert "Nothing waits for a person with these filters." in text_of(
        response.content.decode()
    )


def test_the_definition_page_does_not_give_timers_and_people_attempts(viewer):
    make_definition(
        "waits",
        steps=[
            {
                **ENGINE_STEP,
                "name": "window",
                "kind": "timer",
                "wait_for": timedelta(seconds=30),
            },
            {
                **ENGINE_STEP,
                "name": "review",
                "kind": "human",
                "timeout": timedelta(minutes=10),
                "form_fields": [{"name": "ok", "type": "boolean"}],
            },
            {"name": "pay", "restart_point": True},
        ],
    )
    page = logged_in(viewer).get(reverse("definition_detail", args=["waits"]))
    rows = text_of(page.content.decode(), "definition-steps")
    assert (
        "window timer: waits 30 seconds none — none: the engine does this step "
        "itself nothing: a timer wakes at its time" in rows
    )
    assert (
        "review waits for a person (inbox) none 10 min (its time rule) none: the "
        "engine does this step itself overdue: the instance alerts; the step "
        "keeps waiting in the inbox" in rows
    )
    assert "held for a person" in rows.split("pay restart point")[1]


def test_an_overdue_step_for_a_person_is_not_called_stuck(broker, operator):
    from tests.support import advance_clock
    from workflows_app.engine.sweeps import sweep_all

    make_definition(
        "reviewed",
        steps=[
            {"name": "one"},
            {
                **ENGINE_STEP,
                "name": "review",
                "kind": "human",
                "timeout": timedelta(minutes=10),
                "form_fields": [{"name": "ok", "type": "boolean"}],
            },
        ],
    )
    instance = start("reviewed", "big-1")
    broker.run()
    advance_clock(instance, 601)
    sweep_all()
    instance.refresh_from_db()
    assert instance.stuck_kind == "human_step_overdue"
    assert (
        instance.stuck_reason == "review waits for a person for longer than 10 minutes"
    )
    client = logged_in(operator)
    inbox = text_of(client.get("/inbox/").content.decode(), "inbox-list")
    assert "overdue" in inbox and "stuck" not in inbox
    # As the overview counts it: not in the stuck tile, nor a held one.
    counts = client.get("/").context["counts"]
    assert counts.stuck == 0 and counts.by_state.get("running") == 1


def test_the_cached_activity_charts_say_how_old_they_are(broker, wf, viewer, settings):
    settings.CACHES = {
        "default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}
    }
    from django.core.cache import cache

    cache.clear()
    client = logged_in(viewer)
    first = text_of(client.get("/").content.decode(), "activity-title")
    completed(broker)  # the tiles count it at once, the cached charts later
    html = client.get("/").content.decode()
    assert text_of(html, "activity-title") == first  # the same cached figures
    assert re.fullmatch(
        r"Activity \(last 24 hours, per hour, UTC; as of \d\d:\d\d:\d\d ?\)", first
    ), first
    cache.clear()


def test_a_request_the_instance_outran_is_not_offered_for_approval(broker, operator):
    from tests.views.conftest import HOLD_STEPS

    make_definition(
        "four",
        steps=HOLD_STEPS,
        failure_policy="hold",
        approval_actions=["close_as_failed"],
    )
    instance = start("four", "order-4", simulate={"two": "fail_once"})
    broker.run()
    instance.refresh_from_db()
    client = logged_in(operator)
    act(client, instance, "close_as_failed")  # asks a second operator
    instance.refresh_from_db()
    act(client, instance, "retry_step")  # meanwhile the retry goes through
    broker.run()
    assert WorkflowInstance.objects.get(pk=instance.pk).state == "completed"
    other = logged_in(user_in("operator", "oscar"))
    page = other.get(reverse("instance_detail", args=[instance.pk])).content.decode()
    approvals = text_of(page, "approvals")
    assert "Can no longer be done: the instance has finished (completed)" in approvals
    assert "Approve and do it" not in approvals and "Reject" in approvals
    overview = text_of(other.get("/").content.decode(), "pending-approvals")
    assert "Can no longer be done" in overview


def test_a_failed_undo_past_its_deadline_is_not_told_to_retry_forward(broker, operator):
    from tests.support import advance_clock

    make_definition(
        "cf", steps=[{"name": "one"}, {"name": "two"}], deadline=timedelta(hours=1)
    )
    instance = start(
        "cf", "order-c", simulate={"one": "fail_compensation", "two": "fail"}
    )
    broker.run()
    advance_clock(instance, 3601)
    client = logged_in(operator)
    url = reverse("instance_detail", args=[instance.pk])
    hint = text_of(client.get(url).content.decode(), "deadline-outlook")
    assert "Retry compensation goes on undoing" in hint
    assert "mark done" not in hint and "Restart" not in hint


def test_a_job_cancelled_before_its_worker_came_lists_nothing_as_processed(
    plan, operator
):
    client = logged_in(operator)
    client.post(reverse("bulk_job_operate", args=[plan.pk, "confirm"]))
    client.post(reverse("bulk_job_operate", args=[plan.pk, "cancel"]))
    html = client.get(reverse("bulk_job_detail", args=[plan.pk])).content.decode()
    progress = text_of(html, "job-progress")
    assert "Cancelled: instances not reached were left alone." in progress
    assert "0 of 3 processed (0%)" in progress
    assert "not done (job cancelled): 3" in progress
    # The table of processed instances does not list the ones left alone.
    assert text_of(html, "job-items").endswith("None yet.")
