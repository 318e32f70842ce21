"""Prometheus metrics: one registry per process, no ids as labels.

Labels are bounded sets (event type, reason, mode), never a restaurant, order
or user id, so cardinality stays fixed whatever the traffic.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["REGISTRY", "M"]

REGISTRY = CollectorRegistry(auto_describe=True)

_LATENCY = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class _Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.checked = Counter(
            "relay_checked_rows", "Outbox rows the recorder read in new windows", registry=r
        )
        self.windows = Counter("relay_windows_recorded", "Snapshot windows recorded", registry=r)
        self.published = Counter(
            "relay_published_events", "Valid events in new windows", ["event_type"], registry=r
        )
        self.dead_lettered = Counter(
            "relay_dead_lettered_events", "Rows moved to dead letters", registry=r
        )
        self.pii_dropped = Counter(
            "relay_dropped_fields", "Payload fields dropped by the contract whitelist", registry=r
        )
        self.auth_failures = Counter(
            "relay_auth_failures", "Refused stream or poll requests", ["reason"], registry=r
        )
        self.slow_disconnects = Counter(
            "relay_slow_subscriber_disconnects",
            "Streams closed because their buffer overflowed",
            registry=r,
        )
        self.deliveries = Counter(
            "relay_sse_deliveries", "Events written to SSE subscribers", registry=r
        )
        self.replayed = Counter(
            "relay_replayed_events",
            "Events sent to resuming streams, by where they came from: memory (the hub's "
            "recent events) or log (read and rendered again)",
            ["source"],
            registry=r,
        )
        self.hub_read_back = Counter(
            "relay_hub_read_back_events",
            "Events the hub read from the log instead of having them in hand (recorded "
            "by another replica); nothing is read while no local stream is open",
            registry=r,
        )
        self.backplane_published = Counter(
            "relay_backplane_published_events",
            "Events this process published to the live backplane (NATS JetStream)",
            registry=r,
        )
        self.backplane_received = Counter(
            "relay_backplane_received_events",
            "Events this gateway took from the live backplane (not yet delivered when they "
            "came; while no stream is open here, messages are skipped unread and not counted)",
            registry=r,
        )
        self.publish_lag = Histogram(
            "relay_commit_to_publish_seconds",
            "Outbox insert to log publication",
            buckets=_LATENCY,
            registry=r,
        )
        self.send_latency = Histogram(
            "relay_publish_to_send_seconds",
            "Log publication to hub fan-out",
            buckets=_LATENCY,
            registry=r,
        )
        self.subscribers = Gauge("relay_subscribers", "Open SSE streams", registry=r)
        self.backlog = Gauge(
            "relay_backlog",
            "Outbox rows no window holds yet (sampled, counted up to 10,000)",
            registry=r,
        )
        self.replicas = Gauge("relay_replicas", "Live relay processes (sampled)", registry=r)
        self.broker_published = Counter(
            "relay_broker_published",
            "Events a broker confirmed, per external publisher",
            ["publisher"],
            registry=r,
        )
        self.broker_rejected = Counter(
            "relay_broker_rejected",
            "Events a broker refused for good (dead-lettered for that publisher)",
            ["publisher"],
            registry=r,
        )
        self.broker_lag = Gauge(
            "relay_broker_lag",
            "Windows an external publisher has yet to deliver (whole or in part)",
            ["publisher"],
            registry=r,
        )


M = _Metrics(REGISTRY)
