"""Prometheus metrics shared by every service. Service-specific metrics live beside their owners."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest

HTTP_LATENCY = Histogram(
    "http_request_duration_seconds",
    "HTTP request latency by route",
    ["service", "method", "route", "status"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
AMQP_PUBLISHED = Counter("amqp_messages_published_total", "Messages published and confirmed", ["routing_key"])
AMQP_CONSUMED = Counter(
    "amqp_messages_consumed_total", "Messages consumed by outcome", ["queue", "outcome"]
)  # outcome: ok, dead_lettered, redelivered
AMQP_REDELIVERED = Counter(
    "amqp_messages_redelivered_total", "Messages that arrived as redeliveries", ["queue"]
)


def render_latest() -> tuple[bytes, str]:
    return generate_latest(), CONTENT_TYPE_LATEST
