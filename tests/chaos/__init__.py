"""The chaos test (issue 13, level 2): real processes, real crashes.

Three ``celery worker -P prefork -c 1`` processes and a beat run the demo
workflows and one built for the test (``traffic.py``) against a PostgreSQL
cluster and a Redis that the run starts itself on free ports
(``services.py``: initdb into a temporary folder; the shared servers on 5432
and 6379 are never touched). While instances are started, workers are
SIGKILLed (the whole process group), Redis is killed and started again,
PostgreSQL is crash-restarted (immediate shutdown, crash recovery), stray
duplicate and late ``workflows.run_attempt`` messages are sent, and the
participants misbehave (``simulate`` modes). An operator (``operator.py``)
resolves holds, closes some as failed and cancels some running instances.
At quiescence ``figures.py`` runs the saga checker and the participants'
ledger over every instance and prints: started, faults injected, lost,
duplicate effects, changes after an outcome, held without a reason (and
invariant violations). All but the first two must be 0.

CI form (about three minutes, part of ``bash .ci/run``)::

    .venv/bin/pytest tests/chaos        # runs: python -m tests.chaos

Long form, continuous traffic (2 starts a second unless ``--rate``)::

    .venv/bin/python -m tests.chaos --minutes 10

Options: ``--seed N`` replays a run's choices, ``--keep`` keeps the logs
and the stopped cluster (start it with ``pg_ctl -D <cluster>/data``) for a
post-mortem, ``--json FILE`` writes the figures.
"""
