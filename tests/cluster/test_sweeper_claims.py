"""The cluster test's double-work instrument, checked on its own: a sweeper
claim is recorded once, and a claim that skips the compare-and-set (what a
second sweeper without it would do) is reported as work done twice."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.db.models import F

from tests.cluster.sweeper_claims import install, sweeper_work
from tests.support import make_definition, start
from workflows_app.engine import sweeps
from workflows_app.engine.locking import db_now
from workflows_app.models import WorkflowInstance

pytestmark = pytest.mark.django_db


def test_a_claim_is_recorded_once_and_a_claim_without_compare_and_set_is_flagged(
    broker_no_inline,
):
    install()  # DDL in the test's transaction: rolled back with it
    make_definition()
    instance = start(business_key="claimed")  # accepted; its message not sent
    rows = WorkflowInstance.objects.filter(pk=instance.pk)
    rows.update(redispatch_at=db_now() - timedelta(seconds=1))  # due now

    assert sweeps.redispatch_instances(db_now(), 10) == 1
    assert sweeps.redispatch_instances(db_now(), 10) == 0  # not due again yet
    work = sweeper_work(["claimed"])
    assert work["re-sends claimed"] == 1
    assert work["done twice"] == 0

    # A sweeper that takes the row without comparing the due time it read:
    # it moves a due time that is already in the future.
    rows.update(redispatch_at=F("redispatch_at") + timedelta(seconds=5))
    work = sweeper_work(["claimed"])
    assert work["re-sends claimed"] == 2
    assert work["done twice"] == 1, work
    assert "before it was due" in work["examples"][0]
