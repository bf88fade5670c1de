"""Pages say only what is still true (issue 15): after an action, once an
instance has finished, after a retry, for a discarded or finished bulk job."""

from __future__ import annotations

import re
from html.parser import HTMLParser

import pytest
from django.urls import reverse

from tests.views.conftest import held, logged_in
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
