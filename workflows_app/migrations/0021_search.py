"""Search: case-blind business-key prefixes and declared search attributes.

- ``WorkflowDefinition.search_attributes``: the input paths a version
  declares worth finding (name -> dotted path).
- ``WorkflowInstance.search_attributes``: the values found at start. A
  constant database default, so adding the column rewrites no row.
- On PostgreSQL two indexes, built ``CONCURRENTLY`` (no write lock on a live
  table), in raw SQL like migration 0005 because SQLite has neither:
  ``instance_business_key_upper`` on ``upper(business_key) text_pattern_ops``
  serves ``upper(business_key) LIKE 'ORD-5402%'`` whatever the collation;
  ``instance_search_attributes``, GIN with ``jsonb_path_ops``, serves
  ``search_attributes @> '{"customer": "c-349"}'``.

No backfill here: no definition declares attributes before this migration,
so every existing instance's attributes are the empty object it gets.
Attributes declared later reach older instances through
``manage.py reindex_search_attributes`` (batched).
"""

from django.db import migrations, models

INDEXES = {
    "instance_business_key_upper": "(upper(business_key) text_pattern_ops)",
    "instance_search_attributes": "USING gin (search_attributes jsonb_path_ops)",
}


def create(apps, schema_editor):
    if schema_editor.connection.vendor != "postgresql":
        return
    table = apps.get_model("workflows_app", "WorkflowInstance")._meta.db_table
    for name, definition in INDEXES.items():
        schema_editor.execute(
            f"CREATE INDEX CONCURRENTLY IF NOT EXISTS {name} ON {table} {definition}"
        )


def drop(apps, schema_editor):
    if schema_editor.connection.vendor != "postgresql":
        return
    for name in INDEXES:
        schema_editor.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {name}")


class Migration(migrations.Migration):
    # CREATE INDEX CONCURRENTLY cannot run inside a transaction.
    atomic = False

    dependencies = [
        ("workflows_app", "0020_retention"),
    ]

    operations = [
        migrations.AddField(
            model_name="workflowdefinition",
            name="search_attributes",
            field=models.JSONField(
                blank=True,
                default=dict,
                help_text="Input values the instance list can find, as name: "
                'dotted input path, e.g. {"customer": "customer.id", "email": '
                '"contact.email"}; searched as customer:c-349 (exact, any case).',
            ),
        ),
        migrations.AddField(
            model_name="workflowinstance",
            name="search_attributes",
            field=models.JSONField(
                blank=True,
                db_default=models.Value({}, models.JSONField()),
                default=dict,
            ),
        ),
        migrations.RunPython(create, drop, elidable=False),
    ]
