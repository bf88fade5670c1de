from __future__ import annotations

from django.apps import AppConfig


class WorkflowsAppConfig(AppConfig):
    name = "workflows_app"
    verbose_name = "Saga Desk"
    default_auto_field = "django.db.models.BigAutoField"
