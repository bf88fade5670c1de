"""The cluster run: the scaling curve, then traffic through the web host
while a worker host loses power, another is cut off the network for 20 s
and the broker crashes, then a probe batch that every worker host must
take part in (none has gone quiet), then the verdict.

The driver is one thread with a timeline, as in the chaos run: a start the
web host could not take (broker or database unreachable) is sent again
with the same idempotency key on a later tick.
"""

from __future__ import annotations

import dataclasses
import heapq
import random
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from django.db import connections
from django.db.models import Max, Min, Q

from tests.chaos.figures import Figures, collect
from tests.chaos.run import ACTIVE, db_retry
from tests.chaos.traffic import CHAOS_KEY, MIX
from tests.cluster.hosts import BEAT_HOSTS, WORKER_HOSTS, Cluster
from tests.cluster.sweeper_claims import sweeper_work
from tests.saga_invariant import TERMINAL
from workflows_app.client import ClientError, SagaDeskClient
from workflows_app.engine.locking import db_now
from workflows_app.models import (
    ActorKind,
    ApiToken,
    StepExecution,
    TransitionLog,
    WorkflowInstance,
)

PROBE_PER_HOST = 4
# Seconds a worker host may take to work again after the last fault ended.
RECOVERY = 30.0
TIMELINE_BUCKET = 5.0  # seconds


def _host(actor_label: str) -> str:
    """A worker's actor label is its Celery name, ``w1@cluster-w1``."""
    return actor_label.split("@")[0]


def work_by_host(keys: list[str]) -> Counter[str]:
    """Transitions each worker host made for these workflows."""
    labels = TransitionLog.objects.filter(
        instance__business_key__in=keys, actor_kind=ActorKind.WORKER
    ).values_list("actor_label", flat=True)
    return Counter(_host(label) for label in labels)


def work_timeline(keys: list[str], since: Any) -> dict[str, list[int]]:
    """Per worker host, its transitions in each TIMELINE_BUCKET seconds
    from ``since`` (the traffic's start): when a host stopped working."""
    rows = TransitionLog.objects.filter(
        instance__business_key__in=keys,
        actor_kind=ActorKind.WORKER,
        created_at__gte=since,
    ).values_list("actor_label", "created_at")
    buckets: dict[str, Counter[int]] = {host: Counter() for host in WORKER_HOSTS}
    last = 0
    for label, at in rows:
        bucket = int((at - since).total_seconds() // TIMELINE_BUCKET)
        buckets.setdefault(_host(label), Counter())[bucket] += 1
        last = max(last, bucket)
    return {
        host: [counts[b] for b in range(last + 1)] for host, counts in buckets.items()
    }


# The chaos mix without the participants that hang until their deadline:
# they pin a one-process host for seconds and say nothing about hosts.
CLUSTER_MIX = [m for m in MIX if "timeout" not in str(m[2].values())]


@dataclasses.dataclass
class Plan:
    seed: int
    rate: float = 2.0  # starts per second while the faults fire
    traffic_seconds: float = 22.0
    cut_at: float = 1.0  # w3 off the network...
    cut_for: float = 20.0  # ...for this long
    kill_at: float = 3.0  # w2 (worker and beat) loses power...
    reboot_at: float = 13.0  # ...and boots again
    broker_restart_at: float = 8.0
    broker_down: float = 2.0
    curve_workflows: int = 10  # per point of the scaling curve (0: none)
    min_settle: float = 40.0  # seconds after the traffic, whatever the budget
    cycle: float = 0.0  # the long form: the faults again every this many s


class Traffic:
    """Starts through the web host's API; a start that failed is sent again
    with the same idempotency key, so it is recorded once either way."""

    def __init__(self, client: SagaDeskClient, rng: random.Random, run_id: str):
        self.client = client
        self.rng = rng
        self.run_id = run_id
        self.started: list[str] = []
        self.faults: Counter[str] = Counter()
        self.refused: Counter[str] = Counter()  # why a start was sent again
        self._next = 0
        self._pending: tuple[str, str, dict[str, Any]] | None = None

    def start_one(self) -> None:
        if self._pending is None:
            weights = [w for w, _, _ in CLUSTER_MIX]
            _, key, simulate = self.rng.choices(CLUSTER_MIX, weights=weights)[0]
            self._next += 1
            data: dict[str, Any] = {"amount": self.rng.randint(5, 900)}
            if simulate:
                data["simulate"] = simulate
            self._pending = (key, f"{self.run_id}-{self._next:05d}", data)
        key, business_key, data = self._pending
        self.client.start(
            key, business_key=business_key, idempotency_key=business_key, input=data
        )
        self._pending = None
        self.started.append(business_key)
        for mode in data.get("simulate", {}).values():
            self.faults[f"participant {mode}"] += 1


class ClusterRun:
    def __init__(self, cluster: Cluster, plan: Plan, broker: str) -> None:
        self.cluster = cluster
        self.plan = plan
        self.kind = broker
        self.rng = random.Random(f"{plan.seed}-{broker}")
        self.run_id = f"cl-{plan.seed}-{broker}"
        token = db_retry(
            lambda: ApiToken.issue(f"cluster-{broker}-{plan.seed}", ["start", "read"])
        )[1]
        self.client = SagaDeskClient(cluster.web_url(), token, timeout=30)
        self.traffic = Traffic(self.client, self.rng, self.run_id)
        self.curve: dict[int, float] = {}
        self.curve_keys: list[str] = []
        self.timings: dict[str, float] = {}
        self.probe_keys: list[str] = []
        self.probe_work: dict[str, int] = {}
        self.diagnoses: dict[str, str] = {}
        self._probes = 0
        self.healed_at = 0.0  # when the last fault ended (monotonic)
        self.began_at: Any = None  # the traffic's start, by the database's clock
        self.still_busy: list[str] = []
        self._timeline: list[tuple[float, int, str]] = []
        self._order = 0

    # -- the scaling curve ------------------------------------------------------
    def start_batch(self, keys: list[str]) -> None:
        """Four-step workflows started through the API at once."""

        def start(key: str) -> None:
            for _ in range(20):
                try:
                    self.client.start(
                        CHAOS_KEY, business_key=key, idempotency_key=key, input={}
                    )
                    return
                except ClientError:
                    time.sleep(0.5)
            raise RuntimeError(f"could not start {key}")

        with ThreadPoolExecutor(4) as pool:
            list(pool.map(start, keys))

    def wait_finished(self, keys: list[str], timeout: float) -> bool:
        batch = WorkflowInstance.objects.filter(business_key__in=keys)
        deadline = time.monotonic() + timeout
        while batch.exclude(state="completed").exists():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.2)
        return True

    def measure(self, hosts: int) -> float:
        """Workflows/s with ``hosts`` worker hosts: a batch of four-step
        workflows started through the API at once, from the first
        acceptance to the last finish (the database's clock)."""
        n = self.plan.curve_workflows
        keys = [f"{self.run_id}-curve{hosts}-{i:04d}" for i in range(n)]
        self.start_batch(keys)
        if not self.wait_finished(keys, 120):
            raise RuntimeError(f"the curve batch for {hosts} hosts did not finish")
        batch = WorkflowInstance.objects.filter(business_key__in=keys)
        span = batch.aggregate(a=Min("accepted_at"), b=Max("finished_at"))
        seconds = (span["b"] - span["a"]).total_seconds()
        self.curve_keys += keys  # checked with everything else
        return n / seconds

    # -- does every worker host work once the faults healed? ----------------------
    def probe(self) -> Counter[str]:
        """A batch of four-step workflows, a few per worker host, started
        at once after the traffic settled; returns the worker transitions
        each host made for it. Every host is up and idle by then, so one
        that takes none of the batch has gone quiet."""
        self._probes += 1
        n = PROBE_PER_HOST * len(WORKER_HOSTS)
        keys = [f"{self.run_id}-probe{self._probes}-{i:04d}" for i in range(n)]
        self.probe_keys += keys
        self.start_batch(keys)
        self.wait_finished(keys, 60)
        return work_by_host(keys)

    def quiet_hosts(self) -> list[str]:
        # The hosts have RECOVERY seconds from the last fault's end to work
        # again (a broker socket left half-open by the cut is given up after
        # CELERY_BROKER_SOCKET_TIMEOUT or two missed heartbeats, then the
        # worker reconnects).
        time.sleep(max(0.0, self.healed_at + RECOVERY - time.monotonic()))
        work = db_retry(self.probe)
        self.probe_work = dict(work)
        quiet = [host for host in WORKER_HOSTS if not work[host]]
        if quiet:
            # A second chance (a host may have been busy with a slow call the
            # whole first probe); what the hosts were doing meanwhile is kept.
            for host in quiet:
                self.diagnoses[host] = self.cluster.diagnose(host)
            work = db_retry(self.probe)
            self.probe_work = {h: self.probe_work.get(h, 0) + work[h] for h in work}
            quiet = [host for host in quiet if not work[host]]
        return quiet

    def scaling_curve(self) -> None:
        """One worker host, then two, then three; each booted and ready
        before its batch."""
        for count, host in enumerate(WORKER_HOSTS, start=1):
            self.cluster.boot_worker_host(host)
            self.cluster.wait_worker(host)
            connections.close_all()
            self.curve[count] = self.measure(count)
            print(
                f"cluster[{self.kind}]: {count} worker host(s): "
                f"{self.curve[count]:.1f} workflows/s",
                flush=True,
            )

    # -- the faults -------------------------------------------------------------
    def at(self, when: float, what: str) -> None:
        self._order += 1
        heapq.heappush(self._timeline, (when, self._order, what))

    def plan_faults(self) -> None:
        p = self.plan
        start = 0.0
        while start < p.traffic_seconds:
            self.at(start + p.cut_at, "cut w3")
            self.at(start + p.cut_at + p.cut_for, "heal w3")
            self.at(start + p.kill_at, "power off w2")
            self.at(start + p.reboot_at, "boot w2")
            self.at(start + p.broker_restart_at, "broker down")
            self.at(start + p.broker_restart_at + p.broker_down, "broker up")
            start += p.cycle or p.traffic_seconds

    def fire(self, what: str) -> None:
        if what.startswith(("heal", "boot", "broker up")):
            self.healed_at = time.monotonic()
        verb, _, host = what.partition(" ")
        if verb == "cut":
            self.cluster.net.cut(host)
            self.traffic.faults["host cut off 20 s"] += 1
        elif verb == "heal":
            self.cluster.net.heal(host)
        elif what.startswith("power off"):
            killed = self.cluster.kill_host(host.split()[-1])
            self.traffic.faults["host power-off (all processes)"] += 1
            self.traffic.faults["processes killed with it"] += killed
        elif what.startswith("boot"):
            if not self.cluster.procs.get(host):
                self.cluster.boot_worker_host(host)
        elif what == "broker down":
            self.cluster.broker.kill()
            self.traffic.faults[f"{self.kind} crash-restart"] += 1
        elif what == "broker up" and self.cluster.broker.proc is None:
            # RabbitMQ takes seconds to boot: traffic goes on meanwhile.
            self.cluster.broker.start(wait=False)

    def traffic_phase(self) -> None:
        self.began_at = db_retry(db_now)
        begun = time.monotonic()
        p = self.plan
        target = int(p.rate * p.traffic_seconds)
        while True:
            now = time.monotonic() - begun
            while self._timeline and self._timeline[0][0] <= now:
                self.fire(heapq.heappop(self._timeline)[2])
            due = min(int(now * p.rate) + 1, target)
            if now >= p.traffic_seconds and len(self.traffic.started) >= target:
                break
            try:
                while len(self.traffic.started) < due:
                    self.traffic.start_one()
            except ClientError as exc:
                # The web host answered 5xx or not at all: next tick.
                self.traffic.refused[str(exc)[:120]] += 1
            time.sleep(0.05)
        # Heal whatever is still down; faults not yet due are dropped.
        for _, _, what in sorted(self._timeline):
            if what.startswith(("heal", "boot", "broker up")):
                self.fire(what)
        self._timeline = []
        self.cluster.broker.wait()  # RabbitMQ boots for seconds
        self.healed_at = max(self.healed_at, time.monotonic())

    # -- quiescence and the verdict ------------------------------------------------
    @property
    def keys(self) -> list[str]:
        return self.curve_keys + self.traffic.started + self.probe_keys

    def busy(self) -> list[str]:
        keys = self.keys
        active = WorkflowInstance.objects.filter(
            business_key__in=keys, state__in=ACTIVE
        ).values_list("id", "state")
        in_flight = (
            StepExecution.objects.filter(instance__business_key__in=keys)
            .filter(
                Q(state__in=["running", "waiting"]) | Q(compensation_state="running")
            )
            .exclude(instance__state__in=TERMINAL)
            .values_list("instance_id", "name", "state")
        )
        return [f"{pk} {state}" for pk, state in active] + [
            f"{pk}: {name} {state}" for pk, name, state in in_flight
        ]

    def settle(self, until: float) -> bool:
        calm = 0
        while True:
            self.still_busy = db_retry(self.busy)
            calm = calm + 1 if not self.still_busy else 0
            if calm >= 2:
                return True
            if time.monotonic() >= until:
                return False
            time.sleep(1)

    def run(self, end: float, *, curve: bool) -> dict[str, Any]:
        clock = time.monotonic()
        cluster = self.cluster
        cluster.broker.wait()
        cluster.boot_web()
        if curve and self.plan.curve_workflows:
            cluster.wait_web()
            self.scaling_curve()
        else:
            for host in WORKER_HOSTS:
                cluster.boot_worker_host(host)
            cluster.wait_web()
            for host in WORKER_HOSTS:
                cluster.wait_worker(host)
        self.timings["boot and curve"] = time.monotonic() - clock
        self.plan_faults()
        self.traffic_phase()
        self.timings["traffic"] = time.monotonic() - clock
        quiet = self.settle(max(end, time.monotonic() + self.plan.min_settle))
        self.timings["settle"] = time.monotonic() - clock
        quiet_hosts = self.quiet_hosts() if quiet else []
        if quiet:  # the probes' workflows finished too
            quiet = self.settle(time.monotonic() + 60)
        self.timings["probe"] = time.monotonic() - clock
        timeline = db_retry(lambda: work_timeline(self.keys, self.began_at))
        sweeps_by_host = cluster.sweeps_by_host()
        cluster.stop_application()  # the verdict reads a system at rest
        figures: Figures = db_retry(lambda: collect(self.keys, self.traffic.faults))
        sweeps = db_retry(lambda: sweeper_work(self.keys))
        sweeps["sweeps run by host"] = sweeps_by_host
        self.timings["verdict"] = time.monotonic() - clock
        return {
            "broker": self.kind,
            "figures": figures,
            "sweeps": sweeps,
            "curve": self.curve,
            "quiescent": quiet,
            "quiet hosts": quiet_hosts,
            "probe work by host": self.probe_work,
            "diagnoses": self.diagnoses,
            "work timeline": timeline,
            "still busy": self.still_busy[:10],
            "starts sent again": dict(self.traffic.refused.most_common(5)),
            "timings": self.timings,
            "beat hosts": list(BEAT_HOSTS),
        }
