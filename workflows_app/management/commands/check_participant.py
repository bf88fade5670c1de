"""Check that a participant service keeps the saga contract.

    python manage.py check_participant --action https://payments.test/charges \\
        --compensation https://payments.test/refunds \\
        --effects https://payments.test/effects

Prints one verdict per rule (see workflows_app.participants.contract) and
exits with status 1 when any rule fails, so a participant's CI can run it
against a test deployment. It calls the service with fresh instance ids
only; it needs no database.
"""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from workflows_app.participants.contract import FAIL, check


class Command(BaseCommand):
    help = "Probe a participant service and print a verdict per contract rule."
    requires_system_checks: list[str] = []
    requires_migrations_checks = False

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--action", required=True, help="The forward call's URL.")
        parser.add_argument("--compensation", help="The compensation's URL.")
        parser.add_argument(
            "--effects",
            help='Read-back URL: GET ?idempotency_key=K -> {"effects": n}.',
        )
        parser.add_argument(
            "--header",
            action="append",
            default=[],
            metavar="NAME: VALUE",
            help="Extra header for every call (repeatable), e.g. credentials.",
        )
        parser.add_argument("--timeout", type=float, default=10.0)
        parser.add_argument(
            "--callback-wait",
            type=float,
            default=10.0,
            help="Seconds to wait for the callback after a 202.",
        )
        parser.add_argument(
            "--callback-host",
            default="127.0.0.1",
            help="Address the callback receiver listens on (the service must "
            "reach it).",
        )

    def handle(self, *args: Any, **opts: Any) -> None:
        headers = {}
        for raw in opts["header"]:
            name, sep, value = raw.partition(":")
            if not sep or not name.strip():
                raise CommandError(f"--header {raw!r}: use 'Name: value'")
            headers[name.strip()] = value.strip()
        verdicts = check(
            opts["action"],
            compensation_url=opts["compensation"],
            effects_url=opts["effects"],
            headers=headers,
            timeout=opts["timeout"],
            callback_wait=opts["callback_wait"],
            callback_host=opts["callback_host"],
        )
        width = max(len(v.rule) for v in verdicts)
        for v in verdicts:
            self.stdout.write(f"{v.verdict:<4} {v.rule:<{width}}  {v.title}")
            self.stdout.write(f"     {'':<{width}}  {v.detail}")
        failed = [v.rule for v in verdicts if v.verdict == FAIL]
        if failed:
            raise CommandError(f"{len(failed)} rule(s) failed: {', '.join(failed)}")
        self.stdout.write(f"all {len(verdicts)} rules pass or do not apply")
