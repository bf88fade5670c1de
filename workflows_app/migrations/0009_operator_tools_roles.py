"""Give the roles the permissions of the operator tools' models."""

from __future__ import annotations

from django.db import migrations

from workflows_app.roles import sync_roles_in_migration


def sync(apps, schema_editor):
    # Not strict: permissions of later migrations (restart_instance) do not
    # exist yet; the migration that adds them syncs again.
    sync_roles_in_migration(apps, strict=False)


class Migration(migrations.Migration):
    dependencies = [("workflows_app", "0008_operator_tools")]

    operations = [migrations.RunPython(sync, migrations.RunPython.noop)]
