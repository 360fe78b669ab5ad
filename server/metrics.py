"""Prometheus metrics of the server (GET /metrics), defined once."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

ADAPT_SECONDS = Histogram(
    "genadapter_adapt_seconds",
    "Time to answer POST /v1/adapt",
    ["cache"],  # "hit" or "miss"
    buckets=(0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64),
)
ADAPT_CACHE = Counter("genadapter_adapt_cache_total", "Adapt requests by cache result", ["cache"])
ADAPT_QUEUE = Gauge("genadapter_adapt_queue_depth", "Adapt jobs waiting for or in the generator")
GENERATED_TOKENS = Counter("genadapter_generated_tokens_total", "Tokens generated", ["adapter"])
REQUESTS_IN_FLIGHT = Gauge("genadapter_generation_requests_in_flight", "Generations running")
