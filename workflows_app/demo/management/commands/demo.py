"""Run the whole demo on this machine: web server, worker with beat, traffic.

    python3 manage.py demo

Embedded default: SQLite and kombu's filesystem broker under var/, so it
needs no server. One process tree, stopped together with Ctrl-C.
"""

from __future__ import annotations

import contextlib
import os
import random
import secrets
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from django.conf import settings
from django.contrib.auth.models import Group, User
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandParser

from workflows_app.demo.definitions import load_demo_definitions
from workflows_app.demo.traffic import start_one
from workflows_app.engine.stuck import STALLED
from workflows_app.models import WorkflowInstance

DEMO_USERS = [
    ("viewer", "viewer", False),
    ("operator", "operator", False),
    # A second operator, to approve what the first one asks (four eyes).
    ("operator2", "operator", False),
    ("admin", "workflow admin", True),
]


class Command(BaseCommand):
    help = "Run the demo: web server, Celery worker and beat, and a traffic generator."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--host", default="127.0.0.1")
        parser.add_argument("--port", type=int, default=8000)
        parser.add_argument(
            "--rate",
            type=float,
            default=1.0,
            help="new workflows per second (default 1)",
        )
        parser.add_argument(
            "--duration",
            type=float,
            default=0,
            help="stop after this many seconds (default: until Ctrl-C)",
        )

    def handle(self, *args: Any, **opts: Any) -> None:
        call_command("migrate", verbosity=0)
        load_demo_definitions()
        passwords = self._demo_users()
        url = f"http://{opts['host']}:{opts['port']}/"
        children = self._start_children(opts["host"], opts["port"], url)
        self.stdout.write(self.style.SUCCESS(f"\nSaga Desk demo running at {url}"))
        for username, password in passwords.items():
            self.stdout.write(f"  log in as {username:<9} password {password}")
        self.stdout.write(
            f"  alert mail is written to {settings.EMAIL_FILE_PATH}\n"
            "  Ctrl-C stops everything.\n"
        )
        stopping = False

        def stop(signum: int, frame: Any) -> None:
            nonlocal stopping
            stopping = True

        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGTERM, stop)
        try:
            self._traffic(opts["rate"], opts["duration"], children, lambda: stopping)
        finally:
            self._stop_children(children)
            self.stdout.write("Demo stopped.")

    def _demo_users(self) -> dict[str, str]:
        """Demo-only accounts with fresh random passwords, printed once."""
        passwords = {}
        for username, group, staff in DEMO_USERS:
            user, _ = User.objects.get_or_create(username=username)
            password = secrets.token_urlsafe(9)
            user.set_password(password)
            user.is_staff = staff
            user.save()
            user.groups.set([Group.objects.get(name=group)])
            passwords[username] = password
        return passwords

    def _start_children(
        self, host: str, port: int, url: str
    ) -> dict[str, subprocess.Popen[bytes]]:
        var = Path(settings.VAR_DIR)
        env = {
            **os.environ,
            "SITE_URL": url.rstrip("/"),
            "SAGA_DESK_NO_BOOTSTRAP": "1",
            "SAGA_SWEEP_INTERVAL": os.environ.get("SAGA_SWEEP_INTERVAL", "2"),
            "SAGA_REDISPATCH_AFTER": os.environ.get("SAGA_REDISPATCH_AFTER", "10"),
            "SAGA_ALERT_GATHER": os.environ.get("SAGA_ALERT_GATHER", "5"),
        }
        os.environ.update({k: env[k] for k in ("SITE_URL", "SAGA_REDISPATCH_AFTER")})
        bin_dir = Path(sys.executable).parent
        logs = {
            name: (var / f"demo-{name}.log").open("ab") for name in ("web", "worker")
        }
        children = {
            "web": subprocess.Popen(
                [
                    str(bin_dir / "gunicorn"),
                    "workflows_app.wsgi",
                    "--bind",
                    f"{host}:{port}",
                    "--workers",
                    "2",
                    "--threads",
                    "4",
                    "--access-logfile",
                    "-",
                ],
                env=env,
                stdout=logs["web"],
                stderr=subprocess.STDOUT,
                start_new_session=True,
            ),
            "worker": subprocess.Popen(
                [
                    str(bin_dir / "celery"),
                    "-A",
                    "workflows_app",
                    "worker",
                    "-B",
                    "-P",
                    "prefork",
                    "-c",
                    "2",
                    "-l",
                    "info",
                    "-s",
                    str(var / "demo-beat-schedule"),
                ],
                env=env,
                stdout=logs["worker"],
                stderr=subprocess.STDOUT,
                start_new_session=True,
            ),
        }
        self.stdout.write(f"logs: {var}/demo-web.log, {var}/demo-worker.log")
        return children

    def _traffic(
        self, rate: float, duration: float, children: dict[str, Any], stopping: Any
    ) -> None:
        rng = random.Random()
        started = time.monotonic()
        last_report = 0.0
        while not stopping():
            now = time.monotonic()
            if duration and now - started > duration:
                return
            for name, child in children.items():
                if child.poll() is not None:
                    raise SystemExit(
                        f"the {name} process exited ({child.returncode}); "
                        f"see var/demo-{name}.log"
                    )
            if rate > 0:
                start_one(rng)
            if now - last_report > 15:
                last_report = now
                counts = Counter(
                    WorkflowInstance.objects.values_list("state", flat=True)
                )
                # As the overview counts it: a hold is needs_attention, not stuck.
                stuck = WorkflowInstance.objects.filter(STALLED).count()
                summary = ", ".join(
                    f"{state} {n}" for state, n in sorted(counts.items())
                )
                self.stdout.write(
                    f"[{int(now - started):>4}s] {summary}; stuck {stuck}"
                )
            time.sleep(1 / rate if rate > 0 else 1)

    def _stop_children(self, children: dict[str, subprocess.Popen[bytes]]) -> None:
        """Stop each child's whole process group (gunicorn and Celery workers).

        Waiting for the group leader is not enough: pool processes and the
        embedded beat may outlive it by a moment, so wait until the group is
        empty and kill what is left after the grace period.
        """
        for child in children.values():
            _signal_group(child, signal.SIGTERM)
        deadline = time.monotonic() + 20
        for child in children.values():
            if not _wait_for_group(child, deadline):
                _signal_group(child, signal.SIGKILL)
                _wait_for_group(child, time.monotonic() + 5)  # SIGKILL is not instant


def _wait_for_group(child: subprocess.Popen[bytes], deadline: float) -> bool:
    """Whether every process of the child's group exited before ``deadline``.

    ``poll()`` reaps the leader: an unreaped leader still counts as a member."""
    while True:
        child.poll()
        if not _group_alive(child.pid):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _signal_group(child: subprocess.Popen[bytes], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(child.pid, sig)
