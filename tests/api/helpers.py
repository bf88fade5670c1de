"""Helpers for the API tests: raw HTTP (any bytes, any header), row counts,
and the error envelope check."""

from __future__ import annotations

import dataclasses
import http.client
import json
from typing import Any
from urllib.parse import urlsplit

import tests.worker_activities  # noqa: F401 - registers test.accept_later
from tests.support import make_definition
from workflows_app.models import (
    Attempt,
    InboundMessage,
    StepExecution,
    TransitionLog,
    WorkflowInstance,
)

COUNTED = (WorkflowInstance, StepExecution, TransitionLog, InboundMessage, Attempt)


def counts() -> dict[str, int]:
    return {model.__name__: model.objects.count() for model in COUNTED}


def state_snapshot() -> dict[str, Any]:
    """Every row count plus every state and row version: "changes nothing"."""
    return {
        **counts(),
        "instances": sorted(
            WorkflowInstance.objects.values_list("id", "state", "version")
        ),
        "steps": sorted(
            StepExecution.objects.values_list(
                "id", "state", "compensation_state", "attempt"
            )
        ),
        "attempts": sorted(Attempt.objects.values_list("id", "outcome")),
    }


def assert_envelope(status: int, body: Any, code: str | None = None) -> None:
    assert isinstance(body, dict) and set(body) == {"error"}, body
    error = body["error"]
    assert isinstance(error.get("code"), str) and error["code"], body
    assert isinstance(error.get("message"), str) and error["message"], body
    assert set(error) <= {"code", "message", "details"}, body
    if code is not None:
        assert error["code"] == code, (status, body)


@dataclasses.dataclass
class Reply:
    status: int
    headers: dict[str, str]
    raw: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.raw) if self.raw else None


class RawHttp:
    """Requests the client helper would never send: any body bytes, any
    headers, any method."""

    def __init__(self, base_url: str, token: str | None) -> None:
        parts = urlsplit(base_url)
        self.host, self.port = parts.hostname, parts.port
        self.token = token

    def __call__(
        self,
        method: str,
        path: str,
        body: bytes | str | dict[str, Any] | list[Any] | None = None,
        *,
        headers: dict[str, str] | None = None,
        auth: bool = True,
        content_type: str | None = "application/json",
    ) -> Reply:
        if isinstance(body, dict | list):
            body = json.dumps(body)
        if isinstance(body, str):
            body = body.encode("utf-8", "surrogatepass")
        sent = {}
        if auth and self.token:
            sent["Authorization"] = f"Bearer {self.token}"
        if body is not None and content_type:
            sent["Content-Type"] = content_type
        sent.update(headers or {})
        conn = http.client.HTTPConnection(self.host, self.port, timeout=30)
        try:
            conn.request(method, path, body=body, headers=sent)
            answer = conn.getresponse()
            return Reply(
                answer.status,
                {k.lower(): v for k, v in answer.getheaders()},
                answer.read(),
            )
        finally:
            conn.close()


def waiting_definition(key: str = "wf") -> None:
    """one -> two (answers "accepted" and waits for a callback) -> three."""
    make_definition(
        key,
        [
            {"name": "one"},
            {"name": "two", "action": "test.accept_later", "max_attempts": 1},
            {"name": "three"},
        ],
    )


def event_definition(key: str = "ev", event: str = "payment.captured") -> None:
    """one -> two (completes when ``event`` arrives for the business key)."""
    make_definition(
        key,
        [
            {"name": "one"},
            {"name": "two", "awaits_event": event},
        ],
    )


def task_token(instance_id: Any, step: str = "two") -> str:
    attempt = Attempt.objects.filter(
        step__instance_id=instance_id, step__name=step
    ).latest("number")
    return str(attempt.task_token)
