"""The demo and the benchmarks are apps of their own, installed only when the
deployment asks for them (settings ``SAGA_DEMO``): without them the core
loads every part of itself (pages, API, admin, engine, worker tasks) and not
one demo or benchmark module, and its migrations match its models either way.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from django.db import connection

ROOT = Path(__file__).resolve().parent.parent

# Loads what a web process and a worker load, then reports what is installed.
PROBE = """
import json, sys
import django
django.setup()
from django.apps import apps
from django.contrib import admin
from django.core.management import call_command, get_commands
import workflows_app.urls  # pages, API, admin site
from workflows_app.activities import activity_names
from workflows_app.celery import app
app.loader.import_default_modules()  # what a worker discovers at start
call_command("makemigrations", check=True, dry_run=True, verbosity=0)
print(json.dumps({
    "apps": sorted(c.label for c in apps.get_app_configs()),
    "modules": sorted(
        m for m in sys.modules
        if m.startswith(("workflows_app.demo", "workflows_app.bench"))
    ),
    "activities": activity_names(),
    "commands": sorted(get_commands()),
    "tasks": sorted(app.tasks),
    "admin": sorted(m._meta.label for m in admin.site._registry),
}))
"""


def probe(**env: str) -> dict[str, list[str]]:
    base = {k: v for k, v in os.environ.items() if k not in {"SAGA_DEMO", "DEBUG"}}
    done = subprocess.run(
        [sys.executable, "-c", PROBE],
        cwd=ROOT,
        env={**base, **env},
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


DEMO_COMMANDS = {"demo", "load_demo", "screenshots", "serve_participants"}
BENCH_COMMANDS = {
    "bench_api",
    "bench_bulk",
    "bench_dashboard",
    "bench_engine",
    "bench_sweeps",
    "generate_load",
}


def test_production_core_has_no_demo_or_benchmark_code():
    seen = probe(DEBUG="0")
    assert "workflows_app" in seen["apps"]
    assert not {"saga_demo", "saga_bench"} & set(seen["apps"])
    assert seen["modules"] == []
    assert "http.request" in seen["activities"]
    assert not [name for name in seen["activities"] if name.startswith("demo.")]
    assert {"saga", "check_participant", "run_sweeps"} <= set(seen["commands"])
    assert not (DEMO_COMMANDS | BENCH_COMMANDS) & set(seen["commands"])
    assert "workflows.run_attempt" in seen["tasks"]
    assert "bench.baseline_step" not in seen["tasks"]
    assert "saga_demo.ParticipantEffect" not in seen["admin"]


@pytest.mark.parametrize("env", [{"DEBUG": "1"}, {"DEBUG": "0", "SAGA_DEMO": "1"}])
def test_demo_and_benchmarks_come_with_debug_or_when_asked_for(env):
    seen = probe(**env)
    assert {"saga_demo", "saga_bench"} <= set(seen["apps"])
    assert {"demo.charge_payment", "demo.noop"} <= set(seen["activities"])
    assert set(seen["commands"]) >= (DEMO_COMMANDS | BENCH_COMMANDS)
    assert "bench.baseline_step" in seen["tasks"]
    assert "saga_demo.ParticipantEffect" in seen["admin"]


@pytest.mark.django_db
def test_the_demo_ledger_is_a_table_of_the_demo_app():
    tables = set(connection.introspection.table_names())
    assert "saga_demo_participanteffect" in tables
    assert "workflows_app_participanteffect" not in tables
