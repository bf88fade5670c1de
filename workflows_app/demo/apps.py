from __future__ import annotations

from django.apps import AppConfig


class DemoConfig(AppConfig):
    name = "workflows_app.demo"
    label = "saga_demo"
    verbose_name = "Saga Desk demo"
    default_auto_field = "django.db.models.BigAutoField"
    # Read by the activity registry (workflows_app.activities) of an installed app.
    activity_modules = ("workflows_app.demo.activities",)
