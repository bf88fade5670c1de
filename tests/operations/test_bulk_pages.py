"""The bulk job pages: plan from a filtered list, preview, start, progress."""

from __future__ import annotations

import re

import pytest
from django.test import Client

from tests.operations.conftest import finished, held
from tests.support import user_in
from workflows_app.engine.commands import bulk
from workflows_app.models import BulkJob

pytestmark = pytest.mark.django_db(transaction=True)
QUERY = "definition=orders&state=needs_attention"


def logged_in(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


def test_plan_preview_start_and_watch(broker, wf, operator):
    for n in range(3):
        held(broker, f"ORD-{n}")
    finished(broker, "ORD-done")
    client = logged_in(operator)

    form = client.get(f"/bulk-jobs/new/?{QUERY}&cursor=abc&action=retry")
    assert form.status_code == 200
    assert "Definition: orders; State: needs attention" in form.content.decode()

    response = client.post(
        "/bulk-jobs/new/",
        {
            "query": "definition=orders",
            "action": "retry",
            "reason": "back",
            "rate": "0",
        },
    )
    job = BulkJob.objects.get()
    assert (
        response.status_code == 302 and response["Location"] == f"/bulk-jobs/{job.pk}/"
    )
    preview = client.get(response["Location"]).content.decode()
    text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", preview))
    assert "3 instances will be acted on; 1 will be skipped" in text
    assert "retry charge — 3" in text
    assert "skipped, already completed: nothing to retry — 1" in text
    assert "Start the job (3 instances)" in text
    assert job.query == "definition=orders"

    client.post(f"/bulk-jobs/{job.pk}/confirm/")
    client.post(f"/bulk-jobs/{job.pk}/confirm/")  # resubmitted: no second job
    assert BulkJob.objects.get().status == "queued"
    broker.run()
    assert BulkJob.objects.get().status == "finished"
    progress = client.get(f"/bulk-jobs/{job.pk}/", headers={"HX-Request": "true"})
    assert progress.status_code == 286  # final: the page stops polling
    text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", progress.content.decode()))
    assert "3 of 3 processed (100%)" in text
    assert "done: 3" in text


def test_unfiltered_or_forbidden_plans_are_refused(broker, wf, operator):
    held(broker, "ORD-1")
    response = logged_in(operator).get("/bulk-jobs/new/")
    assert response.status_code == 302 and response["Location"] == "/instances/"
    viewer = logged_in(user_in("viewer", "vera"))
    response = viewer.post(
        "/bulk-jobs/new/",
        {"query": QUERY, "action": "retry", "reason": "x", "rate": "1"},
    )
    assert response.status_code == 403
    # Nor the form, which a viewer could never send.
    assert viewer.get(f"/bulk-jobs/new/?{QUERY}").status_code == 403
    missing_reason = logged_in(operator).post(
        "/bulk-jobs/new/",
        {"query": QUERY, "action": "retry", "reason": "", "rate": "1"},
    )
    assert missing_reason.status_code == 422
    assert not BulkJob.objects.exists()


def test_job_page_escapes_and_viewer_cannot_operate(broker, wf, operator):
    held(broker, "<b>ORD</b>")
    job = bulk.bulk_job_plan(
        wf.instances.all(),
        action="retry",
        reason="<script>alert(1)</script>",
        user=operator,
        description="orders",
    )
    viewer = logged_in(user_in("viewer", "vera"))
    preview = viewer.get(f"/bulk-jobs/{job.pk}/").content.decode()
    assert "&lt;b&gt;ORD&lt;/b&gt;" in preview and "<b>ORD" not in preview
    assert "Start the job" not in preview  # only its planner starts it
    bulk.bulk_job_confirm(job.pk, user=operator)
    page = viewer.get(f"/bulk-jobs/{job.pk}/").content.decode()
    assert "<script>alert(1)</script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert ">Pause<" not in page
    assert viewer.post(f"/bulk-jobs/{job.pk}/pause/").status_code == 403
    assert BulkJob.objects.get().status == "queued"
    assert "bulk-jobs" in viewer.get("/bulk-jobs/").content.decode()
