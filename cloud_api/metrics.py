"""Prometheus metrics of the cloud, in one registry of our own (so tests can build many apps per process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

INGEST_MESSAGES = Counter(
    "shelfloop_ingest_messages",
    "Uplinks handled by ingest workers, by kind and outcome.",
    ["kind", "status"],
    registry=REGISTRY,
)
INGEST_LATENCY = Histogram(
    "shelfloop_ingest_seconds",
    "Time from taking an uplink to acking it (storage, database and ack publish).",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
    registry=REGISTRY,
)
HTTP_REQUESTS = Counter(
    "shelfloop_http_requests",
    "API requests by route template, method and status code.",
    ["route", "method", "status"],
    registry=REGISTRY,
)
HTTP_LATENCY = Histogram(
    "shelfloop_http_request_seconds",
    "API request latency by route template.",
    ["route"],
    registry=REGISTRY,
)
QUEUE_EVENTS = Counter(
    "shelfloop_queue_events",
    "Annotation queue transitions (claimed, completed, fenced, expired, dead, review).",
    ["event"],
    registry=REGISTRY,
)
