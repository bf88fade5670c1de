"""Give the roles the permissions of the operator tools' models."""

from __future__ import annotations

from django.db import migrations

from workflows_app.roles import sync_roles_in_migration


def sync(apps, schema_editor):
    sync_roles_in_migration(apps)


class Migration(migrations.Migration):
    dependencies = [("workflows_app", "0008_operator_tools")]

    operations = [migrations.RunPython(sync, migrations.RunPython.noop)]
