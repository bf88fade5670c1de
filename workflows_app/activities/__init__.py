"""The activity registry: dotted names used in definitions -> Python callables.

An activity is a callable ``fn(ctx: ActivityContext) -> dict | Waiting | None``
registered with :func:`activity`. Modules listed in ``ACTIVITY_MODULES`` are
imported lazily the first time the registry is read, so registering in a
module of your own only needs its dotted path added to settings
``SAGA_ACTIVITY_MODULES``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from django.conf import settings

from workflows_app.activities.base import (
    ActivityContext,
    ActivityError,
    Waiting,
)

ActivityFn = Callable[[ActivityContext], Any]

BUILTIN_MODULES = (
    "workflows_app.activities.http",
    "workflows_app.activities.demo",
)

_REGISTRY: dict[str, ActivityFn] = {}
_loaded = False


def activity(name: str) -> Callable[[ActivityFn], ActivityFn]:
    """Register ``fn`` under ``name`` (e.g. ``"payments.charge"``)."""

    def register(fn: ActivityFn) -> ActivityFn:
        existing = _REGISTRY.get(name)
        if existing is not None and existing is not fn:
            qualname = f"{existing.__module__}.{existing.__qualname__}"
            raise ValueError(f"activity {name!r} is already registered by {qualname}")
        _REGISTRY[name] = fn
        return fn

    return register


def _load() -> None:
    global _loaded
    if _loaded:
        return
    for module in (*BUILTIN_MODULES, *getattr(settings, "SAGA_ACTIVITY_MODULES", ())):
        importlib.import_module(module)
    _loaded = True


def registry() -> dict[str, ActivityFn]:
    _load()
    return dict(_REGISTRY)


def get_activity(name: str) -> ActivityFn:
    _load()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise LookupError(f"no activity is registered under {name!r}") from None


def activity_names() -> list[str]:
    return sorted(registry())


__all__ = [
    "ActivityContext",
    "ActivityError",
    "Waiting",
    "activity",
    "activity_names",
    "get_activity",
    "registry",
]
