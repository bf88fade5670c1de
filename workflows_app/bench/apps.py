from __future__ import annotations

from django.apps import AppConfig


class BenchConfig(AppConfig):
    name = "workflows_app.bench"
    label = "saga_bench"
    verbose_name = "Saga Desk benchmarks"
