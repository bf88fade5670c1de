"""The cluster test (issue 16, scale-out): one site spread over hosts.

Hosts are network namespaces on a bridge (``network.py``): a database host
with its own PostgreSQL and broker (``services.py``), a web host with
gunicorn, and three worker hosts, each a Celery worker (prefork), two of
them with beat (``hosts.py``). The run (``run.py``) measures throughput with
one, two and three worker hosts, then sends traffic through the web host
while one worker host loses power (every process in it SIGKILLed, booted
again later), another is cut off the network for 20 s, and the broker
crashes and restarts; once with Redis, once with RabbitMQ. The verdict is
the chaos test's (``tests/chaos/figures.py``: the saga checker and the
participants' ledger) plus a check that no two sweepers did the same work
(``sweeper_claims.py``) and that every worker host works again once the
faults are over (a probe batch after them: a host that is up but takes none
of it has gone quiet).

CI form (150-185 s on the 2-core machine, by its load; needs root)::

    .venv/bin/pytest tests/cluster        # runs: python -m tests.cluster

Long form, N minutes of traffic per broker, faults every minute::

    .venv/bin/python -m tests.cluster --minutes 10
"""
