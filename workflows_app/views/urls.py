"""Routes of the support dashboard (server-rendered pages with HTMX)."""

from __future__ import annotations

from django.contrib.auth import views as auth_views
from django.urls import path

from workflows_app.views import (
    actions,
    alerts,
    bulk_jobs,
    dashboard,
    definitions,
    failures,
    inbox,
    instances,
    saved_views,
    webhooks,
)

urlpatterns = [
    path("", dashboard.overview, name="overview"),
    path(
        "login/",
        auth_views.LoginView.as_view(redirect_authenticated_user=True),
        name="login",
    ),
    path("logout/", auth_views.LogoutView.as_view(next_page="login"), name="logout"),
    path("instances/", instances.instance_list, name="instance_list"),
    path("instances/bulk/", actions.instance_bulk, name="instance_bulk"),
    path("instances/<uuid:pk>/", instances.instance_detail, name="instance_detail"),
    path(
        "instances/<uuid:pk>/actions/<slug:action>/",
        actions.instance_action,
        name="instance_action",
    ),
    path(
        "instances/<uuid:pk>/repair/", actions.instance_repair, name="instance_repair"
    ),
    path(
        "approvals/<int:approval_id>/<slug:decision>/",
        actions.approval_decide,
        name="approval_decide",
    ),
    path(
        "alerts/<int:alert_id>/acknowledge/",
        actions.alert_acknowledge,
        name="alert_acknowledge",
    ),
    path("alerts/", alerts.alert_list, name="alert_list"),
    path("webhooks/", webhooks.webhook_list, name="webhook_list"),
    path("inbox/", inbox.inbox, name="inbox"),
    path(
        "inbox/<int:step_id>/complete/",
        inbox.inbox_complete,
        name="inbox_complete",
    ),
    path(
        "inbox/<int:step_id>/<slug:op>/",
        inbox.inbox_claim,
        name="inbox_claim",
    ),
    path("views/", saved_views.saved_view_create, name="saved_view_create"),
    path(
        "views/<int:pk>/delete/",
        saved_views.saved_view_delete,
        name="saved_view_delete",
    ),
    path("failures/", failures.failure_group_list, name="failure_group_list"),
    path("failures/mark/", failures.failure_group_mark, name="failure_group_mark"),
    path("bulk-jobs/", bulk_jobs.bulk_job_list, name="bulk_job_list"),
    path("bulk-jobs/new/", bulk_jobs.bulk_job_new, name="bulk_job_new"),
    path("bulk-jobs/<int:pk>/", bulk_jobs.bulk_job_detail, name="bulk_job_detail"),
    path(
        "bulk-jobs/<int:pk>/<slug:operation>/",
        bulk_jobs.bulk_job_operate,
        name="bulk_job_operate",
    ),
    path("definitions/", definitions.definition_list, name="definition_list"),
    path(
        "definitions/<str:key>/",
        definitions.definition_detail,
        name="definition_detail",
    ),
]
