"""A Redis channel whose connection is gone raises a connection error, not
an ``AttributeError`` that stops the worker (kombu 5.7).

When Redis goes away while a BRPOP is pending and a task is running (its
message not yet acknowledged, ``acks_late``), Celery's cleanup of the lost
connection fails half-way through closing the channel and then detaches
the transport. From then on everything that channel does with Redis (the
second close handing the message back; the ack when the running task
ends) builds a new connection pool from the detached transport and raises
``AttributeError: 'NoneType' object has no attribute 'hostname'``. Celery
only expects connection errors there, so the worker exits ("Unrecoverable
error") while its host stays up. Seen in the cluster test on the worker
host that lives through a broker crash (tests/cluster).

As a connection error it is what Celery handles already: the close is
ignored, the ack is logged as failed, the consumer reconnects; the message
comes again from Redis after ``visibility_timeout`` (or was lost with a
restarted Redis), and the sweeper re-sends an attempt nobody claimed.
"""

from __future__ import annotations

import logging
from typing import Any

import redis
from kombu.transport import redis as kombu_redis

log = logging.getLogger(__name__)
_connparams = kombu_redis.Channel._connparams  # type: ignore[attr-defined]


def _connparams_of_a_live_connection(
    self: Any, asynchronous: bool = False
) -> dict[str, Any]:
    if self.connection is None or self.connection.client is None:
        # Logged because Celery ignores the error on a close: without this
        # line a worker's log would not show that the patch was needed.
        log.warning("Redis channel used after its connection closed (kombu 5.7)")
        raise redis.ConnectionError("the broker connection was closed")
    params: dict[str, Any] = _connparams(self, asynchronous=asynchronous)
    return params


def install() -> None:
    kombu_redis.Channel._connparams = _connparams_of_a_live_connection  # type: ignore[attr-defined]


def uninstall() -> None:
    """For the test that checks kombu still needs this."""
    kombu_redis.Channel._connparams = _connparams  # type: ignore[attr-defined]
