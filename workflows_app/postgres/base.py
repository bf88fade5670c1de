"""Django's PostgreSQL backend (psycopg2), where a transaction's BEGIN may
travel in the same message as its first statement.

psycopg2 opens a transaction by sending ``BEGIN`` on its own just before the
first statement: one more round trip per transaction, about a tenth of a
millisecond of waiting and a twentieth of the server's CPU for each of the
engine's short units of work. :meth:`DatabaseWrapper.begin_in_next_statement`
lets the caller send ``BEGIN; <statement>`` itself, with the driver in
autocommit so that it does not send its own. Django still runs the
transaction (atomic blocks, savepoints, ``on_commit``); only COMMIT and
ROLLBACK are then sent here, since the driver, in autocommit, would send
neither.
"""

from __future__ import annotations

from typing import Any

from django.db.backends.postgresql import base
from django.db.backends.utils import debug_transaction
from psycopg2.extensions import STATUS_READY


class DatabaseWrapper(base.DatabaseWrapper):
    # The open transaction was begun by the caller's own BEGIN (the driver is
    # in autocommit and will neither commit nor roll it back).
    began_in_statement = False

    def begin_in_next_statement(self) -> bool:
        """Whether the caller's next statement should begin the transaction
        itself (it then sends ``BEGIN; `` before it, in the same message):
        only in an atomic block that has sent nothing yet. Where it says
        yes, the driver is switched to autocommit until the block ends."""
        raw = self.connection
        if (
            raw is None
            or self.began_in_statement
            or not self.in_atomic_block
            or raw.autocommit
            or raw.status != STATUS_READY
        ):
            return False
        raw.autocommit = True
        self.began_in_statement = True
        return True

    def _end(self, command: str) -> None:
        self.began_in_statement = False
        with (
            debug_transaction(self, command),
            self.wrap_database_errors,
            self.connection.cursor() as cursor,
        ):
            cursor.execute(command)

    def _commit(self) -> Any:
        if self.began_in_statement:
            return self._end("COMMIT")
        return super()._commit()  # type: ignore[misc]  # not in the stubs

    def _rollback(self) -> Any:
        if self.began_in_statement:
            return self._end("ROLLBACK")
        return super()._rollback()  # type: ignore[misc]  # not in the stubs

    def connect(self) -> None:
        self.began_in_statement = False
        super().connect()

    def _close(self) -> Any:
        self.began_in_statement = False
        return super()._close()  # type: ignore[misc]  # not in the stubs
