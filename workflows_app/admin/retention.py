"""Admin for the purge audit: read-only, written only by the purge itself."""

from __future__ import annotations

from django.contrib import admin

from workflows_app.admin.runtime import ReadOnlyAdmin
from workflows_app.models import PurgeRun


@admin.register(PurgeRun)
class PurgeRunAdmin(ReadOnlyAdmin):
    list_display = (
        "started_at",
        "actor_label",
        "definition_key",
        "purged",
        "instances",
        "first_finished_at",
        "last_finished_at",
        "cutoff",
        "archive_file",
    )
    list_filter = ("actor_kind", "purged", "definition_key")
    search_fields = ("definition_key", "actor_label")
    search_help_text = "An exact workflow key or who ran it."
    ordering = ("-started_at",)
