"""Create an API token for a machine client and print it once.

    python manage.py create_api_token checkout-service --scopes start,read
    python manage.py create_api_token runbook-alice --scopes operate,read --user alice

An ``operate`` token acts as the named user: the timeline names that person
and their permissions apply, so it needs ``--user``.

Only the token goes to standard output (``TOKEN=$(manage.py create_api_token
...)`` in scripts); what it is for goes to standard error. The database keeps
only its hash: a lost token is revoked in the admin and a new one created.
"""

from __future__ import annotations

from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError, CommandParser

from workflows_app.models import ApiToken


class Command(BaseCommand):
    help = "Create an API token (printed once; only its hash is stored)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("name", help="Who uses it, e.g. checkout-service.")
        parser.add_argument(
            "--scopes",
            required=True,
            help=f"Comma-separated, from: {', '.join(ApiToken.Scope.values)}.",
        )
        parser.add_argument(
            "--user",
            help="The username an operate token acts as (required for operate).",
        )

    def handle(self, *args: Any, **opts: Any) -> None:
        name = opts["name"].strip()
        if not name or len(name) > 100:
            raise CommandError("the name must be 1 to 100 characters")
        scopes = [s.strip() for s in opts["scopes"].split(",") if s.strip()]
        if not scopes:
            raise CommandError("give at least one scope")
        user = self._user(opts["user"])
        try:
            row, token = ApiToken.issue(name, scopes, user=user)
        except ValueError as exc:
            raise CommandError(str(exc)) from exc
        acting = f", acting as {user.get_username()}" if user is not None else ""
        self.stderr.write(
            f"Token {row.prefix}… for {row.name!r}, scopes {', '.join(row.scopes)}"
            f"{acting}. It is shown only this once:"
        )
        self.stdout.write(token)

    def _user(self, username: str | None) -> Any:
        if username is None:
            return None
        model = get_user_model()
        try:
            user = model.objects.get_by_natural_key(username)
        except model.DoesNotExist:
            raise CommandError(f"no user {username!r}") from None
        if not user.is_active:
            raise CommandError(f"the user {username!r} is inactive")
        return user
