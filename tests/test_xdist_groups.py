"""The real-worker tests run one after another, on one xdist worker: they
share the broker's queue (tests/conftest.py). pytest-xdist says nothing when
a group is not applied, so this test does."""

from __future__ import annotations

import pytest


def test_the_real_worker_tests_are_one_group(request):
    if not getattr(request.config.option, "loadgroup", False):
        pytest.skip("groups apply only under xdist's --dist loadgroup")
    machine = [
        item
        for item in request.session.items
        if item.get_closest_marker("celery_worker")
    ]
    if not machine:
        pytest.skip("no real-worker test was collected with this one")
    ungrouped = [
        item.nodeid for item in machine if not item.nodeid.endswith("@machine")
    ]
    assert not ungrouped, f"not in the machine group: {ungrouped[:3]}"
