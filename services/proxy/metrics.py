"""The proxy's own Prometheus metrics (the shared HTTP latency histogram covers the whole request)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

UPSTREAM_LATENCY = Histogram(
    "proxy_upstream_latency_seconds",
    "Time from sending a request upstream to its response head (whole body for non-streamed calls)",
    ["endpoint"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)
UPSTREAM_ERRORS = Counter(
    "proxy_upstream_errors_total",
    "Upstream failures by endpoint and kind (status, timeout, unreachable, dropped)",
    ["endpoint", "kind"],
)
CREDITS_CHARGED = Counter(
    "proxy_credits_charged_total", "Credits committed for served requests", ["endpoint"]
)
REQUESTS_REFUSED = Counter(
    "proxy_requests_refused_total", "Requests refused before upstream, by reason", ["reason"]
)
SETTLEMENT_FAILURES = Counter(
    "proxy_settlement_failures_total", "Commits or releases that failed (the hold then expires)", ["action"]
)
JOBS = Counter("proxy_jobs_total", "ai.requests jobs by outcome", ["outcome"])
HOLDS_PLACED = Counter(
    "proxy_holds_placed_total",
    "Holds by how they were placed: redis (the fast path, recorded at credits afterwards) or http",
    ["via"],
)
HOLDS_LOST = Counter(
    "proxy_holds_lost_total",
    "Holds placed in Redis that credits refused to record (lost with Redis, or past their deadline);"
    " their requests go uncharged",
)
# Resolved once: a label lookup on every request would cost more than the increment.
HOLDS_PLACED_IN_REDIS = HOLDS_PLACED.labels("redis")
HOLDS_PLACED_OVER_HTTP = HOLDS_PLACED.labels("http")
HOLDS_EXTENDED = Counter(
    "proxy_holds_extended_total",
    "Hold deadlines moved on because their requests (long streams) were still being served",
)
