"""Prometheus metrics: counters where things happen, gauges from the database.

- ``metrics``: counters and histograms incremented in the process where the
  event happens (a gunicorn worker, a Celery pool child, beat's sweeper),
  shared through prometheus-client's multiprocess files.
- ``database``: gauges read from PostgreSQL at scrape time and cached briefly
  (counts, queue lag, bulk-job progress): the database is the truth and every
  process sees the same figures.
- ``views``: ``GET /metrics`` in the text exposition format, behind an
  optional bearer token; ``exporter``: the same for a Celery worker machine.
"""
