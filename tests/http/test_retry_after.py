"""``Retry-After`` is the earliest next attempt: the engine waits at least
that long, or longer when the step's own backoff says so.

Needs the engine to honour ``ActivityError.retry_after`` (runner passes it
on the Outcome; ``_schedule_retry`` waits ``max(backoff, retry_after)``)."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.conf import settings
from django.utils import timezone

from tests.http.conftest import run_one
from tests.http.servers import Reply
from tests.support import advance_clock
from workflows_app.engine import sweeps

pytestmark = pytest.mark.django_db(transaction=True)


def test_the_next_attempt_waits_for_retry_after(broker, script, server):
    script.on(
        "/charge",
        Reply(503, {"error": "busy"}, headers={"Retry-After": "120"}),
        Reply(200, {"ok": True}),
    )
    before = timezone.now()
    instance, step, attempts = run_one(broker, f"{server}/charge")
    # The step's own backoff is zero: only the participant's answer delays it.
    assert step.state == "retrying"
    assert step.next_attempt_at >= before + timedelta(seconds=120)
    assert step.next_attempt_at <= timezone.now() + timedelta(seconds=121)
    assert len(script.seen) == 1  # the early redelivery was not let through
    # Past the retry time and the redispatch lease: the sweeper re-sends it.
    advance_clock(instance, 121 + settings.SAGA_REDISPATCH_AFTER)
    sweeps.sweep_all()
    broker.run()
    instance.refresh_from_db()
    assert instance.state == "completed"
    assert len(script.seen) == 2


def test_a_longer_backoff_wins_over_a_short_retry_after(broker, script, server):
    script.on(
        "/charge",
        Reply(429, {"error": "slow down"}, headers={"Retry-After": "1"}),
        Reply(200, {"ok": True}),
    )
    before = timezone.now()
    instance, step, attempts = run_one(
        broker,
        f"{server}/charge",
        step={
            "backoff_initial": timedelta(seconds=300),
            "backoff_max": timedelta(seconds=300),
        },
    )
    assert step.state == "retrying"
    assert step.next_attempt_at >= before + timedelta(seconds=300)
