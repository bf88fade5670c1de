"""Screenshots of the dashboard in headless Chromium, for review and docs.

    SAGA_DEMO=1 python manage.py screenshots --seed

``--seed`` loads the demo definitions and runs a handful of demo instances
into varied states (completed, retried, compensated, held after the pivot,
held on a failed compensation, accepted, running, a step done by hand). The
work runs in this process through the real engine and activities; only the
broker is replaced by an in-memory queue that delivers each message when due.
Then a throwaway server serves the site to Chromium, which logs in as an
operator and saves PNGs under ``static/screenshots/``.
"""

from __future__ import annotations

import dataclasses
import secrets
import threading
import time
from pathlib import Path
from typing import Any
from unittest import mock

from django.conf import settings
from django.contrib.auth.models import Group, User
from django.contrib.staticfiles.handlers import StaticFilesHandler
from django.core.handlers.wsgi import WSGIHandler
from django.core.management.base import BaseCommand, CommandError
from django.core.servers.basehttp import ThreadedWSGIServer, WSGIRequestHandler

from workflows_app import tasks
from workflows_app.alerts import sync_alerts
from workflows_app.demo.definitions import load_demo_definitions
from workflows_app.engine import commands, dispatch
from workflows_app.engine.actors import Actor
from workflows_app.engine.commands import bulk
from workflows_app.engine.locking import db_now
from workflows_app.models import WorkflowDefinition, WorkflowInstance
from workflows_app.roles import sync_roles

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
USERNAME = "screenshots"


@dataclasses.dataclass(order=True)
class _Message:
    due: float
    seq: int
    task: str = dataclasses.field(compare=False)
    args: list[Any] = dataclasses.field(compare=False)


class _MemoryBroker:
    """Deliver task messages in this process, each when its countdown is due;
    messages for instances in ``hold`` are dropped (they stay accepted)."""

    def __init__(self) -> None:
        self.queue: list[_Message] = []
        self.hold: set[str] = set()
        self._seq = 0

    def send(self, name: str, args: list[Any], **options: Any) -> None:
        """Stands in for ``engine.dispatch.send``."""
        self._seq += 1
        due = time.monotonic() + float(options.get("countdown") or 0)
        task = name.removeprefix("workflows.")
        self.queue.append(_Message(due, self._seq, task, list(args)))

    def run(self, *, limit: int = 2000) -> None:
        for _ in range(limit):
            if not self.queue:
                return
            self.queue.sort()
            message = self.queue.pop(0)
            if message.args[0] in self.hold:
                continue
            time.sleep(max(0.0, message.due - time.monotonic()))
            getattr(tasks, message.task)(*message.args)
        raise CommandError("the demo did not settle")


def _start(key: str, business_key: str, **simulate: Any) -> WorkflowInstance:
    data: dict[str, Any] = {"customer": "Ada Lovelace", "amount": "129.90"}
    if simulate:
        data["simulate"] = simulate
    return commands.instance_start(
        key, business_key=business_key, input=data, actor=Actor.api("demo-shop")
    ).instance


def seed(stdout: Any) -> dict[str, Any]:
    """Create demo instances in varied states; return the interesting ones."""
    load_demo_definitions()
    sync_roles()
    operator = _user("demo-operator", "operator")
    broker = _MemoryBroker()
    patches = [mock.patch.object(dispatch, "send", broker.send)]
    for patch in patches:
        patch.start()
    try:
        stamp = secrets.token_hex(2).upper()
        shown: dict[str, Any] = {}
        for n in range(3):
            _start("order-fulfilment", f"ORD-{stamp}-10{n}")
        _start("order-fulfilment", f"ORD-{stamp}-110", charge_payment="fail_once")
        _start("trip-booking", f"TRIP-{stamp}-201", book_flight="fail")
        shown["attention"] = _start(
            "order-fulfilment", f"ORD-{stamp}-120", notify_customer="fail"
        )
        # A burst of one cause: one failure group on the Failures page.
        for n in range(4):
            _start("order-fulfilment", f"ORD-{stamp}-15{n}", notify_customer="fail")
        _start(
            "trip-booking",
            f"TRIP-{stamp}-202",
            book_car="fail_compensation",
            book_flight="fail",
        )
        by_hand = _start("order-fulfilment", f"ORD-{stamp}-130", create_shipment="fail")
        waiting = _start("order-fulfilment", f"ORD-{stamp}-140")
        broker.hold.add(str(waiting.pk))
        broker.run()
        held = WorkflowInstance.objects.get(pk=by_hand.pk)
        commands.instance_mark_step_done(
            held.pk,
            user=operator,
            reason="Shipment booked by phone with the carrier (ticket OPS-4411).",
            output={"reference": "SHIP-PHONE-4411"},
            expected_version=held.version,
        )
        broker.run()
        # What the sweeper does next: open an alert per held instance.
        sync_alerts(db_now(), 500)
        # A planned (not started) bulk retry of the burst: its preview.
        shown["bulk_job"] = bulk.bulk_job_plan(
            WorkflowInstance.objects.filter(
                definition_key="order-fulfilment", state="needs_attention"
            ),
            action="retry",
            reason="Mail service is back after INC-2291.",
            user=operator,
            description="Definition: order-fulfilment; State: needs attention",
            query="definition=order-fulfilment&state=needs_attention",
            rate=5,
        )
        stdout.write(f"seeded demo instances ({stamp})")
        return shown
    finally:
        for patch in patches:
            patch.stop()


def _user(username: str, group: str, password: str | None = None) -> User:
    user, _ = User.objects.get_or_create(
        username=username, defaults={"first_name": username.replace("-", " ").title()}
    )
    if password:
        user.set_password(password)
        user.save(update_fields=["password"])
    user.groups.add(Group.objects.get(name=group))
    return user


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass


class Command(BaseCommand):
    help = "Save screenshots of the overview and an instance page (headless Chromium)."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--seed", action="store_true", help="create demo data")
        parser.add_argument(
            "--out", default=str(Path(settings.BASE_DIR) / "static" / "screenshots")
        )
        parser.add_argument("--chromium", default="/usr/bin/chromium")
        parser.add_argument("--width", type=int, default=1440)
        parser.add_argument("--height", type=int, default=900)

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            from playwright.sync_api import sync_playwright
        except ImportError as exc:
            raise CommandError("install playwright: pip install -e '.[test]'") from exc
        shown = seed(self.stdout) if options["seed"] else {}
        sync_roles()
        password = secrets.token_urlsafe(16)
        user = _user(USERNAME, "operator", password)
        # Also a workflow admin, for the screenshot of the definition admin.
        user.groups.add(Group.objects.get(name="workflow admin"))
        User.objects.filter(pk=user.pk).update(is_staff=True)
        definition = WorkflowDefinition.objects.current("order-fulfilment")
        instance = shown.get("attention") or (
            WorkflowInstance.objects.filter(state="needs_attention").first()
            or WorkflowInstance.objects.first()
        )
        if instance is None:
            raise CommandError("no instances: run with --seed")
        out = Path(options["out"])
        out.mkdir(parents=True, exist_ok=True)
        server = ThreadedWSGIServer(("127.0.0.1", 0), _QuietHandler)
        server.set_app(StaticFilesHandler(WSGIHandler()))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        base = f"http://127.0.0.1:{server.server_address[1]}"
        pages = {
            "login.png": "/login/",
            "overview.png": "/",
            "instance-list.png": "/instances/?state=active",
            "instance.png": f"/instances/{instance.pk}/",
            "definition.png": "/definitions/order-fulfilment/",
            "failures.png": "/failures/",
        }
        if shown.get("bulk_job") is not None:
            pages["bulk-job.png"] = f"/bulk-jobs/{shown['bulk_job'].pk}/"
        if definition is not None:
            pages["admin-definition.png"] = (
                f"/admin/workflows_app/workflowdefinition/{definition.pk}/change/"
            )
        try:
            with sync_playwright() as pw:
                browser = pw.chromium.launch(
                    executable_path=options["chromium"], args=CHROMIUM_ARGS
                )
                page = browser.new_page(
                    viewport={"width": options["width"], "height": options["height"]}
                )
                page.goto(base + "/login/")
                page.screenshot(path=str(out / "login.png"))
                page.fill("#id_username", USERNAME)
                page.fill("#id_password", password)
                page.click("button[type=submit]")
                page.wait_for_url(base + "/")
                for name, path in pages.items():
                    if name == "login.png":
                        continue
                    page.goto(base + path)
                    page.screenshot(path=str(out / name), full_page=True)
                    self.stdout.write(f"{out / name}")
                browser.close()
        finally:
            server.shutdown()
