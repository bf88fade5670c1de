"""Give the operator role the permissions of timers and steps for a person."""

from __future__ import annotations

from django.db import migrations

from workflows_app.roles import sync_roles_in_migration


def sync(apps, schema_editor):
    sync_roles_in_migration(apps)


class Migration(migrations.Migration):
    dependencies = [("workflows_app", "0023_human_steps_and_timers")]

    operations = [migrations.RunPython(sync, migrations.RunPython.noop)]
