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

# A service that notes an operation (and model) for a request (shared.logs.note_request) gets these from
# the shared middleware: the gateway's requests and credits by what was asked of which model.
REQUESTS_BY_MODEL = Counter(
    "http_requests_by_model_total",
    "Requests by operation, model and status",
    ["service", "operation", "model", "status"],
)
CREDITS_BY_MODEL = Counter(
    "credits_charged_by_model_total",
    "Credits charged by operation and model",
    ["service", "operation", "model"],
)
MAX_MODEL_LABELS = 100
_models_seen: set[str] = set()


def model_label(model: str) -> str:
    """The model as a label value. Clients name the model, so only the first MAX_MODEL_LABELS distinct
    names get a series of their own (the rest count as "other"): made-up names cannot mint unbounded series."""
    if not model:
        return "none"
    model = model[:64]
    if model in _models_seen:
        return model
    if len(_models_seen) < MAX_MODEL_LABELS:
        _models_seen.add(model)
        return model
    return "other"


def render_latest() -> tuple[bytes, str]:
    return generate_latest(), CONTENT_TYPE_LATEST
