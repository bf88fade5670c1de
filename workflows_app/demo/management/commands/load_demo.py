from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand

from workflows_app.demo.definitions import load_demo_definitions


class Command(BaseCommand):
    help = "Create and publish the demo workflow definitions (idempotent)."

    def handle(self, *args: Any, **options: Any) -> None:
        for definition in load_demo_definitions():
            steps = ", ".join(s.name for s in definition.ordered_steps())
            self.stdout.write(f"{definition} ({definition.status}): {steps}")
