"""Roles as groups: viewer, operator, workflow admin (see workflows_app.roles)."""

from __future__ import annotations

from django.contrib.auth.management import create_permissions
from django.db import migrations

from workflows_app.roles import ROLES, sync_roles


def create_roles(apps, schema_editor):
    # Permissions are normally created after all migrations; make sure they exist.
    for app_config in apps.get_app_configs():
        app_config.models_module = True
        create_permissions(app_config, apps=apps, verbosity=0)
        app_config.models_module = None
    # Not strict: permissions of models added by later migrations do not exist
    # yet; the migration that adds such a model syncs the roles again.
    sync_roles(
        apps.get_model("auth", "Group"),
        apps.get_model("auth", "Permission"),
        strict=False,
    )


def drop_roles(apps, schema_editor):
    apps.get_model("auth", "Group").objects.filter(name__in=ROLES).delete()


class Migration(migrations.Migration):
    dependencies = [
        ("workflows_app", "0001_initial"),
        ("auth", "0012_alter_user_first_name_max_length"),
        ("contenttypes", "0002_remove_content_type_name"),
    ]

    operations = [migrations.RunPython(create_roles, drop_roles)]
