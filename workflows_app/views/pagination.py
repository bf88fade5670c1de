"""Keyset pagination: pages through (sort value, id) instead of OFFSET, so
page 10,000 costs what page 1 costs, and nothing counts the whole result.

A cursor names the edge row of the page it came from and a direction; a page
fetches one row more than it shows to learn whether another page follows.
"""

from __future__ import annotations

import base64
import dataclasses
import uuid
from datetime import datetime
from typing import Any

from django.db.models import Q, QuerySet


@dataclasses.dataclass
class Page:
    rows: list[Any]
    next_cursor: str | None
    prev_cursor: str | None

    @property
    def is_first(self) -> bool:
        return self.prev_cursor is None


def encode(direction: str, value: datetime, pk: Any) -> str:
    raw = f"{direction}|{value.isoformat()}|{pk}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode(cursor: str | None) -> tuple[str, datetime, uuid.UUID] | None:
    """The cursor's parts, or None for a missing or malformed cursor (first page)."""
    if not cursor:
        return None
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        direction, value, pk = raw.split("|")
        if direction not in {"n", "p"}:
            return None
        moment = datetime.fromisoformat(value)
        if moment.tzinfo is None:
            return None
        return direction, moment, uuid.UUID(pk)
    except (ValueError, UnicodeDecodeError):
        return None


def _beyond(field: str, value: datetime, pk: Any, descending: bool) -> Q:
    """Rows after (value, pk) in the given order. The redundant bound on the
    field alone lets the database walk its index instead of filtering."""
    op = "lt" if descending else "gt"
    bound = Q(**{f"{field}__{op}e": value})
    return bound & (
        Q(**{f"{field}__{op}": value}) | Q(**{field: value, f"pk__{op}": pk})
    )


def keyset_page(
    qs: QuerySet[Any], field: str, descending: bool, cursor: str | None, size: int
) -> Page:
    parsed = decode(cursor)
    backwards = parsed is not None and parsed[0] == "p"
    # Walking back means reading the opposite order, then flipping the rows.
    read_desc = descending != backwards
    sign = "-" if read_desc else ""
    ordered = qs.order_by(f"{sign}{field}", f"{sign}pk")
    if parsed is not None:
        ordered = ordered.filter(_beyond(field, parsed[1], parsed[2], read_desc))
    rows = list(ordered[: size + 1])
    more = len(rows) > size
    rows = rows[:size]
    if backwards:
        rows.reverse()
    has_next = (more and not backwards) or backwards
    has_prev = (more and backwards) or (parsed is not None and not backwards)
    next_cursor = prev_cursor = None
    if rows and has_next:
        last = rows[-1]
        next_cursor = encode("n", getattr(last, field), last.pk)
    if rows and has_prev:
        first = rows[0]
        prev_cursor = encode("p", getattr(first, field), first.pk)
    return Page(rows=rows, next_cursor=next_cursor, prev_cursor=prev_cursor)
