"""API tokens in the admin: created with the clear token shown once, stored
hashed, listed with their last use, revoked by an action."""

from __future__ import annotations

import re

from django.contrib.auth.models import User
from django.test import TestCase
from django.urls import reverse

from workflows_app.models import ApiToken

ADD_URL = reverse("admin:workflows_app_apitoken_add")
LIST_URL = reverse("admin:workflows_app_apitoken_changelist")
TOKEN = re.compile(r"sd_[A-Za-z0-9_-]{43}")


class ApiTokenAdminTests(TestCase):
    def setUp(self):
        self.admin = User.objects.create_superuser("root", password="pw")
        self.client.force_login(self.admin)

    def test_creating_a_token_shows_it_once_and_stores_its_hash(self):
        response = self.client.post(
            ADD_URL, {"name": "checkout", "scopes": ["start", "read"]}, follow=True
        )
        assert response.status_code == 200
        shown = TOKEN.findall(response.content.decode())
        assert len(set(shown)) == 1
        token = shown[0]
        row = ApiToken.objects.get()
        assert (row.name, row.scopes, row.created_by) == (
            "checkout",
            ["read", "start"],
            self.admin,
        )
        assert row.token_hash == ApiToken.hash(token)
        assert token not in str(ApiToken.objects.values().get())
        assert ApiToken.authenticate(token) == row
        # Once: neither the list nor the token's page shows it again.
        for url in (
            LIST_URL,
            reverse("admin:workflows_app_apitoken_change", args=[row.pk]),
        ):
            page = self.client.get(url).content.decode()
            assert token not in page and row.token_hash not in page

    def test_a_token_can_be_renamed_and_rescoped_but_keeps_its_secret(self):
        row, token = ApiToken.issue("old", ["read"])
        url = reverse("admin:workflows_app_apitoken_change", args=[row.pk])
        response = self.client.post(url, {"name": "new", "scopes": ["report"]})
        assert response.status_code == 302
        row.refresh_from_db()
        assert (row.name, row.scopes) == ("new", ["report"])
        assert ApiToken.authenticate(token) == row

    def test_scopes_are_required_and_known(self):
        for scopes in ([], ["admin"]):
            response = self.client.post(ADD_URL, {"name": "x", "scopes": scopes})
            assert response.status_code == 200  # the form again, with errors
        assert not ApiToken.objects.exists()

    def test_the_list_shows_use_and_revocation(self):
        used, _ = ApiToken.issue("dashboard", ["read"])
        used.touch()
        ApiToken.issue("payments", ["report"])
        page = self.client.get(LIST_URL).content.decode()
        for text in (
            "dashboard",
            "payments",
            f"sd_{used.prefix}",
            "report",
            "Last used",
        ):
            assert text in page, text
        assert "Revoked" in page or "revoked" in page

    def test_the_revoke_action_revokes(self):
        keep, keep_token = ApiToken.issue("keep", ["read"])
        drop, drop_token = ApiToken.issue("drop", ["read"])
        response = self.client.post(
            LIST_URL,
            {"action": "revoke", "_selected_action": [drop.pk]},
            follow=True,
        )
        assert "Revoked 1 token(s)." in response.content.decode()
        drop.refresh_from_db()
        assert drop.revoked_at is not None
        assert ApiToken.authenticate(drop_token) is None
        assert ApiToken.authenticate(keep_token) == keep
        # Tokens are revoked, never deleted: the list keeps who had access.
        assert (
            not self.client.get(LIST_URL)
            .context["cl"]
            .model_admin.has_delete_permission(response.wsgi_request)
        )


class WorkflowAdminTokenTests(TestCase):
    """README: tokens are created in the admin. The demo's ``admin`` user is a
    staff member of the workflow admin role (not a superuser)."""

    def setUp(self):
        from tests.support import user_in

        self.admin = user_in("workflow admin", "wanda")
        self.admin.is_staff = True
        self.admin.save()
        self.client.force_login(self.admin)

    def test_the_demo_admin_creates_and_revokes_tokens(self):
        assert self.client.get(ADD_URL).status_code == 200
        response = self.client.post(
            ADD_URL, {"name": "checkout", "scopes": ["start", "read"]}, follow=True
        )
        assert len(set(TOKEN.findall(response.content.decode()))) == 1
        own = self.client.post(
            ADD_URL,
            {"name": "mine", "scopes": ["operate"], "user": self.admin.pk},
            follow=True,
        )
        assert TOKEN.search(own.content.decode())
        row = ApiToken.objects.get(name="checkout")
        self.client.post(
            LIST_URL,
            {"action": "revoke", "_selected_action": [row.pk]},
            follow=True,
        )
        row.refresh_from_db()
        assert row.revoked_at is not None

    def test_only_a_superuser_issues_a_token_acting_as_someone_else(self):
        other = User.objects.create_user("olga")
        response = self.client.post(
            ADD_URL, {"name": "as-olga", "scopes": ["operate"], "user": other.pk}
        )
        assert response.status_code == 200
        assert "Only a superuser can issue a token acting" in response.content.decode()
        assert not ApiToken.objects.exists()
