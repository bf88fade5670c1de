#!/usr/bin/env python3
"""Django's command-line utility, which also bootstraps a fresh checkout.

On a machine with only Python, ``python3 manage.py demo`` creates ``.venv``,
installs the project into it (once, or again when a dependency is missing)
and re-runs itself there.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
REQUIRED = (
    "django, celery, django_fsm, django_htmx, ninja, django_filters, "
    "template_partials, whitenoise, dj_database_url, gunicorn"
)


def _bootstrap() -> None:
    if os.environ.get("SAGA_DESK_NO_BOOTSTRAP") or _have_dependencies():
        return
    python = VENV / "bin" / "python"
    if not python.exists():
        print("Creating .venv ...", file=sys.stderr)
        subprocess.check_call([sys.executable, "-m", "venv", str(VENV)])
    if not _importable(str(python)):
        print("Installing Saga Desk into .venv (first run only) ...", file=sys.stderr)
        pip = [str(python), "-m", "pip", "install", "-q"]
        subprocess.check_call([*pip, "--upgrade", "pip"])
        subprocess.check_call([*pip, "-e", str(ROOT)])
    os.execv(str(python), [str(python), str(ROOT / "manage.py"), *sys.argv[1:]])


def _have_dependencies() -> bool:
    """Whether this interpreter can find every dependency (without importing)."""
    from importlib.util import find_spec

    return all(find_spec(name.strip()) for name in REQUIRED.split(","))


def _importable(python: str) -> bool:
    probe = subprocess.run(
        [
            python,
            "-c",
            "from importlib.util import find_spec as f; "
            f"raise SystemExit(not all(f(n.strip()) for n in {REQUIRED!r}.split(',')))",
        ],
        capture_output=True,
        check=False,
    )
    return probe.returncode == 0


if __name__ == "__main__":
    _bootstrap()
    # The one-command demo installs the demo app (settings SAGA_DEMO) for
    # itself and the web server and worker it starts.
    if sys.argv[1:2] == ["demo"]:
        os.environ.setdefault("SAGA_DEMO", "1")
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "workflows_app.settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)
