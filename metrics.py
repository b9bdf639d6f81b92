"""Prometheus metrics of one app (seed 6.3), on a registry of its own.

A per-app ``CollectorRegistry`` rather than the global one, so two apps in one
process (or an embedding app with its own metrics) never collide.
"""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["CONTENT_TYPE", "Metrics"]

logger = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Metrics:
    """The counters, gauges and histograms Zhiyi exports at ``/metrics``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.tasks = Gauge("zhiyi_tasks", "Tasks by status and type",
                           ["status", "task_type"], registry=r)
        self.queue_depth = Gauge("zhiyi_queue_depth", "Pending tasks waiting for a worker",
                                 registry=r)
        self.running = Gauge("zhiyi_tasks_running", "Tasks being processed in this process",
                             registry=r)
        self.processing_seconds = Histogram(
            "zhiyi_processing_seconds", "Time to process one attempt", ["task_type"],
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600), registry=r)
        self.attempts = Counter("zhiyi_task_attempts", "Attempts ended, by outcome",
                                ["task_type", "outcome"], registry=r)
        self.sse_connections = Gauge("zhiyi_sse_connections", "Live SSE connections",
                                     registry=r)
        self.events_published = Counter("zhiyi_sse_events_published",
                                         "Events handed to subscribers", registry=r)
        self.events_delivered = Counter("zhiyi_sse_events_delivered",
                                        "Event copies queued to subscribers", registry=r)
        self.slow_clients_dropped = Counter("zhiyi_sse_slow_clients_dropped",
                                            "Streams ended because the client fell behind",
                                            registry=r)
        self.webhooks = Counter("zhiyi_webhooks", "Webhook deliveries by outcome", ["outcome"],
                                registry=r)

    def set_task_counts(self, counts: list[tuple[str, str, int]]) -> None:
        self.tasks.clear()
        pending = 0
        for task_type, status, n in counts:
            self.tasks.labels(status=status, task_type=task_type).set(n)
            if status == "pending":
                pending += n
        self.queue_depth.set(pending)

    def render(self) -> bytes:
        return generate_latest(self.registry)
