"""Repair and retry: correct a bad input (validated, diffed, audited), retry,
and the instance completes; a step's recorded output can be corrected too."""

from __future__ import annotations

import json

import pytest
from django.test import Client

from tests.operations.conftest import held
from tests.support import start, user_in
from workflows_app.engine.commands import instance_retry_step
from workflows_app.engine.commands.repair import (
    instance_repair_input,
    step_repair_output,
)
from workflows_app.engine.errors import AlreadyChanged, InvalidInput, NotPermitted
from workflows_app.engine.json_diff import json_diff
from workflows_app.models import TransitionLog, WorkflowInstance

pytestmark = pytest.mark.django_db(transaction=True)


def test_json_diff():
    assert json_diff(
        {"a": 1, "b": {"c": 2}, "d": 3}, {"a": 1, "b": {"c": 4}, "e": 5}
    ) == [
        {"path": "$.b.c", "op": "changed", "before": 2, "after": 4},
        {"path": "$.d", "op": "removed", "before": 3},
        {"path": "$.e", "op": "added", "after": 5},
    ]
    assert json_diff({"x": True}, {"x": 1}) == [
        {"path": "$.x", "op": "changed", "before": True, "after": 1}
    ]
    assert json_diff({"l": [1, 2]}, {"l": [1, 2]}) == []


def test_repair_bad_input_then_retry_completes(broker, wf, operator):
    # A bad input: the gateway fails while "outage" is in it.
    instance = held(broker, "ORD-1", outage="card_number_invalid")
    fixed = {key: value for key, value in instance.input.items() if key != "outage"}
    fixed["card"] = "tok_visa"
    client = Client()
    client.force_login(operator)
    response = client.post(
        f"/instances/{instance.pk}/repair/",
        {
            "target": "input",
            "value": json.dumps(fixed),
            "reason": "customer gave a new card",
            "version": instance.version,
        },
        headers={"HX-Request": "true"},
    )
    assert response.status_code == 200, response.content.decode()[:500]
    page = response.content.decode()
    assert "Input corrected" in page
    assert "$.outage" in page and "$.card" in page  # the diff in the timeline
    row = TransitionLog.objects.get(instance=instance, transition="input_repaired")
    assert row.user == operator and row.reason == "customer gave a new card"
    assert row.data["before"]["outage"] == "card_number_invalid"
    assert row.data["after"] == fixed
    assert {d["path"] for d in row.data["diff"]} == {"$.outage", "$.card"}

    instance = WorkflowInstance.objects.get(pk=instance.pk)
    assert instance.input == fixed
    instance_retry_step(
        instance.pk,
        user=operator,
        reason="retry after repair",
        expected_version=instance.version,
    )
    broker.run()
    assert WorkflowInstance.objects.get(pk=instance.pk).state == "completed"


def test_bad_repairs_change_nothing(broker, wf, operator):
    instance = held(broker, "ORD-1")
    client = Client()
    client.force_login(operator)
    for value in ["{not json", "[1, 2]", json.dumps(instance.input)]:
        response = client.post(
            f"/instances/{instance.pk}/repair/",
            {
                "target": "input",
                "value": value,
                "reason": "x",
                "version": instance.version,
            },
            headers={"HX-Request": "true"},
        )
        assert response.status_code == 422, value
    with pytest.raises(AlreadyChanged):
        instance_repair_input(
            instance.pk, user=operator, reason="x", new_input={}, expected_version=0
        )
    with pytest.raises(NotPermitted):
        instance_repair_input(
            instance.pk, user=user_in("viewer", "vera"), reason="x", new_input={}
        )
    with pytest.raises(InvalidInput):
        instance_repair_input(instance.pk, user=operator, reason=" ", new_input={})
    assert WorkflowInstance.objects.get(pk=instance.pk).input == instance.input
    assert not TransitionLog.objects.filter(transition="input_repaired").exists()


def test_repair_step_output(broker, wf, operator):
    instance = held(broker, "ORD-1")
    reserve = instance.steps.get(name="reserve")
    step_repair_output(
        instance.pk,
        step_id=reserve.pk,
        user=operator,
        reason="the reservation id was wrong",
        new_output={"reservation": "R-2"},
    )
    reserve.refresh_from_db()
    assert reserve.output == {"reservation": "R-2"}
    instance.refresh_from_db()
    assert instance.outputs["reserve"] == {"reservation": "R-2"}
    charge = instance.steps.get(name="charge")
    with pytest.raises(Exception, match="only a finished step"):
        step_repair_output(
            instance.pk, step_id=charge.pk, user=operator, reason="x", new_output={}
        )


def test_finished_instances_cannot_be_repaired(broker, wf, operator):
    instance = start("orders", "ORD-1")
    broker.run()
    with pytest.raises(Exception, match="can no longer change"):
        instance_repair_input(
            instance.pk, user=operator, reason="x", new_input={"a": 1}
        )
