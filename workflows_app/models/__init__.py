from __future__ import annotations

from workflows_app.models.activity import ActivityHour, ActivityRollup
from workflows_app.models.alerts import Alert
from workflows_app.models.audit import ActorKind, InboundMessage, TransitionLog
from workflows_app.models.definitions import StepDefinition, WorkflowDefinition
from workflows_app.models.exchanges import AttemptExchange
from workflows_app.models.operations import (
    ApprovalRequest,
    BulkJob,
    BulkJobItem,
    KnownFailure,
    SavedView,
)
from workflows_app.models.retention import PurgeRun
from workflows_app.models.runtime import (
    ACTIVE_STATES,
    TERMINAL_STATES,
    Attempt,
    AttentionKind,
    CompensationState,
    InstanceState,
    StepExecution,
    StepState,
    StuckKind,
    WorkflowInstance,
)
from workflows_app.models.tokens import ApiToken
from workflows_app.models.webhooks import WebhookDelivery

__all__ = [
    "ACTIVE_STATES",
    "TERMINAL_STATES",
    "ActivityHour",
    "ActivityRollup",
    "ActorKind",
    "Alert",
    "ApiToken",
    "ApprovalRequest",
    "Attempt",
    "AttemptExchange",
    "BulkJob",
    "BulkJobItem",
    "AttentionKind",
    "CompensationState",
    "InboundMessage",
    "InstanceState",
    "KnownFailure",
    "PurgeRun",
    "SavedView",
    "StepDefinition",
    "StepExecution",
    "StepState",
    "StuckKind",
    "TransitionLog",
    "WebhookDelivery",
    "WorkflowDefinition",
    "WorkflowInstance",
]
