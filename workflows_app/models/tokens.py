"""API tokens for machine clients: shown once, stored hashed, scoped, revocable."""

from __future__ import annotations

import hashlib
import secrets

from django.conf import settings
from django.db import models
from django.utils import timezone

PREFIX_LENGTH = 8


class ApiToken(models.Model):
    class Scope(models.TextChoices):
        START = "start", "start workflows"
        READ = "read", "read instances"
        REPORT = "report", "report callbacks and events"
        # Operator actions, approvals and bulk jobs, as the token's user.
        OPERATE = "operate", "act as its user (operator actions)"

    name = models.CharField(
        max_length=100, help_text="Who uses it, e.g. checkout-service."
    )
    # The first characters of the token, stored in clear to find the row.
    prefix = models.CharField(max_length=PREFIX_LENGTH, unique=True, editable=False)
    # SHA-256 of the whole token: tokens are long random strings, so a fast
    # hash is enough (no dictionary to attack) and keeps each request cheap.
    token_hash = models.CharField(max_length=64, editable=False)
    scopes = models.JSONField(default=list)
    created_at = models.DateTimeField(auto_now_add=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True
    )
    # The person an ``operate`` token acts as: the timeline names them and
    # their permissions apply. A deleted user leaves the token without one,
    # and such a token is refused.
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="api_tokens",
        help_text="For an operate token: the operator it acts as.",
    )
    last_used_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix}…)"

    @staticmethod
    def hash(token: str) -> str:
        return hashlib.sha256(token.encode()).hexdigest()

    @classmethod
    def issue(
        cls,
        name: str,
        scopes: list[str],
        *,
        created_by: object = None,
        user: object = None,
    ) -> tuple[ApiToken, str]:
        """Create a token; returns the row and the clear token (shown once)."""
        problem = cls.scope_problem(scopes, user)
        if problem:
            raise ValueError(problem)
        token = f"sd_{secrets.token_urlsafe(32)}"
        row = cls.objects.create(
            name=name,
            prefix=token[3 : 3 + PREFIX_LENGTH],
            token_hash=cls.hash(token),
            scopes=sorted(set(scopes)),
            created_by=created_by,
            user=user,
        )
        return row, token

    @classmethod
    def scope_problem(cls, scopes: list[str], user: object) -> str:
        """Why these scopes and user make no token ("" when they do)."""
        unknown = set(scopes) - set(cls.Scope.values)
        if unknown:
            return f"unknown scopes: {', '.join(sorted(unknown))}"
        operate = cls.Scope.OPERATE in scopes
        if operate and user is None:
            return "an operate token acts as a user: name the user"
        if user is not None and not operate:
            return "only an operate token acts as a user"
        return ""

    @classmethod
    def authenticate(cls, token: str) -> ApiToken | None:
        """The active token row for ``token``, or None."""
        if not token.startswith("sd_") or len(token) < 3 + PREFIX_LENGTH:
            return None
        row = (
            cls.objects.filter(
                prefix=token[3 : 3 + PREFIX_LENGTH], revoked_at__isnull=True
            )
            .select_related("user")
            .first()
        )
        if row is None or not secrets.compare_digest(row.token_hash, cls.hash(token)):
            return None
        return row

    def has_scope(self, scope: str) -> bool:
        return scope in self.scopes

    def touch(self) -> None:
        ApiToken.objects.filter(pk=self.pk).update(last_used_at=timezone.now())

    def revoke(self) -> None:
        ApiToken.objects.filter(pk=self.pk, revoked_at__isnull=True).update(
            revoked_at=timezone.now()
        )
