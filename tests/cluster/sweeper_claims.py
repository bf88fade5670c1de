"""Did two sweepers ever do the same piece of work?

Two kinds of sweeper work are checked:

* **Re-sends.** The sweeper claims unclaimed work by compare-and-set on the
  row's ``redispatch_at`` and then sends it again; the claim itself leaves
  no history row. So the run's database (never the application's schema
  in production) gets triggers that record every claim: a step's
  ``redispatches`` going up by one (only the sweeper's claim does that), an
  accepted instance's ``redispatch_at`` moving forward. Each record has the
  due time it claimed and the ``application_name`` of the connection, i.e.
  the host whose worker ran that sweep. The same row claimed twice for the
  same due time, or claimed before it was due (a claim that waited for
  another's lock and then took the row anyway sees the other's new, future
  due time), is work done twice.
* **Transitions.** Time-outs, deadline holds and stuck flags are history
  rows by ``system:sweep``; each names what it acted on (the attempt's
  deadline, the instance's last progress), so two equal rows for one
  instance and step are the same work done twice.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from django.db import connection

from workflows_app.models import TransitionLog, WorkflowInstance

INSTALL = """
CREATE TABLE IF NOT EXISTS cluster_sweep_claim (
    id bigserial PRIMARY KEY,
    kind text NOT NULL,
    row_id text NOT NULL,
    due timestamptz NOT NULL,
    claimed_by text NOT NULL,
    at timestamptz NOT NULL DEFAULT clock_timestamp(),
    -- Claimed before it was due: the row had been claimed already (a
    -- claim that re-read the row after another's commit sees its new,
    -- future due time), so this sweeper repeats the other's work.
    not_due boolean NOT NULL
);
CREATE OR REPLACE FUNCTION cluster_step_claim() RETURNS trigger AS $$
BEGIN
    IF NEW.redispatches = OLD.redispatches + 1 THEN
        INSERT INTO cluster_sweep_claim (kind, row_id, due, claimed_by, not_due)
        VALUES ('step', OLD.id::text, OLD.redispatch_at,
                current_setting('application_name'),
                OLD.redispatch_at > clock_timestamp());
    END IF;
    RETURN NEW;
END $$ LANGUAGE plpgsql;
CREATE OR REPLACE FUNCTION cluster_instance_claim() RETURNS trigger AS $$
BEGIN
    IF OLD.state = 'accepted' AND NEW.state = 'accepted'
       AND NEW.redispatch_at > OLD.redispatch_at THEN
        INSERT INTO cluster_sweep_claim (kind, row_id, due, claimed_by, not_due)
        VALUES ('instance', OLD.id::text, OLD.redispatch_at,
                current_setting('application_name'),
                OLD.redispatch_at > clock_timestamp());
    END IF;
    RETURN NEW;
END $$ LANGUAGE plpgsql;
DROP TRIGGER IF EXISTS cluster_step_claim ON workflows_app_stepexecution;
CREATE TRIGGER cluster_step_claim AFTER UPDATE ON workflows_app_stepexecution
    FOR EACH ROW EXECUTE FUNCTION cluster_step_claim();
DROP TRIGGER IF EXISTS cluster_instance_claim ON workflows_app_workflowinstance;
CREATE TRIGGER cluster_instance_claim AFTER UPDATE ON workflows_app_workflowinstance
    FOR EACH ROW EXECUTE FUNCTION cluster_instance_claim();
"""

SWEEP_LABEL = "system:sweep"


def install() -> None:
    with connection.cursor() as cursor:
        cursor.execute(INSTALL)


def sweeper_work(business_keys: list[str]) -> dict[str, Any]:
    ids = list(
        WorkflowInstance.objects.filter(business_key__in=business_keys).values_list(
            "id", flat=True
        )
    )
    with connection.cursor() as cursor:
        cursor.execute(
            """
            SELECT c.kind, c.row_id, c.due, c.not_due, c.at, c.claimed_by
            FROM cluster_sweep_claim c
            LEFT JOIN workflows_app_stepexecution s
                   ON c.kind = 'step' AND s.id::text = c.row_id
            WHERE (c.kind = 'step' AND s.instance_id = ANY(%s))
               OR (c.kind = 'instance' AND c.row_id = ANY(%s))
            """,
            [ids, [str(pk) for pk in ids]],
        )
        claims = cursor.fetchall()
    by_claim = Counter((kind, row, due) for kind, row, due, *_ in claims)
    twice = [
        f"{kind} {row} due {due:%H:%M:%S.%f}: claimed {n} times"
        for (kind, row, due), n in by_claim.items()
        if n > 1
    ]
    twice += [
        f"{kind} {row} claimed by {host} before it was due ({due:%H:%M:%S.%f})"
        for kind, row, due, not_due, _, host in claims
        if not_due
    ]
    rows = TransitionLog.objects.filter(instance_id__in=ids, actor_label=SWEEP_LABEL)
    by_row = Counter(
        (*row[:5], json.dumps(row[5], sort_keys=True))
        for row in rows.values_list(
            "instance_id", "step_id", "transition", "target", "reason", "data"
        )
    )
    twice += [
        f"{i} step {s}: {t} -> {g} ({r[:80]})"
        for (i, s, t, g, r, _), n in by_row.items()
        if n > 1
    ]
    kinds: Counter[str] = Counter()
    for key, n in by_row.items():
        kinds[key[2]] += n
    # Evidence that sweepers ran side by side: seconds in which claims were
    # made from more than one host.
    hosts_per_second: dict[Any, set[str]] = {}
    for *_, at, host in claims:
        hosts_per_second.setdefault(at.replace(microsecond=0), set()).add(host)
    return {
        "re-sends claimed": len(claims),
        "claims by host": dict(Counter(host for *_, host in claims)),
        "seconds with claims from two hosts": sum(
            len(hosts) > 1 for hosts in hosts_per_second.values()
        ),
        "sweeper transitions": sum(by_row.values()),
        "sweeper transitions by kind": dict(kinds),
        "done twice": len(twice),
        "examples": twice[:10],
    }
