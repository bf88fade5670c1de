"""The admin, driven through its own views: definitions are edited and
versioned there; runtime rows are read-only."""

from __future__ import annotations

import re
from typing import Any

from django.contrib.auth.models import User
from django.test import Client, TestCase
from django.urls import reverse
from django.utils import timezone
from django.utils.html import escape

from tests.support import make_definition, start, user_in
from workflows_app.demo.models import ParticipantEffect
from workflows_app.models import (
    Attempt,
    InboundMessage,
    StepDefinition,
    StepExecution,
    TransitionLog,
    WorkflowDefinition,
    WorkflowInstance,
)

ADD_URL = reverse("admin:workflows_app_workflowdefinition_add")
CHANGELIST_URL = reverse("admin:workflows_app_workflowdefinition_changelist")

STEP_DEFAULTS = {
    "action": "demo.step",
    "action_config": "{}",
    "compensation": "demo.undo_step",
    "compensation_config": "{}",
    "timeout": "00:00:30",
    "max_attempts": "3",
    "backoff_initial": "00:00:01",
    "backoff_multiplier": "2.0",
    "backoff_max": "00:05:00",
    "backoff_jitter": "0.1",
    "awaits_event": "",
}


def change_url(definition: WorkflowDefinition) -> str:
    return reverse(
        "admin:workflows_app_workflowdefinition_change", args=[definition.pk]
    )


def tool_url(definition: WorkflowDefinition, tool: str) -> str:
    return reverse(
        f"admin:workflows_app_workflowdefinition_{tool}", args=[definition.pk]
    )


def form_data(
    steps: list[dict[str, Any]],
    *,
    definition: WorkflowDefinition | None = None,
    **fields: Any,
) -> dict[str, Any]:
    """The POST body of the definition form: its fields plus the steps inline.

    Steps with an ``id`` are existing rows (the formset's initial forms, which
    must come first); a step with ``DELETE`` set is removed.
    """
    data: dict[str, Any] = {
        "title": "Order fulfilment",
        "description": "",
        "mode": "orchestrated",
        "failure_policy": "compensate",
        "stuck_after": "00:15:00",
        "deadline": "",
        "alert_recipients": "ops@example.com",
        "_save": "Save",
    }
    if definition is None:
        data.update(key="order", version="1")
    data.update(fields)
    initial = sum(1 for step in steps if "id" in step)
    data.update(
        {
            "steps-TOTAL_FORMS": str(len(steps)),
            "steps-INITIAL_FORMS": str(initial),
            "steps-MIN_NUM_FORMS": "0",
            "steps-MAX_NUM_FORMS": "1000",
        }
    )
    for index, step in enumerate(steps):
        values = {**STEP_DEFAULTS, "position": str(index + 1), **step}
        if "id" in values and definition is not None:
            values["definition"] = definition.pk
        for flag in ("is_pivot", "retry_on_timeout", "restart_point", "DELETE"):
            if not values.pop(flag, False):
                continue
            values[flag] = "on"
        for name, value in values.items():
            data[f"steps-{index}-{name}"] = value
        # Fields with a callable default also post their initial value in a
        # hidden input, which has_changed() compares against.
        for name in ("action_config", "compensation_config"):
            data[f"initial-steps-{index}-{name}"] = "{}"
    return data


def existing_steps(definition: WorkflowDefinition) -> list[dict[str, Any]]:
    """The stored steps as the change form would post them back, unchanged."""
    return [
        {
            "id": step.pk,
            "position": str(step.position),
            "name": step.name,
            "action": step.action,
            "compensation": step.compensation,
            "timeout": str(step.timeout.total_seconds()),
            "max_attempts": str(step.max_attempts),
            "backoff_initial": str(step.backoff_initial.total_seconds()),
            "backoff_max": str(step.backoff_max.total_seconds()),
            "backoff_jitter": str(step.backoff_jitter),
            "is_pivot": step.is_pivot,
        }
        for step in definition.ordered_steps()
    ]


def errors(response: Any) -> list[str]:
    """The error messages of a re-rendered admin form, for assertion output."""
    return re.findall(
        r'<ul class="errorlist[^"]*"[^>]*>(.*?)</ul>', response.content.decode(), re.S
    )


def snapshot(definition: WorkflowDefinition) -> list[tuple[Any, ...]]:
    return list(
        definition.steps.order_by("pk").values_list(
            "pk", "position", "name", "action", "is_pivot", "max_attempts"
        )
    )


class AdminTestCase(TestCase):
    @classmethod
    def setUpTestData(cls):
        cls.superuser = User.objects.create_superuser("root", password="pw")
        cls.editor = user_in("workflow admin", "editor")
        cls.editor.is_staff = True
        cls.editor.save(update_fields=["is_staff"])

    def setUp(self):
        self.client.force_login(self.editor)


class AddDefinitionTests(AdminTestCase):
    def test_add_page_offers_registered_activities(self):
        response = self.client.get(ADD_URL)
        assert response.status_code == 200
        self.assertContains(response, '<option value="demo.charge_payment">')
        self.assertContains(response, '<option value="demo.refund_payment">')
        self.assertContains(response, 'name="steps-TOTAL_FORMS"')

    def test_timer_and_human_steps_are_declared_with_clear_errors(self):
        wait = {"name": "wait", "kind": "timer", "action": "", "compensation": ""}
        review = {"name": "review", "kind": "human", "action": "", "compensation": ""}
        bad = [
            {"name": "reserve"},
            {**wait, "wait_until": "ship_by"},
            {**review, "form_fields": '[{"name": "ok", "type": "date"}'},
        ]
        response = self.client.post(ADD_URL, form_data(bad))
        assert response.status_code == 200
        text = " ".join(errors(response))
        assert "input.ship_by" in text
        assert "Enter a valid JSON" in text
        bad[2]["form_fields"] = '[{"name": "ok", "type": "date"}]'
        text = " ".join(errors(self.client.post(ADD_URL, form_data(bad))))
        assert "type must be one of text, number, boolean, choice" in text
        good = [
            {"name": "reserve"},
            {**wait, "wait_until": "input.ship_by"},
            {
                **review,
                "form_fields": '[{"name": "ok", "type": "boolean", "required": true}]',
            },
        ]
        response = self.client.post(ADD_URL, form_data(good))
        assert response.status_code == 302, errors(response)
        stored = StepDefinition.objects.get(name="review")
        assert stored.kind == "human" and stored.form_fields[0]["name"] == "ok"
        assert StepDefinition.objects.get(name="reserve").kind == "activity"

    def test_valid_definition_with_steps_is_saved(self):
        steps = [
            {"name": "reserve", "action": "demo.reserve_inventory"},
            {"name": "charge", "action": "demo.charge_payment", "position": "5"},
            {
                "name": "ship",
                "action": "demo.create_shipment",
                "compensation": "",
                "is_pivot": True,
                "position": "9",
            },
        ]
        response = self.client.post(ADD_URL, form_data(steps))
        assert response.status_code == 302, errors(response)
        definition = WorkflowDefinition.objects.get(key="order")
        assert (definition.version, definition.status) == (1, "draft")
        assert definition.recipient_list() == ["ops@example.com"]
        rows = [
            (s.position, s.name, s.action, s.compensation, s.is_pivot)
            for s in definition.ordered_steps()
        ]
        assert rows == [
            (1, "reserve", "demo.reserve_inventory", "demo.undo_step", False),
            (5, "charge", "demo.charge_payment", "demo.undo_step", False),
            (9, "ship", "demo.create_shipment", "", True),
        ]

    def assert_rejected(self, data: dict[str, Any], message: str) -> None:
        response = self.client.post(ADD_URL, data)
        assert response.status_code == 200
        self.assertContains(response, "Please correct the error")
        self.assertContains(response, escape(message))
        assert WorkflowDefinition.objects.count() == 0
        assert StepDefinition.objects.count() == 0

    def test_unknown_activity_is_rejected(self):
        data = form_data([{"name": "charge", "action": "payments.charge"}])
        self.assert_rejected(data, "No activity is registered as 'payments.charge'.")
        # The rejected name stays visible in the re-rendered select.
        response = self.client.post(ADD_URL, data)
        self.assertContains(response, "payments.charge (not registered)")

    def test_unknown_compensation_is_rejected(self):
        data = form_data([{"name": "charge", "compensation": "demo.nope"}])
        self.assert_rejected(data, "No activity is registered as 'demo.nope'.")

    def test_duplicate_step_name_is_rejected(self):
        data = form_data([{"name": "charge"}, {"name": "charge"}])
        self.assert_rejected(
            data,
            "Step names must be unique within a definition: "
            "'charge' is used by 2 steps.",
        )

    def test_duplicate_position_is_rejected(self):
        data = form_data(
            [{"name": "a", "position": "2"}, {"name": "b", "position": "2"}]
        )
        self.assert_rejected(
            data, "Positions must be unique within a definition: 2 is used by 2 steps."
        )

    def test_two_pivots_are_rejected(self):
        data = form_data(
            [{"name": "a", "is_pivot": True}, {"name": "b", "is_pivot": True}]
        )
        self.assert_rejected(
            data,
            "At most one step can be the pivot; these steps are marked as pivot: a, b.",
        )

    def test_restart_point_at_or_after_the_pivot_is_rejected(self):
        data = form_data(
            [
                {"name": "a", "restart_point": True},
                {"name": "b", "is_pivot": True, "restart_point": True},
            ]
        )
        self.assert_rejected(
            data, "Step 'b': a restart point must come before the pivot."
        )

    def test_zero_max_attempts_is_rejected(self):
        data = form_data([{"name": "a", "max_attempts": "0"}])
        self.assert_rejected(data, "Max attempts must be between 1 and 100.")

    def test_negative_timeout_is_rejected(self):
        data = form_data([{"name": "a", "timeout": "-5"}])
        self.assert_rejected(data, "The timeout must be positive.")

    def test_backoff_cap_below_initial_is_rejected(self):
        data = form_data(
            [{"name": "a", "backoff_initial": "00:01:00", "backoff_max": "00:00:10"}]
        )
        self.assert_rejected(
            data, "The backoff cap must not be below the initial backoff."
        )

    def test_jitter_above_one_is_rejected(self):
        data = form_data([{"name": "a", "backoff_jitter": "1.5"}])
        self.assert_rejected(data, "Jitter must be between 0 and 1.")

    def test_invalid_alert_email_is_rejected(self):
        data = form_data(
            [{"name": "a"}], alert_recipients="ops@example.com\nnot-an-email"
        )
        self.assert_rejected(data, "'not-an-email' is not a valid email address.")

    def test_search_attributes_are_validated_and_saved(self):
        data = form_data([{"name": "a"}], search_attributes='{"Customer": "x y"}')
        self.assert_rejected(data, "'Customer' is not a valid attribute name")
        self.assert_rejected(data, "must be a dotted input path")
        self.assert_rejected(
            form_data([{"name": "a"}], search_attributes='["customer"]'),
            "Must be a JSON object of name to input path",
        )
        declared = '{"customer": "customer.id", "email": "contact.email"}'
        response = self.client.post(
            ADD_URL, form_data([{"name": "a"}], search_attributes=declared)
        )
        assert response.status_code == 302, errors(response)
        definition = WorkflowDefinition.objects.get(key="order")
        assert definition.search_attributes == {
            "customer": "customer.id",
            "email": "contact.email",
        }
        page = self.client.get(change_url(definition)).content.decode()
        assert 'name="search_attributes"' in page

    def test_orchestrated_definition_needs_a_step(self):
        self.assert_rejected(
            form_data([]), "An orchestrated definition needs at least one step."
        )

    def test_orchestrated_step_needs_an_action(self):
        data = form_data([{"name": "a", "action": ""}])
        self.assert_rejected(data, "An orchestrated step needs an action activity.")

    def test_observed_definition_steps_need_an_event(self):
        data = form_data(
            [{"name": "paid", "action": "", "compensation": ""}], mode="observed"
        )
        self.assert_rejected(data, "An observed step needs the event type it expects.")
        data = form_data(
            [{"name": "paid", "action": "", "compensation": "", "awaits_event": "p"}],
            mode="observed",
        )
        assert self.client.post(ADD_URL, data).status_code == 302
        assert WorkflowDefinition.objects.get().steps.get().awaits_event == "p"

    def test_untouched_extra_row_is_ignored(self):
        # STEP_DEFAULTS holds the model defaults apart from the two activities,
        # so this row posts exactly what an untouched extra row renders with.
        untouched = {"position": "", "name": "", "action": "", "compensation": ""}
        response = self.client.post(ADD_URL, form_data([{"name": "a"}, untouched]))
        assert response.status_code == 302, errors(response)
        assert StepDefinition.objects.count() == 1


class EditDraftTests(AdminTestCase):
    def setUp(self):
        super().setUp()
        self.draft = make_definition(
            "order",
            [{"name": "a", "is_pivot": True}, {"name": "b"}, {"name": "c"}],
            publish=False,
        )

    def post(self, steps: list[dict[str, Any]], **fields: Any) -> Any:
        data = form_data(steps, definition=self.draft, **fields)
        return self.client.post(change_url(self.draft), data)

    def test_draft_page_is_editable_and_offers_publish(self):
        response = self.client.get(change_url(self.draft))
        self.assertContains(response, 'name="title"')
        self.assertContains(response, 'name="steps-0-name"')
        self.assertContains(response, 'name="_save"')
        self.assertContains(response, f'action="{tool_url(self.draft, "publish")}"')
        self.assertContains(response, f'action="{tool_url(self.draft, "new_draft")}"')

    def test_swap_positions_rename_and_move_pivot_in_one_save(self):
        steps = existing_steps(self.draft)
        # a <-> b by position, b takes the pivot, c is renamed to a's old name.
        steps[0].update(position="2", is_pivot=False, name="x")
        steps[1].update(position="1", is_pivot=True, name="a")
        steps[2].update(name="b")
        response = self.post(steps, title="Renamed")
        assert response.status_code == 302, errors(response)
        self.draft.refresh_from_db()
        assert self.draft.title == "Renamed"
        assert [
            (s.name, s.position, s.is_pivot) for s in self.draft.ordered_steps()
        ] == [
            ("a", 1, True),
            ("x", 2, False),
            ("b", 3, False),
        ]

    def test_delete_a_step_and_reuse_its_position_and_name(self):
        steps = existing_steps(self.draft)
        steps[1]["DELETE"] = True
        steps.append({"name": "b", "position": "2", "action": "demo.charge_payment"})
        response = self.post(steps)
        assert response.status_code == 302, errors(response)
        assert [(s.name, s.action) for s in self.draft.ordered_steps()] == [
            ("a", "demo.step"),
            ("b", "demo.charge_payment"),
            ("c", "demo.step"),
        ]

    def test_bad_change_changes_nothing(self):
        before = snapshot(self.draft)
        for change in (
            {"name": "c"},
            {"is_pivot": True},
            {"action": "demo.nope"},
            {"max_attempts": "0"},
        ):
            steps = existing_steps(self.draft)
            steps[1].update(change)
            response = self.post(steps, title="Changed")
            assert response.status_code == 200, change
            self.assertContains(response, "Please correct the error")
            self.draft.refresh_from_db()
            assert self.draft.title == "order"
            assert snapshot(self.draft) == before

    def test_deleting_every_step_is_rejected(self):
        steps = [{**step, "DELETE": True} for step in existing_steps(self.draft)]
        response = self.post(steps)
        self.assertContains(
            response, "An orchestrated definition needs at least one step."
        )
        assert self.draft.steps.count() == 3


class PublishTests(AdminTestCase):
    def test_publish_button(self):
        draft = make_definition("order", publish=False)
        response = self.client.post(tool_url(draft, "publish"), follow=True)
        self.assertRedirects(response, change_url(draft))
        self.assertContains(response, "Order v1 is published.")
        draft.refresh_from_db()
        assert draft.is_published
        assert draft.published_at is not None

    def test_publish_needs_post(self):
        draft = make_definition("order", publish=False)
        assert self.client.get(tool_url(draft, "publish")).status_code == 405
        draft.refresh_from_db()
        assert not draft.is_published

    def test_publish_and_new_draft_need_the_csrf_token(self):
        draft = make_definition("order", publish=False)
        client = Client(enforce_csrf_checks=True)
        client.force_login(self.editor)
        assert client.post(tool_url(draft, "publish")).status_code == 403
        assert client.post(tool_url(draft, "new_draft")).status_code == 403
        assert WorkflowDefinition.objects.get().status == "draft"

    def test_publish_action(self):
        drafts = [make_definition(key, publish=False) for key in ("a", "b")]
        response = self.client.post(
            CHANGELIST_URL,
            {"action": "publish_selected", "_selected_action": [d.pk for d in drafts]},
            follow=True,
        )
        self.assertContains(response, "A v1 is published.")
        self.assertContains(response, "B v1 is published.")
        assert WorkflowDefinition.objects.published().count() == 2

    def test_publish_shows_the_validation_error(self):
        draft = make_definition("order", steps=[], publish=False)
        response = self.client.post(tool_url(draft, "publish"), follow=True)
        self.assertContains(
            response,
            "Order v1 was not published: "
            "An orchestrated definition needs at least one step.",
        )
        draft.refresh_from_db()
        assert not draft.is_published

    def test_publish_revalidates_steps_stored_without_the_form(self):
        draft = make_definition(
            "order", [{"name": "a", "action": "gone"}], publish=False
        )
        response = self.client.post(tool_url(draft, "publish"), follow=True)
        self.assertContains(
            response, escape("Step 'a': No activity is registered as 'gone'.")
        )
        draft.refresh_from_db()
        assert not draft.is_published

    def test_publishing_twice_says_so(self):
        published = make_definition("order")
        response = self.client.post(tool_url(published, "publish"), follow=True)
        self.assertContains(response, "Order v1 is already published.")

    def test_staff_without_change_permission_cannot_publish(self):
        operator = user_in("operator")
        operator.is_staff = True
        operator.save(update_fields=["is_staff"])
        self.client.force_login(operator)
        draft = make_definition("order", publish=False)
        response = self.client.get(change_url(draft))
        assert response.status_code == 200
        self.assertNotContains(response, tool_url(draft, "publish"))
        self.assertNotContains(response, tool_url(draft, "new_draft"))
        assert self.client.post(tool_url(draft, "publish")).status_code == 403
        assert self.client.post(tool_url(draft, "new_draft")).status_code == 403
        draft.refresh_from_db()
        assert not draft.is_published
        assert WorkflowDefinition.objects.count() == 1


class PublishedIsReadOnlyTests(AdminTestCase):
    def setUp(self):
        super().setUp()
        self.published = make_definition("order", title="Order")

    def test_change_page_has_no_editable_inputs(self):
        response = self.client.get(change_url(self.published))
        assert response.status_code == 200
        self.assertContains(response, "is published and cannot be changed")
        for needle in (
            'name="title"',
            'name="mode"',
            'name="steps-0-name"',
            'name="steps-0-action"',
            'name="steps-0-DELETE"',
            'name="_save"',
            tool_url(self.published, "publish"),
            reverse(
                "admin:workflows_app_workflowdefinition_delete",
                args=[self.published.pk],
            ),
        ):
            self.assertNotContains(response, needle)
        # No empty rows: the inline's JavaScript offers no "Add another" either.
        self.assertContains(response, 'name="steps-MAX_NUM_FORMS" value="0"')
        # The steps are shown, and a new version can be started from here.
        self.assertContains(response, "demo.undo_step")
        self.assertContains(response, tool_url(self.published, "new_draft"))

    def test_post_does_not_change_it(self):
        before = snapshot(self.published)
        steps = existing_steps(self.published)
        steps[0]["name"] = "changed"
        steps.append({"name": "extra"})
        data = form_data(steps, definition=self.published, title="Hacked")
        response = self.client.post(change_url(self.published), data)
        assert response.status_code == 403
        self.published.refresh_from_db()
        assert self.published.title == "Order"
        assert snapshot(self.published) == before

    def test_cannot_be_deleted(self):
        url = reverse(
            "admin:workflows_app_workflowdefinition_delete", args=[self.published.pk]
        )
        assert self.client.post(url, {"post": "yes"}).status_code == 403
        self.client.post(
            CHANGELIST_URL,
            {
                "action": "delete_selected",
                "_selected_action": [self.published.pk],
                "post": "yes",
            },
        )
        assert WorkflowDefinition.objects.filter(pk=self.published.pk).exists()

    def test_drafts_can_be_deleted(self):
        drafts = [make_definition(key, publish=False) for key in ("a", "b")]
        url = reverse(
            "admin:workflows_app_workflowdefinition_delete", args=[drafts[0].pk]
        )
        assert self.client.post(url, {"post": "yes"}).status_code == 302
        response = self.client.post(
            CHANGELIST_URL,
            {
                "action": "delete_selected",
                "_selected_action": [drafts[1].pk],
                "post": "yes",
            },
        )
        assert response.status_code == 302
        assert list(WorkflowDefinition.objects.all()) == [self.published]
        assert StepDefinition.objects.exclude(definition=self.published).count() == 0


class NewDraftTests(AdminTestCase):
    def setUp(self):
        super().setUp()
        self.v1 = make_definition(
            "order", [{"name": "a"}, {"name": "b", "is_pivot": True, "max_attempts": 7}]
        )

    def assert_copied(self, draft: WorkflowDefinition) -> None:
        assert (draft.key, draft.version, draft.status) == ("order", 2, "draft")
        copied = [s[1:] for s in snapshot(draft)]
        assert copied == [s[1:] for s in snapshot(self.v1)]
        assert {s[0] for s in snapshot(draft)}.isdisjoint(
            s[0] for s in snapshot(self.v1)
        )

    def test_new_draft_button(self):
        response = self.client.post(tool_url(self.v1, "new_draft"), follow=True)
        draft = WorkflowDefinition.objects.get(key="order", version=2)
        self.assertRedirects(response, change_url(draft))
        self.assertContains(response, "Created draft order v2 from order v1.")
        self.assertContains(response, 'name="steps-1-name"')  # editable again
        self.assert_copied(draft)

    def test_new_draft_action(self):
        self.client.post(
            CHANGELIST_URL,
            {"action": "new_draft_selected", "_selected_action": [self.v1.pk]},
        )
        self.assert_copied(WorkflowDefinition.objects.get(key="order", version=2))
        self.v1.refresh_from_db()
        assert self.v1.is_published

    def test_running_instances_keep_their_version(self):
        first = start("order", "order-1")
        self.client.post(tool_url(self.v1, "new_draft"))
        v2 = WorkflowDefinition.objects.get(key="order", version=2)
        steps = existing_steps(v2)
        steps.append({"name": "c"})
        response = self.client.post(
            change_url(v2), form_data(steps, definition=v2, title="v2")
        )
        assert response.status_code == 302, errors(response)
        self.client.post(tool_url(v2, "publish"))

        first.refresh_from_db()
        assert first.definition_id == self.v1.pk
        assert list(first.steps.values_list("name", flat=True)) == ["a", "b"]
        second = start("order", "order-2")
        assert second.definition_id == v2.pk
        assert list(second.steps.values_list("name", flat=True)) == ["a", "b", "c"]


class AccessTests(AdminTestCase):
    def test_viewer_without_staff_flag_cannot_enter(self):
        self.client.force_login(user_in("viewer"))
        for url in (reverse("admin:index"), CHANGELIST_URL, ADD_URL):
            response = self.client.get(url)
            assert response.status_code == 302
            assert response["Location"].startswith(reverse("admin:login"))

    def test_workflow_admin_sees_definitions_and_instances(self):
        response = self.client.get(reverse("admin:index"))
        self.assertContains(response, "Workflow definitions")
        self.assertContains(response, "Workflow instances")
        # The demo ledger and the dedupe table are not part of the role.
        self.assertNotContains(response, "Participant effects")


class InstanceAdminTests(AdminTestCase):
    def setUp(self):
        super().setUp()
        make_definition("order", [{"name": "reserve"}, {"name": "charge"}])
        self.instance = start("order", "order-42", simulate={"charge": "fail"})
        self.step = self.instance.steps.get(name="reserve")
        Attempt.objects.create(
            step=self.step, direction="action", number=1, started_at=timezone.now()
        )
        InboundMessage.objects.create(source="shop", message_id="m-1", kind="event")
        ParticipantEffect.objects.create(
            idempotency_key=self.step.idempotency_key("action"),
            instance_id=self.instance.pk,
            step_name="reserve",
            direction="action",
        )

    def url(self, model: type, view: str, *args: Any) -> str:
        meta = model._meta
        return reverse(f"admin:{meta.app_label}_{meta.model_name}_{view}", args=args)

    def test_changelist_filters_and_exact_search(self):
        other = start("order", "order-43")
        url = self.url(WorkflowInstance, "changelist")
        response = self.client.get(url, {"q": "order-42"})
        self.assertContains(response, str(self.instance.pk))
        self.assertNotContains(response, str(other.pk))
        response = self.client.get(url, {"q": str(other.pk)})
        self.assertContains(response, "order-43")
        self.assertNotContains(response, "order-42")
        response = self.client.get(
            url, {"state": "accepted", "definition_key": "order"}
        )
        self.assertContains(response, "order-42")
        self.assertContains(response, "order-43")
        response = self.client.get(url, {"stuck__exact": "1"})
        self.assertNotContains(response, "order-42")

    def test_instance_change_page_is_read_only_with_steps_and_history(self):
        response = self.client.get(
            self.url(WorkflowInstance, "change", self.instance.pk)
        )
        assert response.status_code == 200
        self.assertContains(response, "reserve")
        self.assertContains(response, "charge")
        self.assertContains(response, "History")
        history = TransitionLog.objects.filter(instance=self.instance).first()
        self.assertContains(response, history.reason)
        self.assertContains(response, escape('"charge": "fail"'))  # the input
        for needle in ('name="_save"', 'name="business_key"', 'name="steps-0-name"'):
            self.assertNotContains(response, needle)

    def test_instance_cannot_be_added_changed_or_deleted(self):
        pk = self.instance.pk
        assert self.client.get(self.url(WorkflowInstance, "add")).status_code == 403
        response = self.client.post(
            self.url(WorkflowInstance, "change", pk), {"business_key": "changed"}
        )
        assert response.status_code == 403
        response = self.client.post(
            self.url(WorkflowInstance, "delete", pk), {"post": "yes"}
        )
        assert response.status_code == 403
        self.instance.refresh_from_db()
        assert self.instance.business_key == "order-42"
        changelist = self.client.get(self.url(WorkflowInstance, "changelist"))
        self.assertNotContains(changelist, self.url(WorkflowInstance, "add"))
        self.assertNotContains(changelist, "delete_selected")

    def test_every_runtime_admin_is_read_only(self):
        self.client.force_login(self.superuser)
        rows = {
            WorkflowInstance: self.instance.pk,
            StepExecution: self.step.pk,
            Attempt: Attempt.objects.get().pk,
            TransitionLog: TransitionLog.objects.filter(instance=self.instance)
            .first()
            .pk,
            InboundMessage: InboundMessage.objects.get().pk,
            ParticipantEffect: ParticipantEffect.objects.get().pk,
        }
        for model, pk in rows.items():
            name = model.__name__
            assert self.client.get(self.url(model, "changelist")).status_code == 200
            assert self.client.get(self.url(model, "add")).status_code == 403, name
            response = self.client.get(self.url(model, "change", pk))
            assert response.status_code == 200, name
            self.assertNotContains(response, 'name="_save"')
            assert self.client.post(self.url(model, "change", pk)).status_code == 403
            response = self.client.post(self.url(model, "delete", pk), {"post": "yes"})
            assert response.status_code == 403, name
            assert model.objects.filter(pk=pk).exists(), name

    def test_step_page_shows_attempts(self):
        response = self.client.get(self.url(StepExecution, "change", self.step.pk))
        self.assertContains(response, "Attempts")
        self.assertContains(response, "running")
