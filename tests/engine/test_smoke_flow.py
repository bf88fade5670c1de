from __future__ import annotations

import pytest

from tests.support import make_definition, start
from workflows_app.demo.models import ParticipantEffect
from workflows_app.models import TransitionLog

pytestmark = pytest.mark.django_db(transaction=True)


def test_happy_path(broker):
    make_definition()
    inst = start()
    broker.run()
    inst.refresh_from_db()
    assert inst.state == "completed"
    for row in TransitionLog.objects.filter(instance=inst).order_by("id"):
        print(
            row.step and row.step.name,
            row.field,
            row.source,
            row.target,
            row.transition,
        )
    assert ParticipantEffect.objects.filter(applied=True).count() == 3


def test_fail_compensates(broker):
    make_definition()
    inst = start(simulate={"three": "fail"})
    broker.run()
    inst.refresh_from_db()
    for row in TransitionLog.objects.filter(instance=inst).order_by("id"):
        print(
            row.step and row.step.name,
            row.field,
            row.source,
            row.target,
            row.transition,
            row.reason,
        )
    assert inst.state == "compensated"
