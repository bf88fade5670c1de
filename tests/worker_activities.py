"""Activities used by the real-worker tests (loaded by the worker process via
SAGA_ACTIVITY_MODULES=tests.worker_activities)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from workflows_app.activities import activity
from workflows_app.activities.base import ActivityContext, ActivityError, Waiting
from workflows_app.demo.activities import perform_action, perform_compensation


@activity("test.die_once")
def die_once(ctx: ActivityContext) -> dict[str, object]:
    """First attempt: tell the test which process runs it, then hang until
    killed. Later attempts behave like a normal idempotent participant."""
    if ctx.attempt == 1:
        Path(ctx.config["pid_file"]).write_text(str(os.getpid()))
        time.sleep(120)
    return perform_action(ctx, "fragile")


@activity("test.undo")
def undo(ctx: ActivityContext) -> dict[str, object]:
    return perform_compensation(ctx, "fragile")


@activity("test.accept_later")
def accept_later(ctx: ActivityContext) -> Waiting:
    """A participant that answers "accepted" and reports the result later."""
    return Waiting({"queued": True})


@activity("test.poison")
def poison(ctx: ActivityContext) -> None:
    """Kills the worker process that runs it, every time."""
    os.kill(os.getpid(), 9)


@activity("test.flaky_gateway")
def flaky_gateway(ctx: ActivityContext) -> dict[str, object]:
    """A payment gateway during an outage: while the instance's input says so,
    every first attempt fails with an error naming the order and a status
    code, as real gateways do. Later attempts succeed."""
    outage = ctx.input.get("outage")
    if outage and ctx.attempt == 1:
        raise ActivityError(
            f"payments returned {outage} for order '{ctx.business_key}'"
        )
    return perform_action(ctx, "gateway")


@activity("test.branch")
def branch(ctx: ActivityContext) -> dict[str, object]:
    """A branch of a parallel stage that proves it runs alongside the others:
    it leaves a marker (its process id) and waits until every branch named
    in ``party`` has left one (declining for good if they never do, so a
    sequential engine fails the test); then lingers, and applies or declines."""
    folder = Path(ctx.config["dir"])
    (folder / ctx.step_name).write_text(str(os.getpid()))
    deadline = time.monotonic() + 10
    while not all((folder / name).exists() for name in ctx.config["party"]):
        if time.monotonic() > deadline:
            raise ActivityError("the other branches never started", permanent=True)
        time.sleep(0.02)
    time.sleep(float(ctx.config.get("linger", 0)))
    if ctx.config.get("decline"):
        raise ActivityError("declined for good", permanent=True)
    return perform_action(ctx, "branch")
