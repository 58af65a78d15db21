"""The inference server's Prometheus metrics, defined once, on a registry of their own.

One registry per app (not the global default) so several apps can live in one test process and the agent's
metrics never mix with the server's. Nothing here measures anything: callers observe.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Gauge, Histogram

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class ServerMetrics:
    """Every metric the server exports; ``registry`` is what ``/metrics`` renders."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        # A gauge, not a histogram: each process cold-starts once; the phases run from ~0.1 s to many minutes.
        self.cold_start_seconds = Gauge(
            "weightcache_server_cold_start_seconds",
            "Seconds spent in each cold-start phase of this process (import, wait for the cache, load, warm-up)",
            ["phase"],
            registry=self.registry,
        )
        self.request_duration_seconds = Histogram(
            "weightcache_server_request_duration_seconds",
            "Latency of HTTP requests, by route and status code",
            ["route", "status"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "weightcache_server_requests_in_flight",
            "HTTP requests being served right now",
            registry=self.registry,
        )
        self.ready = Gauge(
            "weightcache_server_ready",
            "1 once the weights are loaded and the warm-up inference ran, else 0",
            registry=self.registry,
        )
        self.model_bytes = Gauge(
            "weightcache_server_model_bytes",
            "Bytes of weights loaded",
            registry=self.registry,
        )
