"""Indexes for the support dashboard at millions of instances.

Raw SQL, not ``AddIndex``: PostgreSQL builds them ``CONCURRENTLY`` (no write
lock on a live table) and with ``INCLUDE`` columns for index-only scans, which
``models.Index`` cannot express portably. The model state is unchanged, so
``makemigrations`` sees nothing to do.

- ``instance_accepted``: the list's "accepted from / until" filter and its
  "newest / oldest accepted first" sort (keyset pages on accepted_at).
- ``instance_stuck_progress``: the stuck list sorted by last progress, and the
  stuck counts per definition on the overview, from the index alone.
"""

from django.db import migrations

INDEXES = [
    ("instance_accepted", "(accepted_at)", "", ""),
    ("instance_stuck_progress", "(last_progress_at)", "(definition_key)", "stuck"),
]


def create(apps, schema_editor):
    table = apps.get_model("workflows_app", "WorkflowInstance")._meta.db_table
    postgres = schema_editor.connection.vendor == "postgresql"
    for name, columns, include, where in INDEXES:
        sql = "CREATE INDEX {}IF NOT EXISTS {} ON {} {}".format(
            "CONCURRENTLY " if postgres else "", name, table, columns
        )
        if include and postgres:
            sql += f" INCLUDE {include}"
        if where:
            sql += f" WHERE {where}"
        schema_editor.execute(sql)


def drop(apps, schema_editor):
    postgres = schema_editor.connection.vendor == "postgresql"
    for name, *_ in INDEXES:
        schema_editor.execute(
            "DROP INDEX {}IF EXISTS {}".format("CONCURRENTLY " if postgres else "", name)
        )


class Migration(migrations.Migration):
    # CREATE INDEX CONCURRENTLY cannot run inside a transaction.
    atomic = False

    dependencies = [
        ("workflows_app", "0004_alerts"),
    ]

    operations = [migrations.RunPython(create, drop, elidable=False)]
