"""What a worker keeps between the transactions of one task, so that its next
step costs one round trip instead of two.

After a worker's transaction commits the claim of its next attempt, it
knows exactly what the instance's row and its steps' rows hold: what it
read under the lock, and what it wrote. When the activity returns, the
usual way locks the instance and reads all of that again before deciding
anything (one round trip), then writes (another). Instead the worker
decides from what it kept and sends one message::

    BEGIN; <guard>; <the writes, fences checked by the server>; COMMIT; <snapshot>

The guard locks the instance row, as the usual way's first statement does,
then fails with ``saga_fence`` unless the instance row and every step row
are still the versions the worker kept (PostgreSQL's ``xmin``: the
transaction that wrote a row version last; any update makes a new one).
That holds against every writer, including the sweepers' and alerts'
updates that take no instance lock and leave the version alone. Then the
whole message is rolled back and the worker goes the usual way.

The snapshot, read right after the COMMIT, tells the worker its own
transaction's id (the xmin of the attempt row it just inserted) and the
rows' xmins, so that it can keep them for the next step. It keeps them only
if they are exactly what its own transaction left: the instance row and
the steps it wrote with its own transaction's xmin, the others as they were.

The database's clock is not read either: the worker's ``now`` is the
database clock as last read (at the snapshot) plus the worker's monotonic
clock since, behind the database's by about one trip across the network.

An xmin is a 32-bit transaction id, used again only after about four
billion transactions; a worker keeps rows for one activity call. A
decision that needs a statement before the write (a stale outcome's note,
an alert episode to end) and a change whose write cannot be the last
statement (webhook rows to queue) go the usual way, as does a database
other than PostgreSQL.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.db import connection

from workflows_app.engine.locking import lock_statement
from workflows_app.models import Attempt, StepExecution, WorkflowInstance


@dataclass
class Held:
    instance: WorkflowInstance
    steps: list[StepExecution]
    # The row versions the worker knows (xmin as text): the instance's and
    # each step's, by id.
    instance_xmin: str
    xmins: dict[int, str]
    # The database's clock at one moment and the worker's monotonic clock
    # at (about) the same moment.
    read_at: datetime
    read_mono: float

    def now(self) -> datetime:
        return self.read_at + timedelta(seconds=time.monotonic() - self.read_mono)


def _table(model: Any) -> str:
    return str(connection.ops.quote_name(model._meta.db_table))


def _steps_versions(alias: str) -> str:
    """The instance's step rows and their versions as one text, in id order."""
    return (
        f"(SELECT coalesce(string_agg(s.id::text || ':' || s.xmin::text, ',' "
        f"ORDER BY s.id), '') FROM {_table(StepExecution)} s "
        f"WHERE s.instance_id = {alias})"
    )


def _versions_text(xmins: dict[int, str]) -> str:
    return ",".join(f"{pk}:{xmins[pk]}" for pk in sorted(xmins))


def guard(held: Held) -> list[tuple[str, list[Any]]]:
    """The message's first statements: lock the instance row, as the usual
    way does, then check that it and the steps are the versions held (the
    check fails the statement otherwise). Two statements, so that the check
    reads with a snapshot taken once the lock is held: it sees whatever the
    lock's previous holder committed, a step it changed alone too."""
    instance_id = str(held.instance.id)
    table = _table(WorkflowInstance)
    lock = lock_statement(connection)
    assert lock is not None  # PostgreSQL: a held change exists only there
    check = (
        f"SELECT saga_fence((SELECT xmin = %s::xid FROM {table} WHERE id = %s) "
        f"AND {_steps_versions('%s::uuid')} = %s)"
    )
    return [
        (lock, [instance_id]),
        (
            check,
            [held.instance_xmin, instance_id, instance_id, _versions_text(held.xmins)],
        ),
    ]


def snapshot(instance_id: Any, task_token: str) -> tuple[str, list[Any]]:
    """The statement after the COMMIT: this transaction's id (the xmin of the
    attempt it inserted), the instance row's version and xmin, the steps'
    versions and the database's clock."""
    sql = (
        "SELECT a.xmin::text, i.xmin::text, i.version, clock_timestamp(), "
        f"{_steps_versions('i.id')} FROM {_table(WorkflowInstance)} i "
        f"JOIN {_table(Attempt)} a ON a.task_token = %s WHERE i.id = %s"
    )
    return sql, [task_token, str(instance_id)]


def kept(
    instance: WorkflowInstance,
    steps: list[StepExecution],
    known: dict[int, str],
    written: Iterable[int],
    row: Any,
) -> Held | None:
    """What the worker may keep after its transaction, from the snapshot's
    ``row``: only if every row is as its transaction left it (``known``: the
    steps' versions before it; ``written``: the steps it updated)."""
    received = time.monotonic()
    if row is None:
        return None
    mine, instance_xmin, version, clock, versions = row
    if instance_xmin != mine or version != instance.version:
        return None
    now = dict(_parse(versions))
    written = set(written)
    expected = {pk: mine if pk in written else known.get(pk) for pk in known}
    if now != expected or {s.id for s in steps} != set(now):
        return None
    return Held(instance, steps, instance_xmin, now, clock, received)


def _parse(versions: str) -> Iterable[tuple[int, str]]:
    for part in versions.split(",") if versions else ():
        pk, _, xmin = part.partition(":")
        yield int(pk), xmin
