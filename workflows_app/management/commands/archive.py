"""Archive and purge finished instances by hand.

    python manage.py archive --before 2026-01-01 [--definition KEY]
                             [--dry-run] [--no-purge]

Finished instances (completed, compensated, cancelled, failed) that finished
before DATE are written to SAGA_ARCHIVE_DIR (for workflows that ask for an
archive) and deleted, in the sweeper's short batches; the run is recorded
in the purge audit with the operating-system user who ran it. The given date
is the policy here: a definition's retention period is not consulted.
"""

from __future__ import annotations

import getpass
import os
import socket
import time
from datetime import UTC, datetime
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils.dateparse import parse_date, parse_datetime

from workflows_app.engine import retention
from workflows_app.engine.locking import db_now
from workflows_app.models import PurgeRun, WorkflowDefinition

DATE_FORMS = "YYYY-MM-DD or YYYY-MM-DDTHH:MM[:SS][+HH:MM] (UTC when no offset)"


def parse_before(text: str) -> datetime:
    text = text.strip()
    try:
        moment = parse_datetime(text)
        if moment is None:
            day = parse_date(text)
            if day is not None:
                moment = datetime(day.year, day.month, day.day)
    except ValueError:
        # Well formed but impossible, e.g. 2026-02-30.
        moment = None
    if moment is None:
        raise CommandError(f"--before: {text!r} is not a date; use {DATE_FORMS}.")
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment


def operator() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = f"uid {os.getuid()}"
    return f"{user} on {socket.gethostname()}"


class Command(BaseCommand):
    help = "Archive and purge finished instances that finished before a date."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--before", required=True, help=f"the cutoff date: {DATE_FORMS}"
        )
        parser.add_argument(
            "--definition", metavar="KEY", help="only this workflow (all versions)"
        )
        parser.add_argument(
            "--dry-run",
            action="store_true",
            help="count what would be archived and purged; write nothing",
        )
        parser.add_argument(
            "--no-purge",
            action="store_true",
            help="write the archive, delete nothing",
        )
        parser.add_argument(
            "--batch", type=int, default=None, help="instances per transaction"
        )

    def handle(self, *args: Any, **opts: Any) -> None:
        before = parse_before(opts["before"])
        if before > db_now():
            raise CommandError(
                f"--before: {before.isoformat()} is in the future; it would "
                "purge instances that only just finished."
            )
        if opts["batch"] is not None and opts["batch"] < 1:
            raise CommandError("--batch: give a positive number of instances.")
        key = opts["definition"]
        if key is not None and not WorkflowDefinition.objects.filter(key=key).exists():
            known = ", ".join(
                WorkflowDefinition.objects.order_by("key")
                .values_list("key", flat=True)
                .distinct()
            )
            raise CommandError(f"--definition: no workflow {key!r} (known: {known}).")
        targets = retention.command_targets(before, key)
        folder = settings.SAGA_ARCHIVE_DIR
        if opts["no_purge"]:
            if not folder:
                raise CommandError("--no-purge archives only: set SAGA_ARCHIVE_DIR.")
            for target in targets:
                target.archive = True
        wanting = [t.key for t in targets if t.archive]
        if wanting and not folder:
            raise CommandError(
                f"{', '.join(wanting)} ask(s) for an archive before the purge and "
                "SAGA_ARCHIVE_DIR is not set: nothing was done."
            )
        if opts["dry_run"]:
            self._dry_run(targets, before, folder, purge=not opts["no_purge"])
            return
        actor = (PurgeRun.Actor.COMMAND, operator())
        total, started = 0, time.monotonic()
        for target in targets:
            path = (
                retention.archive_path(folder, target.key, per_run=True)
                if target.archive
                else None
            )
            outcome = retention.run(
                target,
                actor=actor,
                archive_file=path,
                purge=not opts["no_purge"],
                batch=opts["batch"],
            )
            total += outcome.instances
            verb = "archived" if opts["no_purge"] else "purged"
            where = (
                f", archive {outcome.archive_file}"
                if outcome.instances and outcome.archive_file
                else ""
            )
            longest = max(outcome.batch_seconds, default=0.0)
            self.stdout.write(
                f"{target.key}: {outcome.instances} instances {verb} in "
                f"{outcome.batches} batches (longest {longest * 1000:.0f} ms)"
                f"{where}"
            )
        self.stdout.write(
            f"total: {total} instances finished before {before.isoformat()} "
            f"{'archived' if opts['no_purge'] else 'purged'} in "
            f"{time.monotonic() - started:.1f} s"
        )

    def _dry_run(
        self,
        targets: list[retention.Target],
        before: datetime,
        folder: str,
        purge: bool,
    ) -> None:
        total = 0
        for target in targets:
            due = retention.count_due(target)
            total += due.instances
            if due.instances:
                span = (
                    f" (finished {due.first_finished_at.isoformat()} .. "  # type: ignore[union-attr]
                    f"{due.last_finished_at.isoformat()})"  # type: ignore[union-attr]
                )
            else:
                span = ""
            then = []
            if target.archive:
                then.append(f"archived to {folder}/{target.key}/")
            if purge:
                then.append("purged")
            self.stdout.write(
                f"{target.key}: {due.instances} instances would be "
                f"{' and '.join(then)}{span}"
            )
        self.stdout.write(
            f"total: {total} instances finished before {before.isoformat()} "
            "(dry run: nothing written)"
        )
