"""The chaos run: traffic on three worker processes while workers are killed
and the broker and the database crash, then healing, an operator, and the
verdict (:mod:`tests.chaos.figures`).

The driver is one thread: faults are events on a timeline, so a start that
meets a database outage is simply tried again on a later tick (the
idempotency key makes that safe) while the outage ends on schedule.
"""

from __future__ import annotations

import dataclasses
import heapq
import random
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from django.db import InterfaceError, OperationalError, connections
from django.db.models import Q
from kombu.exceptions import OperationalError as BrokerError

from tests.celery_processes import (
    beat_command,
    kill_group,
    process_env,
    spawn,
    stop,
    worker_command,
)
from tests.chaos.figures import Figures, collect
from tests.chaos.operator import cancel_one, resolve_held
from tests.chaos.services import PostgresCluster, RedisServer
from tests.chaos.traffic import Traffic
from tests.saga_invariant import TERMINAL
from tests.support import user_in
from workflows_app.models import StepExecution, WorkflowInstance

ACTIVE = ("accepted", "running", "compensating")
OUTAGE = 3.0  # seconds a crashed Redis or PostgreSQL stays down
DOWN = (OperationalError, InterfaceError, BrokerError)


@dataclasses.dataclass
class Plan:
    workflows: int  # start at least this many...
    traffic_seconds: float  # ...spread over this long (the long form: more)
    seed: int
    workers: int = 3
    kill_every: tuple[float, float] = (7.0, 13.0)
    redis_restarts: int = 1
    postgres_restarts: int = 1
    late: bool = False  # also start chaos-late instances (traffic.LATE)

    @property
    def rate(self) -> float:
        return self.workflows / self.traffic_seconds


def db_retry(fn: Callable[[], Any], timeout: float = 60) -> Any:
    """Call ``fn`` until the database answers (after a crash, every pooled
    connection is dead and has to be dropped)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return fn()
        except (OperationalError, InterfaceError):
            if time.monotonic() > deadline:
                raise
            connections.close_all()
            time.sleep(0.5)


class ChaosRun:
    def __init__(
        self, plan: Plan, pg: PostgresCluster, redis: RedisServer, rundir: Path
    ) -> None:
        self.plan = plan
        self.pg = pg
        self.redis = redis
        self.rundir = rundir
        self.rng = random.Random(plan.seed)
        self.traffic = Traffic(self.rng, f"chaos-{plan.seed}", late=plan.late)
        self.faults = self.traffic.faults
        self.actions: Counter[str] = Counter()
        self.env = process_env(
            database=pg.url("chaos"),
            broker=redis.url(),
            SAGA_SWEEP_INTERVAL="2",
            # Not shorter: a message waiting in a backlog longer than this is
            # sent again each time, and the copies lengthen the backlog.
            SAGA_REDISPATCH_AFTER="30",
            # Unacknowledged messages of a killed worker come back (late
            # duplicates) while the run is still going.
            CELERY_VISIBILITY_TIMEOUT="30",
            SAGA_ALERT_INTERVAL="5",
            SAGA_DESK_VAR_DIR=str(rundir / "var"),
            SAGA_ACTIVITY_MODULES="tests.worker_activities,tests.chaos.activities",
        )
        self.workers: dict[int, Any] = {}
        self.beat: Any = None
        self._spawned = 0
        self._timeline: list[tuple[float, int, str]] = []
        self._order = 0
        self.timings: dict[str, float] = {}
        self.still_busy: list[str] = []
        self.operator: Any = None
        self.tried: Counter[Any] = Counter()

    # -- processes ------------------------------------------------------------
    def start_worker(self, slot: int) -> None:
        self._spawned += 1
        name = f"chaos-{slot}-{self._spawned}"
        self.workers[slot] = spawn(
            # Warnings only: three busy workers' info lines cost CPU time.
            worker_command(1, name, level="warning"),
            self.env,
            self.rundir / f"{name}.log",
            own_group=True,
        )

    def start_workers(self) -> None:
        """Before the migration, so that they boot while it runs."""
        connections.close_all()  # children must not share this connection
        for slot in range(self.plan.workers):
            self.start_worker(slot)

    def start_beat(self) -> None:
        connections.close_all()
        self.beat = spawn(
            beat_command(self.rundir / "beat-schedule"),
            self.env,
            self.rundir / "beat.log",
            own_group=True,
        )

    def stop_processes(self) -> None:
        stop([*self.workers.values(), *([self.beat] if self.beat else [])])

    # -- the timeline -----------------------------------------------------------
    def at(self, when: float, what: str) -> None:
        self._order += 1
        heapq.heappush(self._timeline, (when, self._order, what))

    def plan_faults(self) -> None:
        span = self.plan.traffic_seconds
        t = self.rng.uniform(*self.plan.kill_every)
        while t < span:
            self.at(t, f"kill {self.rng.randrange(self.plan.workers)}")
            t += self.rng.uniform(*self.plan.kill_every)
        for n in range(self.plan.redis_restarts):
            slot = span * (n + 0.25) / self.plan.redis_restarts
            self.at(slot + self.rng.uniform(0, span * 0.1), "redis down")
        for n in range(self.plan.postgres_restarts):
            slot = span * (n + 0.6) / self.plan.postgres_restarts
            self.at(slot + self.rng.uniform(0, span * 0.1), "postgres down")

    def fire(self, what: str, now: float) -> None:
        verb, _, arg = what.partition(" ")
        if verb == "kill":
            slot = int(arg)
            if slot in self.workers:
                kill_group(self.workers.pop(slot))
                self.faults["worker SIGKILL"] += 1
                self.at(now + self.rng.uniform(0.5, 3.0), f"respawn {slot}")
        elif verb == "respawn":
            self.start_worker(int(arg))
        elif what == "redis down":
            self.redis.kill()
            self.faults["Redis restart"] += 1
            self.at(now + OUTAGE, "redis up")
        elif what == "redis up":
            self.redis.start()
        elif what == "postgres down":
            self.pg.crash()
            self.faults["PostgreSQL crash-restart"] += 1
            self.at(now + OUTAGE, "postgres up")
        elif what == "postgres up":
            self.pg.start()

    # -- phases ---------------------------------------------------------------
    def traffic_phase(self) -> None:
        """Start instances at an even rate while the timeline's faults fire."""
        begun = time.monotonic()
        next_strays = 1.0
        next_operator = 3.0
        while True:
            now = time.monotonic() - begun
            while self._timeline and self._timeline[0][0] <= now:
                self.fire(heapq.heappop(self._timeline)[2], now)
            due = min(int(now * self.plan.rate) + 1, self.plan.workflows)
            if now >= self.plan.traffic_seconds and len(self.traffic.started) >= due:
                break
            try:
                while len(self.traffic.started) < due:
                    self.traffic.start_one()
                if now >= next_strays:
                    next_strays = now + 1.0
                    self.traffic.stray_messages(self.rng.randint(1, 4))
                if now >= next_operator:
                    next_operator = now + 3.0
                    self.operate_during_traffic()
            except DOWN:
                # The database or broker is down: try again on a later tick.
                connections.close_all()
            time.sleep(0.05)

    def heal(self) -> None:
        """Whatever is down comes back; a full set of workers."""
        pending, self._timeline = sorted(self._timeline), []
        for _, _, what in pending:
            if what.endswith(" up") or what.startswith("respawn"):
                self.fire(what, 0.0)
        for slot in range(self.plan.workers):
            if slot not in self.workers:
                self.start_worker(slot)

    def busy(self) -> list[str]:
        """What is still in progress: active instances, attempts in flight."""
        keys = self.traffic.started
        active = WorkflowInstance.objects.filter(
            business_key__in=keys, state__in=ACTIVE
        ).values_list("id", "state")
        in_flight = (
            StepExecution.objects.filter(instance__business_key__in=keys)
            .filter(
                Q(state__in=["running", "waiting"]) | Q(compensation_state="running")
            )
            .exclude(instance__state__in=TERMINAL)
            .values_list("instance_id", "instance__state", "name", "state")
        )
        return [f"{pk} {state}" for pk, state in active] + [
            f"{pk} {state}: {name} {step_state}"
            for pk, state, name, step_state in in_flight
        ]

    def settle(self, until: float) -> bool:
        """Let the backlog drain while the operator works the held instances,
        until nothing is in progress and the operator has nothing left to do
        (twice in a row, two seconds apart), or the clock reaches ``until``."""
        calm = 0
        shown = operated = 0.0
        while True:
            self.still_busy = db_retry(self.busy)
            acted = 0
            if not self.still_busy or time.monotonic() - operated >= 3:
                operated = time.monotonic()
                acted = self.operate()
            if time.monotonic() - shown >= 15:
                shown = time.monotonic()
                print(f"chaos: {len(self.still_busy)} in progress", flush=True)
                for item in self.still_busy[:3]:
                    print(f"  e.g. {item}", flush=True)
            calm = calm + 1 if not (self.still_busy or acted) else 0
            if calm >= 2:
                return True
            if time.monotonic() >= until:
                return False
            time.sleep(2)

    def operate(self) -> int:
        taken = db_retry(
            lambda: resolve_held(
                self.traffic.started, self.operator, self.tried, self.rng
            )
        )
        self.actions.update(taken)
        return sum(taken.values())

    def operate_during_traffic(self) -> None:
        """The operator at work while faults still fire: holds resolved
        early (some closed while work may be in flight) and now and then a
        running instance cancelled. A database outage ends the round."""
        self.actions.update(
            resolve_held(self.traffic.started, self.operator, self.tried, self.rng)
        )
        if self.rng.random() < 0.5:
            self.actions["operator cancel"] += cancel_one(
                self.traffic.started, self.operator, self.rng
            )

    def run(self, end: float) -> tuple[Figures, dict[str, Any]]:
        """Traffic and faults, then settle until ``end`` at the latest."""
        clock = time.monotonic()
        self.operator = db_retry(lambda: user_in("operator", "chaos-operator"))
        self.start_beat()
        self.plan_faults()
        self.traffic_phase()
        self.timings["traffic"] = time.monotonic() - clock
        self.heal()
        quiet = self.settle(end)
        self.timings["settle"] = time.monotonic() - clock
        # The verdict reads a system at rest, also when the budget ran out.
        self.stop_processes()
        figures = db_retry(lambda: collect(self.traffic.started, self.faults))
        figures.info.update(self.actions)
        self.timings["verdict"] = time.monotonic() - clock
        return figures, {
            "quiescent": quiet,
            "still busy": self.still_busy[:10],
            "timings": self.timings,
        }
