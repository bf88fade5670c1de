"""Error signatures: what many failures of one cause have in common.

A signature is the error class plus its message with the parts that differ
from one instance to the next taken out (quoted values, times, durations,
ids, numbers), so a burst of ``PaymentGatewayError: 503 for order 'ORD-17'``
failures after an outage groups as one ``PaymentGatewayError: <n> for order
<q>``. Where a timeout was noticed is not part of its cause: the sweeper's
``Timeout: no outcome within 30s (deadline 2026-12-02T09:19:02+00:00)`` and
the worker's ``Timeout: no outcome within 30s (interrupted in the worker)``
are both ``Timeout: no outcome within <duration>``.

Stored on the step row; a change here needs a data migration that recomputes
the stored ones (see migration 0016).
"""

from __future__ import annotations

import re

MAX_LENGTH = 300

_UNITS = (
    r"(?:ns|us|µs|ms|milliseconds?|msecs?|s|secs?|seconds?|m|mins?|minutes?"
    r"|h|hrs?|hours?|d|days?)"
)
_MONTHS = r"(?:Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec)"
# Order matters: quoted values first (they may contain anything), then times
# and durations (they contain numbers), then ids that contain digits, then
# the remaining numbers.
_PATTERNS = [
    (re.compile(r"'[^']*'|\"[^\"]*\"|`[^`]*`"), "<q>"),
    # ISO 8601 date-times, with or without a zone (2026-12-02T09:19:02.5Z,
    # 2026-12-02 09:19:02+00:00, 20261202T091902Z) and dates alone.
    (
        re.compile(
            r"\b\d{4}-\d{2}-\d{2}(?:[T ]\d{2}:\d{2}(?::\d{2}(?:[.,]\d+)?)?"
            r"(?:\s?(?:Z|UTC|GMT)\b|[+-]\d{2}(?::?\d{2})?)?)?"
            r"|\b\d{8}T\d{6}(?:\.\d+)?Z?\b",
            re.I,
        ),
        "<time>",
    ),
    # HTTP dates: Tue, 02 Dec 2026 09:19:02 GMT.
    (
        re.compile(
            rf"\b(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun), \d{{1,2}} {_MONTHS} \d{{4}} "
            r"\d{2}:\d{2}:\d{2}(?: GMT)?"
        ),
        "<time>",
    ),
    # Durations: 30s, 12.5 s, 500 ms, 1h30m, 2 minutes, ISO PT30S.
    (
        re.compile(
            rf"\b(?:\d+(?:[.,]\d+)?\s?{_UNITS}(?!\w|[.-]\w))+"
            rf"|\b(?:\d+(?:\.\d+)?{_UNITS}){{2,}}\b"
            r"|\bP(?:\d+[YMWD])*T(?:\d+(?:\.\d+)?[HMS])+\b|\bP\d+[YMWD]\b",
            re.I,
        ),
        "<duration>",
    ),
    (
        re.compile(
            r"\b[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b",
            re.I,
        ),
        "<id>",
    ),
    (re.compile(r"\b0x[0-9a-f]+\b|\b[0-9a-f]{12,}\b", re.I), "<id>"),
    # Numbers with their fractions and units (10.0.0.3, 503, 5%).
    (re.compile(r"\b\d+(?:[.,:]\d+)*[a-z%]*\b", re.I), "<n>"),
    # Words mixing letters and digits (ORD-1042, job_77, A1B2) are ids.
    (re.compile(r"\b[\w-]*\d[\w-]*\b"), "<n>"),
]
# Where a timeout was noticed, after the above: the deadline the sweeper saw
# pass, or the worker's own time limit. Same cause, so same signature.
_NOTICED = re.compile(r"\s*\((?:deadline <time>|interrupted in the worker)\)")
_SPACES = re.compile(r"\s+")


def error_signature(error: str) -> str:
    """The normalised ``Class: message`` of an error text ("" for none)."""
    text = error.strip()
    if not text:
        return ""
    error_class, sep, message = text.partition(": ")
    if not sep or " " in error_class:
        error_class, message = "", text
    for pattern, placeholder in _PATTERNS:
        message = pattern.sub(placeholder, message)
    message = _NOTICED.sub("", message)
    message = _SPACES.sub(" ", message).strip()
    signature = f"{error_class}: {message}" if error_class else message
    return signature[:MAX_LENGTH]
