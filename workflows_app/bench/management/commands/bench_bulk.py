"""Benchmark a bulk job: planning (the dry run) and the runner's throughput.

    SAGA_DEMO=1 DATABASE_URL=postgres://.../saga_bench \\
        python manage.py bench_bulk --instances 10000

Builds one held instance through the engine, copies it in SQL (PostgreSQL
only), plans a bulk retry of all of them and works the job in this process.
The broker is replaced by a list, so the figures are the database work of a
runner: one engine command and its recorded outcome per item, in one commit.
Prints the plan time, items per second and the median / p95 time per item.
"""

from __future__ import annotations

import statistics
import time
import uuid
from datetime import timedelta
from typing import Any
from unittest import mock

from django.contrib.auth.models import Group, User
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import connection

from workflows_app import tasks
from workflows_app.engine import dispatch
from workflows_app.engine.actors import Actor
from workflows_app.engine.commands import bulk, instance_start
from workflows_app.models import StepDefinition, WorkflowDefinition, WorkflowInstance
from workflows_app.roles import sync_roles

KEY = "bench-bulk"


def clone_instance(template: WorkflowInstance, copies: int, prefix: str) -> None:
    """Copies of an instance (its row, steps and attempts) made in SQL: each
    copy is in the state the engine left the original in (its history is not
    copied). PostgreSQL only."""
    q = connection.ops.quote_name
    run = uuid.uuid4().hex

    def columns(model: Any, *skip: str) -> str:
        return ", ".join(
            q(f.column) for f in model._meta.concrete_fields if f.column not in skip
        )

    from workflows_app.models import Attempt, StepExecution

    instances = q(WorkflowInstance._meta.db_table)
    steps = q(StepExecution._meta.db_table)
    attempts = q(Attempt._meta.db_table)
    instance_cols = columns(WorkflowInstance, "id", "business_key", "idempotency_key")
    step_cols = columns(StepExecution, "id", "instance_id")
    attempt_cols = columns(Attempt, "id", "step_id", "task_token")
    attempt_src = ", ".join(f"a.{c.strip()}" for c in attempt_cols.split(","))
    with connection.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {instances} (id, business_key, idempotency_key, "
            f"{instance_cols}) SELECT md5(%s || g)::uuid, %s || g, NULL, "
            f"{instance_cols} FROM {instances}, generate_series(1, %s) g "
            "WHERE id = %s",
            [run, prefix, copies, template.pk],
        )
        cursor.execute(
            f"INSERT INTO {steps} (instance_id, {step_cols}) "
            f"SELECT md5(%s || g)::uuid, {step_cols} "
            f"FROM {steps}, generate_series(1, %s) g WHERE instance_id = %s",
            [run, copies, template.pk],
        )
        # The attempts too, each under its copied step (same position).
        cursor.execute(
            f"INSERT INTO {attempts} (step_id, task_token, {attempt_cols}) "
            f"SELECT copy.id, md5(%s || g || ':' || a.id)::uuid, {attempt_src} "
            f"FROM {attempts} a JOIN {steps} original ON original.id = a.step_id "
            f"CROSS JOIN generate_series(1, %s) g JOIN {steps} copy "
            "ON copy.instance_id = md5(%s || g)::uuid "
            "AND copy.position = original.position "
            "WHERE original.instance_id = %s",
            [run, copies, run, template.pk],
        )


def _definition() -> WorkflowDefinition:
    definition = WorkflowDefinition.objects.filter(key=KEY).order_by("-version").first()
    if definition is not None:
        return definition
    definition = WorkflowDefinition.objects.create(
        key=KEY, title="Bulk job benchmark", failure_policy="hold"
    )
    for position, name in enumerate(["reserve", "charge", "ship"], start=1):
        StepDefinition.objects.create(
            definition=definition,
            position=position,
            name=name,
            action="demo.step",
            compensation="demo.undo_step",
            timeout=timedelta(seconds=5),
            max_attempts=1,
            backoff_initial=timedelta(0),
            backoff_max=timedelta(0),
            backoff_jitter=0,
        )
    definition.publish()
    return definition


class _Broker:
    """Messages go to a list; ``drain`` runs them in this process."""

    def __init__(self) -> None:
        self.queue: list[tuple[str, list[Any]]] = []

    def send(self, name: str, args: list[Any], **options: Any) -> None:
        """Stands in for ``engine.dispatch.send``."""
        self.queue.append((name.removeprefix("workflows."), list(args)))

    def drain(self) -> None:
        while self.queue:
            name, args = self.queue.pop(0)
            getattr(tasks, name)(*args)


class Command(BaseCommand):
    help = "Time planning and running a bulk retry over many held instances."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--instances", type=int, default=10_000)

    def handle(self, *args: Any, **opts: Any) -> None:
        if connection.vendor != "postgresql":
            raise CommandError("bench_bulk needs PostgreSQL (set DATABASE_URL)")
        count = opts["instances"]
        sync_roles()
        user, _ = User.objects.get_or_create(username="bench-operator")
        user.groups.add(Group.objects.get(name="operator"))
        user = User.objects.get(pk=user.pk)
        _definition()
        broker = _Broker()
        patches = [mock.patch.object(dispatch, "send", broker.send)]
        for patch in patches:
            patch.start()
        try:
            self._run(count, user, broker)
        finally:
            for patch in patches:
                patch.stop()

    def _run(self, count: int, user: User, broker: _Broker) -> None:
        stamp = uuid.uuid4().hex[:6]
        template = instance_start(
            KEY,
            business_key=f"BENCH-{stamp}-0",
            input={"simulate": {"charge": "fail"}},
            actor=Actor.api("bench"),
        ).instance
        broker.drain()
        template.refresh_from_db()
        if template.state != "needs_attention":
            raise CommandError(f"the template instance is {template.state}")
        started = time.perf_counter()
        clone_instance(template, count - 1, f"BENCH-{stamp}-")
        self.stdout.write(
            f"{count} held instances in {time.perf_counter() - started:.1f} s"
        )
        selection = WorkflowInstance.objects.filter(
            business_key__startswith=f"BENCH-{stamp}-"
        )
        started = time.perf_counter()
        job = bulk.bulk_job_plan(
            selection, action="retry", reason="bench", user=user, description="bench"
        )
        plan_seconds = time.perf_counter() - started
        bulk.bulk_job_confirm(job.pk, user=user)
        durations: list[float] = []
        apply = bulk._apply

        def timed(*a: Any) -> None:
            begun = time.perf_counter()
            apply(*a)
            durations.append(time.perf_counter() - begun)

        started = time.perf_counter()
        with mock.patch.object(bulk, "_apply", timed):
            while bulk.bulk_job_work(job.pk, budget=3600) == "more":
                pass
        run_seconds = time.perf_counter() - started
        done = job.items.filter(outcome="done").count()
        cuts = statistics.quantiles(durations, n=20)
        self.stdout.write(
            f"plan (dry run) of {count}: {plan_seconds:.2f} s\n"
            f"run: {done} done in {run_seconds:.1f} s = {done / run_seconds:.0f} "
            f"items/s; per item median {statistics.median(durations) * 1000:.1f} ms"
            f", p95 {cuts[18] * 1000:.1f} ms"
        )
