"""Bad input on every dashboard form that takes JSON or free text: a 4xx with
a message that says what is wrong, and nothing written (issue 15, "Bad
input never gets a 500"). The same inputs go to the API in
tests/api/test_bad_input.py; both use workflows_app.validation."""

from __future__ import annotations

import json
from typing import Any

import pytest
from django.test import Client
from django.urls import reverse
from django.utils import timezone
from django.utils.html import escape

from tests.support import make_definition, start, user_in
from tests.views.conftest import HOLD_STEPS, fresh, held
from workflows_app import validation
from workflows_app.engine import actions
from workflows_app.engine.commands import bulk
from workflows_app.engine.errors import InvalidInput
from workflows_app.forms import sentence
from workflows_app.models import (
    Alert,
    ApiToken,
    ApprovalRequest,
    BulkJob,
    KnownFailure,
    SavedView,
    StepExecution,
    TransitionLog,
    WorkflowInstance,
)

pytestmark = pytest.mark.django_db(transaction=True)
HTMX = {"HX-Request": "true"}

# The issue's inputs, as an operator would type them into a JSON field, with
# a part of the message each must get.
BAD_JSON = [
    ("NaN", '{"a": NaN}', "NaN is not a JSON number"),
    ("Infinity", '{"a": Infinity}', "Infinity is not a JSON number"),
    ("-Infinity", '{"a": -Infinity}', "-Infinity is not a JSON number"),
    ("1e999", '{"a": 1e999}', "the number 1e999 is out of range"),
    ("lone surrogate", '{"a": "\\ud800"}', "at a contains a lone UTF-16 surrogate"),
    ("NUL", '{"a": "\\u0000"}', "at a contains a NUL character"),
    ("NUL in a key", '{"a\\u0000": 1}', "object key in the"),
    ("5,000 deep", '{"a": ' + "[" * 5000 + "]" * 5000 + "}", "deeper than 64"),
    ("65 deep", '{"a": ' + "[" * 65 + "]" * 65 + "}", "deeper than 64"),
    ("digits", '{"a": ' + "9" * 5000 + "}", "Not valid JSON"),
]
NUL = "payments is back\x00"
NUL_MESSAGE = "contains a NUL character"


def logged_in(user) -> Client:
    # A 500 is an answer to assert on, not an exception in the test.
    client = Client(raise_request_exception=False)
    client.force_login(user)
    return client


def written() -> dict[str, Any]:
    """Everything a form could write: audit rows, requests, jobs, versions,
    data, acknowledgements, saved views and marks."""
    return {
        "log": TransitionLog.objects.count(),
        "approvals": list(ApprovalRequest.objects.values_list("id", "status")),
        "jobs": list(BulkJob.objects.order_by("id").values_list("id", "status")),
        "instances": list(
            WorkflowInstance.objects.order_by("id").values_list(
                "id", "version", "state", "input", "outputs"
            )
        ),
        "steps": list(
            StepExecution.objects.order_by("id").values_list(
                "id", "state", "output", "claimed_by"
            )
        ),
        "alerts": list(
            Alert.objects.order_by("id").values_list("id", "acknowledged_at")
        ),
        "saved": SavedView.objects.count(),
        "known": KnownFailure.objects.count(),
    }


def assert_refused(response, message: str, status: int = 422) -> None:
    html = response.content.decode()
    assert response.status_code == status, f"status {response.status_code}"
    assert escape(message) in html, f"no {message!r} in {html[:3000]}"


@pytest.fixture
def four_eyes(wf):
    def require(*actions: str) -> None:
        wf.approval_actions = list(actions)
        wf.save(update_fields=["approval_actions"])

    return require


def each_bad_json(post) -> None:
    """Send every input of BAD_JSON; collect every miss, then fail once."""
    before = written()
    misses = []
    for label, text, message in BAD_JSON:
        response = post(text)
        try:
            assert_refused(response, message)
            assert written() == before
        except AssertionError as exc:
            misses.append(f"{label}: {str(exc).splitlines()[0][:300]}")
    assert not misses, "\n".join(misses)


# -- JSON: repair (input, a step's output), mark step done ----------------------


@pytest.mark.parametrize("approval", [False, True], ids=["direct", "four-eyes"])
def test_repair_input_refuses_every_bad_json(broker, wf, operator, four_eyes, approval):
    if approval:
        four_eyes("repair")
    instance = held(broker)
    client = logged_in(operator)
    url = reverse("instance_repair", args=[instance.pk])

    def post(text):
        data = {"target": "input", "value": text, "reason": "typo"}
        return client.post(url, {**data, "version": instance.version}, headers=HTMX)

    each_bad_json(post)


@pytest.mark.parametrize("approval", [False, True], ids=["direct", "four-eyes"])
def test_repair_output_refuses_every_bad_json(
    broker, wf, operator, four_eyes, approval
):
    if approval:
        four_eyes("repair")
    instance = held(broker)
    done = instance.steps.get(name="one")
    client = logged_in(operator)
    url = reverse("instance_repair", args=[instance.pk])

    def post(text):
        data = {"target": done.pk, "value": text, "reason": "typo"}
        return client.post(url, {**data, "version": instance.version}, headers=HTMX)

    each_bad_json(post)


@pytest.mark.parametrize("approval", [False, True], ids=["direct", "four-eyes"])
def test_mark_step_done_refuses_every_bad_json(
    broker, wf, operator, four_eyes, approval
):
    if approval:
        four_eyes("mark_step_done")
    instance = held(broker)
    step = instance.steps.get(name="two")
    client = logged_in(operator)
    url = reverse("instance_action", args=[instance.pk, "mark_step_done"])

    def post(text):
        data = {"output": text, "reason": "by phone", "step": step.pk}
        return client.post(url, {**data, "version": instance.version}, headers=HTMX)

    each_bad_json(post)


def test_without_htmx_the_form_comes_back_with_its_error(broker, wf, operator):
    """No JavaScript: the whole page with the form and its message, not a
    redirect that loses what was typed."""
    instance = held(broker)
    before = written()
    response = logged_in(operator).post(
        reverse("instance_repair", args=[instance.pk]),
        {
            "target": "input",
            "value": '{"a": NaN}',
            "reason": "typo",
            "version": instance.version,
        },
    )
    assert_refused(response, "NaN is not a JSON number")
    assert "<html" in response.content.decode()
    assert written() == before


# -- text: reasons and notes ------------------------------------------------------


def test_every_instance_action_refuses_a_nul_reason(broker, operator):
    # A restart point on step one, so that every action's form is offered.
    steps = [{**HOLD_STEPS[0], "restart_point": True}, *HOLD_STEPS[1:]]
    make_definition("wf", steps=steps, failure_policy="hold")
    instance = held(broker)
    client = logged_in(operator)
    names = [
        "retry_step",
        "mark_step_done",
        "restart_from_step",
        "compensate",
        "cancel",
        "close_as_failed",
    ]
    before = written()
    for name in names:
        step = instance.steps.get(name="one" if name.startswith("restart") else "two")
        response = client.post(
            reverse("instance_action", args=[instance.pk, name]),
            {"reason": NUL, "version": instance.version, "step": step.pk},
            headers=HTMX,
        )
        assert_refused(response, NUL_MESSAGE)
        assert written() == before, name
    response = client.post(
        reverse("instance_repair", args=[instance.pk]),
        {
            "target": "input",
            "value": '{"a": 1}',
            "reason": NUL,
            "version": instance.version,
        },
        headers=HTMX,
    )
    assert_refused(response, NUL_MESSAGE)
    assert written() == before


@pytest.mark.parametrize("htmx", [True, False], ids=["htmx", "page"])
def test_acknowledge_refuses_a_nul_reason(broker, wf, operator, htmx):
    instance = held(broker)
    alert = Alert.objects.create(
        instance=instance,
        definition_key="wf",
        kind=Alert.Kind.HELD,
        reason="waits on a person",
        opened_at=timezone.now(),
    )
    before = written()
    response = logged_in(operator).post(
        reverse("alert_acknowledge", args=[alert.pk]),
        {"reason": NUL},
        headers=HTMX if htmx else {},
    )
    assert_refused(response, "The reason contains a NUL character")
    assert written() == before
    assert fresh(instance).version == instance.version


@pytest.fixture
def job(broker, wf, operator):
    held(broker, "order-1")
    held(broker, "order-2")
    return bulk.bulk_job_plan(
        WorkflowInstance.objects.all(),
        action="retry",
        reason="gateway back",
        user=operator,
        description="all",
    )


@pytest.mark.parametrize("status", ["draft", "queued"])
def test_bulk_cancel_refuses_a_nul_reason(broker, job, operator, status):
    if status == "queued":
        bulk.bulk_job_confirm(job.pk, user=operator)
    before = written()
    response = logged_in(operator).post(
        reverse("bulk_job_operate", args=[job.pk, "cancel"]), {"reason": NUL}
    )
    assert_refused(response, "The reason contains a NUL character")
    assert written() == before
    assert BulkJob.objects.get(pk=job.pk).status == status


def test_bulk_forms_refuse_a_nul_reason(broker, wf, operator):
    instance = held(broker)
    client = logged_in(operator)
    before = written()
    response = client.post(
        reverse("instance_bulk"),
        {
            "action": "retry",
            "reason": NUL,
            "selected": f"{instance.pk}:{instance.version}",
        },
        headers=HTMX,
    )
    assert_refused(response, NUL_MESSAGE)
    response = client.post(
        reverse("bulk_job_new"),
        {"query": "definition=wf", "action": "retry", "reason": NUL, "rate": 10},
    )
    assert_refused(response, NUL_MESSAGE)
    assert written() == before


@pytest.mark.parametrize("bulk_job", [False, True], ids=["instance", "bulk job"])
def test_approval_refuses_a_nul_note(broker, wf, operator, four_eyes, bulk_job):
    four_eyes("cancel")
    instance = held(broker)
    client = logged_in(operator)
    if bulk_job:
        wf.approval_bulk_over = 0
        wf.save(update_fields=["approval_bulk_over"])
        job = bulk.bulk_job_plan(
            WorkflowInstance.objects.all(),
            action="retry",
            reason="gateway back",
            user=operator,
            description="all",
        )
        bulk.bulk_job_confirm(job.pk, user=operator)
    else:
        client.post(
            reverse("instance_action", args=[instance.pk, "cancel"]),
            {"reason": "customer called", "version": instance.version},
            headers=HTMX,
        )
    request = ApprovalRequest.objects.get()
    before = written()
    second = logged_in(user_in("operator", "oscar"))
    for decision in ("approve", "reject"):
        response = second.post(
            reverse("approval_decide", args=[request.pk, decision]),
            {"note": NUL},
            headers=HTMX,
        )
        assert_refused(response, "The note contains a NUL character")
        assert written() == before, decision


def test_saved_views_and_failure_marks_refuse_nul(broker, wf, operator):
    """The saved-view form is a plain post-redirect-get form on the list: it
    is refused with the message on the page it returns to."""
    held(broker)
    client = logged_in(operator)
    before = written()
    for data, message in (
        ({"name": NUL, "query": "definition=wf"}, "The name contains a NUL"),
        (
            {"name": "mine", "query": "definition=wf&business_key=a%00"},
            "A filter of the list contains a NUL",
        ),
        ({"name": "mine", "query": "definition=wf\x00"}, "The query contains a NUL"),
    ):
        response = client.post(reverse("saved_view_create"), data, follow=True)
        assert response.redirect_chain[0][1] == 302
        assert "Not saved: " in response.content.decode()
        assert message in response.content.decode()
    mark = {"definition_key": "wf", "step_name": "two", "signature": "x"}
    for data in ({**mark, "note": NUL}, {**mark, "signature": NUL, "note": "known"}):
        response = client.post(reverse("failure_group_mark"), data)
        assert_refused(response, NUL_MESSAGE)
    assert written() == before


# -- the inbox: claim, release, complete or reject a step for a person -----------

REVIEW = {
    "name": "review",
    "kind": "human",
    "action": "",
    "compensation": "",
    "form_fields": [
        {"name": "approved", "type": "boolean", "required": True},
        {"name": "limit", "type": "number", "required": True},
        {"name": "note", "type": "text"},
    ],
}
GOOD_FIELDS = {"field-approved": "on", "field-limit": "250", "field-note": "ok"}
# The page's completion data are typed fields, not a JSON document: each
# exact input goes where it can do harm, with the field's message.
BAD_FIELDS = [
    *(
        (f"limit {label}", {"field-limit": value}, "must be a number")
        for label, value in (
            ("NaN", "NaN"),
            ("Infinity", "Infinity"),
            ("-Infinity", "-Infinity"),
            ("1e999", "1e999"),
            ("digits", "9" * 5000),
            ("5,000 deep", "[" * 5000 + "]" * 5000),
        )
    ),
    ("note NUL", {"field-note": "called\x00"}, "this text contains a NUL character"),
    ("note only NUL", {"field-note": "\x00"}, "this text contains a NUL character"),
    (
        "note 5,000 deep",
        {"field-note": "[" * 5000 + "]" * 5000},
        "must be text of at most 5000 characters",
    ),
]


@pytest.fixture
def waiting(broker):
    """A step for a person waiting in the inbox, claimed by no one."""
    make_definition("orders", [{"name": "reserve"}, REVIEW, {"name": "ship"}])
    instance = start("orders", "ORD-1")
    broker.run()
    return instance.steps.get(name="review")


@pytest.mark.parametrize("htmx", [True, False], ids=["htmx", "page"])
@pytest.mark.parametrize("approval", [False, True], ids=["direct", "four-eyes"])
def test_inbox_completion_refuses_every_bad_field(waiting, operator, htmx, approval):
    if approval:
        wf = waiting.instance.definition
        wf.approval_actions = ["complete_human_step"]
        wf.save(update_fields=["approval_actions"])
    client = logged_in(operator)
    url = reverse("inbox_complete", args=[waiting.pk])
    version = fresh(waiting.instance).version
    before = written()
    misses = []
    for label, fields, message in BAD_FIELDS:
        data = {**GOOD_FIELDS, **fields, "reason": "checked", "version": version}
        response = client.post(url, data, headers=HTMX if htmx else {})
        try:
            assert_refused(response, message)
            assert "correct the form" in response.content.decode()
            assert written() == before
        except AssertionError as exc:
            misses.append(f"{label}: {str(exc).splitlines()[0][:300]}")
    assert not misses, "\n".join(misses)


@pytest.mark.parametrize("htmx", [True, False], ids=["htmx", "page"])
@pytest.mark.parametrize("approval", [False, True], ids=["direct", "four-eyes"])
def test_inbox_forms_refuse_a_nul_reason(waiting, operator, htmx, approval):
    """Complete, reject and release (someone else's claim, and one's own):
    the reason is refused with the validator's message, nothing written."""
    if approval:
        wf = waiting.instance.definition
        wf.approval_actions = ["complete_human_step"]
        wf.save(update_fields=["approval_actions"])
    headers = HTMX if htmx else {}
    client = logged_in(operator)
    complete = reverse("inbox_complete", args=[waiting.pk])
    version = fresh(waiting.instance).version
    before = written()
    for decision in ("complete", "reject"):
        data = {**GOOD_FIELDS, "reason": NUL, "decision": decision}
        response = client.post(complete, {**data, "version": version}, headers=headers)
        assert_refused(response, "the reason contains a NUL character")
        assert written() == before, decision

    unclaim = reverse("inbox_claim", args=[waiting.pk, "unclaim"])
    for owner in (user_in("operator", "oscar"), operator):
        claim = reverse("inbox_claim", args=[waiting.pk, "claim"])
        assert logged_in(owner).post(claim).status_code == 200
        before = written()
        response = client.post(unclaim, {"reason": NUL}, headers=headers)
        assert_refused(response, "the reason contains a NUL character")
        assert written() == before, owner.username
        logged_in(owner).post(unclaim, {"reason": "done here"})


def test_inbox_claim_ignores_bad_filters_but_never_fails(waiting, operator):
    """The claim form carries the list's filters (hx-include): a NUL there
    is a filter nobody has, never a 500; the claim itself is valid."""
    response = logged_in(operator).post(
        reverse("inbox_claim", args=[waiting.pk, "claim"]),
        {"definition": "orders\x00", "claimed": "\x00"},
        headers=HTMX,
    )
    assert response.status_code == 200
    assert "is yours now" in response.content.decode()


def test_a_lone_surrogate_cannot_reach_the_inbox_through_a_form(waiting, operator):
    """A form post is bytes: the encoded lone surrogate (ED A0 80, not valid
    UTF-8) is decoded as replacement characters, never stored as such; here
    the limit is wrong too, so the form comes back and nothing is written."""
    client = logged_in(operator)
    before = written()
    response = client.post(
        reverse("inbox_complete", args=[waiting.pk]),
        "field-approved=on&field-limit=NaN&field-note=%ED%A0%80&reason=a%ED%A0%80",
        content_type="application/x-www-form-urlencoded",
        headers=HTMX,
    )
    assert_refused(response, "must be a number")
    assert "\ufffd" in response.content.decode()
    assert written() == before


# -- paths and query strings ------------------------------------------------------


def test_nul_in_paths_and_filters_is_not_a_500(broker, wf, operator):
    held(broker)
    client = logged_in(operator)
    assert client.get("/definitions/%00/").status_code == 404
    assert client.get("/definitions/wf%00/").status_code == 404
    for query in (
        "business_key=a%00",
        "definition=wf%00",
        "q=%00",
        "step=%00",
        "error=%00",
    ):
        response = client.get(f"{reverse('instance_list')}?{query}")
        assert response.status_code < 500, (query, response.status_code)
    response = client.get(f"{reverse('bulk_job_new')}?business_key=a%00")
    assert response.status_code < 500


# -- one validator: the pages, the API and the engine give its refusal -----------


def refusal_of(check, *args) -> str:
    """The shared validator's message for an input (it must refuse it)."""
    with pytest.raises(validation.BadInput) as refused:
        check(*args)
    return refused.value.message


def lenient(text: str) -> Any:
    """What a caller that skipped the checks would hand the engine: Python's
    own parser takes NaN, 1e999, lone surrogates and NUL; deep nesting is
    built, since that parser recurses."""
    if "[" * 65 in text:
        depth, value = text.count("["), []
        for _ in range(depth - 1):
            value = [value]
        return {"a": value}
    return json.loads(text)


@pytest.mark.parametrize(
    "text", [text for _, text, _ in BAD_JSON], ids=[label for label, *_ in BAD_JSON]
)
def test_pages_api_and_engine_refuse_through_the_one_validator(broker, wf, text):
    """Each surface answers with exactly the message workflows_app.validation
    gives for that input where that surface checks it: a form, an API body or
    the engine with its own check would word it otherwise, and fail here."""
    user = user_in("operator", "olga")
    instance = held(broker)
    before = written()

    page = logged_in(user).post(
        reverse("instance_repair", args=[instance.pk]),
        {"target": "input", "value": text, "reason": "t", "version": instance.version},
        headers=HTMX,
    )
    assert_refused(page, sentence(refusal_of(validation.parse_json, text, "the value")))

    body = '{"reason": "t", "data": {"input": ' + text + "}}"
    _, token = ApiToken.issue("ops", ["operate"], user=user)
    api = Client(raise_request_exception=False).post(
        f"/api/v1/instances/{instance.pk}/actions/repair_input",
        body,
        content_type="application/json",
        headers={"Authorization": f"Bearer {token}"},
    )
    assert 400 <= api.status_code < 500, api.content[:300]
    message = refusal_of(validation.parse_json, body, "the body")
    assert api.json()["error"]["message"] == message

    if "9" * 5000 not in text:  # no Python int of 5,000 digits to pass on
        value = lenient(text)
        with pytest.raises(InvalidInput) as engine:
            actions.CATALOGUE["repair_input"].command(
                instance.pk,
                user=user,
                reason="t",
                new_input=value,
                expected_version=instance.version,
            )
        assert str(engine.value) == refusal_of(
            validation.check_json, value, "the new value"
        )
    assert written() == before


def test_a_nul_reason_is_refused_through_the_one_validator(broker, wf):
    user = user_in("operator", "olga")
    instance = held(broker)
    before = written()
    page = logged_in(user).post(
        reverse("instance_action", args=[instance.pk, "cancel"]),
        {"reason": NUL, "version": instance.version},
        headers=HTMX,
    )
    assert_refused(page, sentence(refusal_of(validation.check_text, NUL, "the reason")))
    _, token = ApiToken.issue("ops", ["operate"], user=user)
    body = json.dumps({"reason": NUL})
    api = Client(raise_request_exception=False).post(
        f"/api/v1/instances/{instance.pk}/actions/cancel",
        body,
        content_type="application/json",
        headers={"Authorization": f"Bearer {token}"},
    )
    assert api.status_code == 422, api.content[:300]
    message = refusal_of(validation.parse_json, body, "the body")
    assert api.json()["error"]["message"] == message
    with pytest.raises(InvalidInput) as engine:
        cancel = actions.CATALOGUE["cancel"].command
        cancel(instance.pk, user=user, reason=NUL, expected_version=instance.version)
    assert str(engine.value) == refusal_of(validation.check_text, NUL, "the reason")
    assert written() == before
