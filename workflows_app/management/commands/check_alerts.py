from __future__ import annotations

from typing import Any

from django.core.mail import get_connection
from django.core.management.base import BaseCommand, CommandError, CommandParser

from workflows_app.alerts import make_message, recipients
from workflows_app.models import WorkflowDefinition


class Command(BaseCommand):
    help = (
        "Check alert configuration: send a test email to each definition's alert "
        "recipients (or the on-call address) through the configured mail server."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("keys", nargs="*", help="definition keys (default: all)")

    def handle(self, *args: Any, **options: Any) -> None:
        keys = options["keys"] or sorted(
            set(WorkflowDefinition.objects.published().values_list("key", flat=True))
        )
        mail = get_connection(fail_silently=False)
        failures = 0
        for key in keys:
            definition = WorkflowDefinition.objects.current(key)
            if definition is None:
                raise CommandError(f"no published definition {key!r}")
            to = recipients(definition)
            message = make_message("test", to, {"definition": definition})
            try:
                mail.send_messages([message])
            except Exception as exc:  # report every definition, then fail
                failures += 1
                self.stderr.write(f"{key}: sending to {', '.join(to)} failed: {exc}")
                continue
            self.stdout.write(f"{key}: test message sent to {', '.join(to)}")
        if failures:
            raise CommandError(f"{failures} test message(s) could not be sent")
