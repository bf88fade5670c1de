"""Metrics across processes: gunicorn with several workers and a Celery
prefork worker write into one multiprocess folder; every scrape, whichever
gunicorn worker answers it, shows the same totals, and they match the
database. Real processes, real HTTP, PostgreSQL and Redis."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.celery_processes import celery_processes, database_url, wait_for
from tests.monitoring.scrape import Samples, parse, total, value
from tests.support import make_definition
from workflows_app.models import ApiToken, WorkflowInstance

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.celery_worker]

ROOT = Path(__file__).resolve().parent.parent.parent
GUNICORN = str(Path(sys.executable).with_name("gunicorn"))
SCRAPE_TOKEN = "scrape-secret-3f9c"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get(url: str, token: str | None = None) -> tuple[int, str]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def scrape(url: str) -> Samples:
    status, body = get(url, SCRAPE_TOKEN)
    assert status == 200, body
    return parse(body)


@pytest.fixture(autouse=True)
def empty_broker():
    from workflows_app.celery import app

    with app.connection_for_write() as conn:
        conn.default_channel.client.flushdb()


@pytest.fixture
def folder(tmp_path):
    """A fresh multiprocess folder, as a deployment creates at start."""
    path = tmp_path / "prometheus"
    path.mkdir()
    return path


@pytest.fixture
def gunicorn(transactional_db, tmp_path, folder):
    """gunicorn with three workers on the test database; yields its base URL."""
    from django.db import connection

    port = free_port()
    env = {
        **os.environ,
        "DATABASE_URL": database_url(),
        "SAGA_DESK_VAR_DIR": str(tmp_path),
        "PROMETHEUS_MULTIPROC_DIR": str(folder),
        "SAGA_METRICS_TOKEN": SCRAPE_TOKEN,
        "SAGA_METRICS_CACHE_SECONDS": "0",
        "PYTHONPATH": str(ROOT),
    }
    connection.close()  # the server must not share this process's connection
    log_path = tmp_path / "gunicorn.log"
    with log_path.open("wb") as log:
        server = subprocess.Popen(
            [GUNICORN, "workflows_app.wsgi", "-b", f"127.0.0.1:{port}", "-w", "3"],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for(lambda: _answers(port, server, log_path), 60, "gunicorn to listen")
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(timeout=30)


def _answers(port: int, server: subprocess.Popen[bytes], log: Path) -> bool:
    if server.poll() is not None:
        raise AssertionError(log.read_text()[-3000:])
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


def start_over_http(base: str, token: str, key: str, **input: object) -> str:
    request = urllib.request.Request(
        f"{base}/api/v1/workflows/shop/instances",
        data=json.dumps({"business_key": key, "input": input}).encode(),
        headers={
            "Authorization": f"Bearer {token}",
            "Idempotency-Key": key,
            "Content-Type": "application/json",
        },
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.status == 202
        return json.loads(response.read())["id"]


def test_gunicorn_workers_and_celery_pool_add_up(gunicorn, folder):
    make_definition("shop", steps=[{"name": "one"}, {"name": "two"}])
    api_token = ApiToken.issue("shop-service", ["start", "read"])[1]
    metrics_url = f"{gunicorn}/metrics"

    # The token guards the endpoint, through a real server.
    assert get(metrics_url)[0] == 401
    assert get(metrics_url, "wrong")[0] == 401
    assert get(metrics_url, SCRAPE_TOKEN)[0] == 200

    # Accepted in gunicorn's workers (several connections, several
    # processes), run by the Celery pool's children.
    ids = [start_over_http(gunicorn, api_token, f"o-{n}") for n in range(8)]
    ids += [
        start_over_http(gunicorn, api_token, f"d-{n}", simulate={"two": "fail"})
        for n in range(3)
    ]
    worker_port = free_port()
    worker_env = {
        "PROMETHEUS_MULTIPROC_DIR": str(folder),
        "SAGA_METRICS_WORKER_BIND": f"127.0.0.1:{worker_port}",
        "SAGA_METRICS_TOKEN": SCRAPE_TOKEN,
    }
    settled = WorkflowInstance.objects.filter(
        pk__in=ids, state__in=["completed", "compensated"]
    )
    with celery_processes(concurrency=2, beat=True, extra_env=worker_env):
        wait_for(lambda: settled.count() == len(ids), 90, "the instances to finish")
        # Beat's sweeps run in the pool too.
        wait_for(
            lambda: (
                total(scrape(metrics_url), "saga_sweep_duration_seconds_count") >= 2
            ),
            30,
            "two sweeps",
        )
        # The worker machine's own endpoint serves the same folder.
        exporter = f"http://127.0.0.1:{worker_port}/metrics"
        assert get(exporter)[0] == 401
        from_worker = scrape(exporter)

    writers = {p.stem.rsplit("_", 1)[-1] for p in folder.glob("counter_*.db")}
    # Three gunicorn workers at most answered the starts; the pool has two
    # children: counters came from more than one process of each kind.
    assert len(writers) >= 3, writers

    shop = {"definition": "shop"}
    # Whichever gunicorn worker answers, the totals are the same.
    for _ in range(9):
        samples = scrape(metrics_url)
        assert total(samples, "saga_instances_accepted_total", **shop) == 11
        finished = "saga_instances_finished_total"
        assert total(samples, finished, state="completed", **shop) == 8
        assert total(samples, finished, state="compensated", **shop) == 3
        assert value(samples, "saga_instances", state="completed", **shop) == 8
        assert value(samples, "saga_instances", state="compensated", **shop) == 3
        count = "saga_instance_duration_seconds_count"
        assert total(samples, count, state="completed", **shop) == 8
        assert total(samples, "saga_attempts_total", outcome="failed_permanent") == 3
        # The pool's children record their next steps from the rows they
        # kept (engine.held), as the engine's own tests do in-process.
        assert total(samples, "saga_worker_records_total", way="kept") > 0

    assert total(from_worker, "saga_instances_finished_total", **shop) == 11
    # The worker endpoint leaves the site-wide gauges to the web endpoint.
    assert total(from_worker, "saga_instances") == 0
