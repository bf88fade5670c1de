"""The Django admin: workflow admins edit definitions; runtime rows are read-only."""

from __future__ import annotations

from workflows_app.admin import definitions, runtime, tokens

__all__ = ["definitions", "runtime", "tokens"]
