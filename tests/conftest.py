from __future__ import annotations

import pytest

from tests.support import LocalBroker


@pytest.fixture
def broker():
    with LocalBroker() as local:
        yield local


@pytest.fixture
def broker_no_inline():
    with LocalBroker(inline=False) as local:
        yield local
