"""Instances per definition and state, exact, without reading every
instance at every scrape.

One ``GROUP BY`` over a million instances reads a million index entries
(about a second on a small machine): too much every ten seconds. But a
finished instance never changes again (closed means closed) and its
``last_progress_at`` is the time it finished, so the finished ones split at
a boundary ``B``:

1. finished before ``B``: counted by one full index-only ``GROUP BY`` and
   remembered; recounted every ``SAGA_METRICS_BASE_SECONDS`` so that rows a
   retention purge removed disappear from the figures within that time;
2. finished since ``B``: counted at every read, on the
   ``(definition_key, state, last_progress_at)`` index range, which holds only
   the instances finished since;
3. unfinished instances: counted at every read (a few percent of the rows,
   the same index).

``B`` lies ``SETTLE`` before the database clock when the base is read: a
transaction that stamped its time before ``B`` has long committed by then, so
no finished instance falls between the two parts.
"""

from __future__ import annotations

import time
from collections import Counter
from datetime import datetime, timedelta

from django.conf import settings
from django.db.models import Count, QuerySet

from workflows_app.models import (
    ACTIVE_STATES,
    TERMINAL_STATES,
    InstanceState,
    WorkflowDefinition,
    WorkflowInstance,
)

SETTLE = timedelta(minutes=5)
STATES = [state.value for state in InstanceState]
Key = tuple[str, str]


def _grouped(qs: QuerySet[WorkflowInstance]) -> Counter[Key]:
    rows = qs.values_list("definition_key", "state").annotate(n=Count("*"))
    return Counter({(key, state): n for key, state, n in rows})


class InstanceCounts:
    """Remembers the finished-before-``B`` part between reads (per process)."""

    def __init__(self) -> None:
        self._base: Counter[Key] = Counter()
        self._boundary: datetime | None = None
        self._base_read_at = float("-inf")

    def read(self, now: datetime) -> dict[Key, int]:
        # Naming every definition key (a short list) turns the conditions on
        # state and last_progress_at into ranges of the composite index.
        keys = list(
            WorkflowDefinition.objects.order_by()
            .values_list("key", flat=True)
            .distinct()
        )
        instances = WorkflowInstance.objects.order_by().filter(definition_key__in=keys)
        finished = instances.filter(state__in=TERMINAL_STATES)
        age = time.monotonic() - self._base_read_at
        if self._boundary is None or age >= settings.SAGA_METRICS_BASE_SECONDS:
            boundary = now - SETTLE
            self._base = _grouped(finished.filter(last_progress_at__lt=boundary))
            self._boundary, self._base_read_at = boundary, time.monotonic()
        counts = Counter(self._base)
        counts.update(_grouped(finished.filter(last_progress_at__gte=self._boundary)))
        counts.update(_grouped(instances.filter(state__in=ACTIVE_STATES)))
        # Every state of every definition, 0 included: a series that vanishes
        # would read as "no data", not as "none".
        return {(key, state): counts[key, state] for key in keys for state in STATES}
