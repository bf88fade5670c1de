"""Exit codes of ``manage.py saga`` and how engine errors map onto them.

Scripts branch on the code, so each one means one thing whatever the
subcommand: a refusal is 3 whether the state, a permission or a missing
approval stands in the way, and only a version fence (or a request already
pending) is 4.
"""

from __future__ import annotations

from workflows_app.engine.errors import (
    AlreadyChanged,
    EngineError,
    InvalidInput,
    NotPermitted,
    TransitionRejected,
)
from workflows_app.validation import BadInput

DONE = 0
FAILED = 1
BAD_INPUT = 2
REFUSED = 3
CHANGED = 4
SENT_FOR_APPROVAL = 5

HELP = """\
exit codes:
  0  done (or, with --dry-run, previewed)
  1  anything else (an unexpected error; see the message)
  2  bad arguments or input: unknown or ambiguous instance, user or step,
     invalid filter, JSON or reason
  3  refused: not possible now (state, nothing to do) or not permitted
  4  changed meanwhile: the instance is not at --expected-version any more,
     or the same action already waits for approval
  5  sent for approval: a second operator must approve it (four eyes);
     nothing was done yet
"""


class Exit(Exception):
    """Stop the command with ``code``; ``message`` goes to standard error
    (and, with ``--json``, into an ``error`` object on standard output unless
    the outcome was ``reported`` there already)."""

    def __init__(
        self, code: int, message: str, kind: str = "", *, reported: bool = False
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.reported = reported
        self.kind = kind or {
            BAD_INPUT: "invalid_input",
            REFUSED: "refused",
            CHANGED: "already_changed",
            SENT_FOR_APPROVAL: "sent_for_approval",
        }.get(code, "error")


def bad_input(message: str) -> Exit:
    return Exit(BAD_INPUT, message)


def refused(message: str) -> Exit:
    return Exit(REFUSED, message)


def from_error(exc: EngineError | BadInput) -> Exit:
    """The exit for an engine (or validation) error; the order matters:
    ``AlreadyChanged`` is a ``TransitionRejected`` and ``ApprovalRequired``
    a ``NotPermitted``."""
    if isinstance(exc, BadInput):
        return Exit(BAD_INPUT, exc.message, exc.code)
    code = FAILED
    if isinstance(exc, AlreadyChanged):
        code = CHANGED
    elif isinstance(exc, (NotPermitted, TransitionRejected)):
        code = REFUSED
    elif isinstance(exc, InvalidInput):
        code = BAD_INPUT
    return Exit(code, str(exc), exc.code)
