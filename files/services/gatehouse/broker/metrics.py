"""The broker's Prometheus metrics, in a registry of its own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge


class BrokerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.sessions = Gauge(
            "gatehouse_broker_sessions",
            "Broker protocol sessions held (JSESSIONID cookies)",
            registry=self.registry,
        )
        self.auth = Counter(
            "gatehouse_broker_authentications",
            "Authentications by result",
            ["result"],
            registry=self.registry,
        )
        self.allocations = Counter(
            "gatehouse_broker_allocations",
            "allocate-resource answers by result",
            ["result"],
            registry=self.registry,
        )
        self.requests = Counter(
            "gatehouse_broker_requests",
            "HTTP requests by endpoint and status",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self.protocol_errors = Counter(
            "gatehouse_broker_protocol_errors",
            "error-resp answers by result-id",
            ["result"],
            registry=self.registry,
        )
        self.agent_reports = Counter(
            "gatehouse_broker_agent_reports", "Accepted agent load reports", registry=self.registry
        )
        for result in ("success", "failure"):
            self.auth.labels(result)
