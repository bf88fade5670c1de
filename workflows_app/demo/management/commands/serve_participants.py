"""Serve the demo participants over HTTP (see demo.participants_server).

    SAGA_DEMO=1 python manage.py serve_participants --port 8001 \\
        --callback-token "$TOKEN"

The token (scope ``report``) is used for the results of ``?reply=async``
calls; without one those callbacks are refused by the API.
"""

from __future__ import annotations

import os
from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from workflows_app.demo.participants_server import make_server


class Command(BaseCommand):
    help = "Serve the demo participants (inventory, payments, ...) over HTTP."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--host", default="127.0.0.1")
        parser.add_argument("--port", type=int, default=8001)
        parser.add_argument(
            "--callback-token",
            default=os.environ.get("SAGA_PARTICIPANT_CALLBACK_TOKEN", ""),
            help="API token (scope report) for async results; default "
            "$SAGA_PARTICIPANT_CALLBACK_TOKEN.",
        )

    def handle(self, *args: Any, **opts: Any) -> None:
        server = make_server(
            opts["host"], opts["port"], callback_token=opts["callback_token"]
        )
        host, port = server.server_address[:2]
        assert isinstance(host, str)  # an IP address, never bytes here
        # Tests and scripts read this line to learn the port of --port 0.
        self.stdout.write(f"participants listening on http://{host}:{port}")
        self.stdout.flush()
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            server.server_close()
