from __future__ import annotations

import os
from typing import Any

from celery import Celery, signals

from workflows_app import broker_patches

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "workflows_app.settings")

# A lost Redis connection must not stop a worker (kombu 5.7, see the module).
broker_patches.install()

app = Celery("workflows_app")
app.config_from_object("django.conf:settings", namespace="CELERY")
# Every installed app's tasks module: the core's, and the benchmark's baseline
# when the bench app is installed (SAGA_DEMO).
app.autodiscover_tasks()


@signals.task_prerun.connect
@signals.task_postrun.connect
def _recycle_database_connections(task: Any = None, **_: object) -> None:
    """Each task is a request as far as the database is concerned: a
    connection that broke or outlived ``CONN_MAX_AGE`` is closed, a healthy
    one is kept (and checked before its next use, ``CONN_HEALTH_CHECKS``).
    Not for a task run eagerly inside its caller's transaction."""
    from django.db import close_old_connections, connection

    if getattr(getattr(task, "request", None), "is_eager", False):
        return
    if connection.in_atomic_block:
        return
    close_old_connections()


@signals.worker_ready.connect
def _start_metrics_exporter(**_: object) -> None:
    """A worker machine without a web process serves its counters itself
    (``SAGA_METRICS_WORKER_BIND``); the pool children write, this serves."""
    from workflows_app.monitoring import exporter

    exporter.start_from_settings()
