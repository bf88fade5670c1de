"""Where webhooks go: the targets a definition lists, checked when it is
saved and again before every call.

A definition stores a URL or a *reference* (``env:NAME``, ``secret:NAME``)
that the sender resolves at delivery time, so a URL that is itself a
credential (a chat's incoming-webhook URL) is never in the database, the
admin or a page. Targets a definition names must be on the HTTP activity's
host allow-list (``SAGA_HTTP_ALLOWED_HOSTS``): an admin-edited field must not
make Saga Desk call an address nobody meant. The global
``SAGA_ALERT_WEBHOOK_URL`` is set by whoever runs the service, beside that
list, and is trusted as it stands.
"""

from __future__ import annotations

import dataclasses
import re
from urllib.parse import parse_qsl, urlsplit

from django.conf import settings

from workflows_app.activities.http_config import WHOLE_REF, host_allowed, resolve

FORMATS = ("slack", "json")
# The instance states a client system may subscribe to.
EVENTS = ("completed", "compensated", "needs_attention", "failed")
GLOBAL_TARGET = "SAGA_ALERT_WEBHOOK_URL"
# Query parameters that carry a credential: such a URL must be a reference.
SECRET_PARAM = re.compile(r"token|secret|key|sig|pass|auth", re.IGNORECASE)


class TargetError(ValueError):
    """A target cannot be called (bad URL, not allowed, secret missing)."""


@dataclasses.dataclass(frozen=True)
class Target:
    format: str
    ref: str  # a URL, env:NAME, secret:NAME or GLOBAL_TARGET


@dataclasses.dataclass(frozen=True)
class Subscription:
    events: frozenset[str]
    ref: str


def _lines(text: str) -> list[str]:
    return [line.strip() for line in (text or "").splitlines() if line.strip()]


def url_errors(url: str) -> list[str]:
    """What is wrong with a literal URL (a reference is checked at delivery)."""
    parts = urlsplit(url)
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        return [f"{url!r} is not an absolute http(s) URL or env:NAME / secret:NAME."]
    if parts.username or parts.password:
        return ["A webhook URL must not carry credentials; use env:NAME."]
    if any(SECRET_PARAM.search(name) for name, _ in parse_qsl(parts.query)):
        return [
            "This URL carries a credential in its query; store it in the "
            "environment or a secret file and give env:NAME or secret:NAME."
        ]
    if not host_allowed(url):
        listed = ", ".join(settings.SAGA_HTTP_ALLOWED_HOSTS) or "nothing"
        return [
            f"{parts.netloc} is not in SAGA_HTTP_ALLOWED_HOSTS (which allows "
            f"{listed}); add it there to let Saga Desk call it."
        ]
    return []


def _ref_errors(ref: str) -> list[str]:
    return [] if WHOLE_REF.match(ref) else url_errors(ref)


def parse_alert_targets(text: str) -> tuple[list[Target], list[str]]:
    targets, errors = [], []
    for line in _lines(text):
        fmt, _, ref = line.partition(" ")
        fmt, ref = fmt.lower(), ref.strip()
        if fmt not in FORMATS or not ref or " " in ref:
            errors.append(
                f"{line!r}: write 'slack env:NAME' or 'json <url>', one per line."
            )
            continue
        if fmt == "slack" and not WHOLE_REF.match(ref):
            errors.append(
                f"{line!r}: a chat's webhook URL is a credential; store it in the "
                "environment or a secret file and give env:NAME or secret:NAME."
            )
            continue
        problems = _ref_errors(ref)
        errors += [f"{line!r}: {p}" for p in problems]
        if not problems:
            targets.append(Target(fmt, ref))
    return targets, errors


def parse_subscriptions(text: str) -> tuple[list[Subscription], list[str]]:
    subscriptions, errors = [], []
    for line in _lines(text):
        names, _, ref = line.partition(" ")
        ref = ref.strip()
        events = set(EVENTS) if names == "*" else set(names.lower().split(","))
        unknown = sorted(events - set(EVENTS))
        if not ref or " " in ref or unknown or not events:
            errors.append(
                f"{line!r}: write the events ({', '.join(EVENTS)}, comma "
                "separated, or *), a space, then the URL or env:NAME."
                + (f" Unknown: {', '.join(unknown)}." if unknown else "")
            )
            continue
        problems = _ref_errors(ref)
        errors += [f"{line!r}: {p}" for p in problems]
        if not problems:
            subscriptions.append(Subscription(frozenset(events), ref))
    return subscriptions, errors


def webhook_errors(alert_webhooks: str, event_webhooks: str) -> list[tuple[str, str]]:
    """(field, message) for everything a definition save must refuse."""
    return [("alert_webhooks", m) for m in parse_alert_targets(alert_webhooks)[1]] + [
        ("event_webhooks", m) for m in parse_subscriptions(event_webhooks)[1]
    ]


def global_alert_target() -> Target | None:
    if not settings.SAGA_ALERT_WEBHOOK_URL:
        return None
    return Target(settings.SAGA_ALERT_WEBHOOK_FORMAT, GLOBAL_TARGET)


def resolve_url(ref: str) -> tuple[str, list[str]]:
    """The URL to call and the secret values to keep out of every message.

    Raises TargetError when it cannot be called now (a missing secret, a host
    taken off the allow-list since the definition was saved)."""
    if ref == GLOBAL_TARGET:
        url = settings.SAGA_ALERT_WEBHOOK_URL
        return url, [url]
    whole = WHOLE_REF.match(ref)
    if whole is None:
        problems = url_errors(ref)
        if problems:
            raise TargetError(problems[0])
        return ref, []
    try:
        url = resolve(whole.group(1), whole.group(2)).strip()
    except LookupError as exc:
        raise TargetError(str(exc)) from exc
    problems = url_errors(url)
    if problems:
        # Said without the URL: it is a secret.
        raise TargetError(
            f"the URL in {ref} cannot be called: " + problems[0].replace(url, "…")
        )
    return url, [url]
