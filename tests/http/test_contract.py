"""The participant contract check: it passes on the demo participants served
over HTTP, and fails rule by rule on a participant broken one way at a time."""

from __future__ import annotations

from io import StringIO

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from tests.http.participants import broken_participant, demo_participants
from workflows_app.demo.models import ParticipantEffect
from workflows_app.participants.contract import FAIL, NOT_APPLICABLE, PASS, check

pytestmark = pytest.mark.django_db(transaction=True)
RULES = [
    "replay",
    "compensate_unknown",
    "late_forward",
    "async_callback",
    "unknown_fields",
]


@pytest.fixture
def demo():
    with demo_participants() as base:
        yield base


def verdicts(
    base: str, service: str = "", action: str = "/action", **options
) -> dict[str, str]:
    result = check(
        f"{base}{service}{action}",
        compensation_url=f"{base}{service}/compensation",
        effects_url=f"{base}/effects",
        callback_wait=3,
        **options,
    )
    assert [v.rule for v in result] == RULES
    return {v.rule: v.verdict for v in result}


def test_the_demo_participants_keep_the_contract(demo):
    answers = verdicts(demo, "/payments")
    assert answers == {**dict.fromkeys(RULES, PASS), "async_callback": NOT_APPLICABLE}
    # The probes really went to the participant's ledger.
    assert ParticipantEffect.objects.filter(step_name="contract_check").exists()


def test_the_demo_participants_keep_it_answering_later_too(demo):
    answers = verdicts(demo, "/payments", action="/action?reply=async")
    assert answers == dict.fromkeys(RULES, PASS)


def test_a_correct_in_memory_participant_passes():
    with broken_participant() as base:
        answers = verdicts(base)
    assert answers == {**dict.fromkeys(RULES, PASS), "async_callback": NOT_APPLICABLE}


@pytest.mark.parametrize(
    ("flag", "rule", "also"),
    [
        ("no_dedupe", "replay", []),
        # The late-forward probe starts with an undo of a call that never
        # ran, so it cannot pass where that undo is refused.
        ("compensation_needs_action", "compensate_unknown", ["late_forward"]),
        ("accepts_late_forward", "late_forward", []),
        ("callback_wrong_token", "async_callback", []),
        ("strict_fields", "unknown_fields", []),
    ],
)
def test_each_broken_rule_fails(flag, rule, also):
    with broken_participant(flag) as base:
        answers = verdicts(base)
    failed = [r for r, verdict in answers.items() if verdict == FAIL]
    assert failed == [r for r in RULES if r in {rule, *also}]


def test_replay_without_an_effects_url_compares_the_answers():
    with broken_participant("no_dedupe") as base:
        [replay, *_] = check(f"{base}/action", callback_wait=1)
    assert replay.verdict == FAIL
    assert "replay answered" in replay.detail


def test_an_unreachable_participant_fails_every_rule_that_calls_it():
    result = check("http://127.0.0.1:9/action", compensation_url=None, timeout=2)
    by_rule = {v.rule: v.verdict for v in result}
    assert by_rule["replay"] == FAIL and by_rule["unknown_fields"] == FAIL
    assert by_rule["compensate_unknown"] == NOT_APPLICABLE


def test_the_command_prints_a_verdict_per_rule_and_fails_in_ci(demo):
    out = StringIO()
    call_command(
        "check_participant",
        "--action",
        f"{demo}/inventory/action",
        "--compensation",
        f"{demo}/inventory/compensation",
        "--effects",
        f"{demo}/effects",
        stdout=out,
    )
    lines = out.getvalue().splitlines()
    assert lines[-1] == "all 5 rules pass or do not apply"
    assert sum(line.startswith(("pass", "n/a")) for line in lines) == 5
    with broken_participant("accepts_late_forward") as base:
        out = StringIO()
        with pytest.raises(CommandError, match="1 rule\\(s\\) failed: late_forward"):
            call_command(
                "check_participant",
                "--action",
                f"{base}/action",
                "--compensation",
                f"{base}/compensation",
                "--callback-wait",
                "1",
                stdout=out,
            )
        assert "FAIL late_forward" in out.getvalue()
