"""The engine's hot path reads and writes its rows with SQL compiled once per
process, not once per call.

Every step of every workflow locks its instance, reads the steps and writes
the instance and one or two steps back. Through the ORM each of those builds
and compiles a query again (about 0.3 to 1 ms of Python apiece, most of a
step's cost); here the SQL is made once, from the same ORM query or the same
model fields, and only the parameters change. Results become model objects
the way Django's own iterator makes them (``Model.from_db``, converters,
``select_related`` caches), and writes keep django-fsm's compare-and-set:
the ``UPDATE`` matches only the state (and version) the object was loaded
with, else :class:`django_fsm.ConcurrentTransition`.

On PostgreSQL the updates of one unit of work travel in one statement
(data-modifying CTEs, each returning its row count); elsewhere one by one.
There every statement of the hot path is also a server-side prepared
statement (``SAGA_PREPARED_STATEMENTS``): parsing and planning these long
statements again on every call was about half of the server's time per
step.
"""

from __future__ import annotations

import itertools
import re
import uuid
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypeVar, cast

from django.conf import settings
from django.db import DEFAULT_DB_ALIAS, DatabaseError, connection, connections
from django.db.models import (
    NOT_PROVIDED,
    AutoField,
    BigAutoField,
    BigIntegerField,
    BooleanField,
    CharField,
    DateTimeField,
    DurationField,
    Field,
    ForeignKey,
    IntegerField,
    Model,
    PositiveIntegerField,
    QuerySet,
    TextField,
    UUIDField,
    signals,
)
from django.db.models.base import ModelState
from django.db.models.expressions import DatabaseDefault
from django.db.models.query import get_related_populators
from django.db.transaction import TransactionManagementError
from django_fsm import ConcurrentTransition, FSMField

from workflows_app.models.runtime import StateField

M = TypeVar("M", bound=Model)

# Stands for the one parameter of a compiled query while it is compiled.
_PARAMETER = uuid.UUID("5a9a0000-0000-4000-8000-00000000c0de")
_INTEGER_PARAMETER = -7_041_979_123


class CompiledSelect:
    """``make(parameter)`` is an ORM queryset with one parameter; compiled
    on first use (inside a transaction when it locks) and run again with
    new values of that parameter."""

    def __init__(
        self,
        make: Callable[[Any], QuerySet[Any]],
        field: Any,
        *,
        before: Callable[[Any], str | None] | None = None,
        related_once: bool = False,
    ) -> None:
        self._make = make
        # The model field the parameter is compared with: values are prepared
        # by it, so a malformed id fails as it would through the ORM.
        self._field = field
        # before(connection): a statement taking the same parameter, run
        # just before the query in the same round trip (a lock: the query,
        # a statement of its own, then reads with a snapshot taken after
        # it), or None where the database has no such statement.
        self._before = before
        # The select_related objects are one and the same for every row
        # (the steps of one instance): built from the first row only.
        self._related_once = related_once
        self._compiled: dict[str, _Compiled] = {}

    def rows(self, value: Any) -> list[Any]:
        db = connections[DEFAULT_DB_ALIAS]
        compiled = self._compiled.get(db.vendor)
        if compiled is None:
            target = getattr(self._field, "target_field", self._field)
            sentinel = (
                _INTEGER_PARAMETER if isinstance(target, IntegerField) else _PARAMETER
            )
            # As the field hands it to the driver (SQLite: a UUID as hex).
            marker = self._field.get_db_prep_value(sentinel, db, prepared=False)
            compiled = self._compiled[db.vendor] = _Compiled.of(
                self._make(sentinel),
                marker,
                before=self._before(db) if self._before else None,
                related_once=self._related_once,
            )
        if compiled.locks and not db.in_atomic_block:
            # The ORM refuses this too: a lock outside a transaction is let
            # go at once, and the caller would believe it holds it.
            raise TransactionManagementError(
                "select_for_update cannot be used outside of a transaction."
            )
        prepared = self._field.get_db_prep_value(value, db, prepared=False)
        return compiled.run(prepared)


@dataclass
class _Compiled:
    sql: str
    params: tuple[Any, ...]
    slot: int
    locks: bool
    compiler: Any
    model_slice: slice
    annotations: dict[str, int]
    converters: Any
    # The converters of the model's own columns and annotations.
    own_converters: Any
    populators: Any
    build: Callable[[Sequence[Any]], Any]
    before: str | None
    related_once: bool

    @classmethod
    def of(
        cls,
        queryset: QuerySet[Any],
        marker: Any,
        *,
        before: str | None = None,
        related_once: bool = False,
    ) -> _Compiled:
        compiler = queryset.query.get_compiler(using=queryset.db)
        sql, params = compiler.as_sql()
        slots = [i for i, p in enumerate(params) if p == marker]
        if len(slots) != 1:
            raise ValueError("a compiled query takes exactly one parameter")
        klass_info = compiler.klass_info
        fields = klass_info["select_fields"]
        start, end = fields[0], fields[-1] + 1
        init_list = [c[0].target.attname for c in compiler.select[start:end]]
        converters = compiler.get_converters([c[0] for c in compiler.select])
        return cls(
            sql=sql,
            params=tuple(params),
            slot=slots[0],
            locks=bool(queryset.query.select_for_update) or before is not None,
            compiler=compiler,
            model_slice=slice(start, end),
            annotations=dict(compiler.annotation_col_map),
            converters=converters,
            own_converters={
                position: converter
                for position, converter in converters.items()
                if start <= position < end
                or position in compiler.annotation_col_map.values()
            },
            # As Django's ModelIterable does, for this one queryset shape.
            populators=_fast_populators(
                get_related_populators(  # type: ignore[call-arg]
                    klass_info, compiler.select, queryset.db
                ),  # (the stubs follow Django 6, which adds fetch_mode)
                queryset.db,
            ),
            build=_builder(klass_info["model"], init_list, queryset.db),
            before=before,
            related_once=related_once,
        )

    def _converted(self, rows: list[Any]) -> list[Any]:
        """Rows with Django's converters applied (JSON decoded, ...): with
        ``related_once``, a related object's columns only in the first row,
        the one they are built from."""
        apply = self.compiler.apply_converters
        if not (self.related_once and len(rows) > 1):
            return list(apply(rows, self.converters))
        first = apply(rows[:1], self.converters)
        return [*first, *apply(rows[1:], self.own_converters)]

    def run(self, value: Any) -> list[Any]:
        params = list(self.params)
        params[self.slot] = value
        with connection.cursor() as cursor:
            if self.before is None:
                execute(cursor, self.sql, params)
            else:
                execute_after(cursor, (self.before, [value]), (self.sql, params))
            rows = cursor.fetchall()
        if self.converters:
            rows = self._converted(rows)
        populators = self.populators
        objects: list[Any] = []
        build = self.build
        for row in rows:
            obj = build(row[self.model_slice])
            if not (self.related_once and objects):
                for populator in populators:
                    populator.populate(row, obj)
            for name, position in self.annotations.items():
                setattr(obj, name, row[position])
            objects.append(obj)
        return objects


def _builder(
    model: type[Model], init_list: list[str], alias: str
) -> Callable[[Sequence[Any]], Any]:
    """What makes a model object of a row holding every concrete field.

    ``Model.from_db`` goes through ``__init__``, which sets each field
    through its descriptor and sends the init signals: for a fresh object of
    a model without init receivers or django-fsm state proxies, that ends in
    exactly the same ``__dict__``, which is set here at once (then
    django-fsm's remembered states, as its ``__init__`` would)."""
    concrete = model._meta.concrete_fields
    plain = (
        sorted(init_list) == sorted(f.attname for f in concrete)
        and not signals.pre_init.has_listeners(model)
        and not signals.post_init.has_listeners(model)
        and not any(getattr(f, "state_proxy", None) for f in concrete)
    )
    if not plain:
        return lambda values: model.from_db(alias, init_list, values)
    names = tuple(init_list)
    remember = hasattr(model, "_update_initial_state")

    def build(values: Sequence[Any]) -> Any:
        obj: Any = model.__new__(model)
        state = obj._state = ModelState()
        state.adding, state.db = False, alias
        obj.__dict__.update(zip(names, values, strict=True))
        if remember:
            obj._update_initial_state()
        return obj

    return build


# Per model: the concrete fields' constant defaults (by attname), and what
# makes each other default (a callable, a mutable value, a database default).
_defaults: dict[
    type[Model], tuple[dict[str, Any], list[tuple[str, Callable[[], Any]]]]
] = {}
_CONSTANT = (type(None), str, int, bool, float)


def _default_template(
    model: type[Model],
) -> tuple[dict[str, Any], list[tuple[str, Callable[[], Any]]]]:
    constants: dict[str, Any] = {}
    made: list[tuple[str, Callable[[], Any]]] = []
    for f in model._meta.concrete_fields:
        value = f.get_default()
        if not callable(f.default) and type(value) in _CONSTANT:
            constants[f.attname] = value
        else:
            made.append((f.attname, f.get_default))
    return constants, made


def new(model: type[M], related: dict[str, Model | None], **values: Any) -> M:
    """A new (unsaved) object, as ``model(**values)`` makes it, for a model
    without init receivers: ``values`` by attname, every other field its
    default, and each of ``related`` (a foreign key's name: the object) set
    with its id and cached. The engine makes several history rows per step;
    ``Model.__init__`` with keywords costs about a hundred calls apiece."""
    template = _defaults.get(model)
    if template is None:
        if signals.pre_init.has_listeners(model) or signals.post_init.has_listeners(
            model
        ):
            raise TypeError(f"{model.__name__} has init receivers: use the model")
        template = _defaults[model] = _default_template(model)
    constants, made = template
    obj: Any = model.__new__(model)
    obj._state = ModelState()
    fields = obj.__dict__
    fields.update(constants)
    for attname, default in made:
        if attname not in values:
            fields[attname] = default()
    fields.update(values)
    cache = obj._state.fields_cache
    for name, target in related.items():
        fields[_field(model, name).attname] = None if target is None else target.pk
        cache[name] = target
    return cast(M, obj)


class _Built:
    """Stands for a related model where Django's ``RelatedPopulator`` makes
    its objects (``model_cls.from_db``): made by :func:`_builder` instead."""

    def __init__(self, build: Callable[[Sequence[Any]], Any]) -> None:
        self._build = build

    def from_db(self, db: str, init_list: list[str], values: Sequence[Any]) -> Any:
        return self._build(values)


def _fast_populators(populators: list[Any], alias: str) -> list[Any]:
    """The ``select_related`` objects (the instance's definition) built as
    the main ones are, at every level."""
    for populator in populators:
        populator.model_cls = _Built(
            _builder(populator.model_cls, populator.init_list, alias)
        )
        _fast_populators(populator.related_populators, alias)
    return populators


class Write:
    """One statement of a unit of work's writes."""

    def statement(self) -> tuple[str, list[Any]]:
        raise NotImplementedError

    def check(self, matched: int) -> None:
        """Called with the number of rows the statement wrote."""

    @property
    def model(self) -> type[Model]:
        raise NotImplementedError

    @property
    def weight(self) -> int:
        """About how many parameters the statement takes."""
        raise NotImplementedError


@dataclass(frozen=True)
class FencedUpdate(Write):
    """Write ``fields`` of ``obj`` where its row still has the ``fence``
    values it was loaded with."""

    obj: Model
    fields: Sequence[str]
    fence: dict[str, Any]

    def statement(self) -> tuple[str, list[Any]]:
        model = type(self.obj)
        key = (model, tuple(self.fields), tuple(self.fence))
        sql = _update_sql.get(key)
        if sql is None:
            sql = _update_sql[key] = _update(model, key[1], ["pk", *key[2]])
        db = connections[DEFAULT_DB_ALIAS]
        params = [prepare(self.obj, db) for prepare in _preparers(model, key[1])]
        values = (self.obj.pk, *self.fence.values())
        for (field, plain), value in zip(
            _fence_fields(model, key[2]), values, strict=True
        ):
            plain_value = plain and _plain(value, plain)
            params.append(value if plain_value else field.get_db_prep_value(value, db))
        return sql, params

    @property
    def model(self) -> type[Model]:
        return type(self.obj)

    @property
    def weight(self) -> int:
        return len(self.fields) + len(self.fence) + 1

    def check(self, matched: int) -> None:
        if matched != 1:
            raise ConcurrentTransition(
                f"{type(self.obj).__name__} {self.obj.pk} changed since it was read"
            )


@dataclass(frozen=True)
class Update(Write):
    """``UPDATE target SET values WHERE filters``, however many rows match."""

    target: type[Model]
    values: dict[str, Any]
    filters: dict[str, Any]

    @property
    def model(self) -> type[Model]:
        return self.target

    @property
    def weight(self) -> int:
        return len(self.values) + len(self.filters)

    def statement(self) -> tuple[str, list[Any]]:
        key = (self.model, tuple(self.values), tuple(self.filters))
        sql = _update_sql.get(key)
        if sql is None:
            sql = _update_sql[key] = _update(self.model, key[1], key[2])
        params = [
            _field(self.model, name).get_db_prep_save(value, connection)
            for name, value in (*self.values.items(), *self.filters.items())
        ]
        return sql, params


@dataclass(frozen=True)
class Insert(Write):
    """New rows of one model (their primary keys are not read back)."""

    objs: Sequence[Model]

    @property
    def model(self) -> type[Model]:
        return type(self.objs[0])

    @property
    def weight(self) -> int:
        return len(self.objs) * len(_insert_preparers(self.model))

    def check(self, matched: int) -> None:
        """The objects are rows now, as after ``Model.save``."""
        for obj in self.objs:
            obj._state.adding = False
            obj._state.db = connection.alias
            written = getattr(obj, "written", None)
            if written is not None:
                written()  # the fence of its next update

    def statement(self) -> tuple[str, list[Any]]:
        model = self.model
        rows, params = [], []
        db = connections[DEFAULT_DB_ALIAS]
        columns = _insert_preparers(model)
        for obj in self.objs:
            values = obj.__dict__
            marks = []
            for attname, plain, prepare, may_default in columns:
                value = values.get(attname, _MISSING)
                if not (plain and _plain(value, plain)):
                    value = prepare(obj, db)
                    if may_default and isinstance(value, DatabaseDefault):
                        marks.append("DEFAULT")
                        continue
                marks.append("%s")
                params.append(value)
            rows.append(f"({', '.join(marks)})")
        return f"{_insert_into(model)} VALUES {', '.join(rows)}", params


_update_sql: dict[tuple[type[Model], tuple[str, ...], tuple[str, ...]], str] = {}
_fence_cache: dict[
    tuple[type[Model], tuple[str, ...]], list[tuple[Field[Any, Any], tuple[type, ...]]]
] = {}


def _fence_fields(
    model: type[Model], names: tuple[str, ...]
) -> list[tuple[Field[Any, Any], tuple[type, ...]]]:
    """The primary key's and the fence's fields, with their plain types."""
    key = (model, names)
    found = _fence_cache.get(key)
    if found is None:
        fields = [_field(model, name) for name in ("pk", *names)]
        found = _fence_cache[key] = [(f, _plain_types(f)) for f in fields]
    return found


_preparer_cache: dict[tuple[type[Model], tuple[str, ...]], list[Any]] = {}


def _field(model: type[Model], name: str) -> Field[Any, Any]:
    field = model._meta.pk if name == "pk" else model._meta.get_field(name)
    assert isinstance(field, Field), name
    return field


def _column(model: type[Model], name: str) -> str:
    column = _field(model, name).column
    assert column is not None, name
    return column


def _update(model: type[Model], sets: Sequence[str], where: Sequence[str]) -> str:
    quote = connection.ops.quote_name
    assignments = ", ".join(f"{quote(_column(model, f))} = %s" for f in sets)
    conditions = " AND ".join(f"{quote(_column(model, f))} = %s" for f in where)
    table = quote(model._meta.db_table)
    return f"UPDATE {table} SET {assignments} WHERE {conditions}"


def _preparers(model: type[Model], names: tuple[str, ...]) -> list[Any]:
    """Per field, what turns the object's value into the parameter, as
    ``Model.save`` would (``pre_save``, then ``get_db_prep_save``)."""
    key = (model, names)
    found = _preparer_cache.get(key)
    if found is None:
        found = _preparer_cache[key] = [
            _preparer(_field(model, name)) for name in names
        ]
    return found


def _preparer(field: Field[Any, Any], *, add: bool = False) -> Any:
    plain = _plain_types(field)
    attname = field.attname

    def prepare(obj: Model, db: Any) -> Any:
        if plain:
            # Text, numbers, flags and the like of the right type (and NULL)
            # go to the driver as they are: Django's preparation would
            # return them unchanged, after a few calls each.
            value = obj.__dict__.get(attname, _MISSING)
            if _plain(value, plain):
                return value
            if plain == (str,) and isinstance(value, str):
                return str(value)  # a TextChoices member: its value
        value = field.pre_save(obj, add)
        if isinstance(value, DatabaseDefault):
            return value
        if hasattr(value, "resolve_expression"):
            raise TypeError(f"{field.name}: expressions are saved through the ORM")
        return field.get_db_prep_save(value, db)

    return prepare


_MISSING = object()


def _plain_types(field: Field[Any, Any]) -> tuple[type, ...]:
    """The Python types a field stores without conversion; none for fields
    whose saving does more (dates, JSON, UUIDs, subclasses with their own
    preparation)."""
    kind = type(field)
    if kind is ForeignKey:
        target = field.target_field  # type: ignore[attr-defined]
        if type(target) in {AutoField, BigAutoField}:
            return (int,)
        return _plain_types(target) if type(target) is UUIDField else ()
    if kind in {CharField, TextField, FSMField, StateField}:
        return (str,)
    if kind in {IntegerField, PositiveIntegerField, BigIntegerField}:
        return (int,)
    if kind is BooleanField:
        return (bool,)
    if connection.vendor == "postgresql":
        # PostgreSQL stores these natively: Django hands a UUID, a duration
        # or an aware date-time to the driver unchanged (a naive one is made
        # aware first, so it is not plain: see _AWARE).
        if kind is UUIDField:
            return (uuid.UUID,)
        if kind is DurationField:
            return (timedelta,)
        if kind is DateTimeField and not (field.auto_now or field.auto_now_add):  # type: ignore[attr-defined]
            return _AWARE
    return ()


# The plain types of a date-time column: a datetime, if it is aware.
_AWARE = (datetime,)


def _plain(value: Any, plain: tuple[type, ...]) -> bool:
    """Whether ``value`` goes to the driver as it is (see _plain_types)."""
    if value is None:
        return True
    if type(value) not in plain:
        return False
    return plain is not _AWARE or value.tzinfo is not None


# Per model: each inserted column's attname, the types stored as they are,
# the preparer for other values, and whether it may be the column's default.
_insert_preparer_cache: dict[
    type[Model], list[tuple[str, tuple[type, ...], Any, bool]]
] = {}
_insert_sql: dict[type[Model], str] = {}


def _insert_into(model: type[Model]) -> str:
    found = _insert_sql.get(model)
    if found is None:
        quote = connection.ops.quote_name
        fields = _insert_fields(model)
        columns = ", ".join(quote(_column(model, f.name)) for f in fields)
        table = quote(model._meta.db_table)
        found = _insert_sql[model] = f"INSERT INTO {table} ({columns})"
    return found


def _insert_preparers(
    model: type[Model],
) -> list[tuple[str, tuple[type, ...], Any, bool]]:
    found = _insert_preparer_cache.get(model)
    if found is None:
        found = _insert_preparer_cache[model] = [
            (
                f.attname,
                _plain_types(f),
                _preparer(f, add=True),
                f.db_default is not NOT_PROVIDED,
            )
            for f in _insert_fields(model)
        ]
    return found


def _insert_fields(model: type[Model]) -> list[Field[Any, Any]]:
    return [
        f
        for f in model._meta.concrete_fields
        if isinstance(f, Field) and not (f.primary_key and f.db_returning)
    ]


def write(
    writes: Sequence[Write],
    *,
    last: bool = False,
    guard: Sequence[tuple[str, Sequence[Any]]] = (),
    after: tuple[str, Sequence[Any]] | None = None,
) -> Any:
    """Run the writes (on PostgreSQL as few statements as possible, usually
    one round trip) and check each: a fenced update that matched no row
    raises ConcurrentTransition, which rolls the caller's transaction back.

    ``last``: nothing else runs in the caller's transaction after these
    writes, so where the backend allows (``workflows_app.postgres``) the
    final statement carries the COMMIT, and the server checks the fences.

    ``guard`` and ``after`` need all of that, in one message that begins
    the transaction (else NotInOneMessage, before anything is sent): the
    guard's statements run first (one fails with ``saga_fence`` when the
    rows it checks changed), and ``after`` runs once COMMIT has, its row
    returned."""
    if guard or after is not None:
        return _write_guarded(writes, guard, after)
    if connection.vendor != "postgresql":
        for w in writes:
            _write_alone(w)
        return None
    segments = _segments(writes)
    for index, segment in enumerate(segments):
        if last and index == len(segments) - 1:
            _write_last(segment)
        elif len(segment) == 1:
            _write_alone(segment[0])
        else:
            _write_together(segment, *_ctes(segment))
    return None


class NotInOneMessage(Exception):
    """The guarded writes cannot go in one message that begins and commits
    their transaction (another backend, a statement already sent, writes
    that need more than one statement); nothing was sent."""


def _write_guarded(
    writes: Sequence[Write],
    guard: Sequence[tuple[str, Sequence[Any]]],
    after: tuple[str, Sequence[Any]] | None,
) -> Any:
    segments = _segments(writes) if connection.vendor == "postgresql" else []
    if len(segments) != 1:
        raise NotInOneMessage("the writes need more than one statement")
    with connection.cursor() as cursor:
        # The guard must be the transaction's first statement.
        begin = bool(guard)
        if begin and not _begins(cursor):
            raise NotInOneMessage("the transaction has begun already")
        commit = getattr(cursor.db, "commit_in_next_statement", None)
        if commit is None or not commit():
            # (A BEGIN promised above was not sent: the caller's rollback
            # then only meets "no transaction in progress".)
            raise NotInOneMessage("this transaction cannot commit in a statement")
        statements: list[Statement] = [*guard, _last_statement(segments[0]), "COMMIT"]
        if after is not None:
            statements.append(after)
        _send_committing(cursor, statements, begin=begin)
        row = cursor.fetchone() if after is not None else None
    _checked(segments[0])
    return row


def _last_statement(segment: Sequence[Write]) -> tuple[str, list[Any]]:
    """The segment as one statement whose fences the server checks."""
    ctes, params = _ctes(segment)
    fenced = [
        f"(SELECT count(*) FROM w{i}) = 1"
        for i, w in enumerate(segment)
        if isinstance(w, FencedUpdate)
    ]
    return f"WITH {ctes} SELECT saga_fence({' AND '.join(fenced) or 'true'})", params


def _send_committing(
    cursor: Any, statements: Sequence[Statement], *, begin: bool | None = None
) -> None:
    """Send a message that ends with (or after) COMMIT; a failure rolls back."""
    try:
        execute_all(cursor, statements, begin=begin)
    except DatabaseError as exc:
        cursor.db.statement_failed()
        if getattr(exc.__cause__, "pgcode", None) == FENCE_FAILED:
            raise ConcurrentTransition("a row changed since it was read") from exc
        raise


def _checked(segment: Sequence[Write]) -> None:
    """The writes' own bookkeeping once the server checked their fences."""
    for w in segment:
        w.check(1 if isinstance(w, FencedUpdate) else len(getattr(w, "objs", ())))


def _write_together(segment: Sequence[Write], ctes: str, params: list[Any]) -> None:
    counts = ", ".join(f"(SELECT count(*) FROM w{i})" for i in range(len(segment)))
    with connection.cursor() as cursor:
        execute(cursor, f"WITH {ctes} SELECT {counts}", params)
        matched = list(cursor.fetchone())
    for w, count in zip(segment, matched, strict=True):
        w.check(count)


def _ctes(segment: Sequence[Write]) -> tuple[str, list[Any]]:
    """The segment's statements as the parts ``w0``, ``w1``, ... of one."""
    statements = [w.statement() for w in segment]
    ctes = ", ".join(
        f"w{i} AS ({sql} RETURNING 1)" for i, (sql, _) in enumerate(statements)
    )
    return ctes, [p for _, values in statements for p in values]


# The SQLSTATE of saga_fence's error (migration 0032).
FENCE_FAILED = "SD409"


def _write_last(segment: Sequence[Write]) -> None:
    """The transaction's last statement: with its COMMIT in the same
    message where the backend allows, the fences then checked by the server
    (``saga_fence`` fails the statement, so COMMIT never runs)."""
    sql, params = _last_statement(segment)
    with connection.cursor() as cursor:
        commit = getattr(cursor.db, "commit_in_next_statement", None)
        committing = commit is not None and commit()
        if committing:
            _send_committing(cursor, [(sql, params), "COMMIT"])
    if not committing:
        _write_together(segment, *_ctes(segment))
        return
    _checked(segment)


def insert(objs: Iterable[Model]) -> None:
    """Insert new rows of one model in one statement (none: nothing to do),
    built and prepared as the engine's own; ``bulk_create`` spends about
    20 ms preparing 50 history rows."""
    built = list(objs)
    if built:
        write([Insert(built)])


def _write_alone(w: Write) -> None:
    if isinstance(w, Insert) and connection.vendor != "postgresql":
        # The ORM knows how each backend spells a column's database default.
        w.model._default_manager.bulk_create(w.objs)
        w.check(len(w.objs))
        return
    sql, values = w.statement()
    with connection.cursor() as cursor:
        execute(cursor, sql, values)
        w.check(cursor.rowcount)


# PostgreSQL takes at most 65,535 parameters in one statement.
_MAX_PARAMETERS = 30_000


def _segments(writes: Sequence[Write]) -> list[list[Write]]:
    """Consecutive runs of writes that may share one statement. The parts of
    one statement see the same snapshot: an update cannot see a row inserted
    by an earlier part, so it starts a new statement."""
    segments: list[list[Write]] = [[]]
    inserted: set[type[Model]] = set()
    size = 0
    for w in writes:
        if segments[-1] and (
            (not isinstance(w, Insert) and w.model in inserted)
            or size + w.weight > _MAX_PARAMETERS
        ):
            segments.append([])
            inserted, size = set(), 0
        segments[-1].append(w)
        size += w.weight
        if isinstance(w, Insert):
            inserted.add(w.model)
    return [segment for segment in segments if segment]


# Prepared statements, per database session (a new connection starts with
# none): the SQL text, with Django's %s placeholders, to the statement's name.
_prepared: weakref.WeakKeyDictionary[Any, dict[str, str]] = weakref.WeakKeyDictionary()
_names = itertools.count(1)
# A session prepares at most this many; further shapes run unprepared.
_MAX_PREPARED = 500
_PLACEHOLDER = re.compile(r"%%|%s")


def execute_after(
    cursor: Any, first: tuple[str, Sequence[Any]], then: tuple[str, Sequence[Any]]
) -> None:
    """Run two statements in one round trip (PostgreSQL), ``then``'s rows
    the cursor's. Each is a statement of its own, with its own snapshot,
    and an error in the first stops the second."""
    execute_all(cursor, [first, then])


# A statement with its parameters, or one without any (COMMIT).
Statement = tuple[str, Sequence[Any]] | str


def execute_all(
    cursor: Any, statements: Sequence[Statement], *, begin: bool | None = None
) -> None:
    """Run the statements in one message (PostgreSQL), each prepared as
    :func:`execute` does; the last one's rows are the cursor's. Each is a
    statement of its own, with its own snapshot, and an error in one stops
    those after it. ``begin``: whether BEGIN goes first (None: where the
    backend allows)."""
    if begin is None:
        begin = _begins(cursor)
    texts: list[str] = [_BEGIN] if begin else []
    params = [p for s in statements if not isinstance(s, str) for p in s[1]]
    if not settings.SAGA_PREPARED_STATEMENTS:
        texts += [s if isinstance(s, str) else s[0] for s in statements]
        cursor.execute("; ".join(texts), params)
        return
    known = _session_statements(cursor)
    new: dict[str, str] = {}
    for statement in statements:
        if isinstance(statement, str):
            texts.append(statement)
            continue
        sql, values = statement
        name = known.get(sql) or new.get(sql)
        if name is None:
            if len(known) + len(new) >= _MAX_PREPARED:
                texts.append(sql)
                continue
            name = new[sql] = f"saga_{next(_names)}"
            texts.append(f"PREPARE {name} AS {_numbered(sql)}")
        texts.append(f"EXECUTE {name}{_arguments(values)}")
    cursor.execute("; ".join(texts), params)
    known.update(new)


_BEGIN = "BEGIN"


def _begins(cursor: Any) -> bool:
    """Whether the statement about to be sent opens its transaction: it is
    then sent after BEGIN, in the same round trip (``workflows_app.postgres``;
    other backends let the driver begin)."""
    begin = getattr(cursor.db, "begin_in_next_statement", None)
    return begin is not None and bool(begin())


def _session_statements(cursor: Any) -> dict[str, str]:
    """The statements prepared in the cursor's database session, by SQL."""
    session = cursor.db.connection
    known = _prepared.get(session)
    if known is None:
        known = _prepared[session] = {}
    return known


def _arguments(params: Sequence[Any]) -> str:
    return f"({', '.join(['%s'] * len(params))})" if params else ""


def _numbered(sql: str) -> str:
    """Django's %s placeholders as PostgreSQL's $1, $2, ..."""
    numbers = itertools.count(1)
    return _PLACEHOLDER.sub(
        lambda m: m.group() if m.group() == "%%" else f"${next(numbers)}", sql
    )


def execute(cursor: Any, sql: str, params: Sequence[Any], *, then: str = "") -> None:
    """``cursor.execute(sql, params)``, on PostgreSQL as a prepared statement:
    the first call in a session sends ``PREPARE`` and ``EXECUTE`` in one
    round trip, later ones only ``EXECUTE name(values)``. Parameter types are
    the server's inference from where each one stands (a column, a cast).
    Prepared statements outlive a rolled-back transaction; after any error the
    statement is prepared again under a new name, so a name is never
    assumed to exist when it might not. ``then``: a statement without
    parameters sent after it in the same message (PostgreSQL)."""
    if cursor.db.vendor != "postgresql":
        cursor.execute(sql, params)
        return
    execute_all(cursor, [(sql, params), then] if then else [(sql, params)])
