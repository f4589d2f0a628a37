"""The SG's UDP relay: client ↔ SG:Port/udp, SG:AgentUdpSourcePort/udp ↔ agent session port."""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any

from gatehouse.sg.stats import Stats
from gatehouse.sg.udp_table import UdpTable

log = logging.getLogger("gatehouse.sg.udp")
# The default socket buffer (about 200 KiB, ~90 datagrams) overflows whenever the loop is busy
# for a millisecond at high rates; the kernel caps the request at net.core.[rw]mem_max.
SOCKET_BUFFER = 4 * 1024 * 1024


class UdpRelay:
    def __init__(self, table: UdpTable, stats: Stats) -> None:
        self.table = table
        self.stats = stats
        self.client_side: asyncio.DatagramTransport | None = None
        self.agent_side: asyncio.DatagramTransport | None = None

    async def start(self, listen: str, port: int, agent_source_port: int) -> None:
        loop = asyncio.get_running_loop()
        self.client_side, _protocol = await loop.create_datagram_endpoint(
            lambda: _ClientDatagrams(self), local_addr=(listen, port)
        )
        # Agents are reached over IPv4: with an IPv6 listen address the agent side binds all IPv4.
        agent_bind = "0.0.0.0" if ":" in listen else listen
        self.agent_side, _protocol = await loop.create_datagram_endpoint(
            lambda: _AgentDatagrams(self), local_addr=(agent_bind, agent_source_port)
        )
        for transport in (self.client_side, self.agent_side):
            sock = transport.get_extra_info("socket")
            for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
                try:
                    sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)
                except OSError as exc:  # a smaller buffer still works
                    log.debug("cannot set the UDP socket buffer: %s", exc)

    def close(self) -> None:
        for transport in (self.client_side, self.agent_side):
            if transport:
                transport.close()

    def from_client(self, data: bytes, addr: tuple[Any, ...]) -> None:
        session = self.table.from_client((addr[0], addr[1]))
        if session is None or self.agent_side is None:
            self.stats.udp_dropped["no-session"] += 1
            return
        self.agent_side.sendto(data, session.agent_addr)
        self.stats.udp_relayed["to_agent"] += 1

    def from_agent(self, data: bytes, addr: tuple[Any, ...]) -> None:
        session = self.table.from_agent((addr[0], addr[1]))
        if session is None or session.client_addr is None or self.client_side is None:
            self.stats.udp_dropped["unknown-agent"] += 1
            return
        self.client_side.sendto(data, session.client_addr)
        self.stats.udp_relayed["to_client"] += 1


class _ClientDatagrams(asyncio.DatagramProtocol):
    def __init__(self, relay: UdpRelay) -> None:
        self.relay = relay

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self.relay.from_client(data, addr)

    def error_received(self, exc: Exception) -> None:
        log.debug("client-side udp error: %s", exc)


class _AgentDatagrams(asyncio.DatagramProtocol):
    def __init__(self, relay: UdpRelay) -> None:
        self.relay = relay

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self.relay.from_agent(data, addr)

    def error_received(self, exc: Exception) -> None:
        log.debug("agent-side udp error: %s", exc)
