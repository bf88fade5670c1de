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

from workflows_app.models import CompensationState, InstanceState, StepState

MAX_KEY = 200


def _no_nul(value: str) -> str:
    # PostgreSQL cannot store NUL in text; refuse it as bad input.
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
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
