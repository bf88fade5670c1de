from __future__ import annotations

from django.contrib import admin
from django.urls import include, path, re_path

from workflows_app.api.urls import unknown_path
from workflows_app.health import health
from workflows_app.monitoring.views import metrics

urlpatterns = [
    path("admin/", admin.site.urls),
    path("health", health, name="health"),
    path("metrics", metrics, name="metrics"),
    path("api/v1/", include("workflows_app.api.urls")),
    # Any other /api/ path answers in the API's JSON error envelope too.
    re_path(r"^api/(?P<rest>[\s\S]*)\Z", unknown_path),
    path("", include("workflows_app.views.urls")),
]
