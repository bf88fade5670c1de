"""Run the chaos test by hand; the CI form is ``tests/chaos/test_chaos.py``.

    .venv/bin/python -m tests.chaos                 # the CI form: 300 workflows
    .venv/bin/python -m tests.chaos --minutes 10    # continuous traffic, 10 min

It starts its own PostgreSQL cluster (initdb into a temporary folder, a free
port from 55432) and its own Redis (a free port from 56379), migrates, loads
the demo definitions, runs three worker processes and beat, and removes it
all at the end. The shared servers are never touched. Exit status 0 when
every figure that must be 0 is 0 and the run reached quiescence.
"""

from __future__ import annotations

import argparse
import atexit
import json
import logging
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.chaos.services import PostgresCluster, RedisServer


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos")
    parser.add_argument("--workflows", type=int, default=300)
    parser.add_argument("--seconds", type=float, default=45.0, help="traffic time")
    parser.add_argument(
        "--budget", type=float, default=190.0, help="seconds from start to verdict"
    )
    parser.add_argument(
        "--minutes", type=float, help="long form: traffic for this long"
    )
    parser.add_argument(
        "--rate", type=float, default=2.0, help="long form: starts per second"
    )
    parser.add_argument("--seed", type=int, default=random.randrange(10**6))
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument(
        "--keep", action="store_true", help="keep the logs and the stopped cluster"
    )
    return parser.parse_args()


def _plan(args: argparse.Namespace) -> Any:
    from tests.chaos.run import Plan

    if args.minutes is None:
        return Plan(args.workflows, args.seconds, args.seed)
    seconds = args.minutes * 60
    every = max(1, round(seconds / 150))  # a broker and a database crash each
    return Plan(
        max(args.workflows, int(seconds * args.rate)),
        seconds,
        args.seed,
        kill_every=(8.0, 25.0),
        redis_restarts=every,
        postgres_restarts=every,
        late=True,
    )


def _setup_django(pg: PostgresCluster, redis: RedisServer, rundir: Path) -> None:
    os.environ.update(
        DJANGO_SETTINGS_MODULE="workflows_app.settings",
        DATABASE_URL=pg.url("chaos"),
        CELERY_BROKER_URL=redis.url(),
        SAGA_DESK_VAR_DIR=str(rundir / "var"),
        SAGA_REDISPATCH_AFTER="30",
        # The demo participants' ledger and activities (settings SAGA_DEMO).
        SAGA_DEMO="1",
        # Publishing a definition checks that its activities exist.
        SAGA_ACTIVITY_MODULES="tests.worker_activities,tests.chaos.activities",
    )
    import django

    django.setup()
    # The driver's own log (failed sends during outages) goes to a file.
    handler = logging.FileHandler(rundir / "driver.log")
    logging.getLogger().handlers = [handler]


def _migrate() -> None:
    from django.core.management import call_command

    from tests.chaos.traffic import load_definitions

    call_command("migrate", verbosity=0)
    load_definitions()


def main() -> int:
    args = _arguments()
    rundir = Path(tempfile.mkdtemp(prefix="saga-chaos-run-"))
    pg = PostgresCluster()
    redis = RedisServer()
    run: Any = None

    def clean_up() -> None:
        if run is not None:
            run.stop_processes()
        redis.stop()
        pg.stop(delete=not args.keep)
        if not args.keep:
            shutil.rmtree(rundir, ignore_errors=True)

    atexit.register(clean_up)
    # SIGTERM (a test's timeout) unwinds through the cleanup too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    clock = time.monotonic()
    # The budget runs from here: the verdict starts by then at the latest.
    end = clock + (args.budget if args.minutes is None else args.minutes * 120 + 300)
    pg.init()
    pg.start()
    pg.create_database("chaos")
    redis.start()
    _setup_django(pg, redis, rundir)
    from tests.chaos.run import ChaosRun

    plan = _plan(args)
    print(
        f"chaos: seed {plan.seed}, {plan.workflows} workflows over "
        f"{plan.traffic_seconds:.0f}s, PostgreSQL :{pg.port}, Redis :{redis.port}, "
        f"logs {rundir}, cluster {pg.root}",
        flush=True,
    )
    run = ChaosRun(plan, pg, redis, rundir)
    run.start_workers()
    _migrate()
    setup = time.monotonic() - clock
    figures, extra = run.run(end)
    timings = {"setup": setup, **extra["timings"]}
    if figures.reports:
        (rundir / "violations.txt").write_text("\n\n".join(figures.reports))
    print(figures.table())
    print(f"{'quiescent':<28}{'yes' if extra['quiescent'] else 'NO':>8}")
    for item in extra["still busy"]:
        print(f"  still busy: {item}")
    print("seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
    if args.json:
        result = {**figures.as_json(), "seed": plan.seed, **extra}
        args.json.write_text(json.dumps(result, indent=2, default=str))
    return 0 if figures.ok and extra["quiescent"] else 1


if __name__ == "__main__":
    sys.exit(main())
