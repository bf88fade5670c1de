from __future__ import annotations

import os

import pytest

from tests.support import LocalBroker

# Tests that use machine-wide resources (real worker processes, servers of
# their own that they restart, or the demo's process tree)
# run one after another on one xdist worker; everything else spreads over
# the cores (.ci/run: -n 2 --dist loadgroup).
MACHINE_WIDE_MODULES = {"tests.test_demo", "tests.test_embedded_default"}

# The settings install the demo app under pytest (SAGA_DEMO); the processes
# the tests start (workers, manage.py, the demo) are told so explicitly.
os.environ.setdefault("SAGA_DEMO", "1")


# First, before pytest-xdist's own hook reads the groups to schedule by:
# without tryfirst xdist's hook ran first and the group was never applied,
# so real workers of two tests shared one broker queue and purged each
# other's messages (a test then waited out its timeout). pyproject.toml
# says which pytest the grouping also needs.
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    for item in items:
        if (
            item.get_closest_marker("celery_worker")
            or item.module.__name__ in MACHINE_WIDE_MODULES
        ):
            item.add_marker(pytest.mark.xdist_group("machine"))


@pytest.fixture(autouse=True)
def _empty_broker_queue(request):
    """A test with real workers starts from an empty queue: messages another
    test left (work for instances of its own, now flushed) would otherwise
    be worked through first, each one failing, before this test's own."""
    if request.node.get_closest_marker("celery_worker"):
        from workflows_app.celery import app

        app.control.purge()
    yield


@pytest.fixture
def broker():
    with LocalBroker() as local:
        yield local


@pytest.fixture
def broker_no_inline():
    with LocalBroker(inline=False) as local:
        yield local
