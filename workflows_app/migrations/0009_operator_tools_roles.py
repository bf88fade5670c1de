"""Give the roles the permissions of the operator tools' models."""

from __future__ import annotations

from django.contrib.auth.management import create_permissions
from django.db import migrations

from workflows_app.roles import sync_roles


def sync(apps, schema_editor):
    for app_config in apps.get_app_configs():
        app_config.models_module = True
        create_permissions(app_config, apps=apps, verbosity=0)
        app_config.models_module = None
    sync_roles(apps.get_model("auth", "Group"), apps.get_model("auth", "Permission"))


class Migration(migrations.Migration):
    dependencies = [("workflows_app", "0008_operator_tools")]

    operations = [migrations.RunPython(sync, migrations.RunPython.noop)]
