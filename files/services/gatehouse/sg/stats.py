"""SG counters kept as plain integers on the hot path and exposed to Prometheus at scrape time."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector


class Stats:
    def __init__(self) -> None:
        self.active = 0
        self.establishing = 0
        self.accepted = 0
        self.refused: Counter[str] = Counter()
        self.bytes_to_agent = 0
        self.bytes_to_client = 0
        self.udp_relayed: Counter[str] = Counter()
        self.udp_dropped: Counter[str] = Counter()


class StatsCollector(Collector):
    def __init__(self, stats: Stats, max_connections: int) -> None:
        self.stats = stats
        self.max_connections = max_connections

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        s = self.stats
        yield GaugeMetricFamily("gatehouse_sg_sessions_active", "Relayed sessions open now", value=s.active)
        yield GaugeMetricFamily(
            "gatehouse_sg_sessions_establishing", "Clients past TLS, before the relay", value=s.establishing
        )
        yield GaugeMetricFamily(
            "gatehouse_sg_max_connections", "MaxConnections setting", value=self.max_connections
        )
        yield CounterMetricFamily(
            "gatehouse_sg_sessions_accepted", "Sessions relayed to an agent", value=s.accepted
        )
        refused = CounterMetricFamily(
            "gatehouse_sg_sessions_refused", "Connections refused, by reason", labels=["reason"]
        )
        for reason, count in sorted(s.refused.items()):
            refused.add_metric([reason], count)
        yield refused
        relayed = CounterMetricFamily(
            "gatehouse_sg_bytes_relayed", "TCP payload bytes relayed", labels=["direction"]
        )
        relayed.add_metric(["to_agent"], s.bytes_to_agent)
        relayed.add_metric(["to_client"], s.bytes_to_client)
        yield relayed
        udp = CounterMetricFamily(
            "gatehouse_sg_udp_datagrams_relayed", "UDP datagrams relayed", labels=["direction"]
        )
        for direction in ("to_agent", "to_client"):
            udp.add_metric([direction], s.udp_relayed[direction])
        yield udp
        dropped = CounterMetricFamily(
            "gatehouse_sg_udp_datagrams_dropped", "UDP datagrams dropped, by reason", labels=["reason"]
        )
        for reason, count in sorted(s.udp_dropped.items()):
            dropped.add_metric([reason], count)
        yield dropped
