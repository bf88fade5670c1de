"""Who caused a transition: recorded on every history row."""

from __future__ import annotations

import dataclasses
import socket
from typing import Any

from workflows_app.models import ActorKind


@dataclasses.dataclass(frozen=True)
class Actor:
    kind: str
    user: Any = None  # a django.contrib.auth user for operators
    label: str = ""

    @classmethod
    def system(cls, what: str) -> Actor:
        return cls(ActorKind.SYSTEM, label=f"system:{what}")

    @classmethod
    def worker(cls, host: str | None = None) -> Actor:
        return cls(ActorKind.WORKER, label=host or socket.gethostname())

    @classmethod
    def operator(cls, user: Any) -> Actor:
        return cls(ActorKind.OPERATOR, user=user, label=user.get_username())

    @classmethod
    def api(cls, client: str) -> Actor:
        return cls(ActorKind.API, label=client)

    @classmethod
    def event(cls, source: str) -> Actor:
        return cls(ActorKind.EVENT, label=source)
