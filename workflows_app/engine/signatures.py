"""Error signatures: what many failures of one cause have in common.

A signature is the error class plus its message with the parts that differ
from one instance to the next taken out (quoted values, ids, numbers), so a
burst of ``PaymentGatewayError: 503 for order 'ORD-17'`` failures after an
outage groups as one ``PaymentGatewayError: <n> for order <q>``.
"""

from __future__ import annotations

import re

MAX_LENGTH = 300

# Order matters: quoted values first (they may contain anything), then ids
# that contain digits, then the remaining numbers.
_PATTERNS = [
    (re.compile(r"'[^']*'|\"[^\"]*\"|`[^`]*`"), "<q>"),
    (
        re.compile(
            r"\b[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b",
            re.I,
        ),
        "<id>",
    ),
    (re.compile(r"\b0x[0-9a-f]+\b|\b[0-9a-f]{12,}\b", re.I), "<id>"),
    # Numbers with their fractions and units (5.0s, 10.0.0.3, 503).
    (re.compile(r"\b\d+(?:[.,:]\d+)*[a-z%]*\b", re.I), "<n>"),
    # Words mixing letters and digits (ORD-1042, job_77, A1B2) are ids.
    (re.compile(r"\b[\w-]*\d[\w-]*\b"), "<n>"),
]
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
    message = _SPACES.sub(" ", message).strip()
    signature = f"{error_class}: {message}" if error_class else message
    return signature[:MAX_LENGTH]
