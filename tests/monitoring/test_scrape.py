"""GET /metrics after real workflows: the engine drives instances on
PostgreSQL (the in-memory transport delivers its messages to the real tasks),
then a scrape must show the figures moved, and agree with the database."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.db import transaction
from django.test import override_settings

import tests.worker_activities  # noqa: F401 - registers test.flaky_gateway
from tests.monitoring.scrape import Samples, moved, parse, total, value
from tests.smtp import SmtpServer
from tests.support import advance_clock, make_definition, start, user_in
from workflows_app.alerts import send_due_alerts
from workflows_app.engine.actors import Actor
from workflows_app.engine.commands import bulk
from workflows_app.engine.sweeps import sweep_all
from workflows_app.engine.transitions import Change
from workflows_app.models import StepExecution, WorkflowInstance

pytestmark = [
    pytest.mark.django_db(transaction=True),
    # Every scrape reads the database afresh (no cache between scrapes).
    pytest.mark.usefixtures("uncached"),
]


@pytest.fixture
def uncached():
    with override_settings(SAGA_METRICS_CACHE_SECONDS=0, SAGA_METRICS_TOKEN=""):
        yield


def scrape(client) -> Samples:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/plain; version=0.0.4")
    return parse(response.content.decode())


def test_a_scrape_after_real_workflows_shows_what_happened(broker, client):
    make_definition("shop", steps=[{"name": "one"}, {"name": "two"}])
    before = scrape(client)

    start("shop", "o-happy")
    start("shop", "o-flaky", simulate={"two": "fail_once"})
    start("shop", "o-declined", simulate={"two": "fail"})
    broker.run()
    states = {i.business_key: i.state for i in WorkflowInstance.objects.all()}
    assert states == {
        "o-happy": "completed",
        "o-flaky": "completed",
        "o-declined": "compensated",
    }
    after = scrape(client)
    shop = {"definition": "shop"}

    assert moved(before, after, "saga_instances_accepted_total", **shop) == 3
    assert (
        moved(
            before,
            after,
            "saga_transitions_total",
            entity="instance",
            transition="complete",
            target="completed",
            **shop,
        )
        == 2
    )
    assert (
        moved(
            before,
            after,
            "saga_transitions_total",
            entity="instance",
            transition="finish_compensation",
            target="compensated",
            **shop,
        )
        == 1
    )
    # Attempts: 2 + 3 + 2 claimed; the flaky one failed once and was retried,
    # the declined one failed for good; one compensation undid step one.
    assert moved(before, after, "saga_attempts_started_total", **shop) == 8
    outcome = "saga_attempts_total"
    assert (
        moved(before, after, outcome, outcome="succeeded", direction="action", **shop)
        == 5
    )
    assert moved(before, after, outcome, outcome="failed", **shop) == 1
    assert moved(before, after, outcome, outcome="failed_permanent", **shop) == 1
    assert (
        moved(
            before,
            after,
            outcome,
            outcome="succeeded",
            direction="compensation",
            **shop,
        )
        == 1
    )
    finished = "saga_instances_finished_total"
    assert moved(before, after, finished, state="completed", **shop) == 2
    assert moved(before, after, finished, state="compensated", **shop) == 1

    # One duration per finished instance, of the right size.
    count = "saga_instance_duration_seconds_count"
    assert moved(before, after, count, state="completed", **shop) == 2
    assert moved(before, after, count, state="compensated", **shop) == 1
    took = sum(
        (i.finished_at - i.accepted_at).total_seconds()
        for i in WorkflowInstance.objects.filter(state="completed")
    )
    observed = moved(
        before, after, "saga_instance_duration_seconds_sum", state="completed", **shop
    )
    assert observed == pytest.approx(took, abs=1e-3)
    assert (
        moved(
            before,
            after,
            "saga_instance_duration_seconds_bucket",
            state="completed",
            le="+Inf",
            **shop,
        )
        == 2
    )

    # The gauges are the database's figures.
    assert value(after, "saga_instances", state="completed", **shop) == 2
    assert value(after, "saga_instances", state="compensated", **shop) == 1
    assert value(after, "saga_metrics_database_up") == 1


def test_a_rolled_back_change_counts_nothing(broker, client):
    """Counted after the commit: a change that rolls back never happened."""
    # A definition of its own: the metrics are shared by every process on
    # the machine (the other test worker's too), so counts are per definition.
    make_definition("shop-rollback")
    instance = start("shop-rollback", "o-1")
    before = scrape(client)
    cancel = {
        "definition": "shop-rollback",
        "entity": "instance",
        "transition": "cancel",
        "target": "cancelled",
    }

    def cancel_instance(then_fail: bool) -> None:
        with transaction.atomic():
            change = Change.open(instance.id, Actor.system("test"))
            change.fire(change.instance, "cancel", reason="test")
            change.save()
            if then_fail:
                raise RuntimeError("the transaction fails after the save")

    with pytest.raises(RuntimeError, match="fails after the save"):
        cancel_instance(then_fail=True)
    assert moved(before, scrape(client), "saga_transitions_total", **cancel) == 0
    cancel_instance(then_fail=False)
    after = scrape(client)
    assert moved(before, after, "saga_transitions_total", **cancel) == 1
    finished = {"definition": "shop-rollback", "state": "cancelled"}
    assert moved(before, after, "saga_instances_finished_total", **finished) == 1


def test_held_stuck_and_queue_lag_come_from_the_database(broker_no_inline, client):
    broker = broker_no_inline  # every attempt travels as a message
    make_definition("held", failure_policy="hold")
    make_definition("slow")
    held = start("held", "o-held", simulate={"one": "fail"})
    broker.run()
    held.refresh_from_db()
    assert held.state == "needs_attention"

    # A started instance whose first attempt's message is lost: the step is
    # scheduled and due, and nobody claims it.
    waiting = start("slow", "o-lost")
    broker.deliver(broker.queue.pop(0))  # advance: schedules step one
    broker.queue.clear()  # ... whose message is lost
    advance_clock(waiting, 120)
    # And an accepted instance whose start message is lost.
    unstarted = start("slow", "o-unstarted")
    broker.queue.clear()
    advance_clock(unstarted, 60)

    samples = scrape(client)
    assert (
        value(samples, "saga_instances_held", definition="held", kind="step_failed")
        == 1
    )
    assert value(samples, "saga_instances_stuck", definition="held") == 1
    assert value(samples, "saga_instances", definition="slow", state="running") == 1
    assert value(samples, "saga_instances", definition="slow", state="accepted") == 1
    assert value(samples, "saga_queue_due", work="attempt") == 1
    assert value(samples, "saga_queue_lag_seconds", work="attempt") >= 120
    assert value(samples, "saga_queue_due", work="start") == 1
    assert value(samples, "saga_queue_lag_seconds", work="start") >= 60

    # The sweeper re-sends the lost attempt (and start), and those messages
    # are lost too: the work is still due, its lag counted from the re-send.
    step = StepExecution.objects.get(instance=waiting, position=1)
    assert step.state == "scheduled"
    sweep_all()
    broker.queue.clear()
    samples = scrape(client)
    assert value(samples, "saga_queue_due", work="attempt") == 1
    assert value(samples, "saga_queue_lag_seconds", work="attempt") < 60
    # The next re-send (after a longer wait) arrives; once a worker claimed
    # and ran it, nothing is due any more.
    advance_clock(waiting, 120)
    advance_clock(unstarted, 120)
    sweep_all()
    broker.run()
    samples = scrape(client)
    assert value(samples, "saga_queue_due", work="attempt") == 0
    assert value(samples, "saga_queue_lag_seconds", work="attempt") == 0
    assert value(samples, "saga_queue_due", work="start") == 0
    assert value(samples, "saga_instances", definition="slow", state="completed") == 2


def test_sweeper_runs_and_failed_alert_deliveries_are_counted(broker, client):
    make_definition("held", failure_policy="hold", alert_recipients="ops@example.com")
    start("held", "o-held", simulate={"one": "fail"})
    broker.run()
    mail = SmtpServer()  # a mail server that is down: the port refuses
    before = scrape(client)
    with override_settings(
        EMAIL_BACKEND="django.core.mail.backends.smtp.EmailBackend",
        EMAIL_HOST="127.0.0.1",
        EMAIL_PORT=mail.port,
        EMAIL_TIMEOUT=5,
        SAGA_ALERT_GATHER=0,
    ):
        result = sweep_all()
        assert result["alerts_opened"] == 1
        assert send_due_alerts()["mails_failed"] == 1
    after = scrape(client)
    # Sweeps and deliveries are counted per machine, without a label of this
    # test's own: other processes sharing the folder (the other test worker,
    # as other services on a real machine) may add theirs meanwhile.
    assert (
        moved(before, after, "saga_alert_deliveries_failed_total", channel="email") >= 1
    )
    assert value(after, "saga_alerts_open", kind="held") == 1
    assert value(after, "saga_alerts_undelivered", kind="held") == 1

    assert moved(before, after, "saga_sweep_duration_seconds_count") >= 1
    assert (
        moved(before, after, "saga_sweep_batch_size_count", part="alerts_opened") >= 1
    )
    assert moved(before, after, "saga_sweep_batch_size_sum", part="alerts_opened") >= 1
    assert total(after, "saga_sweep_last_success_timestamp_seconds") > 0


def test_bulk_job_progress(broker, client):
    # One attempt: the transient failure holds each instance at once.
    steps = [{"name": "one", "max_attempts": 1}, {"name": "two"}]
    make_definition("held", steps=steps, failure_policy="hold")
    for n in range(3):
        start("held", f"o-{n}", simulate={"one": "fail_once"})
    broker.run()
    instances = WorkflowInstance.objects.filter(state="needs_attention")
    assert instances.count() == 3
    operator = user_in("operator", "olga")
    job = bulk.bulk_job_plan(
        instances,
        action="retry",
        reason="gateway is back",
        user=operator,
        description="retry the held ones",
    )
    samples = scrape(client)
    assert value(samples, "saga_bulk_jobs", status="draft") == 1
    # A draft is not work in progress yet.
    assert total(samples, "saga_bulk_job_items") == 0

    bulk.bulk_job_confirm(job.pk, user=operator)
    samples = scrape(client)
    queued = {"bulk_job": str(job.pk), "action": "retry", "status": "queued"}
    assert value(samples, "saga_bulk_job_items", outcome="pending", **queued) == 3

    broker.run()
    samples = scrape(client)
    assert value(samples, "saga_bulk_jobs", status="finished") == 1
    assert total(samples, "saga_bulk_job_items") == 0
    assert value(samples, "saga_instances", definition="held", state="completed") == 3


def test_stuck_age_is_measured_on_the_database_clock(broker, client):
    make_definition("held", failure_policy="hold")
    held = start("held", "o-held", simulate={"one": "fail"})
    broker.run()
    WorkflowInstance.objects.filter(pk=held.pk).update(
        stuck_since=held.accepted_at - timedelta(minutes=10)
    )
    samples = scrape(client)
    assert value(samples, "saga_stuck_oldest_age_seconds") >= 600
