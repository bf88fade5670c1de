"""Retention: finished instances older than their definition's retention
period are archived (optionally) and purged, one short transaction per batch.

A batch, for one definition version, oldest finished first:

1. picks up to ``size`` finished instances due, *without* locks, and builds
   their archive lines (one per instance) and the compressed gzip member,
   with a fingerprint per line (an MD5 of the line without its
   ``archived_at``): reading, encoding and compressing hold no lock at all;
2. opens the transaction and locks the candidates still due,
   ``FOR UPDATE SKIP LOCKED``, computing their fingerprints again under the
   lock: an instance an operator or a worker holds right now is left for
   later, one that changed since step 1 (a late note in its timeline, an
   alert acknowledged) is left too and picked up again with a fresh line,
   and an operator action that comes after the lock waits for the batch and
   then finds no instance (a "no such instance" answer, not an error);
3. appends the member of the instances that stayed unchanged to the archive
   file, flushed and fsynced (the prebuilt one when none changed);
4. deletes their rows, children first, and updates the run's audit row;
5. commits.

A crash before the commit rolls the delete back, so the instances stay and
the next run archives them again: an instance may be in two archive files,
never in none. Only steps 2-5 hold row locks. Batches shrink while that
transaction takes longer than ``SAGA_RETENTION_BATCH_SECONDS``, which bounds
how long any row lock is held; ``lock_timeout`` bounds how long a batch waits
for someone else's.

What refers to an instance is found from the models, so a new table is
covered without changes here: rows of tables with a cascading foreign key
(steps, attempts, HTTP exchanges, the timeline, alerts, approval requests,
bulk-job items) are deleted with it and archived in its line; a ``SET_NULL``
key is cleared; a protecting key stops the purge with an error. The
inbound-message dedupe rows carry the instance id without a key: they are
archived and deleted too. The demo participants' ledger is theirs, not the
engine's, and is left alone.
"""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import io
import json
import logging
import os
import secrets
import socket
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.exceptions import ImproperlyConfigured
from django.core.serializers.json import DjangoJSONEncoder
from django.db import connection, models, transaction
from django.db.models import F, Q
from django.db.models.functions import Now

from workflows_app.engine.locking import db_now
from workflows_app.models import (
    TERMINAL_STATES,
    Attempt,
    AttemptExchange,
    InboundMessage,
    PurgeRun,
    StepExecution,
    TransitionLog,
    WorkflowDefinition,
    WorkflowInstance,
)

log = logging.getLogger(__name__)
ARCHIVE_FORMAT = "saga-desk-archive/1"
MIN_BATCH = 10
START_BATCH = 50
# Names of the lists in an archive line for the instance's other rows.
RELATED_NAMES = {
    "workflows_app.alert": "alerts",
    "workflows_app.approvalrequest": "approval_requests",
    "workflows_app.bulkjobitem": "bulk_job_items",
}


@dataclass
class Target:
    """Finished instances of one workflow (all its versions) before a cutoff."""

    key: str
    cutoff: datetime
    definition_ids: list[int]
    archive: bool


@dataclass
class Outcome:
    key: str
    instances: int = 0
    batches: int = 0
    # Seconds from BEGIN to COMMIT of each batch (lock, re-verify, write and
    # fsync, delete): the longest any row lock taken by the purge was held.
    # The archive lines are built before, without locks.
    batch_seconds: list[float] = field(default_factory=list)
    archive_file: str = ""
    run_id: int | None = None
    # Instances left because they changed between their archive line's build
    # and the lock (picked again with a fresh line).
    changed: int = 0
    # False when the time budget ran out with instances still due.
    finished: bool = True


# -- what is due -------------------------------------------------------------


def due(definition_id: int, cutoff: datetime) -> models.QuerySet[WorkflowInstance]:
    return WorkflowInstance.objects.filter(
        definition_id=definition_id,
        finished_at__lt=cutoff,
        state__in=TERMINAL_STATES,
    )


def sweeper_targets(now: datetime) -> list[Target]:
    """Per workflow key with a retention period: what the sweeper purges."""
    grouped: dict[tuple[str, timedelta], Target] = {}
    rows = WorkflowDefinition.objects.filter(retention__isnull=False).order_by(
        "key", "version"
    )
    for row in rows.values("id", "key", "retention", "archive_on_purge"):
        retention = row["retention"]
        assert retention is not None  # filtered above
        group = (row["key"], retention)
        target = grouped.setdefault(
            group, Target(row["key"], now - retention, [], False)
        )
        target.definition_ids.append(row["id"])
        # Any version asking for an archive gets one (the admin keeps them equal).
        target.archive |= row["archive_on_purge"]
    return list(grouped.values())


def command_targets(before: datetime, key: str | None = None) -> list[Target]:
    """Per workflow key (or the one given): everything finished before ``before``."""
    rows = WorkflowDefinition.objects.order_by("key", "version")
    if key is not None:
        rows = rows.filter(key=key)
    targets: dict[str, Target] = {}
    for row in rows.values("id", "key", "archive_on_purge"):
        target = targets.setdefault(row["key"], Target(row["key"], before, [], False))
        target.definition_ids.append(row["id"])
        target.archive |= row["archive_on_purge"]
    return list(targets.values())


@dataclass
class DueCount:
    instances: int
    first_finished_at: datetime | None
    last_finished_at: datetime | None


def count_due(target: Target) -> DueCount:
    figures = WorkflowInstance.objects.filter(
        definition_id__in=target.definition_ids,
        finished_at__lt=target.cutoff,
        state__in=TERMINAL_STATES,
    ).aggregate(
        n=models.Count("id"),
        first=models.Min("finished_at"),
        last=models.Max("finished_at"),
    )
    return DueCount(figures["n"], figures["first"], figures["last"])


# -- the archive -------------------------------------------------------------

_append_lock = threading.Lock()
_process_tokens: dict[int, str] = {}


def archive_path(directory: str | Path, key: str, *, per_run: bool) -> Path:
    """A file of this process (per day) or of this run: never two writers
    on one file, so a crash can only cut the tail of its own file."""
    now = datetime.now(UTC)
    host = socket.gethostname().split(".")[0] or "host"
    if per_run:
        stamp = f"{now:%Y%m%dT%H%M%S}"
        token = secrets.token_hex(3)
    else:
        stamp = f"{now:%Y%m%d}"
        # Per process, not per import: prefork children must not share a file.
        token = _process_tokens.setdefault(os.getpid(), secrets.token_hex(3))
    return Path(directory) / key / f"{key}-{stamp}-{host}-{token}.jsonl.gz"


def compress(lines: bytes) -> bytes:
    """``lines`` as one complete gzip member (built before any lock is taken)."""
    out = io.BytesIO()
    with gzip.GzipFile(
        filename="", mode="wb", fileobj=out, mtime=0, compresslevel=6
    ) as gz:
        gz.write(lines)
    return out.getvalue()


def append_member(path: Path, member: bytes) -> None:
    """Append ``member`` (one complete gzip member, see ``compress``) and
    fsync it.

    A multi-member gzip file reads as one stream (``gzip.open``, ``zcat``).
    A failed write is cut off again, so the file never ends in half a member
    unless the process itself dies mid-write."""
    path.parent.mkdir(parents=True, exist_ok=True)
    created = not path.exists()
    with _append_lock, open(path, "ab") as raw:
        fcntl.flock(raw.fileno(), fcntl.LOCK_EX)
        start = raw.seek(0, os.SEEK_END)
        try:
            raw.write(member)
            raw.flush()
            os.fsync(raw.fileno())
        except BaseException:
            raw.truncate(start)
            raise
    if created:
        # The new directory entry must survive a crash too.
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@dataclass
class Built:
    """Archive lines of some instances, keyed by ``str(id)``: the line (with
    its newline) and its fingerprint, an MD5 of the line's content without
    ``archived_at``. Equal fingerprints mean nothing archived has changed."""

    lines: dict[str, bytes]
    fingerprints: dict[str, str]

    def member(self, ids: Iterable[str]) -> bytes:
        return compress(b"".join(self.lines[i] for i in ids if i in self.lines))


def _values(qs: models.QuerySet[Any]) -> list[dict[str, Any]]:
    return list(qs.values())


def build(ids: list[Any]) -> Built:
    """One JSON line per instance: the row, its steps with their attempts and
    HTTP exchanges, the full timeline, the inbound messages and every other
    row that is deleted with it. On PostgreSQL the lines are built by the
    database (several times faster than decoding and encoding in Python)."""
    if connection.vendor == "postgresql":
        return _build_sql(ids)
    return _build_python(ids)


def fingerprints_locked(
    ids: list[Any], definition_id: int, cutoff: datetime
) -> dict[str, str]:
    """Lock those of ``ids`` still due that nobody else holds (``SKIP
    LOCKED``; SQLite locks the whole database) and return their fingerprints
    as they are now, under the lock. Call inside the batch's transaction."""
    if connection.vendor == "postgresql":
        sql = (
            f"SELECT i.id::text, md5(({_line_sql()})::text) {_from_sql()} "
            f"WHERE i.id = ANY(%s::uuid[]) AND i.definition_id = %s "
            "AND i.finished_at < %s AND i.state = ANY(%s) "
            "FOR UPDATE OF i SKIP LOCKED"
        )
        with connection.cursor() as cursor:
            cursor.execute(
                sql,
                [
                    ARCHIVE_FORMAT,
                    [str(i) for i in ids],
                    definition_id,
                    cutoff,
                    sorted(TERMINAL_STATES),
                ],
            )
            return dict(cursor.fetchall())
    still_due = list(
        due(definition_id, cutoff).filter(pk__in=ids).values_list("pk", flat=True)
    )
    return _build_python(still_due).fingerprints


def locked_ids(ids: list[Any], definition_id: int, cutoff: datetime) -> set[str]:
    """Lock those of ``ids`` still due that nobody else holds; no archive."""
    qs = due(definition_id, cutoff).filter(pk__in=ids)
    if connection.features.has_select_for_update_skip_locked:
        qs = qs.select_for_update(skip_locked=True, of=("self",))
    return {str(pk) for pk in qs.values_list("pk", flat=True)}


def _table(model: Any) -> str:
    return connection.ops.quote_name(model._meta.db_table)


def _rows_json(model: Any, where: str, order: str, extra: str = "") -> str:
    """A JSON array of ``model``'s rows matching ``where`` (alias x)."""
    row = "to_jsonb(x)" + (f" || {extra}" if extra else "")
    return (
        f"COALESCE((SELECT jsonb_agg({row} ORDER BY {order}) "
        f"FROM {_table(model)} x WHERE {where}), '[]'::jsonb)"
    )


def _line_sql() -> str:
    """The archive line of instance ``i`` (definition ``d``) as a jsonb
    expression, without ``archived_at``; its one parameter is the format."""
    exchanges = _rows_json(
        AttemptExchange, "x.attempt_id = a.task_token", "x.hop, x.id"
    )
    attempts = (
        f"COALESCE((SELECT jsonb_agg(to_jsonb(a) || jsonb_build_object("
        f"'exchanges', {exchanges}) ORDER BY a.started_at, a.id) "
        f"FROM {_table(Attempt)} a WHERE a.step_id = s.id), '[]'::jsonb)"
    )
    steps = (
        f"COALESCE((SELECT jsonb_agg(to_jsonb(s) || jsonb_build_object("
        f"'attempts', {attempts}) ORDER BY s.position) "
        f"FROM {_table(StepExecution)} s WHERE s.instance_id = i.id), '[]'::jsonb)"
    )
    username = (
        "jsonb_build_object('username', (SELECT username FROM "
        f"{_table(get_user_model())} u "
        "WHERE u.id = x.user_id))"
    )
    parts = [
        "'format', %s",
        "'definition', jsonb_build_object('key', i.definition_key, "
        "'version', d.version)",
        "'instance', to_jsonb(i)",
        f"'steps', {steps}",
        "'timeline', "
        + _rows_json(TransitionLog, "x.instance_id = i.id", "x.id", username),
        "'inbound_messages', "
        + _rows_json(InboundMessage, "x.instance_id = i.id", "x.id"),
    ]
    qn = connection.ops.quote_name
    for rel in _direct_relations():
        model = rel.related_model
        name = RELATED_NAMES.get(model._meta.label_lower, model._meta.label_lower)
        where = f"x.{qn(rel.field.column)} = i.id"
        parts.append(f"'{name}', " + _rows_json(model, where, "x.id"))
    return f"jsonb_build_object({', '.join(parts)})"


def _from_sql() -> str:
    """``FROM`` of the archive queries: instance ``i``, its definition ``d``."""
    return (
        f"FROM {_table(WorkflowInstance)} i "
        f"JOIN {_table(WorkflowDefinition)} d ON d.id = i.definition_id"
    )


def _build_sql(ids: list[Any]) -> Built:
    # OFFSET 0 keeps the subquery: the line is built once, not per use.
    sql = (
        "SELECT id::text, (line || jsonb_build_object('archived_at', now()))::text, "
        f"md5(line::text) FROM (SELECT i.id, {_line_sql()} AS line {_from_sql()} "
        # No ORDER BY: sorting the built lines would spill to disk.
        "WHERE i.id = ANY(%s::uuid[]) OFFSET 0) AS built"
    )
    lines: dict[str, bytes] = {}
    prints: dict[str, str] = {}
    with connection.cursor() as cursor:
        cursor.execute(sql, [ARCHIVE_FORMAT, [str(i) for i in ids]])
        for pk, line, fingerprint in cursor.fetchall():
            lines[pk] = line.encode() + b"\n"
            prints[pk] = fingerprint
    return Built(lines, prints)


def _build_python(ids: list[Any]) -> Built:
    archived_at = datetime.now(UTC).isoformat()
    instances = _values(
        WorkflowInstance.objects.filter(pk__in=ids)
        .annotate(definition_version=F("definition__version"))
        .order_by("finished_at", "id")
    )
    steps: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    by_step: dict[int, dict[str, Any]] = {}
    for step in _values(
        StepExecution.objects.filter(instance_id__in=ids).order_by(
            "instance_id", "position"
        )
    ):
        step["attempts"] = []
        steps[step["instance_id"]].append(step)
        by_step[step["id"]] = step
    by_token: dict[Any, dict[str, Any]] = {}
    for attempt in _values(
        Attempt.objects.filter(step__instance_id__in=ids).order_by(
            "step_id", "started_at", "id"
        )
    ):
        attempt["exchanges"] = []
        by_step[attempt["step_id"]]["attempts"].append(attempt)
        by_token[attempt["task_token"]] = attempt
    for exchange in _values(
        AttemptExchange.objects.filter(attempt__step__instance_id__in=ids).order_by(
            "attempt_id", "hop", "id"
        )
    ):
        by_token[exchange["attempt_id"]]["exchanges"].append(exchange)
    timeline: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    for row in _values(
        TransitionLog.objects.filter(instance_id__in=ids)
        .annotate(username=F("user__username"))
        .order_by("id")
    ):
        timeline[row["instance_id"]].append(row)
    inbound: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    for row in _values(InboundMessage.objects.filter(instance_id__in=ids)):
        inbound[row["instance_id"]].append(row)
    others: dict[str, dict[Any, list[dict[str, Any]]]] = {}
    for rel in _direct_relations():
        model = rel.related_model
        name = RELATED_NAMES.get(model._meta.label_lower, model._meta.label_lower)
        rows: dict[Any, list[dict[str, Any]]] = defaultdict(list)
        for row in _values(
            model._default_manager.filter(**{f"{rel.field.name}__in": ids}).order_by(
                "pk"
            )
        ):
            rows[row[rel.field.attname]].append(row)
        others[name] = rows
    lines: dict[str, bytes] = {}
    prints: dict[str, str] = {}
    for instance in instances:
        pk = instance["id"]
        line = {
            "format": ARCHIVE_FORMAT,
            "definition": {
                "key": instance["definition_key"],
                "version": instance.pop("definition_version"),
            },
            "instance": instance,
            "steps": steps.get(pk, []),
            "timeline": timeline.get(pk, []),
            "inbound_messages": inbound.get(pk, []),
            **{name: rows.get(pk, []) for name, rows in others.items()},
        }
        content = json.dumps(line, cls=DjangoJSONEncoder, sort_keys=True)
        prints[str(pk)] = hashlib.md5(content.encode()).hexdigest()
        line["archived_at"] = archived_at
        lines[str(pk)] = (
            json.dumps(line, cls=DjangoJSONEncoder, separators=(",", ":")) + "\n"
        ).encode()
    return Built(lines, prints)


# -- the delete ----------------------------------------------------------------

ARCHIVED_ELSEWHERE = {StepExecution, TransitionLog}


def _relations(model: Any) -> list[Any]:
    """The keys pointing at ``model``, hidden ones (related_name "+") too."""
    return [
        rel
        for rel in model._meta.get_fields(include_hidden=True)
        if rel.auto_created and not rel.concrete and (rel.one_to_many or rel.one_to_one)
    ]


def _direct_relations() -> list[Any]:
    """Tables with a key to the instance, besides steps and timeline."""
    return [
        rel
        for rel in _relations(WorkflowInstance)
        if rel.related_model not in ARCHIVED_ELSEWHERE
        and rel.on_delete is models.CASCADE
    ]


def _statements(model: Any, where: str) -> list[str]:
    """Deletes (and key clearings) of everything below ``model``'s rows that
    match ``where``, children first; ``{ids}`` stands for the batch's ids."""
    qn = connection.ops.quote_name
    out: list[str] = []
    # Rows keyed to the instance itself first (the timeline by instance),
    # so the same rows reached through the steps are already gone.
    relations = sorted(
        _relations(model), key=lambda rel: bool(_relations(rel.related_model))
    )
    for rel in relations:
        child = rel.related_model
        column = qn(rel.field.column)
        target = rel.field.target_field.column
        if model is WorkflowInstance:
            child_where = f"{column} {{ids}}"
        else:
            child_where = (
                f"{column} IN (SELECT {qn(target)} FROM "
                f"{qn(model._meta.db_table)} WHERE {where})"
            )
        table = qn(child._meta.db_table)
        if rel.on_delete is models.CASCADE:
            out += _statements(child, child_where)
            out.append(f"DELETE FROM {table} WHERE {child_where}")
        elif rel.on_delete is models.SET_NULL:
            out.append(f"UPDATE {table} SET {column} = NULL WHERE {child_where}")
        elif rel.on_delete is not models.DO_NOTHING:
            raise ImproperlyConfigured(
                f"{child._meta.label}.{rel.field.name} protects instances: "
                "decide how retention treats it before purging"
            )
    return out


def delete_statements() -> list[str]:
    qn = connection.ops.quote_name
    return [
        *_statements(WorkflowInstance, ""),
        f"DELETE FROM {qn(InboundMessage._meta.db_table)} "
        f"WHERE {qn('instance_id')} {{ids}}",
        f"DELETE FROM {qn(WorkflowInstance._meta.db_table)} WHERE id {{ids}}",
    ]


def _delete(ids: list[Any]) -> None:
    """Each statement names the batch's instance ids once ({ids})."""
    pk = WorkflowInstance._meta.pk
    values = [pk.get_db_prep_value(value, connection) for value in ids]
    with connection.cursor() as cursor:
        for sql in delete_statements():
            if connection.vendor == "postgresql":
                cursor.execute(sql.format(ids="= ANY(%s)"), [values])
            else:
                marks = ", ".join(["%s"] * len(values))
                cursor.execute(sql.format(ids=f"IN ({marks})"), values)


# -- a run -----------------------------------------------------------------------


def _record(
    run: PurgeRun | None,
    rows: list[dict[str, Any]],
    *,
    target: Target,
    actor: tuple[str, str],
    purged: bool,
    archive_file: str,
    started_at: datetime,
) -> PurgeRun:
    now = Now()
    first = min(row["finished_at"] for row in rows)
    last = max(row["finished_at"] for row in rows)
    if run is None:
        return PurgeRun.objects.create(
            actor_kind=actor[0],
            actor_label=actor[1][:200],
            definition_key=target.key,
            cutoff=target.cutoff,
            purged=purged,
            instances=len(rows),
            first_finished_at=first,
            last_finished_at=last,
            archive_file=archive_file,
            started_at=started_at,
            updated_at=now,
        )
    run.instances += len(rows)
    run.first_finished_at = min(run.first_finished_at or first, first)
    run.last_finished_at = max(run.last_finished_at or last, last)
    run.updated_at = now
    run.save(
        update_fields=[
            "instances",
            "first_finished_at",
            "last_finished_at",
            "updated_at",
        ]
    )
    return run


def run(
    target: Target,
    *,
    actor: tuple[str, str],
    archive_file: Path | None,
    purge: bool = True,
    deadline: float | None = None,
    batch: int | None = None,
    on_batch: Callable[[int, float], None] | None = None,
    limit: int | None = None,
) -> Outcome:
    """Archive (when ``archive_file`` is given) and purge (when ``purge``)
    ``target``'s due instances, a batch at a time, until none is left, the
    monotonic ``deadline`` passes or ``limit`` instances are done.
    ``actor``: (PurgeRun.Actor, label). ``on_batch`` gets each batch's count
    and the seconds its transaction (the only part holding row locks) took."""
    if archive_file is None and not purge:
        raise ValueError("nothing to do: no archive and no purge")
    configured = batch or settings.SAGA_RETENTION_BATCH
    # Start small (cold caches, an unknown machine) and grow while fast.
    size = min(configured, START_BATCH)
    slow = settings.SAGA_RETENTION_BATCH_SECONDS
    outcome = Outcome(target.key, archive_file=str(archive_file or ""))
    record: PurgeRun | None = None
    started_at = db_now()
    for definition_id in target.definition_ids:
        after: tuple[datetime, Any] | None = None
        # Instances that changed between their line's build and the lock are
        # picked again once in this run, with a fresh line.
        retried: set[str] = set()
        while True:
            if deadline is not None and time.monotonic() > deadline:
                outcome.finished = False
                return outcome
            if limit is not None and outcome.instances >= limit:
                outcome.finished = False
                return outcome
            take = size if limit is None else min(size, limit - outcome.instances)
            # 1. Candidates and their archive member, without any lock.
            qs = due(definition_id, target.cutoff)
            if after is not None:
                # Keyset: rows skipped as locked are not picked again.
                qs = qs.filter(finished_at__gte=after[0]).filter(
                    Q(finished_at__gt=after[0]) | Q(id__gt=after[1])
                )
            candidates: list[dict[str, Any]] = [
                dict(row)
                for row in qs.order_by("finished_at", "id").values("id", "finished_at")[
                    :take
                ]
            ]
            if not candidates:
                break
            ids = [row["id"] for row in candidates]
            built = build(ids) if archive_file is not None else None
            member = built.member(str(i) for i in ids) if built else b""
            # 2-5. Lock, re-verify, write, delete: the only locking part.
            began = time.perf_counter()
            with transaction.atomic():
                if connection.vendor == "postgresql":
                    with connection.cursor() as cursor:
                        # Never queue for long behind someone else's lock;
                        # no JIT: the id-array estimates make it look worth
                        # it, and at a few hundred rows it is not.
                        cursor.execute(
                            "SET LOCAL lock_timeout = '1s'; SET LOCAL jit = off"
                        )
                changed: list[str] = []
                if not purge:
                    keep = [str(i) for i in ids]
                elif built is None:
                    locked = locked_ids(ids, definition_id, target.cutoff)
                    keep = [str(i) for i in ids if str(i) in locked]
                else:
                    current = fingerprints_locked(ids, definition_id, target.cutoff)
                    keep, changed = [], []
                    for pk in map(str, ids):
                        if pk not in current:
                            continue  # held by someone, or no longer due
                        if current[pk] == built.fingerprints.get(pk):
                            keep.append(pk)
                        else:
                            changed.append(pk)
                kept = set(keep)
                rows = [row for row in candidates if str(row["id"]) in kept]
                if rows:
                    if built is not None and archive_file is not None:
                        if len(keep) < len(ids):
                            member = built.member(keep)
                        append_member(archive_file, member)
                    if purge:
                        _delete([row["id"] for row in rows])
                    record = _record(
                        record,
                        rows,
                        target=target,
                        actor=actor,
                        purged=purge,
                        archive_file=outcome.archive_file,
                        started_at=started_at,
                    )
            took = time.perf_counter() - began
            fresh = [pk for pk in changed if pk not in retried]
            retried.update(fresh)
            outcome.changed += len(changed)
            if fresh:
                # Resume just before the first changed instance.
                first = next(
                    n for n, row in enumerate(candidates) if str(row["id"]) == fresh[0]
                )
                if first:
                    after = (
                        candidates[first - 1]["finished_at"],
                        candidates[first - 1]["id"],
                    )
            else:
                after = (candidates[-1]["finished_at"], candidates[-1]["id"])
            if not rows:
                continue
            outcome.instances += len(rows)
            outcome.batches += 1
            outcome.batch_seconds.append(took)
            assert record is not None
            outcome.run_id = record.pk
            if on_batch is not None:
                on_batch(len(rows), took)
            # Keep each transaction, and so each row lock, short.
            if took > slow:
                size = max(MIN_BATCH, size // 2)
            elif took < slow / 4 and size < configured:
                size = min(configured, size * 2)
    return outcome


# -- the sweeper ---------------------------------------------------------------

_next_sweep: dict[int, float] = {}
SWEEPER = (PurgeRun.Actor.SWEEPER, f"sweeper on {socket.gethostname()}")


def sweep(now: datetime) -> int:
    """The sweeper's share: purge what its retention period makes due, for at
    most SAGA_RETENTION_SWEEP_SECONDS; again at the next sweep while a
    backlog is left, otherwise after SAGA_RETENTION_EVERY."""
    pid = os.getpid()
    if time.monotonic() < _next_sweep.get(pid, 0.0):
        return 0
    deadline = time.monotonic() + settings.SAGA_RETENTION_SWEEP_SECONDS
    purged = 0
    backlog = False
    for target in sweeper_targets(now):
        if target.archive and not settings.SAGA_ARCHIVE_DIR:
            log.warning(
                "not purging %s: it asks for an archive and SAGA_ARCHIVE_DIR "
                "is not set",
                target.key,
            )
            continue
        path = (
            archive_path(settings.SAGA_ARCHIVE_DIR, target.key, per_run=False)
            if target.archive
            else None
        )
        try:
            outcome = run(target, actor=SWEEPER, archive_file=path, deadline=deadline)
        except Exception:
            # A full disk or a lock timeout: the batch rolled back, nothing
            # is lost; the next sweep tries again.
            log.exception("retention purge of %s stopped", target.key)
            backlog = True
            continue
        purged += outcome.instances
        backlog |= not outcome.finished
    if not backlog:
        _next_sweep[pid] = time.monotonic() + settings.SAGA_RETENTION_EVERY
    return purged


def read_archive(path: str | Path) -> Iterable[dict[str, Any]]:
    """The lines of an archive file (every member), as dicts."""
    with gzip.open(path, "rt", encoding="utf-8") as lines:
        for line in lines:
            yield json.loads(line)
