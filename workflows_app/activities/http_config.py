"""The HTTP activity's step configuration: parsing, the host allow-list and
secret references.

A definition stores only *references* to secrets (``env:NAME`` or
``secret:NAME``); the worker resolves them at call time, so a credential is
never in the database, the admin, the timeline or an exchange record. The
allow-list (``SAGA_HTTP_ALLOWED_HOSTS``) is checked when a definition is
saved and again before every call, so a definition cannot be pointed at an
address nobody meant, and a host removed from the list stops being called
at once.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from django.conf import settings

METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE"})
DEFAULT_EXPECTED = frozenset({200, 201, 204})
CONFIG_KEYS = frozenset(
    {"url", "method", "expected_status", "headers", "follow_redirects", "redact"}
)
# Headers the activity sets itself: a definition must not override them.
RESERVED_HEADERS = frozenset({"idempotency-key", "content-type", "content-length"})
# Header names whose values are credentials: only references are accepted.
SENSITIVE_HEADER = re.compile(
    r"^(authorization|proxy-authorization|cookie)$|token|secret|password|api-?key",
    re.IGNORECASE,
)
# ``env:NAME`` / ``secret:NAME`` as the whole value, or ``${env:NAME}`` inside
# one (``Bearer ${env:PAYMENTS_TOKEN}``).
WHOLE_REF = re.compile(r"^(env|secret):([A-Za-z_][A-Za-z0-9_.-]*)$")
INLINE_REF = re.compile(r"\$\{(env|secret):([A-Za-z_][A-Za-z0-9_.-]*)\}")
MAX_REDIRECTS = 5


class ConfigError(ValueError):
    """The step configuration cannot be used; ``messages`` says why."""

    def __init__(self, messages: list[str]) -> None:
        super().__init__("; ".join(messages))
        self.messages = messages


@dataclasses.dataclass(frozen=True)
class HttpConfig:
    url: str
    method: str
    expected_status: frozenset[int]
    # Header values as configured: literals and secret references.
    headers: Mapping[str, str]
    follow_redirects: bool
    # JSON field names whose values are blanked in the exchange record.
    redact: frozenset[str]


def parse(config: Mapping[str, Any]) -> HttpConfig:
    """The configuration as the activity uses it, or ConfigError."""
    errors = shape_errors(config)
    if errors:
        raise ConfigError(errors)
    headers = {str(k): str(v) for k, v in (config.get("headers") or {}).items()}
    return HttpConfig(
        url=str(config["url"]),
        method=str(config.get("method", "POST")).upper(),
        expected_status=frozenset(config.get("expected_status") or DEFAULT_EXPECTED),
        headers=headers,
        follow_redirects=bool(config.get("follow_redirects", False)),
        redact=frozenset(str(f).lower() for f in config.get("redact") or ()).union(
            f.lower() for f in settings.SAGA_HTTP_REDACT_FIELDS
        ),
    )


def shape_errors(config: Any) -> list[str]:
    """What is wrong with the configuration itself (not the allow-list)."""
    if not isinstance(config, Mapping):
        return ["The HTTP activity's config must be a JSON object."]
    errors: list[str] = []
    unknown = sorted(set(config) - CONFIG_KEYS)
    if unknown:
        errors.append(
            f"Unknown config keys: {', '.join(unknown)} "
            f"(known: {', '.join(sorted(CONFIG_KEYS))})."
        )
    url = config.get("url")
    parts = urlsplit(str(url)) if isinstance(url, str) else None
    if parts is None or parts.scheme not in {"http", "https"} or not parts.hostname:
        errors.append("'url' must be an absolute http(s) URL.")
    elif parts.username or parts.password:
        errors.append(
            "'url' must not carry credentials; put them in a header as a "
            "reference (env:NAME)."
        )
    method = config.get("method", "POST")
    if not isinstance(method, str) or method.upper() not in METHODS:
        errors.append(f"'method' must be one of {', '.join(sorted(METHODS))}.")
    expected = config.get("expected_status", list(DEFAULT_EXPECTED))
    if (
        not isinstance(expected, list)
        or not expected
        or not all(isinstance(s, int) and 200 <= s <= 299 for s in expected)
        or 202 in expected
    ):
        errors.append(
            "'expected_status' must be a list of 2xx codes (202 always means "
            "'accepted, result by callback')."
        )
    errors += _header_errors(config.get("headers", {}))
    if not isinstance(config.get("follow_redirects", False), bool):
        errors.append("'follow_redirects' must be true or false.")
    redact = config.get("redact", [])
    if not isinstance(redact, list) or not all(isinstance(f, str) for f in redact):
        errors.append("'redact' must be a list of field names.")
    return errors


def _header_errors(headers: Any) -> list[str]:
    if not isinstance(headers, Mapping):
        return ["'headers' must be a JSON object of name: value."]
    errors = []
    for name, value in headers.items():
        if not isinstance(value, str):
            errors.append(f"Header {name!r}: the value must be a string.")
            continue
        if name.lower() in RESERVED_HEADERS:
            errors.append(f"Header {name!r} is set by Saga Desk and cannot be set.")
        elif SENSITIVE_HEADER.search(name) and not secret_references(value):
            errors.append(
                f"Header {name!r} holds a credential: store a reference such as "
                f'"env:NAME" or "Bearer ${{env:NAME}}", never the value itself.'
            )
    return errors


def config_errors(config: Any) -> list[str]:
    """Everything a definition save must refuse: the shape and the allow-list."""
    errors = shape_errors(config)
    if not errors and not host_allowed(str(config["url"])):
        errors.append(host_refusal(str(config["url"])))
    return errors


# -- the allow-list -----------------------------------------------------------


def allowed_patterns() -> list[str]:
    return [p.strip().lower() for p in settings.SAGA_HTTP_ALLOWED_HOSTS if p.strip()]


def host_allowed(url: str, patterns: Iterable[str] | None = None) -> bool:
    """Whether the URL's host (and port) matches an allow-list entry:
    ``host``, ``host:port``, ``*.domain`` (subdomains only) or ``*`` (any)."""
    parts = urlsplit(url)
    host = (parts.hostname or "").lower().rstrip(".")
    if not host:
        return False
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return False
    for pattern in allowed_patterns() if patterns is None else patterns:
        pattern_host, pattern_port = _split_pattern(pattern)
        if pattern_port is not None and pattern_port != port:
            continue
        if pattern_host == "*" or pattern_host == host:
            return True
        if pattern_host.startswith("*.") and host.endswith(pattern_host[1:]):
            return True
    return False


def _split_pattern(pattern: str) -> tuple[str, int | None]:
    if pattern.startswith("["):  # [::1]:8000
        host, _, rest = pattern[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") else None
    if pattern.count(":") == 1:
        host, port = pattern.split(":")
        return host, int(port) if port.isdigit() else None
    return pattern, None


def host_refusal(url: str) -> str:
    host = urlsplit(url).netloc or url
    listed = ", ".join(allowed_patterns()) or "nothing"
    return (
        f"{host} is not in SAGA_HTTP_ALLOWED_HOSTS (which allows {listed}); "
        "add it there to let the HTTP activity call it."
    )


# -- secret references --------------------------------------------------------


def secret_references(value: str) -> list[tuple[str, str]]:
    """The ``(kind, name)`` references in a header value."""
    whole = WHOLE_REF.match(value)
    if whole:
        return [(whole.group(1), whole.group(2))]
    return INLINE_REF.findall(value)


class MissingSecret(LookupError):
    pass


def resolve(kind: str, name: str) -> str:
    """A secret's value, read in the worker at call time."""
    if kind == "env":
        value = os.environ.get(name)
        if value is None:
            raise MissingSecret(f"{name} is not set in the worker's environment")
        return value
    directory = Path(settings.SAGA_HTTP_SECRETS_DIR)
    path = directory / name
    if path.parent != directory or not path.is_file():
        raise MissingSecret(f"no secret file {name!r} in {directory}")
    return path.read_text().strip()


def resolve_headers(headers: Mapping[str, str]) -> tuple[dict[str, str], list[str]]:
    """Header values with references replaced, and the secret values used
    (to be scrubbed from everything that is kept)."""
    resolved: dict[str, str] = {}
    secrets: list[str] = []
    for name, value in headers.items():
        whole = WHOLE_REF.match(value)
        if whole:
            secret = resolve(whole.group(1), whole.group(2))
            secrets.append(secret)
            resolved[name] = secret
            continue

        def substitute(match: re.Match[str]) -> str:
            secret = resolve(match.group(1), match.group(2))
            secrets.append(secret)
            return secret

        resolved[name] = INLINE_REF.sub(substitute, value)
    return resolved, [s for s in secrets if s]
