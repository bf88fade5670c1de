"""Error signatures: failures of one cause share one, others do not."""

from __future__ import annotations

import pytest

from workflows_app.engine.signatures import MAX_LENGTH, error_signature


@pytest.mark.parametrize(
    ("first", "second"),
    [
        (
            "PaymentGatewayError: 503 for order 'ORD-17'",
            "PaymentGatewayError: 502 for order 'ORD-9912'",
        ),
        (
            "Timeout: attempt 1 timed out after 5.0s",
            "Timeout: attempt 3 timed out after 12s",
        ),
        (
            "ConnectionError: job 7f3a9c2e-1b2c-4d5e-8f90-123456789abc refused",
            "ConnectionError: job 00000000-1111-2222-3333-444444444444 refused",
        ),
        ('KeyError: "sku-1"', "KeyError: 'sku-22'"),
        ("HTTPError: 500 from 10.0.0.3", "HTTPError: 503 from 10.0.0.17"),
    ],
)
def test_same_cause_same_signature(first, second):
    assert error_signature(first) == error_signature(second)


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("PaymentGatewayError: card declined", "PaymentGatewayError: card expired"),
        ("ValueError: bad amount 5", "TypeError: bad amount 5"),
    ],
)
def test_other_cause_other_signature(first, second):
    assert error_signature(first) != error_signature(second)


def test_shape():
    assert error_signature("") == ""
    assert error_signature("   ") == ""
    assert (
        error_signature("PaymentGatewayError: 503 for order 'ORD-17'")
        == "PaymentGatewayError: <n> for order <q>"
    )
    # No "Class: " prefix: the whole text is the message.
    assert error_signature("the host said no 3 times") == "the host said no <n> times"
    assert len(error_signature("E: " + "word " * 200)) == MAX_LENGTH
