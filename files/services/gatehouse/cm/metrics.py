"""Prometheus metrics of the CM."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

AGENT_FAILURES = ("error", "timeout", "invalid", "unverified")
# Why a create-invitation or redeem-invitation was refused (docs/protocol.md, "Collaboration").
INVITATION_REFUSALS = ("disabled", "limit", "unknown", "used", "expired", "ended", "agent")
FORWARD_OUTCOMES = ("answered", "gone", "timeout")


class _Evictions(Collector):
    def __init__(self, count: Callable[[], float]) -> None:
        self.count = count

    def collect(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily(
            "gatehouse_cm_pre_auth_evictions",
            "Unauthenticated sessions evicted because MaxPreAuthSessions was reached",
            value=self.count(),
        )


class CmMetrics:
    def __init__(
        self,
        sessions: Callable[[], float],
        in_flight: Callable[[], float],
        *,
        pre_auth: Callable[[], float] = lambda: 0.0,
        evictions: Callable[[], float] = lambda: 0.0,
        sg_up: Callable[[], float] = lambda: 1.0,
        invitations: Callable[[], float] = lambda: 0.0,
    ) -> None:
        self.registry = CollectorRegistry()
        Gauge(
            "gatehouse_cm_sessions_active",
            "Authenticated client sessions (MaxClients)",
            registry=self.registry,
        ).set_function(sessions)
        Gauge(
            "gatehouse_cm_pre_auth_sessions",
            "Unauthenticated client sessions (MaxPreAuthSessions)",
            registry=self.registry,
        ).set_function(pre_auth)
        Gauge(
            "gatehouse_cm_security_gateway_up",
            "1 while the co-located SG's health check passes (always 1 without SecurityGatewayHealthUrl)",
            registry=self.registry,
        ).set_function(sg_up)
        self.registry.register(_Evictions(evictions))
        self.auth_attempts_exceeded = Counter(
            "gatehouse_cm_auth_attempts_exceeded",
            "Sessions ended after MaxAuthAttempts failed authentications",
            registry=self.registry,
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
            "Failed broker and agent calls by kind (error, timeout; for agents also invalid answers and "
            "credentials withheld from unverified agents)",
            ["upstream", "kind"],
            registry=self.registry,
        )
        self.forwarded = Counter(
            "gatehouse_cm_forwarded_requests",
            "Requests of another worker's session passed to that worker (Workers > 1), by outcome "
            "(answered; gone: the worker had ended; timeout)",
            ["outcome"],
            registry=self.registry,
        )
        self.busy = Counter(
            "gatehouse_cm_busy_refusals",
            "Requests refused with FAILED_SERVER_BUSY by limit",
            ["limit"],
            registry=self.registry,
        )
        Gauge(
            "gatehouse_cm_invitations_outstanding",
            "Collaboration invitations created, not yet used and not expired",
            registry=self.registry,
        ).set_function(invitations)
        self.invitations_created = Counter(
            "gatehouse_cm_invitations_created",
            "Collaboration invitations created by session owners",
            registry=self.registry,
        )
        self.invitations_redeemed = Counter(
            "gatehouse_cm_invitations_redeemed",
            "Collaboration invitations redeemed: a collaborator joined an owner's session",
            registry=self.registry,
        )
        self.invitations_refused = Counter(
            "gatehouse_cm_invitations_refused",
            "create-invitation and redeem-invitation requests refused, by reason",
            ["reason"],
            registry=self.registry,
        )
        for reason in INVITATION_REFUSALS:
            self.invitations_refused.labels(reason)
        for outcome in FORWARD_OUTCOMES:
            self.forwarded.labels(outcome)
        self.invitation_attempts_exceeded = Counter(
            "gatehouse_cm_invitation_attempts_exceeded",
            "Sessions ended after MaxInvitationAttempts unknown invitation codes",
            registry=self.registry,
        )
        for upstream, kinds in (("broker", ("error", "timeout")), ("agent", AGENT_FAILURES)):
            for kind in kinds:
                self.upstream_failures.labels(upstream, kind)
