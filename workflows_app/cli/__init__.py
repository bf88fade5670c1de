"""The ``manage.py saga`` command line for runbooks: what it resolves,
selects and prints. The command itself (``management/commands/saga.py``)
only wires these to the engine's catalogue and bulk jobs."""

from __future__ import annotations
