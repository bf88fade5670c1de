from __future__ import annotations

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

__all__ = [
    "ACTIVE_STATES",
    "TERMINAL_STATES",
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
    "SavedView",
    "StepDefinition",
    "StepExecution",
    "StepState",
    "StuckKind",
    "TransitionLog",
    "WorkflowDefinition",
    "WorkflowInstance",
]
