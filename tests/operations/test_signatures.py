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
        # A step's timeout, noticed by the sweeper (with the deadline it saw
        # pass) or by the worker's own time limit, is one cause.
        (
            "Timeout: no outcome within 30s "
            "(deadline 2026-12-02T09:19:02.123456+00:00)",
            "Timeout: no outcome within 30s (interrupted in the worker)",
        ),
        (
            "Timeout: no outcome within 12.5 s (deadline 2026-12-02 09:19:02)",
            "Timeout: no outcome within 500 ms (deadline 2026-12-02T09:19:02Z)",
        ),
        ("Timeout: no outcome within 5s", "Timeout: no outcome within 1h30m"),
        (
            "the workflow deadline 2026-12-02T09:19:02+00:00 passed",
            "the workflow deadline 2027-01-31T23:00:00.5-05:00 passed",
        ),
        (
            "RateLimited: retry after Tue, 02 Dec 2026 09:19:02 GMT",
            "RateLimited: retry after Wed, 3 Dec 2026 10:00:00 GMT",
        ),
        ("Busy: try again in 2 minutes", "Busy: try again in PT30S"),
        ("Stale: lease 20261202T091902Z lapsed", "Stale: lease 2026-12-02 lapsed"),
    ],
)
def test_same_cause_same_signature(first, second):
    assert error_signature(first) == error_signature(second)


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("PaymentGatewayError: card declined", "PaymentGatewayError: card expired"),
        ("ValueError: bad amount 5", "TypeError: bad amount 5"),
        ("Timeout: no outcome within 30s", "Timeout: connect failed after 30s"),
        # Only where a timeout was noticed is dropped, not any parenthesis.
        ("Refused: 402 (card expired)", "Refused: 402 (quota exceeded)"),
        ("E: took 30s", "E: took 30 requests"),
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


def test_times_durations_and_ids_become_placeholders():
    sweeper = "Timeout: no outcome within 30s (deadline 2026-12-02T09:19:02+00:00)"
    assert error_signature(sweeper) == "Timeout: no outcome within <duration>"
    assert (
        error_signature("Timeout: attempt 1 timed out after 5.0s")
        == "Timeout: attempt <n> timed out after <duration>"
    )
    assert (
        error_signature("the workflow deadline 2026-12-02T09:19:02+00:00 passed")
        == "the workflow deadline <time> passed"
    )
    assert (
        error_signature("Gone: job 7f3a9c2e-1b2c-4d5e-8f90-123456789abc at 2026-12-02")
        == "Gone: job <id> at <time>"
    )
    assert error_signature("Slow: took 30s.") == "Slow: took <duration>."
    # A status code and an amount stay numbers, not durations.
    assert error_signature("HTTPError: 503 declined 12 items") == (
        "HTTPError: <n> declined <n> items"
    )


@pytest.mark.django_db(transaction=True)
def test_migration_recomputes_stored_signatures_and_moves_known_marks(broker):
    """Rows written under the old rules join the new groups, marks included."""
    import importlib

    from django.apps import apps

    from tests.operations.held_population import SCENARIOS, make_definitions, make_held
    from tests.support import user_in
    from workflows_app.failure_groups import failure_groups
    from workflows_app.models import KnownFailure, StepExecution

    make_definitions()
    [scenario] = [s for s in SCENARIOS if s.name == "ship never answers"]
    instance = make_held(broker, scenario, "ORD-1")
    old = "Timeout: no outcome within <n> (deadline <n>-<n>-<n>:<n>+<n>)"
    step = StepExecution.objects.filter(instance=instance, name="ship")
    step.update(error_signature=old)
    KnownFailure.objects.create(
        definition_key=instance.definition_key,
        step_name="ship",
        signature=old,
        note="carrier API slow, INC-7",
        marked_by=user_in("operator", "olga"),
    )

    migration = importlib.import_module(
        "workflows_app.migrations.0018_recompute_error_signatures"
    )
    migration.recompute(apps, None)

    assert step.get().error_signature == "Timeout: no outcome within <duration>"
    [group] = failure_groups()
    assert group.signature == "Timeout: no outcome within <duration>"
    assert group.known is not None and group.known.note == "carrier API slow, INC-7"
