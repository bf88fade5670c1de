"""Test helpers: definitions built in code, and an in-process message queue.

``LocalBroker`` replaces only the transport (``engine.dispatch.send``): messages are
queued in memory and delivered by calling the real task functions, so the
engine, the database and the activities are all real. Tests that claim
distribution or crash safety use a real Celery worker instead
(``tests/engine/test_worker.py``).
"""

from __future__ import annotations

import dataclasses
from datetime import timedelta
from typing import Any
from unittest import mock

from django.contrib.auth.models import Group, User

from workflows_app import tasks
from workflows_app.engine import dispatch
from workflows_app.engine.actors import Actor
from workflows_app.engine.commands import instance_start
from workflows_app.models import StepDefinition, WorkflowDefinition, WorkflowInstance
from workflows_app.roles import sync_roles

ZERO = timedelta(0)


def make_definition(
    key: str = "wf",
    steps: list[dict[str, Any]] | None = None,
    *,
    publish: bool = True,
    **fields: Any,
) -> WorkflowDefinition:
    """A definition of generic demo steps (``demo.step`` / ``demo.undo_step``)."""
    fields.setdefault("title", key)
    definition = WorkflowDefinition.objects.create(key=key, **fields)
    if steps is None:
        steps = [{"name": n} for n in ("one", "two", "three")]
    for position, spec in enumerate(steps, start=1):
        spec = {
            "action": "demo.step",
            "compensation": "demo.undo_step",
            "timeout": timedelta(seconds=5),
            "max_attempts": 3,
            "backoff_initial": ZERO,
            "backoff_max": ZERO,
            "backoff_jitter": 0,
            **spec,
        }
        StepDefinition.objects.create(definition=definition, position=position, **spec)
    if publish:
        definition.publish()
    return definition


def start(
    key: str = "wf", business_key: str = "order-1", **input: Any
) -> WorkflowInstance:
    return instance_start(
        key, business_key=business_key, input=input, actor=Actor.api("test")
    ).instance


@dataclasses.dataclass
class Message:
    task: str
    args: list[Any]
    options: dict[str, Any]


class LocalBroker:
    """At-least-once transport in memory: record, deliver, duplicate, drop.

    With ``inline=False`` workers never continue with an instance's next
    attempt in the same task, so every attempt travels as a message (what a
    fault-injecting test wants to drop, duplicate and reorder)."""

    def __init__(self, *, inline: bool = True) -> None:
        self.queue: list[Message] = []
        self._patches = [mock.patch.object(dispatch, "send", self._send)]
        if not inline:
            self._patches.append(mock.patch.object(tasks, "_budget", lambda task: None))

    def _send(self, name: str, args: list[Any], **options: Any) -> None:
        """Stands in for ``engine.dispatch.send``."""
        task = name.removeprefix("workflows.")
        self.queue.append(Message(task, list(args), options))

    def __enter__(self) -> LocalBroker:
        for patch in self._patches:
            patch.start()
        return self

    def __exit__(self, *exc: object) -> None:
        for patch in self._patches:
            patch.stop()

    def deliver(self, message: Message) -> None:
        getattr(tasks, message.task)(*message.args)

    def run(self, limit: int = 500) -> int:
        """Deliver messages in order until the queue is empty."""
        delivered = 0
        while self.queue:
            delivered += 1
            if delivered > limit:
                raise AssertionError(f"more than {limit} messages: a loop?")
            self.deliver(self.queue.pop(0))
        return delivered


def other_session(*, autocommit: bool = True) -> Any:
    """A connection of its own to the test database, as another process
    would have (PostgreSQL)."""
    import psycopg2
    from django.db import connection

    db = connection.settings_dict
    conn = psycopg2.connect(
        dbname=db["NAME"],
        user=db.get("USER") or "postgres",
        host=db.get("HOST") or "127.0.0.1",
        port=db.get("PORT") or 5432,
    )
    conn.autocommit = autocommit
    return conn


def user_in(group: str, username: str | None = None) -> User:
    sync_roles()  # a transactional test's flush removes the migration's groups
    user = User.objects.create_user(username or group.replace(" ", "_"), password="pw")
    user.groups.add(Group.objects.get(name=group))
    return User.objects.get(pk=user.pk)  # fresh permission cache


def advance_clock(instance: WorkflowInstance, seconds: float) -> None:
    """Let ``seconds`` pass for one instance, as the sweeper sees it.

    Deadlines are compared with the database clock, so moving this
    instance's bookkeeping timestamps into the past is equivalent to waiting
    (a test-only shortcut; the engine itself never rewrites them)."""
    from django.db.models import F

    from workflows_app.models import StepExecution

    delta = timedelta(seconds=seconds)
    cols = ["deadline_at", "next_attempt_at", "redispatch_at"]
    for col in [*cols, "wake_at"]:
        StepExecution.objects.filter(
            instance=instance, **{f"{col}__isnull": False}
        ).update(**{col: F(col) - delta})
    from workflows_app.models import Alert

    for col in ["next_send_at", "escalate_at"]:
        Alert.objects.filter(instance=instance, **{f"{col}__isnull": False}).update(
            **{col: F(col) - delta}
        )
    for col in [*cols, "stuck_check_at", "last_progress_at"]:
        if col == "next_attempt_at":
            continue
        WorkflowInstance.objects.filter(
            pk=instance.pk, **{f"{col}__isnull": False}
        ).update(**{col: F(col) - delta})
