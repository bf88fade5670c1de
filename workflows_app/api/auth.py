"""Bearer-token authentication for machine clients, one scope per operation.

Only ``Authorization: Bearer <token>`` authenticates: a browser session is
never looked at, so a session cookie alone gets a 401 and CSRF plays no part
(ninja's views are CSRF-exempt; token auth needs no CSRF protection because a
browser never attaches the header by itself).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.http import HttpRequest
from django.utils import timezone
from ninja.errors import AuthorizationError
from ninja.security import HttpBearer

from workflows_app.engine.actors import Actor
from workflows_app.models import ApiToken

# last_used_at is for people ("is this token still in use?"): updating it at
# most once a minute spares a write on the same row for every request.
TOUCH_EVERY = timedelta(minutes=1)


class TokenAuth(HttpBearer):
    def __init__(self, scope: str) -> None:
        super().__init__()
        # The plain value: the refusal names the scope as clients write it.
        self.scope = str(scope)
        # An operate token acts as its user, who must still be active: the
        # engine then checks that user's permissions like on the dashboard.
        self.acts_as_user = self.scope == ApiToken.Scope.OPERATE

    def authenticate(self, request: HttpRequest, token: str) -> ApiToken | None:
        token = token.strip()
        if "\x00" in token:  # PostgreSQL refuses NUL in a query parameter
            return None
        row = ApiToken.authenticate(token)
        if row is None:
            return None  # ninja answers 401
        if not row.has_scope(self.scope):
            raise AuthorizationError(
                message=f"this token lacks the {self.scope!r} scope"
            )
        if self.acts_as_user and (row.user is None or not row.user.is_active):
            raise AuthorizationError(
                message="this operate token acts for no active user: "
                "ask an admin for a new one"
            )
        now = timezone.now()
        if row.last_used_at is None or now - row.last_used_at >= TOUCH_EVERY:
            row.touch()
        return row


START = TokenAuth(ApiToken.Scope.START)
READ = TokenAuth(ApiToken.Scope.READ)
REPORT = TokenAuth(ApiToken.Scope.REPORT)
OPERATE = TokenAuth(ApiToken.Scope.OPERATE)


def request_token(request: HttpRequest) -> ApiToken:
    """The token this request authenticated with."""
    # Set by ninja after TokenAuth accepted it; HttpRequest does not declare it.
    token: ApiToken = request.auth  # type: ignore[attr-defined]
    return token


def client_name(request: HttpRequest) -> str:
    """The authenticated client: its token's name (history rows show it, and
    inbound message ids are deduplicated per client)."""
    return request_token(request).name


def api_actor(request: HttpRequest) -> Actor:
    return Actor.api(client_name(request))


def event_actor(request: HttpRequest) -> Actor:
    return Actor.event(client_name(request))


def token_user(request: HttpRequest) -> Any:
    """The person an ``operate`` token acts as (checked by OPERATE)."""
    return request_token(request).user
