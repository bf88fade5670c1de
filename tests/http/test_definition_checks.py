"""What a definition save refuses for the HTTP activity: hosts off the
allow-list, literal credentials, a malformed config; in the model, at
publish and in the admin."""

from __future__ import annotations

import pytest
from django.core.exceptions import ValidationError
from django.test import override_settings
from django.utils.html import escape

from tests.http.conftest import http_step
from tests.support import make_definition
from tests.test_admin import ADD_URL, AdminTestCase, form_data
from workflows_app.activities.http_config import config_errors, host_allowed
from workflows_app.models import StepDefinition, WorkflowDefinition

pytestmark = pytest.mark.django_db

PATTERNS = ["payments.internal", "*.svc.example", "127.0.0.1:8001", "[::1]"]


@pytest.mark.parametrize(
    ("url", "allowed"),
    [
        ("https://payments.internal/charges", True),
        ("https://PAYMENTS.internal./charges", True),
        ("https://evil.payments.internal/", False),
        ("https://shipping.svc.example/x", True),
        ("https://svc.example/x", False),
        ("http://127.0.0.1:8001/x", True),
        ("http://127.0.0.1:8002/x", False),
        ("http://127.0.0.1/x", False),
        ("http://[::1]:9000/x", True),
        ("http://169.254.169.254/latest/meta-data", False),
        ("http://payments.internal.evil.com/", False),
    ],
)
def test_allow_list_matching(url, allowed):
    assert host_allowed(url, PATTERNS) is allowed


def test_an_empty_allow_list_allows_nothing_and_star_allows_all():
    assert not host_allowed("https://payments.internal/", [])
    assert host_allowed("https://anything.example/", ["*"])


@override_settings(SAGA_HTTP_ALLOWED_HOSTS=["payments.internal"])
@pytest.mark.parametrize(
    ("config", "message"),
    [
        (
            {"url": "http://10.0.0.5/admin"},
            "10.0.0.5 is not in SAGA_HTTP_ALLOWED_HOSTS",
        ),
        (
            {
                "url": "https://payments.internal/",
                "headers": {"Authorization": "Bearer abc"},
            },
            "holds a credential",
        ),
        (
            {"url": "https://payments.internal/", "headers": {"X-Api-Key": "abc"}},
            "holds a credential",
        ),
        ({"url": "https://u:p@payments.internal/"}, "must not carry credentials"),
        ({"url": "ftp://payments.internal/"}, "absolute http(s) URL"),
        ({"url": "https://payments.internal/", "method": "BREW"}, "'method'"),
        ({"url": "https://payments.internal/", "expected_status": [202]}, "202"),
        ({"url": "https://payments.internal/", "expected_status": [404]}, "2xx"),
        ({"url": "https://payments.internal/", "timeout": 3}, "Unknown config keys"),
        (
            {"url": "https://payments.internal/", "headers": {"Idempotency-Key": "x"}},
            "set by Saga Desk",
        ),
    ],
)
def test_config_errors(config, message):
    assert any(message in error for error in config_errors(config)), config_errors(
        config
    )


@override_settings(SAGA_HTTP_ALLOWED_HOSTS=["payments.internal"])
def test_references_are_accepted():
    config = {
        "url": "https://payments.internal/charges",
        "headers": {
            "Authorization": "Bearer ${env:PAYMENTS_TOKEN}",
            "X-Api-Key": "secret:payments_key",
            "Cookie": "env:SESSION",
        },
        "expected_status": [200, 201],
        "follow_redirects": True,
        "redact": ["card_number"],
    }
    assert config_errors(config) == []


@override_settings(SAGA_HTTP_ALLOWED_HOSTS=["payments.internal"])
def test_publish_refuses_a_host_off_the_list_in_either_direction():
    for field in ("action", "compensation"):
        spec = {
            **http_step("https://payments.internal/charges"),
            "compensation": "http.request",
            "compensation_config": {"url": "https://payments.internal/refunds"},
        }
        spec[f"{field}_config"] = {"url": "http://metadata.internal/"}
        definition = make_definition(f"wf-{field}", [spec], publish=False)
        with pytest.raises(ValidationError) as raised:
            definition.publish()
        assert "metadata.internal is not in SAGA_HTTP_ALLOWED_HOSTS" in str(
            raised.value
        )
        assert not WorkflowDefinition.objects.get(pk=definition.pk).is_published


class AdminAllowListTests(AdminTestCase):
    @override_settings(SAGA_HTTP_ALLOWED_HOSTS=["payments.internal"])
    def test_the_admin_refuses_a_host_off_the_list_and_a_literal_token(self):
        cases = [
            ('{"url": "http://127.0.0.1:6379/"}', "127.0.0.1:6379 is not in"),
            (
                '{"url": "https://payments.internal/", '
                '"headers": {"Authorization": "Bearer abc"}}',
                "holds a credential",
            ),
        ]
        for config, message in cases:
            step = {
                "name": "charge",
                "action": "http.request",
                "action_config": config,
                "compensation": "",
            }
            response = self.client.post(ADD_URL, form_data([step]))
            assert response.status_code == 200
            self.assertContains(response, escape(message))
            assert StepDefinition.objects.count() == 0

    @override_settings(SAGA_HTTP_ALLOWED_HOSTS=["payments.internal"])
    def test_the_admin_saves_an_allowed_host_with_a_reference(self):
        step = {
            "name": "charge",
            "action": "http.request",
            "action_config": '{"url": "https://payments.internal/charges", '
            '"headers": {"Authorization": "env:PAYMENTS_TOKEN"}}',
            "compensation": "",
        }
        response = self.client.post(ADD_URL, form_data([step]))
        assert response.status_code == 302
        stored = StepDefinition.objects.get().action_config
        assert stored["headers"] == {"Authorization": "env:PAYMENTS_TOKEN"}
