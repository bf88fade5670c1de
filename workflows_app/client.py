"""A small client for the Saga Desk API (standard library only).

    client = SagaDeskClient("https://saga.example.com", token)
    started = client.start("order-fulfilment", business_key="o-1",
                           input={"amount": 42}, idempotency_key="o-1:create")
    client.status(started.id)["status"]

Every refusal raises :class:`ApiError` with the HTTP status and the API's error
envelope (``{"error": {"code", "message"}}``); a server that cannot be
reached raises :class:`ClientError`.
"""

from __future__ import annotations

import dataclasses
import json
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

API_PREFIX = "/api/v1"


class ClientError(Exception):
    """The request did not get an answer from the API."""


class ApiError(ClientError):
    """The API answered with an error."""

    def __init__(self, status: int, envelope: dict[str, Any]) -> None:
        error = envelope.get("error") if isinstance(envelope, dict) else None
        error = error if isinstance(error, dict) else {}
        self.status = status
        self.envelope = envelope
        self.code: str = str(error.get("code", "http_error"))
        self.message: str = str(error.get("message", ""))
        super().__init__(f"HTTP {status} {self.code}: {self.message}")


@dataclasses.dataclass(frozen=True)
class Response:
    status: int
    headers: dict[str, str]  # names in lower case
    data: Any


@dataclasses.dataclass(frozen=True)
class Started:
    id: str
    status: str
    status_url: str
    # False when the idempotency key was used before: the existing instance.
    created: bool


def _quote(segment: str) -> str:
    return urllib.parse.quote(str(segment), safe="")


class SagaDeskClient:
    def __init__(self, base_url: str, token: str, *, timeout: float = 30.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.timeout = timeout

    # -- the endpoints --------------------------------------------------------
    def start(
        self,
        definition_key: str,
        *,
        business_key: str,
        idempotency_key: str,
        input: dict[str, Any] | None = None,  # noqa: A002 - the API's name
    ) -> Started:
        """Start an instance. Retrying with the same key is safe."""
        response = self.request(
            "POST",
            f"/workflows/{_quote(definition_key)}/instances",
            body={"business_key": business_key, "input": input or {}},
            headers={"Idempotency-Key": idempotency_key},
        )
        data = response.data
        return Started(
            id=data["id"],
            status=data["status"],
            status_url=data["status_url"],
            created=response.status == 202,
        )

    def status(self, instance_id: str) -> dict[str, Any]:
        instance: dict[str, Any] = self.request(
            "GET", f"/instances/{_quote(instance_id)}"
        ).data
        return instance

    def history(self, instance_id: str) -> list[dict[str, Any]]:
        path = f"/instances/{_quote(instance_id)}/history"
        rows: list[dict[str, Any]] = self.request("GET", path).data
        return rows

    def instances(self, **filters: Any) -> dict[str, Any]:
        """One page: filters definition, status (a list), business_key, stuck,
        cursor, limit. Returns {"items", "next_cursor"}."""
        query = []
        for name, value in filters.items():
            if value is None:
                continue
            values = value if isinstance(value, list | tuple) else [value]
            for item in values:
                text = str(item).lower() if isinstance(item, bool) else str(item)
                query.append((name, text))
        suffix = f"?{urllib.parse.urlencode(query)}" if query else ""
        page: dict[str, Any] = self.request("GET", f"/instances{suffix}").data
        return page

    def report_callback(
        self,
        task_token: str,
        *,
        message_id: str,
        succeeded: bool,
        output: Any = None,
        error: str = "",
        permanent: bool = False,
    ) -> dict[str, Any]:
        """Report the result of the attempt that received ``task_token``."""
        body: dict[str, Any] = {
            "id": message_id,
            "status": "succeeded" if succeeded else "failed",
        }
        if succeeded:
            body["output"] = output
        else:
            body.update(error=error, permanent=permanent)
        path = f"/callbacks/{_quote(task_token)}"
        answer: dict[str, Any] = self.request("POST", path, body=body).data
        return answer

    def post_event(
        self,
        event_id: str,
        *,
        type: str,  # noqa: A002 - the API's name
        correlation_key: str,
        payload: Any = None,
    ) -> dict[str, Any]:
        body = {
            "id": event_id,
            "type": type,
            "correlation_key": correlation_key,
            "payload": payload,
        }
        answer: dict[str, Any] = self.request("POST", "/events", body=body).data
        return answer

    # -- transport ------------------------------------------------------------
    def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        headers: dict[str, str] | None = None,
    ) -> Response:
        """Send one request to ``/api/v1`` + ``path``; raise ApiError on 4xx/5xx."""
        all_headers = {
            "Accept": "application/json",
            "Authorization": f"Bearer {self.token}",
            **(headers or {}),
        }
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            all_headers["Content-Type"] = "application/json"
        request = urllib.request.Request(
            f"{self.base_url}{API_PREFIX}{path}",
            data=data,
            headers=all_headers,
            method=method,
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as answer:
                names = {k.lower(): v for k, v in answer.headers.items()}
                return Response(answer.status, names, _json(answer.read()))
        except urllib.error.HTTPError as exc:
            with exc:
                raw = exc.read()
            envelope = _json(raw)
            if not isinstance(envelope, dict) or "error" not in envelope:
                text = raw[:200].decode(errors="replace")
                envelope = {"error": {"code": "http_error", "message": text}}
            raise ApiError(exc.code, envelope) from None
        except (urllib.error.URLError, OSError) as exc:
            raise ClientError(f"{method} {request.full_url} failed: {exc}") from exc


def _json(raw: bytes) -> Any:
    if not raw:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return None
