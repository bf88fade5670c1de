from __future__ import annotations

import os

from celery import Celery, signals

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "workflows_app.settings")

app = Celery("workflows_app")
app.config_from_object("django.conf:settings", namespace="CELERY")
# Every installed app's tasks module: the core's, and the benchmark's baseline
# when the bench app is installed (SAGA_DEMO).
app.autodiscover_tasks()


@signals.worker_ready.connect
def _start_metrics_exporter(**_: object) -> None:
    """A worker machine without a web process serves its counters itself
    (``SAGA_METRICS_WORKER_BIND``); the pool children write, this serves."""
    from workflows_app.monitoring import exporter

    exporter.start_from_settings()
