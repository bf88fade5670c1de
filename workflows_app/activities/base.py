"""What an activity receives, what it may return, and what it may raise; and
what the engine hands the worker that runs it (a claim) and takes back (an
outcome). Nothing here imports the rest of Saga Desk, so the engine, the
activity runner and the tasks all sit above it."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta
from typing import Any, Literal


class ActivityError(Exception):
    """Raised by an activity when its call failed.

    ``permanent=True`` means retrying cannot help (a declined card, a 4xx):
    the engine stops retrying at once. Otherwise the attempt is retried per
    the step's backoff policy until ``max_attempts`` is used up.
    ``retry_after`` is the participant's own earliest time for the next try
    (an HTTP ``Retry-After``): the next attempt waits at least that long,
    or longer if the step's backoff says so.
    """

    def __init__(
        self,
        message: str,
        *,
        permanent: bool = False,
        retry_after: timedelta | None = None,
    ) -> None:
        super().__init__(message)
        self.permanent = permanent
        self.retry_after = retry_after


@dataclasses.dataclass(frozen=True)
class Waiting:
    """Returned by an activity whose participant accepted the work and will
    report the result later (HTTP 202, a queued job). The step waits for a
    callback carrying ``ActivityContext.task_token`` or for its awaited event."""

    detail: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class ActivityContext:
    instance_id: str
    business_key: str
    definition_key: str
    input: Mapping[str, Any]
    # Outputs of the steps that succeeded so far, by step name.
    outputs: Mapping[str, Any]
    step_name: str
    direction: Literal["action", "compensation"]
    attempt: int
    # Stable across attempts: "<instance id>:<step name>:action|compensation",
    # plus ":<run>" once an operator restarted the step (see step_idempotency_key).
    idempotency_key: str
    deadline: datetime | None
    task_token: str
    # Per-step configuration from the definition (URL for the HTTP activity, ...).
    config: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    # 1, then 2, 3... each time an operator restarts the workflow at or before
    # this step. ``attempt`` keeps counting across runs.
    run: int = 1


def step_idempotency_key(
    instance_id: Any, step_name: str, direction: str, run: int = 1
) -> str:
    """``<instance id>:<step name>:action|compensation``, the same on every
    attempt; a restarted step's later runs add ``:<run>`` (2, 3...) so its
    participant sees a new request rather than a replay of a compensated one."""
    key = f"{instance_id}:{step_name}:{direction}"
    return key if run == 1 else f"{key}:{run}"


# -- what crosses between the engine and the worker that runs an activity --


@dataclasses.dataclass(frozen=True)
class Outcome:
    kind: str  # "succeeded" | "waiting" | "failed" | "timed_out"
    output: Any = None
    error_class: str = ""
    error_message: str = ""
    permanent: bool = False
    retry_after: timedelta | None = None  # the participant's earliest retry

    @property
    def error(self) -> str:
        return (
            f"{self.error_class}: {self.error_message}"
            if self.error_class
            else self.error_message
        )


@dataclasses.dataclass(frozen=True)
class Claim:
    instance_id: str
    step_id: int
    timeout: timedelta
    activity: str
    context: ActivityContext
    # What the worker kept of the transaction that made the claim, for its
    # next step (workflows_app.engine.held); the engine's alone.
    held: Any = dataclasses.field(default=None, repr=False, compare=False)


# Answers "may this worker still run an attempt with this timeout?"
InlineBudget = Callable[[timedelta], bool]
