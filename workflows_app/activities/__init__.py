"""The activity registry: dotted names used in definitions -> Python callables.

An activity is a callable ``fn(ctx: ActivityContext) -> dict | Waiting | None``
registered with :func:`activity`. The modules that register are imported
lazily the first time the registry is read: the built-in ones, those an
installed app's config lists in ``activity_modules`` (the demo's), and those
in settings ``SAGA_ACTIVITY_MODULES``, so registering in a module of your own
only needs its dotted path added there.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from django.apps import apps
from django.conf import settings

from workflows_app.activities.base import (
    ActivityContext,
    ActivityError,
    Waiting,
)

ActivityFn = Callable[[ActivityContext], Any]

BUILTIN_MODULES = ("workflows_app.activities.http",)

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
    app_modules = [
        module
        for config in apps.get_app_configs()
        for module in getattr(config, "activity_modules", ())
    ]
    configured = getattr(settings, "SAGA_ACTIVITY_MODULES", ())
    for module in (*BUILTIN_MODULES, *app_modules, *configured):
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
