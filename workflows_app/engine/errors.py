"""Errors the engine raises to its callers (views, API, tasks, admin)."""

from __future__ import annotations


class EngineError(Exception):
    """Base class; ``code`` is the machine-readable name the API returns."""

    code = "engine_error"


class DefinitionNotFound(EngineError):
    code = "unknown_definition"


class InvalidInput(EngineError):
    code = "invalid_input"


class IdempotencyConflict(EngineError):
    """The idempotency key was used before with a different input."""

    code = "idempotency_conflict"


class TransitionRejected(EngineError):
    """The transition is not allowed from the current state."""

    code = "transition_not_allowed"


class AlreadyChanged(TransitionRejected):
    """Someone else changed the instance since the caller looked at it."""

    code = "already_changed"


class NotPermitted(EngineError):
    code = "forbidden"
