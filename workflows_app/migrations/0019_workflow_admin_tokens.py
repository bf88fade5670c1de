from django.db import migrations

from workflows_app.roles import sync_roles_in_migration


def sync_roles(apps, schema_editor):
    # The workflow admin role gets the API token permissions (README: tokens
    # are created in the admin). Not strict: permissions of later migrations
    # (operate_timer) do not exist yet.
    sync_roles_in_migration(apps, strict=False)


class Migration(migrations.Migration):
    dependencies = [
        ("workflows_app", "0018_recompute_error_signatures"),
    ]

    operations = [
        migrations.RunPython(sync_roles, migrations.RunPython.noop),
    ]
