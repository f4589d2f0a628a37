"""Prometheus metrics of the CM."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge


class CmMetrics:
    def __init__(self, sessions: Callable[[], float], in_flight: Callable[[], float]) -> None:
        self.registry = CollectorRegistry()
        Gauge("gatehouse_cm_sessions_active", "Live client sessions", registry=self.registry).set_function(
            sessions
        )
        Gauge(
            "gatehouse_cm_establishments_in_flight",
            "allocate-resource calls in flight",
            registry=self.registry,
        ).set_function(in_flight)
        self.requests = Counter(
            "gatehouse_cm_requests",
            "Client requests by message and result",
            ["message", "result"],
            registry=self.registry,
        )
        self.upstream_failures = Counter(
            "gatehouse_cm_upstream_failures",
            "Failed broker and agent calls by kind (error, timeout)",
            ["upstream", "kind"],
            registry=self.registry,
        )
        self.busy = Counter(
            "gatehouse_cm_busy_refusals",
            "Requests refused with FAILED_SERVER_BUSY by limit",
            ["limit"],
            registry=self.registry,
        )
        for upstream in ("broker", "agent"):
            for kind in ("error", "timeout"):
                self.upstream_failures.labels(upstream, kind)
