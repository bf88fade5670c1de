"""Migration operations that keep a large production table writable."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from django.contrib.postgres.operations import (
    AddIndexConcurrently,
    RemoveIndexConcurrently,
)
from django.db.migrations.operations import AddIndex, RemoveIndex


class _ConcurrentlyOnPostgreSQL:
    """The concurrent operation on PostgreSQL; ``plain`` (the ordinary
    operation) elsewhere. A migration holding one must be ``atomic = False``."""

    plain: Any

    def database_forwards(
        self, app_label: str, schema_editor: Any, from_state: Any, to_state: Any
    ) -> None:
        if schema_editor.connection.vendor == "postgresql":
            super().database_forwards(  # type: ignore[misc]
                app_label, schema_editor, from_state, to_state
            )
        else:
            self.plain.database_forwards(
                self, app_label, schema_editor, from_state, to_state
            )

    def database_backwards(
        self, app_label: str, schema_editor: Any, from_state: Any, to_state: Any
    ) -> None:
        if schema_editor.connection.vendor == "postgresql":
            super().database_backwards(  # type: ignore[misc]
                app_label, schema_editor, from_state, to_state
            )
        else:
            self.plain.database_backwards(
                self, app_label, schema_editor, from_state, to_state
            )


class AddIndexWithoutLocking(_ConcurrentlyOnPostgreSQL, AddIndexConcurrently):
    """CREATE INDEX CONCURRENTLY on PostgreSQL (no write lock on a table of
    millions of rows while it builds); a plain index elsewhere (SQLite)."""

    plain = AddIndex


class RemoveIndexWithoutLocking(_ConcurrentlyOnPostgreSQL, RemoveIndexConcurrently):
    """DROP INDEX CONCURRENTLY on PostgreSQL; a plain drop elsewhere."""

    plain = RemoveIndex


def on_postgresql(sql: str) -> Callable[[Any, Any], None]:
    """A ``RunPython`` function that runs ``sql`` on PostgreSQL only (table
    storage parameters and the like, which SQLite does not have)."""

    def run(apps: Any, schema_editor: Any) -> None:
        if schema_editor.connection.vendor == "postgresql":
            schema_editor.execute(sql)

    return run
