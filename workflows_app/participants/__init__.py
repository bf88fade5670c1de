"""The participant contract check: probes any participant service the way
the engine calls it (``manage.py check_participant``). The demo's own
participants served over HTTP live in :mod:`workflows_app.demo`."""

from __future__ import annotations
