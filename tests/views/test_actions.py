"""Operator actions through the test client: each calls its engine command
with the reason and the version the operator saw, and shows the outcome."""

from __future__ import annotations

import pytest
from django.urls import reverse

from tests.views.conftest import completed, fresh, held, logged_in
from workflows_app.engine.commands import bulk
from workflows_app.models import BulkJob, BulkJobItem, TransitionLog

pytestmark = pytest.mark.django_db(transaction=True)
HTMX = {"HX-Request": "true"}


def detail_url(instance) -> str:
    return reverse("instance_detail", args=[instance.pk])


# -- actions ----------------------------------------------------------------------


def action_url(instance, name: str) -> str:
    return reverse("instance_action", args=[instance.pk, name])


def test_retry_step_swaps_in_the_result_and_is_audited(broker, wf, operator):
    instance = held(broker)
    client = logged_in(operator)
    response = client.post(
        action_url(instance, "retry_step"),
        {"reason": "payments is back", "version": instance.version},
        headers=HTMX,
    )
    assert response.status_code == 200
    html = response.content.decode()
    assert html.lstrip().startswith('<div id="instance-live"')
    assert "Retry step now: done." in html
    assert fresh(instance).state == "running"
    broker.run()
    assert fresh(instance).state == "completed"
    row = TransitionLog.objects.get(instance=instance, transition="retry_step")
    assert (row.user, row.reason) == (operator, "payments is back")
    assert "<strong>olga</strong>" in client.get(detail_url(instance)).content.decode()


def test_a_stale_version_is_told_it_changed_and_changes_nothing(broker, wf, operator):
    instance = held(broker)
    client = logged_in(operator)
    seen = instance.version
    client.post(
        action_url(instance, "close_as_failed"),
        {"reason": "first", "version": seen},
        headers=HTMX,
    )
    rows_before = TransitionLog.objects.count()
    response = client.post(
        action_url(instance, "retry_step"),
        {"reason": "second", "version": seen},
        headers=HTMX,
    )
    assert response.status_code == 409
    html = response.content.decode()
    assert "changed meanwhile" in html
    assert "badge--instance-failed" in html  # the fresh state is shown
    assert TransitionLog.objects.count() == rows_before
    assert fresh(instance).state == "failed"


def test_reason_is_required(broker, wf, operator):
    instance = held(broker)
    response = logged_in(operator).post(
        action_url(instance, "retry_step"),
        {"reason": "  ", "version": instance.version},
        headers=HTMX,
    )
    assert response.status_code == 422
    assert "This field is required" in response.content.decode()
    assert fresh(instance).version == instance.version


@pytest.mark.parametrize(
    ("output", "error"),
    [
        ("{not json", "Not valid JSON"),
        ("[1, 2]", "must be a JSON object"),
    ],
)
def test_mark_step_done_validates_the_output(broker, wf, operator, output, error):
    instance = held(broker)
    response = logged_in(operator).post(
        action_url(instance, "mark_step_done"),
        {"reason": "done by phone", "version": instance.version, "output": output},
        headers=HTMX,
    )
    assert response.status_code == 422
    html = response.content.decode()
    assert error in html
    assert 'id="action-mark_step_done" open' in html  # the form stays open
    assert fresh(instance).version == instance.version


def test_mark_step_done_records_the_output(broker, wf, operator):
    instance = held(broker)
    response = logged_in(operator).post(
        action_url(instance, "mark_step_done"),
        {
            "reason": "booked by phone",
            "version": instance.version,
            "output": '{"reference": "PHONE-1"}',
        },
        headers=HTMX,
    )
    assert response.status_code == 200
    broker.run()
    instance = fresh(instance)
    assert instance.state == "completed"
    assert instance.steps.get(name="two").output == {"reference": "PHONE-1"}


def test_without_htmx_an_action_redirects_with_a_message(broker, wf, operator):
    instance = held(broker)
    client = logged_in(operator)
    response = client.post(
        action_url(instance, "compensate"),
        {"reason": "customer cancelled", "version": instance.version},
    )
    assert response.status_code == 302
    page = client.get(response["Location"]).content.decode()
    assert "Compensate: done." in page
    assert fresh(instance).state == "compensating"


def test_an_unknown_action_is_404(broker, wf, operator):
    instance = held(broker)
    response = logged_in(operator).post(
        action_url(instance, "explode"), {"reason": "x", "version": 1}
    )
    assert response.status_code == 404


# -- bulk -------------------------------------------------------------------------


def plan_from_selection(client, action: str, selected: list[str]):
    return client.post(
        reverse("instance_bulk"),
        {"action": action, "reason": "payments is back", "selected": selected},
        headers=HTMX,
    )


def test_a_selection_is_planned_as_a_bulk_job_and_done_after_confirming(
    broker, wf, operator
):
    first = held(broker, "held-1")
    second = held(broker, "held-2")
    stale = held(broker, "held-3")
    done = completed(broker, "done-1")
    client = logged_in(operator)
    response = plan_from_selection(
        client,
        "retry",
        [
            f"{first.pk}:{first.version}",
            f"{second.pk}:{second.version}",
            f"{stale.pk}:{stale.version - 1}",
            f"{done.pk}:{done.version}",
        ],
    )
    job = BulkJob.objects.get()
    # htmx follows to the preview; nothing was done yet.
    assert response.status_code == 200
    assert response["HX-Redirect"] == reverse("bulk_job_detail", args=[job.pk])
    assert job.description == "4 instances selected in the list"
    assert {fresh(i).state for i in (first, second, stale)} == {"needs_attention"}
    items = {i.instance_id: i for i in job.items.all()}
    assert items[stale.pk].plan == "changed since you selected it: left alone"
    assert items[stale.pk].outcome == BulkJobItem.Outcome.SKIPPED
    assert items[done.pk].outcome == BulkJobItem.Outcome.SKIPPED
    preview = client.get(reverse("bulk_job_detail", args=[job.pk])).content.decode()
    assert "changed since you selected it" in preview

    client.post(reverse("bulk_job_operate", args=[job.pk, "confirm"]))
    bulk.bulk_job_work(job.pk, budget=5)
    broker.run()
    assert {fresh(i).state for i in (first, second)} == {"completed"}
    assert fresh(stale).state == "needs_attention"
    logged = TransitionLog.objects.filter(transition="retry_step", user=operator)
    assert set(logged.values_list("instance_id", flat=True)) == {first.pk, second.pk}


def test_a_selection_to_compensate_and_its_validation(broker, wf, operator):
    instance = held(broker, "held-1")
    client = logged_in(operator)
    empty = client.post(
        reverse("instance_bulk"), {"action": "compensate", "reason": "x"}, headers=HTMX
    )
    assert empty.status_code == 422
    assert "Selection" in empty.content.decode()
    assert not BulkJob.objects.exists()
    plan_from_selection(client, "compensate", [f"{instance.pk}:{instance.version}"])
    job = BulkJob.objects.get()
    assert job.action == "compensate"
    client.post(reverse("bulk_job_operate", args=[job.pk, "confirm"]))
    bulk.bulk_job_work(job.pk, budget=5)
    broker.run()
    assert fresh(instance).state == "compensated"


# -- alerts -----------------------------------------------------------------------


def test_open_alerts_are_shown_and_can_be_acknowledged(broker, wf, operator, viewer):
    from workflows_app.alerts import sync_alerts
    from workflows_app.engine.locking import db_now

    instance = held(broker)
    sync_alerts(db_now(), 100)
    alert = instance.alerts.get()
    assert b"Acknowledge" not in logged_in(viewer).get(detail_url(instance)).content
    client = logged_in(operator)
    response = client.post(
        reverse("alert_acknowledge", args=[alert.pk]),
        {"reason": "on it"},
        headers=HTMX,
    )
    assert response.status_code == 200
    assert "Acknowledged by <strong>olga</strong>" in response.content.decode()
    again = client.post(reverse("alert_acknowledge", args=[alert.pk]), headers=HTMX)
    assert again.status_code == 409
    assert TransitionLog.objects.filter(transition="alert_acknowledged").count() == 1
