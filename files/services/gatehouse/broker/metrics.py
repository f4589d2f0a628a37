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
        self.login_throttled = Counter(
            "gatehouse_broker_login_throttled",
            "Login attempts refused unchecked (answered as a wrong password) by reason",
            ["reason"],
            registry=self.registry,
        )
        self.login_lockouts = Counter(
            "gatehouse_broker_login_lockouts",
            "Login lockouts started, by scope (account_source, source, account)",
            ["scope"],
            registry=self.registry,
        )
        self.login_throttle_entries = Gauge(
            "gatehouse_broker_login_throttle_entries",
            "Keys held by the login throttle (bounded)",
            registry=self.registry,
        )
        self.password_hash_busy = Counter(
            "gatehouse_broker_password_hash_busy",
            "Password checks refused because the hashing pool and its queue were full",
            registry=self.registry,
        )
        self.password_hash_pending = Gauge(
            "gatehouse_broker_password_hash_pending",
            "Password hashing jobs running or waiting",
            registry=self.registry,
        )
        self.agent_reports_refused = Counter(
            "gatehouse_broker_agent_reports_refused",
            "Refused agent load reports by reason",
            ["reason"],
            registry=self.registry,
        )
        self.peers_refused = Counter(
            "gatehouse_broker_peers_refused",
            "Requests refused because the peer certificate lacks the role the endpoint needs",
            ["endpoint"],
            registry=self.registry,
        )
        for result in ("success", "failure", "throttled", "busy"):
            self.auth.labels(result)
        for reason in ("delay", "lockout", "source_lockout", "account_lockout"):
            self.login_throttled.labels(reason)
        for scope in ("account_source", "source", "account"):
            self.login_lockouts.labels(scope)
