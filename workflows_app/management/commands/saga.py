"""Runbooks from the command line: list, show and act on instances, and act
on a filter through a bulk job.

    python manage.py saga list --definition orders --state needs_attention
    python manage.py saga show ORD-1042 --user olga
    python manage.py saga act ORD-1042 retry_step --reason "INC-7 fixed" --user olga
    python manage.py saga bulk retry --failed-step charge --reason "INC-7" \\
        --user olga --dry-run

Every action goes through the engine's catalogue (``engine.operate.act``),
so the command line gets exactly the rules of the pages and the API: the
same permissions, version fences and four eyes. Exit codes: see ``--help``.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from django.core.management.base import BaseCommand, CommandParser, DjangoHelpFormatter
from django.core.serializers.json import DjangoJSONEncoder
from django.urls import reverse

from workflows_app import validation
from workflows_app.cli import documents, exits, lookup, selection, text
from workflows_app.cli.exits import Exit
from workflows_app.engine import actions, operate
from workflows_app.engine.commands import bulk
from workflows_app.engine.errors import EngineError
from workflows_app.models import WorkflowInstance

LIST_LIMIT = 50
LIST_MAX = 10_000
HISTORY = 15
ITEMS_SHOWN = 50
DRY_RUN_NOTE = "dry run from the command line: preview only"


class Formatter(DjangoHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Django's option order, with the epilog's lines kept as written."""


def _action_name(value: str) -> str:
    return value.replace("-", "_")


def _catalogue_help() -> str:
    lines = ["actions (engine catalogue):"]
    for action in actions.CATALOGUE.values():
        extra = []
        if action.targets_step:
            extra.append("--step")
        if action.data_keys:
            extra.append("--data " + ",".join(k for k, _ in action.data_keys))
        tail = f" [{'; '.join(extra)}]" if extra else ""
        lines.append(f"  {action.name:<19}{action.label}{tail}")
    return "\n".join(lines) + "\n\n" + exits.HELP


class Command(BaseCommand):
    help = (
        "Runbooks: list, show and act on saga instances, and act on a filter "
        "through a bulk job."
    )

    def create_parser(
        self, prog_name: str, subcommand: str, **kwargs: Any
    ) -> CommandParser:
        parser = super().create_parser(prog_name, subcommand, epilog=exits.HELP)
        parser.formatter_class = Formatter
        return parser

    def add_arguments(self, parser: CommandParser) -> None:
        sub = parser.add_subparsers(dest="subcommand", required=True, metavar="COMMAND")

        def command(name: str, help: str, epilog: str = exits.HELP) -> Any:
            found = sub.add_parser(
                name,
                help=help,
                description=help,
                epilog=epilog,
                formatter_class=Formatter,
            )
            found.add_argument(
                "--json", action="store_true", help="Print JSON for machines."
            )
            return found

        listing = command(
            "list", "Instances matching the filters, newest progress first."
        )
        selection.add_arguments(listing)
        listing.add_argument(
            "--limit", type=int, default=LIST_LIMIT, help=f"Default {LIST_LIMIT}."
        )

        show = command(
            "show",
            "One instance: state, why it waits, steps and attempts, the actions "
            "possible now (and why not), approvals waiting, the latest timeline.",
        )
        show.add_argument("instance", help="Id, unique id prefix or business key.")
        show.add_argument(
            "--user",
            help="Whose actions to list (default: what the state allows anyone "
            "with every permission).",
        )
        show.add_argument(
            "--history", type=int, default=HISTORY, help="Timeline rows to show."
        )

        act = command(
            "act",
            "Do one catalogued action on one instance, as --user.",
            _catalogue_help(),
        )
        act.add_argument("instance", help="Id, unique id prefix or business key.")
        act.add_argument("action", type=_action_name, choices=sorted(actions.CATALOGUE))
        self._operator_arguments(act)
        act.add_argument("--step", help="The step (name or position) it acts on.")
        act.add_argument(
            "--data",
            help='A JSON object, e.g. \'{"output": {"ref": "R1"}}\', or @FILE.',
        )
        act.add_argument(
            "--expected-version",
            type=int,
            help="Refuse (exit 4) unless the instance is still at this row version.",
        )

        bulk_job = command(
            "bulk",
            "Retry or compensate the instances a filter selects, as one bulk job "
            "that a worker runs (planned, previewed, then started).",
        )
        bulk_job.add_argument("bulk_action", choices=["retry", "compensate"])
        self._operator_arguments(bulk_job)
        selection.add_arguments(bulk_job)
        bulk_job.add_argument(
            "--rate", type=float, default=0, help="Instances per second (0: no limit)."
        )
        bulk_job.add_argument(
            "--dry-run",
            action="store_true",
            help="Print the preview and start nothing; the draft job is cancelled "
            "(it stays in the job list, on record).",
        )

    @staticmethod
    def _operator_arguments(parser: CommandParser) -> None:
        parser.add_argument(
            "--reason", required=True, help="Why; recorded in the timeline."
        )
        parser.add_argument(
            "--user",
            required=True,
            metavar="USERNAME",
            help="The operator who acts: the timeline names them, with their "
            "permissions.",
        )

    def run_from_argv(self, argv: list[str]) -> None:
        try:
            super().run_from_argv(argv)
        except Exit as exc:
            if exc.message:
                self.stderr.write(f"saga: {exc.message}")
            sys.exit(exc.code)

    def handle(self, *args: Any, **opts: Any) -> None:
        try:
            getattr(self, f"_{opts['subcommand']}")(opts)
        except Exit as exc:
            if opts.get("json") and not exc.reported:
                error = {"code": exc.kind, "message": exc.message, "exit": exc.code}
                self._json({"error": error})
            raise

    # -- output ---------------------------------------------------------------

    def _json(self, document: dict[str, Any]) -> None:
        self.stdout.write(json.dumps(document, cls=DjangoJSONEncoder, indent=2))

    def _print(
        self, opts: dict[str, Any], document: dict[str, Any], words: str
    ) -> None:
        if opts["json"]:
            self._json(document)
        else:
            self.stdout.write(words)

    # -- subcommands ----------------------------------------------------------

    def _list(self, opts: dict[str, Any]) -> None:
        limit = opts["limit"]
        if not 1 <= limit <= LIST_MAX:
            raise exits.bad_input(f"--limit must be between 1 and {LIST_MAX}")
        rows = list(selection.select(opts).ordered()[: limit + 1])
        document = documents.listing(rows[:limit], more=len(rows) > limit)
        self._print(opts, document, text.listing(document))

    def _show(self, opts: dict[str, Any]) -> None:
        if opts["history"] < 0:
            raise exits.bad_input("--history cannot be negative")
        instance = lookup.instance(opts["instance"])
        user = (
            lookup.user(opts["user"]) if opts["user"] else documents.EveryPermission()
        )
        document = documents.show(instance, user, opts["history"])
        self._print(opts, document, text.show(document))

    def _act(self, opts: dict[str, Any]) -> None:
        instance = lookup.instance(opts["instance"])
        user = lookup.user(opts["user"])
        reason = lookup.reason(opts["reason"])
        data = lookup.data(opts["data"]) if opts["data"] is not None else None
        step = lookup.step(instance, opts["step"]) if opts["step"] else None
        name = opts["action"]
        try:
            outcome = operate.act(
                instance.pk,
                name,
                user=user,
                reason=reason,
                step_id=step.pk if step else None,
                data=data,
                expected_version=opts["expected_version"],
            )
        except WorkflowInstance.DoesNotExist:
            raise exits.bad_input("the instance no longer exists") from None
        except (EngineError, validation.BadInput) as exc:
            raise _explained(exits.from_error(exc), instance.pk, name, user) from None
        fresh = WorkflowInstance.objects.select_related("definition").get(
            pk=instance.pk
        )
        blocked = documents.blocked_steps([fresh.pk]).get(fresh.pk)
        document = {
            "done": outcome.done,
            "action": name,
            "instance": documents.instance_summary(fresh, blocked),
            "approval": documents.approval(outcome.approval)
            if outcome.approval
            else None,
        }
        label = actions.CATALOGUE[name].label
        if outcome.done:
            words = (
                f"{label}: done on {fresh.business_key} ({str(fresh.pk)[:8]}); "
                f"now {fresh.state}, row version {fresh.version}."
            )
            self._print(opts, document, words)
            return
        request = outcome.approval
        assert request is not None
        words = (
            f"{label} on {fresh.business_key}: sent for approval (request "
            f"#{request.pk}, expires {text.when(request.expires_at)}). "
            "A second operator must approve it; nothing was done yet."
        )
        self._print(opts, document, words)
        raise _reported(exits.SENT_FOR_APPROVAL, "sent for approval (four eyes)")

    def _bulk(self, opts: dict[str, Any]) -> None:
        user = lookup.user(opts["user"])
        reason = lookup.reason(opts["reason"])
        chosen = selection.select(opts)
        if not chosen.is_filtered:
            raise exits.bad_input(
                "a bulk job acts on a filtered list: give at least one filter"
            )
        if not chosen.queryset().exists():
            raise exits.refused("no instance matches this selection: nothing to do")
        try:
            job = bulk.bulk_job_plan(
                chosen.queryset(),
                action=opts["bulk_action"],
                reason=reason,
                user=user,
                description=chosen.description,
                query=chosen.query,
                rate=opts["rate"],
            )
        except EngineError as exc:
            raise exits.from_error(exc) from None
        shown = None if opts["json"] else ITEMS_SHOWN
        preview = documents.bulk_job(job, shown)
        if opts["dry_run"] or not preview["counts"]["acting"]:
            # A draft left behind could be started later from the page on a
            # preview nobody looked at again: cancel it, on record.
            note = DRY_RUN_NOTE if opts["dry_run"] else "nothing to do"
            bulk.bulk_job_cancel(job.pk, user=user, reason=note)
            preview["dry_run"] = opts["dry_run"]
            preview["job"]["status"] = "cancelled"
            words = text.bulk_job(preview)
            if opts["dry_run"]:
                words += f"\nDry run: nothing was done; job #{job.pk} is cancelled."
                self._print(opts, preview, words)
                return
            self._print(opts, preview, words)
            raise _reported(exits.REFUSED, "every selected instance would be skipped")
        try:
            job = bulk.bulk_job_confirm(job.pk, user=user)
        except EngineError as exc:
            raise exits.from_error(exc) from None
        document = documents.bulk_job(job, shown)
        document["dry_run"] = False
        document["url"] = reverse("bulk_job_detail", args=[job.pk])
        words = text.bulk_job(document)
        request = document["approval"]
        if request is not None:
            words += (
                f"\nSent for approval: a second operator must approve job #{job.pk} "
                f"(request #{request['id']}) before it starts: {document['url']}"
            )
            self._print(opts, document, words)
            raise _reported(exits.SENT_FOR_APPROVAL, "sent for approval (four eyes)")
        words += (
            f"\nStarted: job #{job.pk} is {job.status}; watch it at {document['url']}"
        )
        self._print(opts, document, words)


def _reported(code: int, message: str) -> Exit:
    """An exit whose outcome was printed already (not an error document)."""
    return Exit(code, message, reported=True)


def _explained(exit_: Exit, instance_id: Any, name: str, user: Any) -> Exit:
    """A refusal with the catalogue's sentence for why the action is not
    possible now, where it says more than the engine's error."""
    if exit_.code != exits.REFUSED:
        return exit_
    instance = WorkflowInstance.objects.select_related("definition").get(pk=instance_id)
    steps = list(instance.steps.select_related("step_definition").order_by("position"))
    why = actions.why_not(actions.CATALOGUE[name], instance, user, steps)
    if why and why not in exit_.message:
        exit_.message += f" (why: {why})"
    return exit_
