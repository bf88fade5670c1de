"""Re-read the search attributes of existing instances, in batches.

    python manage.py reindex_search_attributes --definition order-fulfilment

New instances get the attributes their definition version declares at start.
Instances started before a version declared (more) attributes get them here,
from the newest published version of their definition key: batches of
``--batch`` rows in primary-key order, each its own short transaction, so a
large table is never locked for long and an interrupted run can be resumed.
"""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError
from django.db import transaction

from workflows_app.models import WorkflowDefinition, WorkflowInstance
from workflows_app.search_attributes import extract


class Command(BaseCommand):
    help = "Re-read the declared search attributes of existing instances."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument(
            "--definition", action="append", help="a definition key (repeatable)"
        )
        parser.add_argument("--batch", type=int, default=5000)

    def handle(self, *args: Any, **options: Any) -> None:
        if options["batch"] < 1:
            raise CommandError("--batch must be at least 1")
        keys = options["definition"] or sorted(
            set(WorkflowDefinition.objects.published().values_list("key", flat=True))
        )
        for key in keys:
            current = WorkflowDefinition.objects.current(key)
            if current is None:
                raise CommandError(f"no published definition {key!r}")
            changed = reindex(key, current.search_attributes, options["batch"])
            self.stdout.write(f"{key}: {changed:,} instances changed")


def reindex(key: str, declared: dict[str, str], batch: int) -> int:
    """Set the attributes of every instance of ``key`` from ``declared``;
    returns how many rows changed."""
    changed, last = 0, None
    while True:
        rows = WorkflowInstance.objects.filter(definition_key=key).order_by("pk")
        if last is not None:
            rows = rows.filter(pk__gt=last)
        page = list(rows.values_list("pk", "input", "search_attributes")[:batch])
        if not page:
            return changed
        last = page[-1][0]
        updates = [
            WorkflowInstance(pk=pk, search_attributes=found)
            for pk, data, stored in page
            if (found := extract(declared, data)) != stored
        ]
        if updates:
            with transaction.atomic():
                WorkflowInstance.objects.bulk_update(updates, ["search_attributes"])
            changed += len(updates)
