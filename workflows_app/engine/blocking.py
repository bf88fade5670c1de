"""What blocks an instance: the one definition every caller uses."""

from __future__ import annotations

from collections.abc import Sequence

from workflows_app.models import StepExecution, StepState

BLOCKING = frozenset({StepState.FAILED, StepState.UNKNOWN})


def blocking_step(steps: Sequence[StepExecution]) -> StepExecution | None:
    """The step that stops forward progress: what retry, mark done and a
    restart act on (the first failed or unknown one)."""
    return next((s for s in steps if s.state in BLOCKING), None)


def restart_points(
    steps: Sequence[StepExecution], blocked: StepExecution | None
) -> list[StepExecution]:
    """The steps an instance may restart from: restart points of its pinned
    definition, at or before the step that blocks it."""
    if blocked is None:
        return []
    return [
        s
        for s in steps
        if s.step_definition.restart_point and s.position <= blocked.position
    ]
