"""Fill a PostgreSQL database with many synthetic instances, for benchmarks.

    python manage.py generate_load --instances 1000000 --history-per-instance 10

Rows are generated inside PostgreSQL (``generate_series`` into a temporary
batch table, then ``INSERT ... SELECT``), in batches, so a million instances
with their steps and ten million history rows take minutes, not hours. The
states follow a plausible production mix (mostly completed, a few percent
compensated, a tail of unfinished, held and stuck instances) and each
instance's steps and timeline agree with its state.

This writes rows directly, bypassing the engine on purpose: it is test data
for a benchmark database, never for a live site. As a superuser the foreign
key triggers are switched off for the session (the rows are consistent by
construction), which makes the load several times faster.
"""

from __future__ import annotations

import secrets
import time
from typing import Any

from django.core.management.base import BaseCommand, CommandError
from django.db import connection, transaction

from workflows_app.demo_definitions import load_demo_definitions
from workflows_app.models import WorkflowDefinition

TERMINAL = "('completed', 'compensated', 'cancelled', 'failed')"

# One row per instance of the batch, with every derived value the three
# INSERTs need. Cumulative state mix: 90 % completed, 4 % compensated, 1 %
# cancelled, 0.5 % failed, 2.5 % running, 0.5 % accepted, 1 % needs attention,
# 0.5 % compensating.
BATCH_SQL = f"""
CREATE TEMP TABLE load_batch ON COMMIT DROP AS
WITH base AS (
    SELECT g AS n, random() AS rs, random() AS rt, random() AS rd,
           1 + floor(random() * %(k)s)::int AS d
    FROM generate_series(%(lo)s, %(hi)s) AS g
), typed AS (
    SELECT *, CASE
        WHEN rs < .900 THEN 'completed' WHEN rs < .940 THEN 'compensated'
        WHEN rs < .950 THEN 'cancelled' WHEN rs < .955 THEN 'failed'
        WHEN rs < .980 THEN 'running' WHEN rs < .985 THEN 'accepted'
        WHEN rs < .995 THEN 'needs_attention' ELSE 'compensating' END AS state
    FROM base
), timed AS (
    SELECT *,
        (%(now)s::timestamptz) - CASE
            WHEN state IN ('running', 'accepted', 'compensating')
                THEN rt * interval '1 hour'
            WHEN state = 'needs_attention' THEN rt * interval '7 days'
            ELSE rt * %(span)s::interval END AS accepted_at,
        (2 + rd * rd * rd * 600) * interval '1 second' AS took,
        (%(step_counts)s::int[])[d] AS steps
    FROM typed
)
SELECT md5(%(run)s || ':' || n)::uuid AS id, n, d, rd, state, accepted_at, took,
    steps,
    -- the step that failed (or is current), 1-based
    CASE WHEN state = 'completed' THEN steps + 1
         ELSE 1 + floor(rd * steps)::int END AS cur,
    CASE WHEN state IN {TERMINAL} OR state = 'needs_attention'
         THEN accepted_at + took
         WHEN state = 'accepted' THEN accepted_at
         ELSE accepted_at + took / 2 END AS progress_at,
    state = 'needs_attention' OR (state = 'running' AND rd < .1) AS stuck
FROM timed
"""

INSTANCE_SQL = f"""
INSERT INTO workflows_app_workflowinstance (
    id, definition_id, definition_key, business_key, idempotency_key, input,
    input_fingerprint, outputs, state, attention_kind, attention_reason, version,
    accepted_at, started_at, finished_at, last_progress_at, deadline_at,
    stuck_check_at, redispatch_at, pivot_passed, stuck, stuck_reason, stuck_since
)
SELECT id, (%(def_ids)s::bigint[])[d], (%(def_keys)s::text[])[d],
    'LOAD-' || %(run)s || '-' || lpad(n::text, 8, '0'), NULL,
    jsonb_build_object('order', n, 'amount', round((rd * 500)::numeric, 2),
                       'currency', 'EUR', 'customer', 'customer-' || (n %% 9973)),
    md5(n::text),
    CASE WHEN state = 'completed'
         THEN jsonb_build_object('receipt', 'R-' || n) ELSE '{{}}'::jsonb END,
    state,
    CASE WHEN state = 'needs_attention' THEN 'step_failed' ELSE '' END,
    CASE WHEN state = 'needs_attention'
         THEN 'step ' || cur || ': step failed; policy is hold' ELSE '' END,
    CASE WHEN state = 'accepted' THEN 0 ELSE 2 + 3 * least(cur, steps) END,
    accepted_at,
    CASE WHEN state NOT IN ('accepted', 'cancelled')
         THEN accepted_at + interval '40 milliseconds' END,
    CASE WHEN state IN {TERMINAL} THEN accepted_at + took END,
    progress_at, NULL,
    CASE WHEN state NOT IN {TERMINAL} THEN progress_at + interval '2 minutes' END,
    NULL, false, stuck,
    CASE WHEN state = 'needs_attention'
         THEN 'step ' || cur || ': step failed; policy is hold'
         WHEN stuck THEN 'no progress since '
             || to_char(progress_at, 'YYYY-MM-DD HH24:MI:SS') || ' UTC while running'
         ELSE '' END,
    CASE WHEN stuck THEN progress_at + interval '2 minutes' END
FROM load_batch
"""

# Steps before ``cur`` succeeded; ``cur`` failed (or runs); later ones never ran.
STEP_SQL = """
INSERT INTO workflows_app_stepexecution (
    instance_id, step_definition_id, position, name, state, compensation_state,
    attempt, attempts_allowed, compensation_attempt, compensation_attempts_allowed,
    next_attempt_at, deadline_at, redispatch_at, last_error, output, succeeded_at,
    compensated_at
)
SELECT b.id, sd.id, sd.position, sd.name,
    CASE WHEN b.state IN ('accepted', 'cancelled') THEN 'pending'
         WHEN sd.position < b.cur THEN 'succeeded'
         WHEN sd.position > b.cur THEN 'pending'
         WHEN b.state = 'running' THEN 'running'
         ELSE 'failed' END,
    CASE WHEN b.state IN ('compensated', 'compensating') AND sd.position < b.cur
              AND sd.compensation <> ''
         THEN CASE WHEN b.state = 'compensated' OR sd.position = 1
                   THEN 'done' ELSE 'pending' END
         WHEN b.state IN ('compensated', 'cancelled') THEN 'not_needed'
         ELSE 'none' END,
    CASE WHEN sd.position < b.cur THEN 1
         WHEN sd.position = b.cur AND b.state NOT IN ('accepted', 'cancelled')
         THEN sd.max_attempts ELSE 0 END,
    sd.max_attempts,
    CASE WHEN b.state = 'compensated' AND sd.position < b.cur THEN 1 ELSE 0 END,
    sd.max_attempts, NULL, NULL, NULL,
    CASE WHEN sd.position = b.cur AND b.state NOT IN ('running', 'completed',
                                                      'accepted', 'cancelled')
         THEN 'ActivityError: ' || sd.name || ' declined the request' ELSE '' END,
    CASE WHEN sd.position < b.cur
         THEN jsonb_build_object('reference', sd.name || '-' || b.n) END,
    CASE WHEN sd.position < b.cur
         THEN b.accepted_at + b.took * sd.position / (b.steps + 1) END,
    CASE WHEN b.state = 'compensated' AND sd.position < b.cur
         THEN b.accepted_at + b.took END
FROM load_batch b
JOIN workflows_app_stepdefinition sd ON sd.definition_id = (%(def_ids)s::bigint[])[b.d]
"""

# ``h`` rows per instance: accept, start, then schedule / begin / succeed per
# step (wrapping around for long timelines), the last row the final move.
HISTORY_SQL = """
INSERT INTO workflows_app_transitionlog (
    instance_id, step_id, field, source, target, transition, actor_kind,
    actor_label, user_id, reason, data, created_at
)
SELECT b.id, CASE WHEN k > 2 AND k < %(h)s THEN s.id END,
    'state',
    CASE WHEN k = 1 THEN '' WHEN k = 2 THEN 'accepted'
         WHEN k = %(h)s THEN CASE WHEN b.state IN ('compensated') THEN 'compensating'
                                 WHEN b.state = 'cancelled' THEN 'accepted'
                                 WHEN b.state = 'failed' THEN 'needs_attention'
                                 ELSE 'running' END
         ELSE (ARRAY['pending', 'scheduled', 'running'])[1 + (k - 3) %% 3] END,
    CASE WHEN k = 1 THEN 'accepted' WHEN k = 2 THEN 'running'
         WHEN k = %(h)s THEN b.state
         ELSE (ARRAY['scheduled', 'running', 'succeeded'])[1 + (k - 3) %% 3] END,
    CASE WHEN k = 1 THEN 'accept' WHEN k = 2 THEN 'start'
         WHEN k = %(h)s THEN CASE b.state
             WHEN 'completed' THEN 'complete'
             WHEN 'compensated' THEN 'finish_compensation'
             WHEN 'cancelled' THEN 'cancel' WHEN 'failed' THEN 'close_as_failed'
             WHEN 'needs_attention' THEN 'hold'
             WHEN 'compensating' THEN 'begin_compensation'
             ELSE 'schedule' END
         ELSE (ARRAY['schedule', 'begin_attempt', 'succeed'])[1 + (k - 3) %% 3] END,
    CASE WHEN k = 1 THEN 'api' ELSE 'worker' END,
    CASE WHEN k = 1 THEN 'load-generator' ELSE 'worker-' || (b.n %% 16) END,
    NULL,
    CASE WHEN k = 1 THEN 'accepted for LOAD-' || b.n ELSE '' END,
    CASE WHEN (k - 3) %% 3 = 1 AND k > 2
         THEN jsonb_build_object('attempt', 1, 'worker_host', 'worker-' || (b.n %% 16))
         ELSE '{}'::jsonb END,
    b.accepted_at + b.took * (k - 1) / %(h)s
FROM load_batch b
CROSS JOIN generate_series(1, %(h)s) AS k
LEFT JOIN workflows_app_stepexecution s
    ON s.instance_id = b.id AND s.position = 1 + ((k - 3) / 3) %% b.steps
WHERE b.state <> 'accepted' OR k = 1
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
        history = max(3, options["history_per_instance"])
        definitions = self._definitions()
        params: dict[str, Any] = {
            "run": secrets.token_hex(3),
            "k": len(definitions),
            "def_ids": [d.pk for d in definitions],
            "def_keys": [d.key for d in definitions],
            "step_counts": [max(1, d.steps.count()) for d in definitions],
            "span": f"{options['days']} days",
            "h": history,
        }
        with connection.cursor() as cursor:
            cursor.execute("SELECT now()")
            params["now"] = cursor.fetchone()[0]
            cursor.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")
            superuser = cursor.fetchone()[0]
        started = time.monotonic()
        for lo in range(1, total + 1, size):
            hi = min(total, lo + size - 1)
            self._batch({**params, "lo": lo, "hi": hi}, superuser)
            rate = hi / (time.monotonic() - started)
            self.stdout.write(f"{hi:>10,} instances  ({rate:,.0f}/s)")
        self.stdout.write("VACUUM ANALYZE (for index-only scans and fresh statistics)")
        with connection.cursor() as cursor:
            for table in ("workflowinstance", "stepexecution", "transitionlog"):
                cursor.execute(f"VACUUM (ANALYZE) workflows_app_{table}")
        self.stdout.write(
            f"done: {total:,} instances, about {total * history:,} history rows "
            f"in {time.monotonic() - started:,.0f} s (run {params['run']})"
        )

    def _definitions(self) -> list[WorkflowDefinition]:
        published = list(
            WorkflowDefinition.objects.published()
            .filter(mode=WorkflowDefinition.Mode.ORCHESTRATED)
            .order_by("key", "version")
        )
        if not published:
            published = load_demo_definitions()
        return published

    def _batch(self, params: dict[str, Any], superuser: bool) -> None:
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.execute("SET LOCAL synchronous_commit = off")
            if superuser:
                # Skips the per-row foreign-key triggers: rows are built consistent.
                cursor.execute("SET LOCAL session_replication_role = replica")
            cursor.execute(BATCH_SQL, params)
            cursor.execute(INSTANCE_SQL, params)
            cursor.execute(STEP_SQL, params)
            cursor.execute(HISTORY_SQL, params)
