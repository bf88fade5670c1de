"""A readable diff of two JSON values, for the audit row of a data repair."""

from __future__ import annotations

from typing import Any

MAX_CHANGES = 200


def json_diff(before: Any, after: Any, path: str = "$") -> list[dict[str, Any]]:
    """Paths that changed, were added or removed, in a stable order.

    Objects are compared key by key; lists and scalars as whole values (a
    list edit is shown as one change of the list)."""
    changes: list[dict[str, Any]] = []
    _walk(before, after, path, changes)
    return changes[:MAX_CHANGES]


def _walk(before: Any, after: Any, path: str, out: list[dict[str, Any]]) -> None:
    if isinstance(before, dict) and isinstance(after, dict):
        for key in sorted(set(before) | set(after), key=str):
            child = f"{path}.{key}"
            if key not in after:
                out.append({"path": child, "op": "removed", "before": before[key]})
            elif key not in before:
                out.append({"path": child, "op": "added", "after": after[key]})
            else:
                _walk(before[key], after[key], child, out)
        return
    # bool is an int in Python; True == 1 must still count as a change.
    if before != after or type(before) is not type(after):
        out.append({"path": path, "op": "changed", "before": before, "after": after})
