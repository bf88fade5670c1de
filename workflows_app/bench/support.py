"""What the benchmark commands share: the environment of the processes they
start (the database this process uses, which may be a test database rather
than ``DATABASE_URL``) and a broker stand-in that sends nothing."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from unittest import mock
from urllib.parse import quote

from django.db import connection

from workflows_app.engine import dispatch


def database_url() -> str:
    """The URL of the database this process is connected to."""
    db = connection.settings_dict
    user = quote(db.get("USER") or "postgres", safe="")
    password = db.get("PASSWORD") or ""
    auth = f"{user}:{quote(password, safe='')}@" if password else f"{user}@"
    host = f"{db.get('HOST') or '127.0.0.1'}:{db.get('PORT') or 5432}"
    return f"postgres://{auth}{host}/{quote(db['NAME'], safe='')}"


def child_env(**extra: str) -> dict[str, str]:
    """A started process's environment: ours, on our database, with the demo
    installed (the benchmarks run its activities and the bench tasks)."""
    return {**os.environ, "DATABASE_URL": database_url(), "SAGA_DEMO": "1", **extra}


@contextmanager
def discarding_broker() -> Iterator[Counter[str]]:
    """The engine's messages are counted per task and dropped."""
    sent: Counter[str] = Counter()

    def send(name: str, args: list[Any], **options: Any) -> None:
        sent[name.removeprefix("workflows.")] += 1

    with mock.patch.object(dispatch, "send", send):
        yield sent
