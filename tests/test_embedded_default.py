"""The embedded default end to end: no DATABASE_URL and no CELERY_BROKER_URL
means SQLite under the var folder and kombu's filesystem broker, with one
Celery process running worker and beat together."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
CELERY = str(Path(sys.executable).with_name("celery"))

START_SCRIPT = """
from workflows_app.engine.actors import Actor
from workflows_app.engine.commands import instance_start
for key, mode in [("ok", {}), ("fail", {"charge_payment": "fail"})]:
    instance_start("order-fulfilment", business_key=key, input={"simulate": mode},
                   actor=Actor.api("smoke"))
"""


def test_sqlite_and_filesystem_broker_run_the_demo(tmp_path):
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in {"DATABASE_URL", "CELERY_BROKER_URL"}
    }
    env.update(SAGA_DESK_VAR_DIR=str(tmp_path), SAGA_SWEEP_INTERVAL="1")

    def manage(*args: str) -> None:
        subprocess.run(
            [PYTHON, "manage.py", *args],
            cwd=ROOT,
            env=env,
            check=True,
            capture_output=True,
        )

    manage("migrate")
    manage("load_demo")
    manage("shell", "-c", START_SCRIPT)
    log = (tmp_path / "celery.log").open("wb")
    worker = subprocess.Popen(
        [
            CELERY,
            "-A",
            "workflows_app",
            "worker",
            "-B",
            "-P",
            "solo",
            "-l",
            "info",
            "-s",
            str(tmp_path / "beat-schedule"),
        ],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    db = sqlite3.connect(tmp_path / "saga_desk.sqlite3")
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            rows = dict(
                db.execute(
                    "SELECT business_key, state FROM workflows_app_workflowinstance"
                )
            )
            if rows == {"ok": "completed", "fail": "compensated"}:
                break
            time.sleep(0.5)
        assert rows == {"ok": "completed", "fail": "compensated"}, (
            tmp_path / "celery.log"
        ).read_text()[-3000:]
        journal = db.execute("PRAGMA journal_mode").fetchone()[0]
        assert journal == "wal"
    finally:
        db.close()
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=30)
