"""Saved views: an operator saves a filtered list; the team sees shared ones
on the overview; private ones stay private."""

from __future__ import annotations

import pytest
from django.test import Client

from tests.support import user_in
from workflows_app.models import SavedView

pytestmark = pytest.mark.django_db


def logged_in(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


def test_save_share_and_delete(wf, operator, second_operator):
    olga = logged_in(operator)
    response = olga.post(
        "/views/",
        {
            "name": "Held <orders>",
            "query": "definition=orders&state=needs_attention&cursor=x",
            "shared": "on",
        },
    )
    view = SavedView.objects.get()
    assert view.query == "definition=orders&state=needs_attention"
    assert response["Location"] == "/instances/?definition=orders&state=needs_attention"
    olga.post("/views/", {"name": "mine only", "query": "stuck=yes"})

    team = logged_in(user_in("viewer", "vera")).get("/").content.decode()
    assert "Held &lt;orders&gt;" in team and "mine only" not in team
    assert "mine only" in olga.get("/").content.decode()

    # Same name twice: refused; someone else's view cannot be deleted.
    olga.post("/views/", {"name": "mine only", "query": "stuck=no"})
    assert SavedView.objects.count() == 2
    oscar = logged_in(second_operator)
    assert oscar.post(f"/views/{view.pk}/delete/").status_code == 404
    olga.post(f"/views/{view.pk}/delete/")
    assert list(SavedView.objects.values_list("name", flat=True)) == ["mine only"]
