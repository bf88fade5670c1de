"""Admin for API tokens: created here (the clear token is shown once, in the
message after saving), listed with their last use, revoked by an action.
An ``operate`` token acts as the user picked here (required for it).
Only the hash is stored; tokens are revoked rather than deleted, so the list
keeps the record of who had access."""

from __future__ import annotations

from typing import Any, cast

from django import forms
from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest
from django.utils.html import format_html

from workflows_app.models import ApiToken


class ApiTokenForm(forms.ModelForm[ApiToken]):
    scopes = forms.MultipleChoiceField(
        choices=ApiToken.Scope.choices,
        widget=forms.CheckboxSelectMultiple,
        help_text="start: start instances; read: GET endpoints; "
        "report: callbacks and events; operate: operator actions, approvals "
        "and bulk jobs as the user below.",
    )

    class Meta:
        model = ApiToken
        fields = ["name", "scopes", "user"]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if "user" in self.fields:
            # Only active people can act; list them by username.
            field = cast("forms.ModelChoiceField[Any]", self.fields["user"])
            assert field.queryset is not None  # a foreign key's field has one
            field.queryset = field.queryset.filter(is_active=True).order_by("username")

    def clean_scopes(self) -> list[str]:
        return sorted(set(self.cleaned_data["scopes"]))

    # The admin user filling in the form (set by ApiTokenAdmin.get_form).
    acting_user: Any = None

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        chosen, acting = data.get("user"), self.acting_user
        # A token acts with its user's permissions: only a superuser may hand
        # out someone else's.
        if (
            chosen is not None
            and acting is not None
            and not acting.is_superuser
            and chosen.pk != acting.pk
        ):
            self.add_error(
                "user", "Only a superuser can issue a token acting as another user."
            )
        if "scopes" in data:
            problem = ApiToken.scope_problem(data["scopes"], data.get("user"))
            if problem:
                self.add_error("user", f"{problem[0].upper()}{problem[1:]}.")
        return data


@admin.register(ApiToken)
class ApiTokenAdmin(admin.ModelAdmin[ApiToken]):
    form = ApiTokenForm
    list_display = (
        "name",
        "prefix_display",
        "scopes_display",
        "user",
        "last_used_at",
        "revoked",
        "created_at",
        "created_by",
    )
    list_filter = (("revoked_at", admin.EmptyFieldListFilter),)
    list_select_related = ("created_by", "user")
    search_fields = ("name", "prefix", "user__username")
    ordering = ("name", "id")
    actions = ("revoke",)
    readonly_fields = (
        "prefix_display",
        "created_at",
        "created_by",
        "last_used_at",
        "revoked_at",
    )

    def get_form(
        self,
        request: HttpRequest,
        obj: ApiToken | None = None,
        change: bool = False,
        **kwargs: Any,
    ) -> Any:
        form = super().get_form(request, obj, change, **kwargs)
        return type(form.__name__, (form,), {"acting_user": request.user})

    def get_fields(self, request: HttpRequest, obj: ApiToken | None = None) -> Any:
        if obj is None:
            return ("name", "scopes", "user")
        return ("name", "scopes", "user", *self.readonly_fields)

    def has_delete_permission(
        self, request: HttpRequest, obj: ApiToken | None = None
    ) -> bool:
        return False

    def get_actions(
        self, request: HttpRequest, *args: Any, **kwargs: Any
    ) -> dict[str, Any]:
        # *args: Django 6 adds an action_location argument.
        actions = super().get_actions(request, *args, **kwargs)
        if not self.has_change_permission(request):
            actions.pop("revoke", None)
        return actions

    @admin.display(description="prefix")
    def prefix_display(self, obj: ApiToken) -> str:
        return f"sd_{obj.prefix}…" if obj.prefix else ""

    @admin.display(description="scopes")
    def scopes_display(self, obj: ApiToken) -> str:
        return ", ".join(obj.scopes)

    @admin.display(description="revoked", boolean=True)
    def revoked(self, obj: ApiToken) -> bool:
        return obj.revoked_at is not None

    def save_model(
        self, request: HttpRequest, obj: ApiToken, form: Any, change: bool
    ) -> None:
        if change:
            obj.save(update_fields=["name", "scopes", "user"])
            return
        row, token = ApiToken.issue(
            obj.name, obj.scopes, created_by=request.user, user=obj.user
        )
        # The admin goes on with ``obj`` (log entry, redirect): make it the row.
        obj.pk = row.pk
        for field in (
            "prefix",
            "token_hash",
            "scopes",
            "created_at",
            "created_by",
            "user",
        ):
            setattr(obj, field, getattr(row, field))
        obj._state.adding = False
        messages.warning(
            request,
            format_html(
                "The token for “{}” is <code>{}</code>. Copy it now: it is shown "
                "only this once and cannot be recovered (only its hash is stored).",
                row.name,
                token,
            ),
        )

    @admin.action(description="Revoke selected tokens", permissions=["change"])
    def revoke(self, request: HttpRequest, queryset: QuerySet[ApiToken]) -> None:
        count = 0
        for token in queryset.filter(revoked_at__isnull=True):
            token.revoke()
            count += 1
        self.message_user(request, f"Revoked {count} token(s).", messages.SUCCESS)
