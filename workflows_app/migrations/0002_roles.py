"""Roles as groups: viewer, operator, workflow admin (see workflows_app.roles)."""

from __future__ import annotations

from django.db import migrations

from workflows_app.roles import ROLES, sync_roles_in_migration


def create_roles(apps, schema_editor):
    # Not strict: permissions of models added by later migrations do not exist
    # yet; the migration that adds such a model syncs the roles again.
    sync_roles_in_migration(apps, strict=False)


def drop_roles(apps, schema_editor):
    apps.get_model("auth", "Group").objects.filter(name__in=ROLES).delete()


class Migration(migrations.Migration):
    dependencies = [
        ("workflows_app", "0001_initial"),
        ("auth", "0012_alter_user_first_name_max_length"),
        ("contenttypes", "0002_remove_content_type_name"),
    ]

    operations = [migrations.RunPython(create_roles, drop_roles)]
