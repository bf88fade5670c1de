"""Login throttling (django-axes, on the project's database): failed logins
are counted per username and address; past the limit that pair is locked
with a clear page (429, not a 500), even for the right password."""

from __future__ import annotations

import pytest
from django.test import Client

from tests.support import user_in

pytestmark = pytest.mark.django_db(transaction=True)


def attempt(client: Client, password: str, username: str = "olga"):
    return client.post("/login/", {"username": username, "password": password})


def test_failed_logins_lock_the_username_then_a_clear_page(settings):
    settings.AXES_FAILURE_LIMIT = 3
    user_in("operator", "olga")
    client = Client()
    for _ in range(2):
        response = attempt(client, "wrong")
        assert response.status_code == 200
        assert "didn't match" in response.content.decode()
    locked = attempt(client, "wrong")  # the third failure locks
    assert locked.status_code == 429
    page = locked.content.decode()
    assert "Too many failed logins" in page
    assert "locked on this computer after 3 failed logins" in page
    assert "Try again in 15 min" in page
    # Locked: even the right password is refused, and no session is made.
    right = attempt(client, "pw")
    assert right.status_code == 429 and "sessionid" not in right.cookies
    # Another username from the same address is not locked.
    user_in("viewer", "victor")
    assert attempt(Client(), "pw", "victor").status_code == 302


def test_a_success_resets_the_count(settings):
    settings.AXES_FAILURE_LIMIT = 3
    user_in("operator", "olga")
    client = Client()
    for _ in range(2):
        attempt(client, "wrong")
    assert attempt(client, "pw").status_code == 302
    client = Client()
    for _ in range(2):
        assert attempt(client, "wrong").status_code == 200
    assert attempt(client, "pw").status_code == 302
