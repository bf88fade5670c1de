# Every step of every workflow writes its instance, one or two steps, an
# attempt and two or three history rows; each index of those tables is one
# more entry to write. The foreign keys' own indexes are dropped where a
# composite index starts with the same column (history_instance_seq,
# step_exec_position, attempt_step_direction_number), and the user
# columns, empty on every worker row, are indexed only where set.
#
# And the instance table leaves 15 % of each page free, so that an update
# that changes no indexed column (a quick step: see
# SAGA_PROGRESS_RESOLUTION) stays on its page without new index entries
# (a HOT update). It applies to pages written from now on.

import django.db.models.deletion
from django.conf import settings
from django.db import migrations, models

from workflows_app.db_operations import AddIndexWithoutLocking, on_postgresql

# (table, column, the index Django made for the foreign key)
FOREIGN_KEY_INDEXES = [
    ("workflows_app_attempt", "step_id", "workflows_app_attempt_step_id_2f32c36f"),
    (
        "workflows_app_stepexecution",
        "claimed_by_id",
        "workflows_app_stepexecution_claimed_by_id_06783f40",
    ),
    (
        "workflows_app_stepexecution",
        "instance_id",
        "workflows_app_stepexecution_instance_id_b50173e1",
    ),
    (
        "workflows_app_transitionlog",
        "instance_id",
        "workflows_app_transitionlog_instance_id_831a3259",
    ),
    (
        "workflows_app_transitionlog",
        "user_id",
        "workflows_app_transitionlog_user_id_5775da7d",
    ),
]
FILLFACTOR = "ALTER TABLE workflows_app_workflowinstance SET (fillfactor = 85)"
FILLFACTOR_RESET = "ALTER TABLE workflows_app_workflowinstance RESET (fillfactor)"


def _concurrently(schema_editor):
    return " CONCURRENTLY" if schema_editor.connection.vendor == "postgresql" else ""


def drop_foreign_key_indexes(apps, schema_editor):
    for _, _, name in FOREIGN_KEY_INDEXES:
        schema_editor.execute(
            f"DROP INDEX{_concurrently(schema_editor)} IF EXISTS {name}"
        )


def create_foreign_key_indexes(apps, schema_editor):
    for table, column, name in FOREIGN_KEY_INDEXES:
        schema_editor.execute(
            f"CREATE INDEX{_concurrently(schema_editor)} IF NOT EXISTS {name} "
            f"ON {table} ({column})"
        )


class Migration(migrations.Migration):
    # Built and dropped concurrently on PostgreSQL: not in a transaction. The
    # partial indexes are built before the ones they replace are dropped.
    atomic = False

    dependencies = [
        ('workflows_app', '0029_overview_active_counts_index'),
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
    ]

    operations = [
        AddIndexWithoutLocking(
            model_name='stepexecution',
            index=models.Index(condition=models.Q(('claimed_by__isnull', False)), fields=['claimed_by'], name='step_exec_claimed_by'),
        ),
        AddIndexWithoutLocking(
            model_name='transitionlog',
            index=models.Index(condition=models.Q(('user__isnull', False)), fields=['user'], name='history_user'),
        ),
        migrations.SeparateDatabaseAndState(
            state_operations=[
                migrations.AlterField(
                    model_name='attempt',
                    name='step',
                    field=models.ForeignKey(db_index=False, on_delete=django.db.models.deletion.CASCADE, related_name='attempts', to='workflows_app.stepexecution'),
                ),
                migrations.AlterField(
                    model_name='stepexecution',
                    name='claimed_by',
                    field=models.ForeignKey(blank=True, db_index=False, null=True, on_delete=django.db.models.deletion.SET_NULL, related_name='claimed_steps', to=settings.AUTH_USER_MODEL),
                ),
                migrations.AlterField(
                    model_name='stepexecution',
                    name='instance',
                    field=models.ForeignKey(db_index=False, on_delete=django.db.models.deletion.CASCADE, related_name='steps', to='workflows_app.workflowinstance'),
                ),
                migrations.AlterField(
                    model_name='transitionlog',
                    name='instance',
                    field=models.ForeignKey(db_index=False, on_delete=django.db.models.deletion.CASCADE, related_name='history', to='workflows_app.workflowinstance'),
                ),
                migrations.AlterField(
                    model_name='transitionlog',
                    name='user',
                    field=models.ForeignKey(blank=True, db_index=False, null=True, on_delete=django.db.models.deletion.PROTECT, to=settings.AUTH_USER_MODEL),
                ),
            ],
            database_operations=[
                migrations.RunPython(
                    drop_foreign_key_indexes, create_foreign_key_indexes
                ),
            ],
        ),
        migrations.RunPython(
            on_postgresql(FILLFACTOR), on_postgresql(FILLFACTOR_RESET)
        ),
    ]
