"""Every state-changing operation of Saga Desk. Views, the API, tasks, the
admin and the sweeper call these; nothing else changes a state."""

from __future__ import annotations

from workflows_app.activities.base import Claim, InlineBudget, Outcome
from workflows_app.engine.commands.execution import (
    attempt_claim,
    attempt_record,
    attempt_record_and_continue,
    attempt_time_out,
    instance_advance,
)
from workflows_app.engine.commands.inbound import (
    InboundResult,
    callback_report,
    event_ingest,
)
from workflows_app.engine.commands.operator import (
    alert_acknowledge,
    instance_cancel,
    instance_close_as_failed,
    instance_compensate,
    instance_mark_step_done,
    instance_restart_from_step,
    instance_resume,
    instance_retry_compensation,
    instance_retry_step,
)
from workflows_app.engine.commands.start import StartResult, instance_start

__all__ = [
    "Claim",
    "InboundResult",
    "InlineBudget",
    "Outcome",
    "StartResult",
    "alert_acknowledge",
    "attempt_claim",
    "attempt_record",
    "attempt_record_and_continue",
    "attempt_time_out",
    "callback_report",
    "event_ingest",
    "instance_advance",
    "instance_cancel",
    "instance_close_as_failed",
    "instance_compensate",
    "instance_mark_step_done",
    "instance_restart_from_step",
    "instance_resume",
    "instance_retry_compensation",
    "instance_retry_step",
    "instance_start",
]
