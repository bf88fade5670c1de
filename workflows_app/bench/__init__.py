"""The benchmarks: synthetic load shaped by the engine's planner, the
commands that measure the engine, API, dashboard, sweeper and bulk jobs, and
the bare Celery baseline. A Django app (label ``saga_bench``) installed with
the demo, whose definitions and activities it runs."""

from __future__ import annotations
