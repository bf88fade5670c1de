"""What a scrape returns, and who may scrape: shared by ``GET /metrics`` and
the Celery worker machine's exporter."""

from __future__ import annotations

import hmac
import os
from collections.abc import Iterator

from prometheus_client import REGISTRY, CollectorRegistry, multiprocess
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector


class _ThisProcess(Collector):
    """The default registry (this process's metrics) as one collector, for a
    process that runs without a multiprocess folder."""

    def collect(self) -> Iterator[Metric]:
        yield from REGISTRY.collect()


def process_registry() -> CollectorRegistry:
    """The counters and histograms of every process of this machine (the
    multiprocess folder), or of this process alone when there is none."""
    registry = CollectorRegistry(auto_describe=False)
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.MultiProcessCollector(registry)
    else:
        registry.register(_ThisProcess())
    return registry


def authorized(header: str | None, token: str) -> bool:
    """``Authorization: Bearer <token>``, compared in constant time; with no
    token configured every scrape is allowed."""
    if not token:
        return True
    scheme, _, given = (header or "").strip().partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(given.strip().encode(), token.encode())


def render(registry: CollectorRegistry, accept: str | None) -> tuple[bytes, str]:
    """The body and content type: the Prometheus text format, or OpenMetrics
    when the scraper asks for it."""
    encoder, content_type = choose_encoder(accept or "")
    return encoder(registry), content_type
