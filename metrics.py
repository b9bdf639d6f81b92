"""Prometheus metrics of one app, on a registry of its own.

A per-app ``CollectorRegistry`` rather than the global one, so two apps in one
process (or an embedding app with its own metrics) never collide. The figures
the alert rules in ``alerts/`` watch are read from the database at scrape time
(``TaskStore.health_figures``), so whichever process is scraped reports them
for every process sharing that database.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from storage import HealthFigures

__all__ = ["CONTENT_TYPE", "DiskSpace", "Metrics", "disk_space"]

logger = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass(frozen=True)
class DiskSpace:
    """Free and total bytes of the file system holding the data folder."""

    free: int
    total: int

    def is_low(self, low_bytes: int) -> bool:
        return self.free < low_bytes


def disk_space(path: Path) -> DiskSpace:
    """Blocking (a ``statvfs``): call it in a thread."""
    usage = shutil.disk_usage(path)
    return DiskSpace(free=usage.free, total=usage.total)


class Metrics:
    """The counters, gauges and histograms Zhiyi exports at ``/metrics``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.tasks = Gauge("zhiyi_tasks", "Tasks by status and type",
                           ["status", "task_type"], registry=r)
        self.queue_depth = Gauge("zhiyi_queue_depth", "Pending tasks waiting for a worker",
                                 registry=r)
        self.queue_oldest_seconds = Gauge(
            "zhiyi_queue_oldest_seconds",
            "How long the oldest runnable pending task has waited (0: none waiting)", registry=r)
        self.failed_tasks = Gauge("zhiyi_failed_tasks", "Failed tasks kept, by error code",
                                  ["error_code"], registry=r)
        self.ledger_drift_users = Gauge(
            "zhiyi_ledger_drift_users", "Users whose balance differs from their ledger sum",
            registry=r)
        self.disk_free_bytes = Gauge("zhiyi_disk_free_bytes",
                                     "Free bytes on the data folder's file system", registry=r)
        self.disk_total_bytes = Gauge("zhiyi_disk_total_bytes",
                                      "Size of the data folder's file system", registry=r)
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
        self.parses = Counter("zhiyi_document_parses",
                              "Document parses started, and how they ended", ["event"],
                              registry=r)
        self.parses_running = Gauge("zhiyi_document_parses_running",
                                    "Documents being read by a parser process now", registry=r)
        self.parses_waiting = Gauge("zhiyi_document_parses_waiting",
                                    "Document parses waiting for a parser slot", registry=r)
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

    def set_health(self, figures: HealthFigures) -> None:
        self.queue_oldest_seconds.set(figures.oldest_pending_seconds)
        self.ledger_drift_users.set(figures.drifting_users)
        self.failed_tasks.clear()
        for code, n in figures.failed_by_code.items():
            self.failed_tasks.labels(error_code=code).set(n)

    def set_disk(self, space: DiskSpace) -> None:
        self.disk_free_bytes.set(space.free)
        self.disk_total_bytes.set(space.total)

    def render(self) -> bytes:
        return generate_latest(self.registry)
