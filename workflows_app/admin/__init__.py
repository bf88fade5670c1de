"""The Django admin: workflow admins edit definitions; runtime rows are read-only."""

from __future__ import annotations

from workflows_app.admin import definitions, retention, runtime, tokens

__all__ = ["definitions", "retention", "runtime", "tokens"]
