"""Fill a PostgreSQL database with many synthetic instances, for benchmarks.

    SAGA_DEMO=1 python manage.py generate_load --instances 1000000 \\
        --history-per-instance 10

Rows are generated inside PostgreSQL (``generate_series`` into a temporary
batch table, then ``INSERT ... SELECT``), in batches, so a million instances
with their steps, attempts and ten million history rows take minutes, not
hours. The states follow a plausible production mix (mostly completed, a few
percent compensated, a tail of unfinished, held and stuck instances).

What each instance's steps and attempts look like comes from
``workflows_app.bench.load_shapes``, which asks the engine's planner: a step
declined for good has ``last_failure_permanent`` and no compensation, holds
carry the planner's kind and reason, compensations run in its order. The
snapshot is one of a site whose workers and sweeper are behind: work sent
and not claimed yet, instances without progress and passed deadlines wait
for the next sweep.

This writes rows directly, bypassing the engine on purpose: it is test data
for a benchmark database, never for a live site. As a superuser the foreign
key triggers are switched off for the session (the rows are consistent by
construction), which makes the load several times faster.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError
from django.db import connection, transaction

from workflows_app.bench.load_shapes import CATEGORIES, Shape, definition_shapes
from workflows_app.demo.definitions import load_demo_definitions
from workflows_app.models import WorkflowDefinition

TERMINAL = "('completed', 'compensated', 'cancelled', 'failed')"
INSERT_COLUMNS = re.compile(r"INSERT INTO (?P<table>\w+) \((?P<columns>[^)]*)\)")
OPERATOR_TRANSITIONS = {"cancel", "close_as_failed", "compensate"}

# The shapes of every definition, as session tables the batches join.
SHAPE_TABLES = """
DROP TABLE IF EXISTS load_def, load_pick, load_shape, load_shape_step,
    load_shape_attempt;
CREATE TEMP TABLE load_def (
    d int PRIMARY KEY, definition_id bigint, key text, steps int,
    stuck_after interval, deadline interval, attributes jsonb);
CREATE TEMP TABLE load_pick (d int, category text, shapes int[],
    PRIMARY KEY (d, category));
CREATE TEMP TABLE load_shape (
    shape int PRIMARY KEY, state text, cur int, attention_kind text,
    attention_reason text, pivot_passed bool, stuck_kind text, ok_steps int,
    final_position int,
    final_source text, final_target text, final_transition text,
    final_actor text);
CREATE TEMP TABLE load_shape_step (
    shape int, position int, state text, compensation_state text, attempt int,
    compensation_attempt int, permanent bool, last_error text,
    error_signature text, dispatched bool, PRIMARY KEY (shape, position));
CREATE TEMP TABLE load_shape_attempt (
    shape int, position int, direction text, number int, outcome text,
    error_class text, error_message text, at float8);
"""

# One row per instance of the batch, with every derived value the INSERTs
# need. Cumulative mix of categories: 90 % completed, 4 % compensated, 1 %
# cancelled, 0.5 % failed, 2.5 % running, 0.5 % accepted, 1 % needs
# attention, 0.5 % compensating; then one of the definition's shapes of it.
BATCH_SQL = """
CREATE TEMP TABLE load_batch ON COMMIT DROP AS
WITH base AS (
    SELECT g AS n, random() AS rs, random() AS rt, random() AS rd,
           random() AS rp, 1 + floor(random() * %(k)s)::int AS d
    FROM generate_series(%(lo)s, %(hi)s) AS g
), typed AS (
    SELECT *, CASE
        WHEN rs < .900 THEN 'completed' WHEN rs < .940 THEN 'compensated'
        WHEN rs < .950 THEN 'cancelled' WHEN rs < .955 THEN 'failed'
        WHEN rs < .980 THEN 'running' WHEN rs < .985 THEN 'accepted'
        WHEN rs < .995 THEN 'needs_attention' ELSE 'compensating' END AS category
    FROM base
), shaped AS (
    SELECT t.*, p.shapes[1 + floor(t.rp * cardinality(p.shapes))::int] AS shape
    FROM typed t JOIN load_pick p USING (d, category)
), timed AS (
    SELECT s.n, s.d, s.rd, s.shape, sh.state, sh.cur, sh.attention_kind,
        sh.attention_reason, sh.pivot_passed, sh.stuck_kind, sh.ok_steps,
        sh.final_position,
        sh.final_source, sh.final_target, sh.final_transition, sh.final_actor,
        def.definition_id, def.key, def.steps, def.stuck_after, def.deadline,
        def.attributes,
        (%(now)s::timestamptz) - CASE
            WHEN sh.state IN ('running', 'accepted', 'compensating')
                THEN s.rt * interval '1 hour'
            WHEN sh.state = 'needs_attention' THEN s.rt * interval '7 days'
            ELSE s.rt * %(span)s::interval END AS accepted_at,
        (2 + s.rd * s.rd * s.rd * 600) * interval '1 second' AS took
    FROM shaped s
    JOIN load_shape sh ON sh.shape = s.shape
    JOIN load_def def ON def.d = s.d
)
SELECT md5(%(run)s || ':' || n)::uuid AS id, *,
    CASE WHEN state = 'accepted' THEN accepted_at
         ELSE least(accepted_at + took, %(now)s::timestamptz) END AS progress_at,
    state = 'needs_attention' OR (state = 'running' AND rd < .1) AS stuck
FROM timed;
ANALYZE load_batch
"""

INSTANCE_SQL = f"""
INSERT INTO workflows_app_workflowinstance (
    id, definition_id, definition_key, business_key, idempotency_key, input,
    input_fingerprint, outputs, state, attention_kind, attention_reason, version,
    accepted_at, started_at, finished_at, last_progress_at, deadline_at,
    stuck_check_at, redispatch_at, pivot_passed, restart_position, stuck,
    stuck_kind, stuck_reason, stuck_since, alert_due, search_attributes
)
SELECT id, definition_id, key,
    'LOAD-' || %(run)s || '-' || lpad(n::text, 8, '0'), NULL,
    i.input,
    md5(n::text),
    CASE WHEN state = 'completed'
         THEN jsonb_build_object('receipt', 'R-' || n) ELSE '{{}}'::jsonb END,
    state, attention_kind, attention_reason,
    CASE WHEN state = 'accepted' THEN 0 ELSE 2 + 3 * least(cur, steps) END,
    accepted_at,
    CASE WHEN state NOT IN ('accepted', 'cancelled')
         THEN accepted_at + interval '40 milliseconds' END,
    CASE WHEN state IN {TERMINAL} THEN progress_at END,
    progress_at,
    CASE WHEN state NOT IN {TERMINAL} THEN accepted_at + deadline END,
    CASE WHEN state NOT IN {TERMINAL} THEN progress_at + stuck_after END,
    -- The start message of an accepted instance is re-sent if it was lost.
    CASE WHEN state = 'accepted'
         THEN accepted_at + %(redispatch)s * interval '1 second' END,
    pivot_passed, NULL, stuck,
    CASE WHEN state = 'needs_attention' THEN stuck_kind
         WHEN stuck THEN 'no_progress' ELSE '' END,
    CASE WHEN state = 'needs_attention' THEN left(attention_reason, 300)
         WHEN stuck THEN 'no progress since '
             || to_char(progress_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS')
             || ' UTC while running'
         ELSE '' END,
    CASE WHEN state = 'needs_attention' THEN progress_at
         WHEN stuck THEN progress_at + stuck_after END,
    -- Stuck, and its alert not opened yet: the next sweep opens it.
    stuck,
    -- The declared search attributes, as search_attributes.extract makes
    -- them: scalars as lower-case text (numbers as float8 prints them, which
    -- is what Python's json.dumps prints).
    (SELECT coalesce(jsonb_object_agg(a.key, lower(btrim(CASE
                WHEN jsonb_typeof(v.value) = 'number'
                    THEN (v.value #>> '{{}}')::float8::text
                ELSE v.value #>> '{{}}' END))), '{{}}'::jsonb)
     FROM jsonb_each_text(attributes) AS a
     CROSS JOIN LATERAL (SELECT i.input #> string_to_array(a.value, '.')) AS v(value)
     WHERE jsonb_typeof(v.value) IN ('string', 'number', 'boolean')
        AND length(v.value #>> '{{}}') BETWEEN 1 AND 200)
FROM load_batch
CROSS JOIN LATERAL (SELECT jsonb_build_object(
    'order', n, 'amount', round((rd * 500)::numeric, 2), 'currency', 'EUR',
    'customer', 'customer-' || (n %% 9973)) AS input) AS i
"""

# The new steps' ids are kept for the attempts and the history, which then
# never scan the whole (growing) step table.
STEP_SQL = """
CREATE TEMP TABLE load_steps (id bigint, instance_id uuid, position int)
    ON COMMIT DROP;
WITH inserted AS (
INSERT INTO workflows_app_stepexecution (
    instance_id, step_definition_id, position, name, state, compensation_state,
    attempt, attempts_allowed, compensation_attempt, compensation_attempts_allowed,
    run, run_base_attempt, run_base_compensation_attempt, last_failure_permanent,
    data_repaired, next_attempt_at, deadline_at, redispatch_at, last_error,
    error_signature, output, succeeded_at, compensated_at
)
SELECT b.id, sd.id, sd.position, sd.name, ss.state, ss.compensation_state,
    ss.attempt, sd.max_attempts, ss.compensation_attempt, sd.max_attempts,
    1, 0, 0, ss.permanent, false, NULL, NULL,
    -- Sent at the last progress: re-sent if nobody claims it in time.
    CASE WHEN ss.dispatched
         THEN b.progress_at + %(redispatch)s * interval '1 second' END,
    ss.last_error, ss.error_signature,
    CASE WHEN ss.state = 'succeeded'
         THEN jsonb_build_object('reference', sd.name || '-' || b.n) END,
    CASE WHEN ss.state = 'succeeded'
         THEN b.accepted_at + (b.progress_at - b.accepted_at) * sd.position
              / (b.steps + 1) END,
    CASE WHEN ss.compensation_state = 'done' THEN b.progress_at END
FROM load_batch b
JOIN workflows_app_stepdefinition sd ON sd.definition_id = b.definition_id
JOIN load_shape_step ss ON ss.shape = b.shape AND ss.position = sd.position
RETURNING id, instance_id, position
)
INSERT INTO load_steps SELECT * FROM inserted;
ANALYZE load_steps
"""

ATTEMPT_SQL = """
INSERT INTO workflows_app_attempt (
    step_id, direction, number, task_token, run, started_at, finished_at,
    outcome, error_class, error_message, worker_host, task_id
)
SELECT s.id, a.direction, a.number,
    md5(%(run)s || ':' || s.id || ':' || a.direction || ':' || a.number)::uuid, 1,
    b.accepted_at + (b.progress_at - b.accepted_at) * a.at,
    CASE WHEN a.outcome <> 'running'
         THEN b.accepted_at + (b.progress_at - b.accepted_at) * a.at
              + interval '20 milliseconds' END,
    a.outcome, a.error_class, a.error_message, 'worker-' || (b.n %% 16), ''
FROM load_batch b
JOIN load_steps s ON s.instance_id = b.id
JOIN load_shape_attempt a ON a.shape = b.shape AND a.position = s.position
"""

# ``h`` rows per instance: accept, start, then schedule / begin / succeed per
# succeeded step (wrapping around for long timelines), the last row the
# shape's final move. Accepted instances have only their accept row,
# cancelled ones (never started) accept and cancel.
HISTORY_SQL = """
INSERT INTO workflows_app_transitionlog (
    instance_id, step_id, field, source, target, transition, actor_kind,
    actor_label, user_id, reason, data, created_at
)
SELECT b.id, CASE WHEN k > 2 THEN s.id END,
    'state',
    CASE WHEN k = 1 THEN '' WHEN k = 2 THEN 'accepted'
         WHEN k = %(h)s THEN b.final_source
         ELSE (ARRAY['pending', 'scheduled', 'running'])[1 + (k - 3) %% 3] END,
    CASE WHEN k = 1 THEN 'accepted' WHEN k = 2 THEN 'running'
         WHEN k = %(h)s THEN b.final_target
         ELSE (ARRAY['scheduled', 'running', 'succeeded'])[1 + (k - 3) %% 3] END,
    CASE WHEN k = 1 THEN 'accept' WHEN k = 2 THEN 'start'
         WHEN k = %(h)s THEN b.final_transition
         ELSE (ARRAY['schedule', 'begin_attempt', 'succeed'])[1 + (k - 3) %% 3] END,
    CASE WHEN k = 1 THEN 'api' WHEN k = %(h)s THEN b.final_actor ELSE 'worker' END,
    CASE WHEN k = 1 THEN 'load-generator'
         WHEN k = %(h)s AND b.final_actor = 'operator' THEN 'operator'
         ELSE 'worker-' || (b.n %% 16) END,
    NULL,
    CASE WHEN k = 1 THEN 'accepted for LOAD-' || b.n
         WHEN k = %(h)s AND b.final_transition = 'hold' THEN b.attention_reason
         ELSE '' END,
    CASE WHEN (k - 3) %% 3 = 1 AND k > 2 AND k < %(h)s
         THEN jsonb_build_object('attempt', 1, 'worker_host', 'worker-' || (b.n %% 16))
         ELSE '{}'::jsonb END,
    b.accepted_at + (b.progress_at - b.accepted_at) * (k - 1) / (%(h)s - 1)
FROM load_batch b
CROSS JOIN generate_series(1, %(h)s) AS k
LEFT JOIN load_steps s
    ON s.instance_id = b.id AND s.position = CASE
        WHEN k = %(h)s THEN b.final_position
        ELSE 1 + ((k - 3) / 3) %% greatest(b.ok_steps, 1) END
WHERE b.state NOT IN ('accepted', 'cancelled') OR k = 1
    OR (b.state = 'cancelled' AND k = %(h)s)
"""


class Command(BaseCommand):
    help = "Generate synthetic instances, steps and history rows (PostgreSQL only)."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--instances", type=int, default=1_000_000)
        parser.add_argument("--history-per-instance", type=int, default=10)
        parser.add_argument("--batch", type=int, default=50_000)
        parser.add_argument(
            "--days", type=int, default=30, help="spread of finished instances"
        )

    def handle(self, *args: Any, **options: Any) -> None:
        if connection.vendor != "postgresql":
            raise CommandError("generate_load needs PostgreSQL (DATABASE_URL)")
        total, size = options["instances"], options["batch"]
        if total < 1 or size < 1:
            raise CommandError("--instances and --batch must be at least 1")
        history = max(3, options["history_per_instance"])
        definitions = self._definitions()
        params: dict[str, Any] = {
            "run": secrets.token_hex(3),
            "k": len(definitions),
            "span": f"{options['days']} days",
            "h": history,
            "redispatch": settings.SAGA_REDISPATCH_AFTER,
        }
        with connection.cursor() as cursor:
            cursor.execute("SELECT now()")
            params["now"] = cursor.fetchone()[0]
            cursor.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")
            superuser = cursor.fetchone()[0]
        self._check_columns()
        shapes = self._load_shapes(definitions)
        self.stdout.write(
            f"{len(definitions)} definitions, {shapes} instance shapes "
            "(from the engine's planner)"
        )
        started = time.monotonic()
        try:
            for lo in range(1, total + 1, size):
                hi = min(total, lo + size - 1)
                self._batch({**params, "lo": lo, "hi": hi}, superuser)
                rate = hi / (time.monotonic() - started)
                self.stdout.write(f"{hi:>10,} instances  ({rate:,.0f}/s)")
        finally:
            with connection.cursor() as cursor:
                cursor.execute(SHAPE_TABLES.split(";")[0])
        if not connection.in_atomic_block:  # VACUUM cannot run in a transaction
            self.stdout.write("VACUUM ANALYZE (index-only scans, fresh statistics)")
            with connection.cursor() as cursor:
                for table in (
                    "workflowinstance",
                    "stepexecution",
                    "attempt",
                    "transitionlog",
                ):
                    cursor.execute(f"VACUUM (ANALYZE) workflows_app_{table}")
        self.stdout.write(
            f"done: {total:,} instances, about {total * history:,} history rows "
            f"in {time.monotonic() - started:,.0f} s (run {params['run']})"
        )

    def _check_columns(self) -> None:
        """Fail early, and say which column, when a migration added a NOT NULL
        column without a database default that these INSERTs leave out."""
        missing = []
        with connection.cursor() as cursor:
            for sql in (INSTANCE_SQL, STEP_SQL, ATTEMPT_SQL, HISTORY_SQL):
                match = INSERT_COLUMNS.search(sql)
                assert match, sql
                table = match["table"]
                given = {c.strip() for c in match["columns"].split(",")}
                cursor.execute(
                    "SELECT column_name FROM information_schema.columns "
                    "WHERE table_schema = current_schema() AND table_name = %s "
                    "AND is_nullable = 'NO' AND column_default IS NULL "
                    "AND is_identity = 'NO'",
                    [table],
                )
                missing += [
                    f"{table}.{column}"
                    for (column,) in cursor.fetchall()
                    if column not in given
                ]
        if missing:
            raise CommandError(
                "generate_load does not fill these NOT NULL columns (no database "
                f"default): {', '.join(sorted(missing))}; add them to its INSERTs"
            )

    def _definitions(self) -> list[WorkflowDefinition]:
        published = list(
            WorkflowDefinition.objects.published()
            .filter(mode=WorkflowDefinition.Mode.ORCHESTRATED)
            # The shapes model steps that call participants (attempts and
            # undo); timers and steps for a person have neither.
            .exclude(steps__kind__in=["timer", "human"])
            .order_by("key", "version")
        )
        if not published:
            published = [
                d
                for d in load_demo_definitions()
                if not d.steps.exclude(kind="activity").exists()
            ]
        return published

    def _load_shapes(self, definitions: list[WorkflowDefinition]) -> int:
        """Every definition's shapes into the session tables; returns the count."""
        # Rows of the session tables, one tuple per row.
        defs: list[tuple[Any, ...]] = []
        picks: list[tuple[Any, ...]] = []
        shapes: list[tuple[Any, ...]] = []
        steps: list[tuple[Any, ...]] = []
        attempts: list[tuple[Any, ...]] = []
        for d, definition in enumerate(definitions, start=1):
            deadline = definition.deadline
            defs.append(
                (
                    d,
                    definition.pk,
                    definition.key,
                    definition.steps.count(),
                    definition.stuck_after,
                    deadline,
                    json.dumps(definition.search_attributes or {}),
                )
            )
            by_category: dict[str, list[int]] = {c: [] for c in CATEGORIES}
            for shape in definition_shapes(definition):
                number = len(shapes) + 1
                by_category[shape.category].append(number)
                shapes.append(self._shape_row(number, shape))
                n = len(shape.steps)
                for position, step in enumerate(shape.steps, start=1):
                    steps.append(
                        (
                            number,
                            position,
                            step.state,
                            step.compensation_state,
                            step.count("action"),
                            step.count("compensation"),
                            step.permanent,
                            step.error,
                            step.signature,
                            step.dispatched,
                        )
                    )
                    for direction in ("action", "compensation"):
                        tries = [a for a in step.attempts if a.direction == direction]
                        for i, attempt in enumerate(tries, start=1):
                            error_class, _, message = attempt.error.partition(": ")
                            attempts.append(
                                (
                                    number,
                                    position,
                                    direction,
                                    i,
                                    attempt.outcome,
                                    error_class,
                                    message,
                                    _when(
                                        attempt.outcome,
                                        direction,
                                        position,
                                        n,
                                        i,
                                        len(tries),
                                    ),
                                )
                            )
            for category, numbers in by_category.items():
                picks.append((d, category, numbers or by_category["completed"]))
        with connection.cursor() as cursor:
            cursor.execute(SHAPE_TABLES)
            for table, rows in (
                ("load_def", defs),
                ("load_pick", picks),
                ("load_shape", shapes),
                ("load_shape_step", steps),
                ("load_shape_attempt", attempts),
            ):
                if rows:
                    marks = ", ".join(["%s"] * len(rows[0]))
                    cursor.executemany(
                        f"INSERT INTO {table} VALUES ({marks})",
                        rows,
                    )
        return len(shapes)

    @staticmethod
    def _shape_row(number: int, shape: Shape) -> tuple[Any, ...]:
        position, source, transition = shape.final
        target = "scheduled" if position is not None else shape.state
        actor = "operator" if transition in OPERATOR_TRANSITIONS else "worker"
        ok_steps = sum(step.state == "succeeded" for step in shape.steps)
        return (
            number,
            shape.state,
            shape.cur,
            shape.attention_kind,
            shape.attention_reason,
            shape.pivot_passed,
            shape.stuck_kind,
            ok_steps,
            position,
            source,
            target,
            transition,
            actor,
        )

    def _batch(self, params: dict[str, Any], superuser: bool) -> None:
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.execute("SET LOCAL synchronous_commit = off")
            if superuser:
                # Skips the per-row foreign-key triggers: rows are built consistent.
                cursor.execute("SET LOCAL session_replication_role = replica")
            cursor.execute(BATCH_SQL, params)
            cursor.execute(INSTANCE_SQL, params)
            cursor.execute(STEP_SQL, params)
            cursor.execute(ATTEMPT_SQL, params)
            cursor.execute(HISTORY_SQL, params)


def _when(
    outcome: str, direction: str, position: int, n: int, i: int, of: int
) -> float:
    """When an attempt started, as a fraction of the instance's time so far:
    actions in step order, compensations after them in reverse order, the
    attempt in flight at the last progress."""
    if outcome == "running":
        return 1.0
    if direction == "action":
        return (position - 1 + i / (of + 1)) / (n + 1)
    return (n + 1 - position / (n + 1)) / (n + 2)
