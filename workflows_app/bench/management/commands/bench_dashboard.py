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
"""

from __future__ import annotations

import html
import json
import random
import re
import statistics
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any
from urllib.parse import quote

from django.contrib.auth.models import Group, User
from django.core.management.base import BaseCommand, CommandError
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext

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


def _percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(p / 100 * len(ordered) + 0.5) - 1))
    return ordered[index]


class Command(BaseCommand):
    help = "Print server-side p50/p95 response times of the dashboard pages."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--runs", type=int, default=60)
        parser.add_argument("--warmup", type=int, default=3)

    def handle(self, *args: Any, **options: Any) -> None:
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
            headers = {}
            if url.endswith("#live"):
                url, headers = url.removesuffix("#live"), {"HX-Request": "true"}
            started = time.perf_counter()
            response = client.get(url, headers=headers)
            elapsed = (time.perf_counter() - started) * 1000
            if response.status_code != 200:
                raise CommandError(f"{url}: HTTP {response.status_code}")
            if run >= options["warmup"]:
                timings.append(elapsed)
        with CaptureQueriesContext(connection) as captured:
            client.get(url, headers=headers)
        return timings, len(captured.captured_queries)

    def _user(self) -> User:
        sync_roles()
        user, _ = User.objects.get_or_create(username="bench-operator")
        user.groups.add(Group.objects.get(name="operator"))
        return User.objects.get(pk=user.pk)
