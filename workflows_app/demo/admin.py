"""The demo participants' ledger in the admin, read-only like the runtime rows."""

from __future__ import annotations

from django.contrib import admin

from workflows_app.admin.runtime import ReadOnlyAdmin
from workflows_app.demo.models import ParticipantEffect


@admin.register(ParticipantEffect)
class ParticipantEffectAdmin(ReadOnlyAdmin):
    list_display = (
        "idempotency_key",
        "step_name",
        "direction",
        "applied",
        "calls",
        "late_refused",
        "first_applied_at",
    )
    list_filter = ("direction", "applied")
    search_fields = ("idempotency_key", "step_name")
    exact_search_uuid_fields = ("instance_id",)
    search_help_text = "An exact idempotency key, step name or instance id."
