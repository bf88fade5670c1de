"""Parallel stages in definitions: edited in the admin ("parallel with
previous" on a step), validated as a whole with clear errors, unchanged for
sequential definitions, copied into new versions."""

from __future__ import annotations

from typing import Any

import pytest
from django.core.exceptions import ValidationError
from django.utils.html import escape

from tests.support import make_definition
from tests.test_admin import ADD_URL, AdminTestCase, errors, form_data
from workflows_app.engine.planning import stage_keys
from workflows_app.models import StepDefinition, WorkflowDefinition
from workflows_app.models.definitions import stage_errors

ORCHESTRATED = WorkflowDefinition.Mode.ORCHESTRATED


def rows(*specs: tuple[str, bool, dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {"name": name, "position": i + 1, "parallel_with_previous": par, **extra}
        for i, (name, par, extra) in enumerate(specs)
    ]


def test_sequential_definitions_have_nothing_to_say():
    assert stage_errors(ORCHESTRATED, rows(("a", False, {}), ("b", False, {}))) == []


@pytest.mark.parametrize(
    ("steps", "message"),
    [
        (
            rows(("a", True, {}), ("b", False, {})),
            "Step 'a' is the first step: there is no previous step to run alongside.",
        ),
        (
            rows(("a", False, {}), ("b", True, {"is_pivot": True})),
            "Step 'b' is the pivot: it must be alone in its stage, but runs "
            "alongside 'a', 'b'.",
        ),
        (
            rows(("a", False, {"is_pivot": True}), ("b", True, {})),
            "Step 'a' is the pivot: it must be alone in its stage",
        ),
        (
            rows(("a", False, {}), ("wait", True, {"kind": "timer"})),
            "Step 'wait' is a timer step: timers and steps for a person run "
            "alone in their stage, not alongside 'a', 'wait'.",
        ),
        (
            rows(("review", False, {"kind": "human"}), ("b", True, {})),
            "Step 'review' is a human step",
        ),
    ],
)
def test_stage_rules_name_the_step_and_the_reason(steps, message):
    found = stage_errors(ORCHESTRATED, steps)
    assert any(m.startswith(message) for m in found), found


def test_observed_workflows_have_no_stages():
    [message] = stage_errors(
        WorkflowDefinition.Mode.OBSERVED, rows(("a", False, {}), ("b", True, {}))
    )
    assert message.startswith("Only orchestrated workflows have parallel stages")


@pytest.mark.django_db
def test_publish_refuses_a_pivot_beside_a_branch_and_drafts_copy_stages():
    draft = make_definition(
        "bad",
        [
            {"name": "a"},
            {"name": "b", "parallel_with_previous": True, "is_pivot": True},
        ],
        publish=False,
    )
    with pytest.raises(ValidationError, match="'b' is the pivot: it must be alone"):
        draft.publish()
    good = make_definition(
        "good",
        [
            {"name": "a"},
            {"name": "b"},
            {"name": "c", "parallel_with_previous": True},
            {"name": "d", "is_pivot": True},
        ],
    )
    copy = good.new_draft()
    steps = copy.ordered_steps()
    assert [s.parallel_with_previous for s in steps] == [False, False, True, False]
    assert stage_keys(
        [type("S", (), {"position": s.position, "step_definition": s}) for s in steps]
    ) == {1: 1, 2: 2, 3: 2, 4: 4}


class ParallelAdminTests(AdminTestCase):
    def test_stages_are_edited_inline_and_validated(self):
        page = self.client.get(ADD_URL).content.decode()
        assert 'name="steps-0-parallel_with_previous"' in page
        bad = form_data(
            [
                {"name": "reserve"},
                {"name": "charge", "parallel_with_previous": "on", "is_pivot": True},
            ]
        )
        response = self.client.post(ADD_URL, bad)
        assert response.status_code == 200
        self.assertContains(response, escape("Step 'charge' is the pivot"))
        assert WorkflowDefinition.objects.count() == 0
        good = form_data(
            [
                {"name": "reserve"},
                {"name": "charge", "parallel_with_previous": "on"},
                {"name": "ship", "is_pivot": True},
            ]
        )
        response = self.client.post(ADD_URL, good)
        assert response.status_code == 302, errors(response)
        stored = dict(
            StepDefinition.objects.values_list("name", "parallel_with_previous")
        )
        assert stored == {"reserve": False, "charge": True, "ship": False}
