"""The broker's Prometheus metrics, in a registry of its own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

from gatehouse.broker.throttle import REASONS, SCOPES


class BrokerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()

        def counter(name: str, doc: str, *labels: str) -> Counter:
            return Counter(f"gatehouse_broker_{name}", doc, labels, registry=self.registry)

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(f"gatehouse_broker_{name}", doc, registry=self.registry)

        self.sessions = gauge("sessions", "Broker protocol sessions held (JSESSIONID cookies)")
        self.auth = counter("authentications", "Authentications by result", "result")
        self.allocations = counter("allocations", "allocate-resource answers by result", "result")
        self.requests = counter("requests", "HTTP requests by endpoint and status", "endpoint", "status")
        self.protocol_errors = counter("protocol_errors", "error-resp answers by result-id", "result")
        self.agent_reports = counter("agent_reports", "Accepted agent load reports")
        self.login_throttled = counter(
            "login_throttled",
            "Login attempts refused unchecked (answered as a wrong password) by reason",
            "reason",
        )
        self.login_lockouts = counter(
            "login_lockouts", "Login lockouts started, by scope (account_source, source, account)", "scope"
        )
        self.login_throttle_entries = gauge(
            "login_throttle_entries", "Keys held by the login throttle (bounded)"
        )
        self.password_hash_busy = counter(
            "password_hash_busy", "Password checks refused because the hashing pool and its queue were full"
        )
        self.identity_busy = counter(
            "identity_busy",
            "Logins refused because a directory (ldap-<domain>) or the RADIUS pool and its queue were full",
            "pool",
        )
        self.password_hash_pending = gauge(
            "password_hash_pending", "Password hashing jobs running or waiting"
        )
        self.agent_reports_refused = counter(
            "agent_reports_refused", "Refused agent load reports by reason", "reason"
        )
        self.peers_refused = counter(
            "peers_refused",
            "Requests refused because the peer certificate lacks the role the endpoint needs",
            "endpoint",
        )
        for result in ("success", "failure", "throttled", "busy", "incomplete", "unavailable"):
            self.auth.labels(result)
        for reason in REASONS:
            self.login_throttled.labels(reason)
        for scope in SCOPES:
            self.login_lockouts.labels(scope)
