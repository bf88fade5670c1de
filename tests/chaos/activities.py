"""An activity of the chaos run's own (loaded by its workers through
SAGA_ACTIVITY_MODULES): a participant that answers late.

``chaos.answer_late`` holds its call until its instance's deadline has put
the instance on hold, and then until an operator acted (closed it as failed,
or resumed it) or a few seconds passed; only then does it apply its effect
and report success. So the success of a call in flight arrives after a
hold, and often after the instance was closed: the "late effect" path.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

from workflows_app.activities import activity
from workflows_app.activities.base import ActivityContext
from workflows_app.demo.activities import perform_action, perform_compensation
from workflows_app.models import WorkflowInstance

AFTER_HOLD = 6.0  # seconds to wait for the operator once held
POLL = 0.3


def _state(ctx: ActivityContext) -> tuple[str, datetime | None]:
    row = WorkflowInstance.objects.values_list("state", "deadline_at").get(
        pk=ctx.instance_id
    )
    return row[0], row[1]


@activity("chaos.answer_late")
def answer_late(ctx: ActivityContext) -> dict[str, object]:
    state, deadline = _state(ctx)
    # No deadline (an operator resumed past it): answer at once.
    if deadline is not None:
        give_up = deadline.timestamp() + AFTER_HOLD + 4
        while state == "running" and time.time() < give_up:
            time.sleep(POLL)
            state, _ = _state(ctx)
        held_until = min(give_up, datetime.now(UTC).timestamp() + AFTER_HOLD)
        while state == "needs_attention" and time.time() < held_until:
            time.sleep(POLL)
            state, _ = _state(ctx)
    return perform_action(ctx, "late")


@activity("chaos.undo_late")
def undo_late(ctx: ActivityContext) -> dict[str, object]:
    return perform_compensation(ctx, "late")
