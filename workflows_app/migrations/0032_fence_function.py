"""``saga_fence(ok)``: fails the statement when a fenced write matched no row.

A unit of work's last write may carry its transaction's COMMIT in the same
message (engine/rows.py): the compare-and-set of its fenced updates is then
checked by the server, which must fail the statement (so that COMMIT, the
next statement in the message, never runs) instead of returning counts for
the caller to check afterwards. The error's SQLSTATE, SD409, is the engine's
own; it surfaces as ``ConcurrentTransition``. PostgreSQL only.
"""

from django.db import migrations

CREATE = """
CREATE OR REPLACE FUNCTION saga_fence(ok boolean) RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    IF ok IS NOT TRUE THEN
        RAISE EXCEPTION 'a row changed since it was read' USING ERRCODE = 'SD409';
    END IF;
    RETURN true;
END
$$
"""


def create(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(CREATE)


def drop(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute("DROP FUNCTION IF EXISTS saga_fence(boolean)")


class Migration(migrations.Migration):
    dependencies = [("workflows_app", "0031_first_load_covering_indexes")]

    operations = [migrations.RunPython(create, drop, elidable=False)]
