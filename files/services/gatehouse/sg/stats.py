"""SG counters kept as plain integers on the hot path and exposed to Prometheus at scrape time.

Refusals are counted in full but logged at most ``REFUSAL_LOG_RATE`` lines per second and reason
(:class:`Refusals`), so that a flood of bad connections or grants cannot rotate the logs away.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from gatehouse.sg.settings import REFUSAL_LOG_RATE


class Stats:
    def __init__(self) -> None:
        self.open = 0  # client connections from accept to close, handshaking ones included
        self.handshaking = 0
        self.active = 0  # relayed sessions (the others past the handshake are establishing)
        self.accepted = 0
        self.refused: Counter[str] = Counter()
        self.log_suppressed: Counter[str] = Counter()
        self.bytes_to_agent = 0
        self.bytes_to_client = 0
        self.udp_relayed: Counter[str] = Counter()
        self.udp_dropped: Counter[str] = Counter()
        self.udp_binds = 0
        self.udp_ports_exhausted = 0


class Refusals:
    """Count every refusal; log at most ``rate`` lines per second for each reason.

    When lines were held back, the next line of that reason says how many (``suppressed``).
    """

    def __init__(
        self,
        stats: Stats,
        log: logging.Logger,
        rate: int = REFUSAL_LOG_RATE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stats = stats
        self.log = log
        self.rate = rate
        self.clock = clock
        self._window: dict[str, tuple[int, int]] = {}  # reason -> (second, lines logged in it)
        self._held: Counter[str] = Counter()

    def refuse(
        self,
        reason: str,
        client: str,
        level: int,
        msg: str,
        *args: object,
        logger: logging.Logger | logging.LoggerAdapter[logging.Logger] | None = None,
        **fields: Any,
    ) -> None:
        """Count a refusal of ``client``; log ``msg`` with the reason, the client and ``fields``."""
        self.stats.refused[reason] += 1
        if self.allow(reason):
            extra = {"client": client, "reason": reason, **fields}
            held = self._held.pop(reason, 0)
            if held:
                extra["suppressed"] = held
            (logger or self.log).log(level, msg, *args, extra=extra)

    def allow(self, reason: str) -> bool:
        second = int(self.clock())
        window, lines = self._window.get(reason, (second, 0))
        if window != second:
            window, lines = second, 0
        if lines >= self.rate:
            self._held[reason] += 1
            self.stats.log_suppressed[reason] += 1
            return False
        self._window[reason] = (window, lines + 1)
        return True


class StatsCollector(Collector):
    """Exposes ``stats``; the gauges that other state already holds are read at scrape time."""

    def __init__(
        self,
        stats: Stats,
        max_connections: int,
        past_handshake: Callable[[], int],
        udp_ports_in_use: Callable[[], int],
    ) -> None:
        self.stats = stats
        self.max_connections = max_connections
        self.past_handshake = past_handshake  # client connections past the TLS handshake, not closed
        self.udp_ports_in_use = udp_ports_in_use

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        s = self.stats
        yield GaugeMetricFamily(
            "gatehouse_sg_connections_open",
            "Client connections open (TLS handshake included); counted against MaxConnections",
            value=s.open,
        )
        yield GaugeMetricFamily(
            "gatehouse_sg_connections_handshaking",
            "Client connections in the TLS handshake",
            value=s.handshaking,
        )
        yield GaugeMetricFamily("gatehouse_sg_sessions_active", "Relayed sessions open now", value=s.active)
        yield GaugeMetricFamily(
            "gatehouse_sg_sessions_establishing",
            "Clients past TLS, before the relay",
            value=self.past_handshake() - s.active,
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
        suppressed = CounterMetricFamily(
            "gatehouse_sg_log_lines_suppressed",
            "Refusal log lines held back by the rate limit, by reason",
            labels=["reason"],
        )
        for reason, count in sorted(s.log_suppressed.items()):
            suppressed.add_metric([reason], count)
        yield suppressed
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
        yield CounterMetricFamily(
            "gatehouse_sg_udp_binds",
            "Client UDP addresses bound to a session (bind datagrams accepted)",
            value=s.udp_binds,
        )
        yield GaugeMetricFamily(
            "gatehouse_sg_udp_agent_ports_in_use",
            "Agent-side UDP ports held by sessions",
            value=self.udp_ports_in_use(),
        )
        yield CounterMetricFamily(
            "gatehouse_sg_udp_agent_ports_exhausted",
            "Sessions whose UDP bind found no agent-side port free (no UDP until one is)",
            value=s.udp_ports_exhausted,
        )
