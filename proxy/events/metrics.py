"""Prometheus metrics of the events pipeline, registered on the caller's registry.

Labels are bounded: event types come from a fixed list, webhook names and
results from the config. Gauges describe shared queues (the same value from
every worker), hence ``multiprocess_mode="max"``.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

DELIVERY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class EventMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.emitted = Counter(
            "sluice_events_emitted", "Events accepted into the buffer.", ["type"], registry=r
        )
        self.dropped = Counter(
            "sluice_events_dropped",
            "Events lost because the in-memory buffer was full (the only loss allowed).",
            ["type"],
            registry=r,
        )
        self.appended = Counter(
            "sluice_events_outbox_appended",
            "Event copies stored in the outbox, per subscription.",
            ["webhook"],
            registry=r,
        )
        self.outbox_errors = Counter(
            "sluice_events_outbox_errors", "Failed outbox operations.", ["op"], registry=r
        )
        self.deliveries = Counter(
            "sluice_webhook_deliveries",
            "Delivery attempts by result (delivered, retry, dead, gone).",
            ["webhook", "result"],
            registry=r,
        )
        self.delivered_events = Counter(
            "sluice_webhook_delivered_events", "Events delivered.", ["webhook"], registry=r
        )
        self.latency = Histogram(
            "sluice_webhook_delivery_seconds",
            "Time of one delivery attempt.",
            ["webhook"],
            buckets=DELIVERY_BUCKETS,
            registry=r,
        )
        self.depth = Gauge(
            "sluice_webhook_queue_depth",
            "Events waiting for delivery.",
            ["webhook"],
            registry=r,
            multiprocess_mode="max",
        )
        self.oldest = Gauge(
            "sluice_webhook_oldest_pending_age_seconds",
            "Age of the oldest event waiting for delivery.",
            ["webhook"],
            registry=r,
            multiprocess_mode="max",
        )
        self.dead = Gauge(
            "sluice_webhook_dead_letters",
            "Events in the dead-letter list.",
            ["webhook"],
            registry=r,
            multiprocess_mode="max",
        )
        self.disabled = Gauge(
            "sluice_webhook_disabled",
            "1 while the subscription is disabled (410 Gone or by an operator).",
            ["webhook"],
            registry=r,
            multiprocess_mode="max",
        )
