"""Request and response bodies of the API (DESIGN.md section 6).

Request bodies are strict: unknown fields are refused and no value is
coerced ("1" is not a number, 1 is not a string), so a client's mistake is a
422 that names the field instead of a guess.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from ninja import Field, Schema
from pydantic import AfterValidator, ConfigDict

from workflows_app import validation
from workflows_app.models import (
    BulkJob,
    BulkJobItem,
    CompensationState,
    InstanceState,
    StepState,
)
from workflows_app.models.operations import ApprovalStatus, BulkJobStatus

MAX_KEY = 200


def _no_nul(value: str) -> str:
    # Text PostgreSQL cannot store: the pages' check and message (one
    # validator); the 422 names the field.
    try:
        validation.check_text(value, "the text")
    except validation.BadInput as exc:
        raise ValueError(exc.message) from None
    return value


Key = Annotated[str, Field(min_length=1, max_length=MAX_KEY), AfterValidator(_no_nul)]


class StrictIn(Schema):
    model_config = ConfigDict(extra="forbid", strict=True)


# -- requests ------------------------------------------------------------------


class StartIn(StrictIn):
    business_key: Key = Field(
        description="The business object this run is about (an order id...).",
        examples=["order-1001"],
    )
    input: dict[str, Any] = Field(
        default_factory=dict,
        description="Input of the workflow, available to every step.",
        examples=[{"amount": 42, "simulate": {"charge_payment": "fail_once"}}],
    )


class CallbackIn(StrictIn):
    id: Key = Field(description="Message id: a replay of the same id is ignored.")
    status: Literal["succeeded", "failed"]
    output: Any = Field(default=None, description="Result of a succeeded step.")
    error: str = Field(default="", max_length=5000, description="Why it failed.")
    permanent: bool = Field(
        default=False, description="A failure that retrying cannot fix."
    )


class EventIn(StrictIn):
    id: Key = Field(description="Event id: a replay of the same id is ignored.")
    type: Key = Field(examples=["payment.captured"])
    correlation_key: Key = Field(
        description="The business key of the instances the event is about."
    )
    payload: Any = None


Reason = Annotated[str, Field(min_length=1, max_length=2000), AfterValidator(_no_nul)]
# The instance list's state filter: a status, or any unfinished/finished one.
StateFilter = Literal[
    "active",
    "finished",
    "accepted",
    "running",
    "needs_attention",
    "compensating",
    "completed",
    "compensated",
    "cancelled",
    "failed",
]


class CompleteStepIn(StrictIn):
    reason: Reason = Field(
        description="Why: the timeline shows it with your name.",
        examples=["order checked with the customer by phone"],
    )
    output: dict[str, Any] = Field(
        default_factory=dict,
        description="The values of the step's form fields, by name (checked "
        "against the fields the definition declares: 422 names each wrong one). "
        "They become the step's output.",
        examples=[{"approved": True, "note": "called the customer"}],
    )
    reject: bool = Field(
        False,
        description="Reject instead: the step fails for good and the "
        "workflow's failure policy applies (no output needed).",
    )
    expected_version: int | None = Field(
        None,
        ge=0,
        description="The instance `version` you saw: if it changed since, "
        "nothing is done and the answer is 409.",
    )


class ActIn(StrictIn):
    reason: Reason = Field(
        description="Why: the timeline shows it with your name.",
        examples=["payment gateway is back (INC-42)"],
    )
    step: Key | None = Field(
        None,
        description="The step's name, for actions that target a step "
        "(`targets_step`); retry_step and mark_step_done default to the step "
        "that blocks the instance.",
        examples=["charge"],
    )
    data: dict[str, Any] | None = Field(
        None,
        description="The action's data, by the keys it lists in `data_keys` "
        '(e.g. {"output": ...} for mark_step_done, {"input": ...} for '
        "repair_input).",
    )
    expected_version: int | None = Field(
        None,
        ge=0,
        description="The instance `version` you saw (GET .../actions): if the "
        "instance changed since, nothing is done and the answer is 409.",
    )


class DecisionIn(StrictIn):
    note: str = Field(
        "", max_length=2000, description="Shown in the timeline with the decision."
    )


class BulkJobIn(StrictIn):
    """What to do and to which instances: the instance list's filters (at
    least one). Nothing is done until the job is started."""

    action: Literal["retry", "compensate"] = Field(
        description="retry: the blocking step (or failed compensation); "
        "compensate: undo what took effect."
    )
    reason: Reason
    rate: float = Field(
        0, ge=0, le=1000, description="Instances per second; 0: as fast as it goes."
    )
    definition: Key | None = Field(None, description="A definition key.")
    status: StateFilter | None = Field(
        None, description="A status, or `active` / `finished` for any of them."
    )
    business_key: Key | None = Field(
        None, description="A business key, or an instance id."
    )
    stuck: bool | None = None
    idle: Literal["5m", "1h", "1d", "7d"] | None = Field(
        None, description="No progress for at least this long."
    )
    accepted_after: datetime | None = Field(None, strict=False)
    accepted_before: datetime | None = Field(None, strict=False)
    failed_step: Key | None = Field(
        None, description="Blocked at this step (a failure group's step)."
    )
    signature: Key | None = Field(
        None, description="With this error signature (a failure group's)."
    )


class BulkJobCancelIn(StrictIn):
    reason: str = Field("", max_length=2000)


# -- responses -----------------------------------------------------------------


class StartOut(Schema):
    id: uuid.UUID
    status: InstanceState
    status_url: str


class StepOut(Schema):
    name: str
    state: StepState
    compensation_state: CompensationState
    attempts: int = Field(description="Attempts so far, actions and compensations.")
    run: int = Field(
        1,
        description="1, then 2, 3... after an operator restarted the workflow "
        "at or before this step (each run sends its own idempotency keys).",
    )
    stage: int = Field(
        1,
        description="The step's stage, 1, 2, ... in order: the steps of one "
        "stage are parallel branches that start together; the next stage "
        "starts when all of them succeeded.",
    )


class InstanceOut(Schema):
    id: uuid.UUID
    definition: str
    version: int = Field(description="The definition version the instance runs.")
    business_key: str
    status: InstanceState
    stuck: bool
    steps: list[StepOut]
    accepted_at: datetime
    completed_at: datetime | None = Field(
        description="When the business outcome happened: set only once the "
        "status is completed (never for compensated, cancelled or failed)."
    )


class InstanceSummary(Schema):
    id: uuid.UUID
    definition: str
    version: int
    business_key: str
    status: InstanceState
    stuck: bool
    accepted_at: datetime
    completed_at: datetime | None
    last_progress_at: datetime
    status_url: str


class InstancePage(Schema):
    items: list[InstanceSummary]
    next_cursor: str | None = Field(
        description="Pass as ?cursor= for the next page; null on the last page."
    )


class HistoryEntry(Schema):
    at: datetime
    step: str | None
    field: str = Field(description="state or compensation_state; empty for a note.")
    source: str
    target: str
    transition: str
    actor: str = Field(examples=["api:checkout-service", "operator:alice"])
    reason: str


class CallbackOut(Schema):
    accepted: bool = Field(
        description="False when the attempt no longer waits for this result "
        "(timed out, retried, instance compensating): noted, nothing changed."
    )
    replay: bool = Field(description="This message id was handled before.")
    instance: uuid.UUID | None = None
    step: str | None = None
    reason: str = ""


class EventOut(Schema):
    # The engine's answer passes through: observed workflows add their keys.
    model_config = ConfigDict(extra="allow")

    accepted: bool = True
    replay: bool = Field(description="This event id was handled before.")
    completed: list[dict[str, Any]] = Field(
        default_factory=list,
        description="The waiting steps this event completed "
        '({"instance", "step_id"} each).',
    )


class ActionOut(Schema):
    name: str = Field(examples=["retry_step"])
    label: str = Field(examples=["Retry step now"])
    explains: str
    allowed: bool = Field(description="Whether the token's user may do it now.")
    why_not: str = Field(description="Why not, in words; empty when allowed.")
    needs_approval: bool = Field(
        description="The workflow puts it under four eyes: doing it creates "
        "a request a second operator decides (202)."
    )
    targets_step: bool
    danger: bool = Field(description="Cannot be reversed.")
    data_keys: list[str] = Field(description="What `data` may carry.")


class ActionsOut(Schema):
    instance: uuid.UUID
    status: InstanceState
    version: int = Field(
        description="The instance's version now: send it as `expected_version`."
    )
    blocked_step: str | None = Field(
        description="The failed or unknown step that blocks the instance."
    )
    actions: list[ActionOut]


class ApprovalOut(Schema):
    id: int
    action: str = Field(description="The action's name, or bulk_job.")
    status: ApprovalStatus
    instance: uuid.UUID | None
    bulk_job: int | None
    reason: str
    params: dict[str, Any]
    requested_by: str
    requested_at: datetime
    expires_at: datetime
    decided_by: str | None
    decided_at: datetime | None
    decision_note: str
    outcome: str = Field(description="Why an approved action could not be done.")


class ApprovalPage(Schema):
    items: list[ApprovalOut]
    next_cursor: str | None


class PlanCount(Schema):
    plan: str = Field(description="What is done to these instances, or why not.")
    count: int


class BulkProgress(Schema):
    acting: int = Field(description="Items the job acts on.")
    skipped: int = Field(description="Items with nothing to do (see `plans`).")
    processed: int = Field(description="Acting items done, changed or refused.")
    percent: int
    outcomes: dict[BulkJobItem.Outcome, int]
    plans: list[PlanCount]
    skips: list[PlanCount]


class BulkJobOut(Schema):
    id: int
    action: BulkJob.Action
    status: BulkJobStatus
    reason: str
    description: str = Field(description="The selection in words.")
    query: str = Field(description="The instance list's query string it came from.")
    rate: float
    created_by: str
    created_at: datetime
    confirmed_at: datetime | None
    finished_at: datetime | None
    progress: BulkProgress
    approval: ApprovalOut | None = Field(
        description="The request waiting for a second operator, if any."
    )
    items_url: str


class BulkItemOut(Schema):
    instance: uuid.UUID
    definition: str
    business_key: str
    status: InstanceState = Field(description="The instance's status now.")
    acts: bool = Field(description="Whether the job acts on it.")
    plan: str
    outcome: BulkJobItem.Outcome
    message: str
    processed_at: datetime | None


class BulkItemPage(Schema):
    items: list[BulkItemOut]
    next_cursor: str | None


class BulkJobPlanned(BulkJobOut):
    preview: BulkItemPage = Field(
        description="The first items of the plan; `items_url` pages on."
    )


class FieldError(Schema):
    field: str
    message: str


class ErrorBody(Schema):
    code: str = Field(examples=["invalid_request"])
    message: str
    details: list[FieldError] | None = None


class ErrorOut(Schema):
    error: ErrorBody


def errors(*statuses: int) -> dict[int, type[ErrorOut]]:
    """The error responses an operation documents."""
    return dict.fromkeys(statuses, ErrorOut)
