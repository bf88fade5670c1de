"""Every state-changing POST of the dashboard refuses the anonymous, the
unauthorised and the forged (no CSRF token), and changes nothing when it does;
user data is escaped; pages send the protective headers; templates carry no
inline code the Content-Security-Policy would have to allow."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
from django.test import Client
from django.urls import reverse

from tests.views.conftest import fresh, held, logged_in
from workflows_app.alerts import sync_alerts
from workflows_app.engine.commands import approvals, bulk
from workflows_app.engine.locking import db_now
from workflows_app.models import (
    Alert,
    ApprovalRequest,
    BulkJob,
    KnownFailure,
    SavedView,
    TransitionLog,
    WorkflowInstance,
)
from workflows_app.views.common import ACTIONS

pytestmark = pytest.mark.django_db(transaction=True)
HTMX = {"HX-Request": "true"}


@pytest.fixture
def target(broker, wf):
    """A held instance with an open alert: every action is allowed on it."""
    instance = held(broker)
    sync_alerts(db_now(), 100)
    return instance


def posts(instance: WorkflowInstance) -> list[tuple[str, dict[str, object]]]:
    """Every state-changing endpoint with a valid body."""
    body = {"reason": "because", "version": instance.version}
    endpoints = [
        (reverse("instance_action", args=[instance.pk, name]), body) for name in ACTIONS
    ]
    endpoints.append(
        (
            reverse("instance_bulk"),
            {
                "action": "retry",
                "reason": "because",
                "selected": [f"{instance.pk}:{instance.version}"],
            },
        )
    )
    endpoints.append(
        (
            reverse("alert_acknowledge", args=[Alert.objects.get().pk]),
            {"reason": "mine"},
        )
    )
    # The operator tools (issue 9).
    endpoints += [
        (
            reverse("instance_repair", args=[instance.pk]),
            {**body, "target": "input", "value": '{"fixed": true}'},
        ),
        (
            reverse("bulk_job_new"),
            {
                "query": "state=needs_attention",
                "action": "retry",
                "reason": "because",
                "rate": "1",
            },
        ),
        (
            reverse("failure_group_mark"),
            {
                "definition_key": "wf",
                "step_name": "two",
                "signature": "x",
                "note": "known",
            },
        ),
    ]
    return endpoints


def snapshot(instance: WorkflowInstance) -> tuple[object, ...]:
    row = fresh(instance)
    alert = Alert.objects.get()
    return (
        row.state,
        row.version,
        TransitionLog.objects.count(),
        alert.acknowledged_at,
        BulkJob.objects.count(),
        KnownFailure.objects.count(),
        SavedView.objects.count(),
    )


def test_anonymous_posts_are_refused_and_change_nothing(target):
    before = snapshot(target)
    client = Client()
    saved_view = (reverse("saved_view_create"), {"name": "v", "query": "stuck=yes"})
    for url, body in [*posts(target), saved_view]:
        response = client.post(url, body)
        assert response.status_code == 302, url
        assert response["Location"].startswith("/login/"), url
        htmx = client.post(url, body, headers=HTMX)
        assert htmx.status_code == 401, url
        assert htmx["HX-Redirect"].startswith("/login/?next="), url
    assert snapshot(target) == before


def test_viewers_posts_are_refused_and_change_nothing(target, viewer):
    before = snapshot(target)
    client = logged_in(viewer)
    for url, body in posts(target):
        assert client.post(url, body).status_code == 403, url
        assert client.post(url, body, headers=HTMX).status_code == 403, url
    assert snapshot(target) == before


def test_viewers_posts_to_approvals_and_bulk_jobs_get_403(target, viewer, operator):
    """Not a redirect with a flash: a plain 403, and nothing changes."""
    job = bulk.bulk_job_plan(
        WorkflowInstance.objects.all(),
        action="retry",
        reason="r",
        user=operator,
        description="all",
    )
    instance_request = approvals.approval_request(
        target.pk, action="cancel", user=operator, reason="r"
    )
    job_request = ApprovalRequest.objects.create(
        bulk_job=job,
        action="bulk_job",
        reason="r",
        requested_by=operator,
        expires_at=db_now() + timedelta(hours=1),
    )
    urls = [
        reverse("approval_decide", args=[request.pk, decision])
        for request in (instance_request, job_request)
        for decision in ("approve", "reject")
    ]
    urls += [
        reverse("bulk_job_operate", args=[job.pk, name])
        for name in ("confirm", "pause", "resume", "cancel")
    ]
    before = (
        snapshot(target),
        list(ApprovalRequest.objects.values_list("status", flat=True)),
        BulkJob.objects.get().status,
    )
    client = logged_in(viewer)
    for url in urls:
        for body in ({"note": "ok", "reason": "r"}, {"note": "\x00", "reason": ""}):
            response = client.post(url, body)
            assert response.status_code == 403, url
            assert "Not allowed" in response.content.decode(), url
            assert client.post(url, body, headers=HTMX).status_code == 403, url
    bad_plan = client.post(reverse("bulk_job_new"), {"query": ""})
    assert bad_plan.status_code == 403
    after = (
        snapshot(target),
        list(ApprovalRequest.objects.values_list("status", flat=True)),
        BulkJob.objects.get().status,
    )
    assert after == before


def test_signed_in_pages_are_not_stored(target, viewer):
    client = logged_in(viewer)
    for url in ["/", "/instances/", reverse("instance_detail", args=[target.pk])]:
        assert "no-store" in client.get(url)["Cache-Control"], url
        partial = client.get(url, headers=HTMX)
        assert "no-store" in partial["Cache-Control"], url


def test_posts_without_csrf_token_are_refused_and_change_nothing(target, operator):
    before = snapshot(target)
    client = Client(enforce_csrf_checks=True)
    client.force_login(operator)
    saved_view = (reverse("saved_view_create"), {"name": "v", "query": "stuck=yes"})
    for url, body in [*posts(target), saved_view]:
        response = client.post(url, body, headers=HTMX)
        assert response.status_code == 403, url
        assert b"CSRF" in response.content, url
    assert snapshot(target) == before


def test_with_the_csrf_token_the_same_post_works(target, operator):
    client = Client(enforce_csrf_checks=True)
    client.force_login(operator)
    page = client.get(reverse("instance_detail", args=[target.pk]))
    token = page.cookies["csrftoken"].value
    # htmx sends the token from <body hx-headers>, the plain form from its field.
    assert f'"X-CSRFToken": "{page.context["csrf_token"]}"' in page.content.decode()
    response = client.post(
        reverse("instance_action", args=[target.pk, "close_as_failed"]),
        {"reason": "a person takes it", "version": target.version},
        headers={**HTMX, "X-CSRFToken": token},
    )
    assert response.status_code == 200
    assert fresh(target).state == "failed"


def test_actions_accept_post_only(target, operator):
    client = logged_in(operator)
    for url, _ in posts(target):
        if url == reverse("bulk_job_new"):
            continue  # GET shows the form; only the POST plans a job
        assert client.get(url).status_code == 405, url


def test_script_in_user_data_is_shown_as_text(broker, wf, operator):
    from tests.support import start

    evil = "<script>alert('x')</script>"
    instance = start("wf", evil, simulate={"two": "fail_once"}, note=evil)
    broker.run()
    instance = fresh(instance)
    client = logged_in(operator)
    client.post(
        reverse("instance_action", args=[instance.pk, "retry_step"]),
        {"reason": evil, "version": instance.version},
    )
    pages = [
        client.get(reverse("instance_detail", args=[instance.pk])),
        client.get("/"),
        client.get(f"/instances/?q={evil}"),
        client.get("/instances/"),
    ]
    for page in pages:
        html = page.content.decode()
        assert "<script>alert" not in html, page.request["PATH_INFO"]
    detail = pages[0].content.decode()
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in detail  # key, reason
    assert "&quot;note&quot;: &quot;&lt;script&gt;" in detail  # input JSON


@pytest.mark.parametrize("url", ["/login/", "/", "/instances/", "/definitions/"])
def test_pages_send_protective_headers(url, viewer):
    client = logged_in(viewer) if url != "/login/" else Client()
    response = client.get(url)
    assert response.status_code == 200
    csp = response["Content-Security-Policy"]
    assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert "script-src 'self'" in csp and "unsafe" not in csp
    assert response["X-Frame-Options"] == "DENY"
    assert response["X-Content-Type-Options"] == "nosniff"
    assert response["Referrer-Policy"] == "same-origin"


def test_pages_carry_no_inline_code(target, operator):
    client = logged_in(operator)
    urls = [
        "/",
        "/instances/",
        reverse("instance_detail", args=[target.pk]),
        "/definitions/",
        "/definitions/wf/",
    ]
    for url in urls:
        html = client.get(url).content.decode()
        scripts = re.findall(r"<script\b[^>]*>", html)
        assert scripts and all("src=" in tag for tag in scripts), url
        assert "<style" not in html and " style=" not in html, url
        assert not re.search(r"\son\w+=", html), url  # no onclick= etc.
        assert "hx-on" not in html and "js:" not in html, url
        # Nothing from another host (a CDN); a random CSRF token may spell "cdn".
        assert not re.search(r'(?:src|href)="(?:https?:)?//', html), url
    assert "/static/django_htmx/htmx-2.min.js" in html


def test_the_admin_keeps_scripts_strict(client):
    csp = client.get("/admin/login/")["Content-Security-Policy"]
    assert "script-src 'self';" in csp and "unsafe-eval" not in csp
    assert "frame-ancestors 'none'" in csp
