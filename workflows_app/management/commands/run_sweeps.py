from __future__ import annotations

import time
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandParser

from workflows_app.engine.sweeps import sweep_all


class Command(BaseCommand):
    help = "Run the sweeper once (or in a loop with --loop), as Celery beat would."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--loop", action="store_true", help="sweep until interrupted"
        )

    def handle(self, *args: Any, **options: Any) -> None:
        while True:
            counts = sweep_all()
            self.stdout.write(" ".join(f"{k}={v}" for k, v in counts.items()))
            if not options["loop"]:
                return
            time.sleep(settings.SAGA_SWEEP_INTERVAL)
