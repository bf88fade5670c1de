"""Covering indexes for the first load after a restart (issue 15).

With nothing in the caches (a restarted PostgreSQL, a rebooted machine),
the pages that visited heap rows one by one took seconds at 1,000,000
instances: a definition page's step map (16,000 instance pages, then
20,000 step lookups: 1-9 s) and the overview's live activity counts (the
last two hours' instances: 26,000 pages, about 3 s). These indexes carry
the columns those queries read, so they are index-only scans of a few
hundred pages. Each replaces the index it extends (built first, the old one
dropped after, both concurrently on PostgreSQL).
"""

from django.db import migrations, models

from workflows_app.db_operations import AddIndexWithoutLocking, RemoveIndexWithoutLocking

ACTIVE_STEP = models.Q(
    ("state__in", ["scheduled", "running", "retrying", "waiting", "failed", "unknown"]),
    ("compensation_state__in", ["pending", "running", "retrying", "failed"]),
    _connector="OR",
)


def accepted_covering(apps, schema_editor):
    """instance_accepted (migration 0005, raw SQL) with the definition key."""
    table = apps.get_model("workflows_app", "WorkflowInstance")._meta.db_table
    if schema_editor.connection.vendor != "postgresql":
        return  # INCLUDE is PostgreSQL's; instance_accepted serves elsewhere
    schema_editor.execute(
        "CREATE INDEX CONCURRENTLY IF NOT EXISTS instance_accepted_key "
        f"ON {table} (accepted_at) INCLUDE (definition_key)"
    )
    schema_editor.execute("DROP INDEX CONCURRENTLY IF EXISTS instance_accepted")


def accepted_plain(apps, schema_editor):
    table = apps.get_model("workflows_app", "WorkflowInstance")._meta.db_table
    if schema_editor.connection.vendor != "postgresql":
        return
    schema_editor.execute(
        "CREATE INDEX CONCURRENTLY IF NOT EXISTS instance_accepted "
        f"ON {table} (accepted_at)"
    )
    schema_editor.execute("DROP INDEX CONCURRENTLY IF EXISTS instance_accepted_key")


class Migration(migrations.Migration):
    # CREATE INDEX CONCURRENTLY cannot run inside a transaction.
    atomic = False

    dependencies = [
        ("workflows_app", "0030_index_diet_for_the_hot_path"),
    ]

    operations = [
        AddIndexWithoutLocking(
            model_name="workflowinstance",
            index=models.Index(
                condition=models.Q(
                    ("state__in", ["accepted", "compensating", "needs_attention", "running"])
                ),
                fields=["definition_key", "state"],
                include=["id", "attention_kind"],
                name="instance_active_covering",
            ),
        ),
        RemoveIndexWithoutLocking(
            model_name="workflowinstance", name="instance_active_def_state"
        ),
        AddIndexWithoutLocking(
            model_name="workflowinstance",
            index=models.Index(
                condition=models.Q(("finished_at__isnull", False)),
                fields=["finished_at"],
                include=["definition_key", "state", "accepted_at"],
                name="instance_finished_covering",
            ),
        ),
        RemoveIndexWithoutLocking(
            model_name="workflowinstance", name="instance_finished_at"
        ),
        AddIndexWithoutLocking(
            model_name="stepexecution",
            index=models.Index(
                condition=ACTIVE_STEP,
                fields=["instance"],
                include=["name", "state", "compensation_state"],
                name="step_exec_active_covering",
            ),
        ),
        RemoveIndexWithoutLocking(model_name="stepexecution", name="step_exec_active"),
        migrations.RunPython(accepted_covering, accepted_plain, elidable=False),
    ]
