"""Run the cluster test by hand; the CI form is ``tests/cluster/test_cluster.py``.

    .venv/bin/python -m tests.cluster                 # the CI form
    .venv/bin/python -m tests.cluster --minutes 10    # 10 min of traffic per broker

Needs root (network namespaces). Exit status 0 when every figure that must
be 0 is 0 in every broker's run and each run reached quiescence.
"""

from __future__ import annotations

import argparse
import atexit
import dataclasses
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

from tests.cluster.network import remove_stale

CPU_NOTE = (
    "all hosts share this machine's {cpus} CPU cores: the curve shows how "
    "the work spreads over hosts, not what more machines would add"
)


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.cluster")
    parser.add_argument("--brokers", default="redis,rabbitmq")
    parser.add_argument(
        "--budget", type=float, default=150.0, help="seconds from start to verdicts"
    )
    parser.add_argument("--minutes", type=float, help="long form: traffic per broker")
    parser.add_argument("--rate", type=float, default=2.0, help="starts per second")
    parser.add_argument(
        "--curve", type=int, help="workflows per point of the scaling curve"
    )
    parser.add_argument("--seed", type=int, default=random.randrange(10**6))
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument(
        "--keep", action="store_true", help="keep the logs and the servers' folders"
    )
    return parser.parse_args()


def _plan(args: argparse.Namespace) -> Any:
    from tests.cluster.run import Plan

    if args.minutes is None:
        return Plan(
            args.seed,
            rate=args.rate,
            curve_workflows=10 if args.curve is None else args.curve,
        )
    return Plan(
        args.seed,
        rate=args.rate,
        traffic_seconds=args.minutes * 60,
        curve_workflows=100 if args.curve is None else args.curve,
        cycle=60.0,
    )


def _setup_django(url: str, broker: str, rundir: Path) -> None:
    os.environ.update(
        DJANGO_SETTINGS_MODULE="workflows_app.settings",
        DATABASE_URL=url,
        CELERY_BROKER_URL=broker,
        SAGA_DESK_VAR_DIR=str(rundir / "driver"),
        PROMETHEUS_MULTIPROC_DIR=str(rundir / "driver" / "prometheus"),
        # The demo participants' ledger and activities (settings SAGA_DEMO).
        SAGA_DEMO="1",
        SAGA_ACTIVITY_MODULES="tests.worker_activities,tests.chaos.activities",
    )
    (rundir / "driver" / "prometheus").mkdir(parents=True, exist_ok=True)
    import django

    django.setup()
    logging.getLogger().handlers = [logging.FileHandler(rundir / "driver.log")]


def _migrate() -> None:
    from django.core.management import call_command

    from tests.chaos.traffic import load_definitions
    from tests.cluster.sweeper_claims import install

    call_command("migrate", verbosity=0)
    load_definitions()
    install()


def _report(result: dict[str, Any]) -> bool:
    from tests.cluster.run import TIMELINE_BUCKET

    figures = result["figures"]
    sweeps = result["sweeps"]
    print(f"\n== {result['broker']}")
    print(figures.table())
    print(f"{'sweeper work done twice':<28}{sweeps['done twice']:>8}")
    for host, n in sorted(sweeps["sweeps run by host"].items()):
        print(f"  {'sweeps run on ' + host:<26}{n!s:>8}")
    print(f"  {'re-sends claimed':<26}{sweeps['re-sends claimed']:>8}")
    for host, n in sorted(sweeps["claims by host"].items()):
        print(f"    {'by ' + host:<24}{n:>8}")
    both = sweeps["seconds with claims from two hosts"]
    print(f"  {'seconds two hosts claimed':<26}{both:>8}")
    print(f"  {'sweeper transitions':<26}{sweeps['sweeper transitions']:>8}")
    for example in sweeps["examples"]:
        print(f"  twice: {example}")
    print(f"{'quiescent':<28}{'yes' if result['quiescent'] else 'NO':>8}")
    quiet = result["quiet hosts"]
    print(f"{'worker hosts gone quiet':<28}{len(quiet):>8}")
    for host, n in sorted(result["probe work by host"].items()):
        print(f"  {'probe work on ' + host:<26}{n:>8}")
    print(f"  work per {TIMELINE_BUCKET:.0f} s from the traffic's start:")
    for host, counts in sorted(result["work timeline"].items()):
        print(f"    {host:<5}" + " ".join(f"{n:3d}" for n in counts))
    for host in quiet:
        print(f"  {host} alive but took none of the work after the faults healed")
    for host, text in result["diagnoses"].items():
        print(f"  -- what {host} was doing when it took no probe work:")
        print("\n".join(f"     {line}" for line in text.splitlines()))
    for why, n in result["starts sent again"].items():
        print(f"  start sent again {n}x: {why}")
    for item in result["still busy"]:
        print(f"  still busy: {item}")
    print("seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in result["timings"].items()))
    return figures.ok and result["quiescent"] and not quiet and not sweeps["done twice"]


def main() -> int:
    args = _arguments()
    if os.geteuid() != 0:
        print("tests.cluster needs root (ip netns)", file=sys.stderr)
        return 2
    for stale in remove_stale():
        print(f"cluster: removed what run {stale} left behind", flush=True)
    rundir = Path(tempfile.mkdtemp(prefix="saga-cluster-run-"))
    from tests.cluster.hosts import Cluster

    clock = time.monotonic()
    settings = {
        "SAGA_SWEEP_INTERVAL": "1",
        "SAGA_REDISPATCH_AFTER": "5",
        # Redis: a dead host's unacknowledged message comes back after this.
        "CELERY_VISIBILITY_TIMEOUT": "15",
        "SAGA_ALERT_INTERVAL": "5",
        "SAGA_ACTIVITY_MODULES": "tests.worker_activities,tests.chaos.activities",
    }
    cluster: Cluster | None = None

    def clean_up() -> None:
        if cluster is not None:
            cluster.remove(keep_logs=args.keep)
        if not args.keep:
            shutil.rmtree(rundir, ignore_errors=True)

    atexit.register(clean_up)
    # SIGTERM (a test's timeout) unwinds through the cleanup too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    cluster = Cluster(rundir, settings)
    kinds = [k for k in args.brokers.split(",") if k]
    if "rabbitmq" in kinds:
        cluster.brokers["rabbitmq"].start(wait=False)  # boots while we migrate
    cluster.pg.init()
    cluster.pg.start()
    cluster.pg.create_database("cluster")
    cluster.brokers["redis"].start()
    _setup_django(
        cluster.database_url("driver"), cluster.brokers["redis"].url(), rundir
    )
    _migrate()
    plan = _plan(args)
    print(
        f"cluster: seed {plan.seed}, hosts {cluster.describe()}, logs {rundir}",
        flush=True,
    )
    from tests.cluster.run import ClusterRun

    results = []
    ok = True
    for n, kind in enumerate(kinds):
        cluster.use_broker(kind)
        if args.minutes is None:
            # The CI budget, shared out: what is left over the runs to come.
            end = time.monotonic() + (clock + args.budget - time.monotonic()) / (
                len(kinds) - n
            )
        else:
            end = time.monotonic() + args.minutes * 60 + 300
        run = ClusterRun(cluster, plan, kind)
        results.append(run.run(end, curve=n == 0 or args.minutes is not None))
        ok = _report(results[-1]) and ok
    cpus = os.cpu_count()
    print(f"\nscaling curve ({CPU_NOTE.format(cpus=cpus)}):")
    for r in results:
        for hosts, rate in r["curve"].items():
            print(f"  {r['broker']:<9} {hosts} worker host(s) {rate:6.1f} workflows/s")
    print(f"cluster: {time.monotonic() - clock:.0f}s in all", flush=True)
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "seed": plan.seed,
                    "plan": dataclasses.asdict(plan),
                    "cpus": cpus,
                    "runs": [
                        {
                            **{k: v for k, v in r.items() if k != "figures"},
                            **r["figures"].as_json(),
                        }
                        for r in results
                    ],
                },
                indent=2,
                default=str,
            )
        )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
