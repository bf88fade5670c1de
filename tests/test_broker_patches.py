"""A lost Redis connection whose teardown fails half-way raises connection
errors, which Celery handles, not the AttributeError that stopped a worker
in the cluster test (workflows_app/broker_patches.py).

Replayed on a real kombu connection to the test's Redis, in the state the
cluster test's tracebacks show: a message taken and not acknowledged (a
task running with acks_late), a BRPOP pending whose read fails and the
broker refusing connections; then Celery's cleanup (collect, then close)
and the running task's ack.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from typing import Any

import kombu
import pytest
import redis
from django.conf import settings
from kombu.common import ignore_errors

from workflows_app import broker_patches

pytestmark = pytest.mark.skipif(
    not settings.CELERY_BROKER_URL.startswith("redis://"),
    reason="needs a Redis broker (CELERY_BROKER_URL)",
)
log = logging.getLogger(__name__)


@pytest.fixture
def queue() -> Iterator[kombu.Queue]:
    queue = kombu.Queue(f"broker-patch-test-{uuid.uuid4().hex}", auto_delete=True)
    yield queue
    with kombu.Connection(settings.CELERY_BROKER_URL) as connection:
        queue(connection.default_channel).delete()


def lost_connection(queue: kombu.Queue) -> tuple[kombu.Connection, Any]:
    connection = kombu.Connection(settings.CELERY_BROKER_URL)
    channel = connection.default_channel
    kombu.Producer(channel).publish({"n": 1}, routing_key=queue.name, declare=[queue])
    message = queue(channel).get(no_ack=False)
    assert message is not None

    def dead_socket_read(**_: Any) -> None:
        channel._in_poll = None
        raise redis.ConnectionError("Connection closed by server.")

    def broker_down(*_: Any) -> None:
        raise redis.ConnectionError("Error 111 connecting. Connection refused.")

    channel._in_poll = True  # a BRPOP pending on the socket the crash broke
    channel._brpop_read = dead_socket_read
    connection.transport.close_connection = broker_down
    return connection, message


def celery_cleanup_then_ack(connection: kombu.Connection, message: Any) -> None:
    """What Celery's consumer does after the loss, then the task's ack."""
    connection.collect(socket_timeout=5)
    ignore_errors(connection, connection.close)
    message.ack_log_error(log, connection.connection_errors)


def test_the_cleanup_and_the_ack_of_a_running_task_raise_no_other_error(queue, caplog):
    broker_patches.install()
    connection, message = lost_connection(queue)
    celery_cleanup_then_ack(connection, message)
    # The worker's log says the patch was at work (the cluster test greps it).
    assert any(
        r.name == "workflows_app.broker_patches" and r.levelno == logging.WARNING
        for r in caplog.records
    ), caplog.text


def test_kombu_still_needs_the_patch(queue):
    """When this fails, kombu fixed it: workflows_app/broker_patches.py can go."""
    broker_patches.uninstall()
    try:
        connection, message = lost_connection(queue)
        with pytest.raises(AttributeError, match="hostname"):
            celery_cleanup_then_ack(connection, message)
    finally:
        broker_patches.install()


def test_the_application_installs_it():
    import workflows_app.celery  # noqa: F401

    assert (
        kombu.transport.redis.Channel._connparams
        is broker_patches._connparams_of_a_live_connection
    )
