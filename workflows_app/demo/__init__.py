"""The demo: its workflow definitions, its participants (in-process
activities and the same services over HTTP) with their own ledger, the
traffic generator and the commands that run them.

A Django app of its own (label ``saga_demo``), installed only when the
deployment asks for it (settings ``SAGA_DEMO``); the core never imports it.
"""

from __future__ import annotations
