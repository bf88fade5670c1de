"""Server-side response times of the dashboard's pages, p50 and p95.

    SAGA_DEMO=1 python manage.py bench_dashboard --runs 60

Each request goes through the whole Django stack in this process (middleware,
session, views, queries, templates) with Django's test client, logged in as
an operator, so the figures are server time without the network. Run it
against a database filled by ``generate_load``. Targets are picked at random
per request (``TABLESAMPLE``), so caches do not flatter the detail and search
figures. The searches are the list's search box: a sampled business key, a
lower-case prefix its neighbours share, a full and an 8-character id, and a
sampled instance's ``name:value`` search attribute (alone and with a state);
each must find rows, or the command stops.

    SAGA_DEMO=1 DATABASE_URL=postgres://...:55432/saga_1m \\
        python manage.py bench_dashboard --first-load-after-restart \\
        --pgdata /work/pg1m/data --repeats 3 [--drop-os-cache]

times instead the first request of each page after a restart of
PostgreSQL (fast shutdown, ``pg_ctl restart``), one restart per page and
repeat, with Django's cache cleared (as in a restarted process): nothing
of the database is in its shared buffers, and with ``--drop-os-cache``
(root) nothing in the operating system's page cache either, as after a
reboot. This process's code and templates stay loaded (each page is
requested once first), so the figure is the database's part of a cold
start. It restarts only the cluster in ``--pgdata``, only if that is the
server ``DATABASE_URL`` names and no other client is connected to it.
"""

from __future__ import annotations

import html
import json
import os
import random
import re
import statistics
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

from django.conf import settings
from django.contrib.auth.models import Group, User
from django.core.cache import cache
from django.core.management.base import BaseCommand, CommandError
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext

from workflows_app.bench.private_postgres import restart_cluster
from workflows_app.models import WorkflowInstance
from workflows_app.roles import sync_roles

NEXT_LINK = re.compile(r'rel="next" href="(?P<href>[^"]+)"')


def _sample(limit: int) -> list[tuple[str, str, dict[str, str]]]:
    """Random (id, business key, search attributes) without scanning the table."""
    table = WorkflowInstance._meta.db_table
    columns = "id, business_key, search_attributes"
    with connection.cursor() as cursor:
        rows = []
        if connection.vendor == "postgresql":
            cursor.execute(
                f"SELECT {columns} FROM {table} TABLESAMPLE SYSTEM (1) LIMIT %s",
                [limit],
            )
            rows = cursor.fetchall()
        if not rows:  # a small table: 1 % of its pages may be none of them
            cursor.execute(
                f"SELECT {columns} FROM {table} ORDER BY random() LIMIT %s", [limit]
            )
            rows = cursor.fetchall()
        # Django's psycopg setup returns jsonb as text on a raw cursor.
        return [
            (str(pk), key, json.loads(attrs) if isinstance(attrs, str) else attrs)
            for pk, key, attrs in rows
        ]


def _attribute_search(samples: list[tuple[str, str, dict[str, str]]]) -> str:
    """``name:value`` of a random instance's search attribute."""
    with_attributes = [attrs for _, _, attrs in samples if attrs]
    if not with_attributes:
        raise CommandError(
            "no sampled instance has search attributes: declare some on the "
            "definitions (the demo ones do) before generate_load"
        )
    name, value = random.choice(sorted(random.choice(with_attributes).items()))
    return f'{name}:"{value}"' if " " in value else f"{name}:{value}"


def _prefix(key: str) -> str:
    """A lower-case prefix of a business key: its siblings share it."""
    return key[: max(3, len(key) - 2)].lower()


def _per_process_cache() -> bool:
    """Django's default cache lives in the process (no CACHES setting): a
    restart empties it. A shared cache would survive, and is left alone."""
    return bool(settings.CACHES["default"]["BACKEND"].endswith(".LocMemCache"))


def _percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(p / 100 * len(ordered) + 0.5) - 1))
    return ordered[index]


class Command(BaseCommand):
    help = "Print server-side p50/p95 response times of the dashboard pages."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--runs", type=int, default=60)
        parser.add_argument("--warmup", type=int, default=3)
        parser.add_argument(
            "--first-load-after-restart",
            action="store_true",
            help="time each page's first request after a restart of PostgreSQL",
        )
        parser.add_argument(
            "--pgdata",
            type=Path,
            help="the data directory of the server to restart (a private one)",
        )
        parser.add_argument("--repeats", type=int, default=3, help="restarts per page")
        parser.add_argument(
            "--drop-os-cache",
            action="store_true",
            help="also drop the OS page cache after each restart (root)",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        if options["first_load_after_restart"]:
            self._check_private_server(options)
        samples = _sample(500)
        if not samples:
            raise CommandError("no instances: run generate_load first")
        client = Client(SERVER_NAME="localhost")
        client.force_login(self._user())
        definition = WorkflowInstance.objects.values_list(
            "definition_key", flat=True
        ).first()
        # The list's second page: the first page's "Next" link (the first
        # page again when there is no second one).
        first_url = f"/instances/?definition={definition}"
        next_link = NEXT_LINK.search(client.get(first_url).content.decode())
        page_two = first_url
        if next_link:
            href = html.unescape(next_link["href"])
            page_two = href if href.startswith("/") else f"/instances/{href}"
        range_url = self._range_url()
        pages: dict[str, Callable[[], str]] = {
            "overview": lambda: "/",
            "overview (htmx refresh)": lambda: "/#live",
            "list: definition + state": lambda: (
                f"/instances/?definition={definition}&state=needs_attention"
            ),
            "list: definition, page 2": lambda: page_two,
            "list: stuck, oldest first": lambda: "/instances/?stuck=yes&sort=progress",
            "list: accepted in a 1 h range": lambda: range_url,
            "search: business key": lambda: (
                f"/instances/?q={quote(random.choice(samples)[1])}"
            ),
            "search: key prefix, any case": lambda: (
                f"/instances/?q={quote(_prefix(random.choice(samples)[1]))}"
            ),
            "search: instance id": lambda: f"/instances/?q={random.choice(samples)[0]}",
            "search: short id (8 chars)": lambda: (
                f"/instances/?q={random.choice(samples)[0][:8]}"
            ),
            "search: attribute name:value": lambda: (
                f"/instances/?q={quote(_attribute_search(samples))}"
            ),
            "search: attribute + state": lambda: (
                f"/instances/?q={quote(_attribute_search(samples))}&status=completed"
            ),
            "instance detail": lambda: f"/instances/{random.choice(samples)[0]}/",
            "definition page": lambda: f"/definitions/{definition}/",
        }
        # A search that finds nothing would time an empty page: each must
        # find its sampled instance.
        for name, make_url in pages.items():
            if name.startswith("search:") and "attribute + state" not in name:
                url = make_url()
                if 'id="instance-table"' not in client.get(url).content.decode():
                    raise CommandError(f"{name}: {url} found nothing")
        total = WorkflowInstance.objects.order_by().count()
        if options["first_load_after_restart"]:
            self._first_loads(client, pages, total, options)
            return
        self.stdout.write(
            f"{total:,} instances; {options['runs']} runs per page "
            f"(+{options['warmup']} warm-up)\n"
        )
        self.stdout.write(
            f"{'page':<32}{'p50 ms':>9}{'p95 ms':>9}{'max ms':>9}  queries"
        )
        for name, make_url in pages.items():
            timings, queries = self._measure(client, make_url, options)
            self.stdout.write(
                f"{name:<32}{statistics.median(timings):>9.1f}"
                f"{_percentile(timings, 95):>9.1f}{max(timings):>9.1f}  {queries}"
            )

    def _check_private_server(self, options: dict[str, Any]) -> None:
        """Refuse to restart anything but the server this command is on,
        and one that nobody else uses."""
        if options["pgdata"] is None:
            raise CommandError("--first-load-after-restart needs --pgdata")
        if options["repeats"] < 1:
            raise CommandError("--repeats: give a positive number")
        if options["drop_os_cache"] and os.geteuid() != 0:
            raise CommandError("--drop-os-cache: only root can drop the page cache")
        if connection.vendor != "postgresql":
            raise CommandError("--first-load-after-restart needs PostgreSQL")
        with connection.cursor() as cursor:
            cursor.execute("SHOW data_directory")
            (data_directory,) = cursor.fetchone()
            cursor.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE backend_type = "
                "'client backend' AND pid <> pg_backend_pid()"
            )
            (others,) = cursor.fetchone()
        if Path(data_directory).resolve() != options["pgdata"].resolve():
            raise CommandError(
                f"--pgdata {options['pgdata']} is not the data directory of the "
                f"server DATABASE_URL names ({data_directory}); nothing restarted"
            )
        if others:
            raise CommandError(
                f"{others} other sessions are connected to this server: restart "
                "only a private one; nothing restarted"
            )

    def _first_loads(
        self,
        client: Client,
        pages: dict[str, Callable[[], str]],
        total: int,
        options: dict[str, Any],
    ) -> None:
        dropped = "and the OS page cache dropped" if options["drop_os_cache"] else ""
        self.stdout.write(
            f"{total:,} instances; first request of each page after a restart of "
            f"PostgreSQL {dropped}".rstrip()
            + f", {options['repeats']} restarts per page; load average "
            f"{os.getloadavg()[0]:.1f}\n"
        )
        self.stdout.write(f"{'page':<32}{'median ms':>10}{'max ms':>9}")
        # Each page once first, so that this process has its templates and
        # code loaded: what is timed is the database's part.
        for make_url in pages.values():
            self._timed_get(client, make_url())
        timings: dict[str, list[float]] = {name: [] for name in pages}
        for _ in range(options["repeats"]):
            for name, make_url in pages.items():
                url = make_url()  # picked before: no query after the restart
                if _per_process_cache():
                    cache.clear()  # a restarted process starts with it empty
                connection.close()
                restart_cluster(
                    options["pgdata"], drop_os_cache=options["drop_os_cache"]
                )
                timings[name].append(self._timed_get(client, url))
        for name, values in timings.items():
            self.stdout.write(
                f"{name:<32}{statistics.median(values):>10.1f}{max(values):>9.1f}"
            )
        self.stdout.write(f"load average at the end {os.getloadavg()[0]:.1f}")

    def _timed_get(self, client: Client, url: str) -> float:
        """Milliseconds of one request of ``url`` ("#live": as htmx asks it),
        which must answer 200 (connecting to the database included, if the
        connection was closed)."""
        headers = {}
        if url.endswith("#live"):
            url, headers = url.removesuffix("#live"), {"HX-Request": "true"}
        started = time.perf_counter()
        response = client.get(url, headers=headers)
        elapsed = (time.perf_counter() - started) * 1000
        if response.status_code != 200:
            raise CommandError(f"{url}: HTTP {response.status_code}")
        return elapsed

    def _range_url(self) -> str:
        """A one-hour window of acceptance times somewhere in the data."""
        row = (
            WorkflowInstance.objects.order_by()
            .values_list("accepted_at", flat=True)
            .first()
        )
        if row is None:
            return "/instances/"
        start = row.replace(minute=0, second=0, microsecond=0)
        end = start + timedelta(hours=1)
        return (
            f"/instances/?accepted_after={start:%Y-%m-%dT%H:%M}"
            f"&accepted_before={end:%Y-%m-%dT%H:%M}"
        )

    def _measure(
        self, client: Client, make_url: Callable[[], str], options: dict[str, Any]
    ) -> tuple[list[float], int]:
        timings = []
        for run in range(options["warmup"] + options["runs"]):
            url = make_url()
            elapsed = self._timed_get(client, url)
            if run >= options["warmup"]:
                timings.append(elapsed)
        with CaptureQueriesContext(connection) as captured:
            self._timed_get(client, url)
        return timings, len(captured.captured_queries)

    def _user(self) -> User:
        sync_roles()
        user, _ = User.objects.get_or_create(username="bench-operator")
        user.groups.add(Group.objects.get(name="operator"))
        return User.objects.get(pk=user.pk)
