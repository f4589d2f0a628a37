"""Which client datagrams the SG may relay, and where agent replies go back to (pure bookkeeping).

Per docs/architecture.md: a client address is admitted only while it has an established TCP
channel (matched by IP); the first datagram from a new source port of that IP binds to its newest
session. Replies are matched by the agent's address; when one agent serves several sessions
through this SG, the session that last sent to that agent address gets the reply.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

Addr = tuple[str, int]


def norm_ip(ip: str) -> str:
    """Canonical text of an address; IPv4-mapped IPv6 (dual-stack sockets) becomes plain IPv4."""
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return ip
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
        return str(addr.ipv4_mapped)
    return str(addr)


@dataclass(eq=False)
class UdpSession:
    session_id: str
    client_ip: str
    agent_addr: Addr
    client_addr: Addr | None = field(default=None)


class UdpTable:
    def __init__(self) -> None:
        self._by_ip: dict[str, list[UdpSession]] = {}
        self._by_client: dict[Addr, UdpSession] = {}
        self._by_agent: dict[Addr, UdpSession] = {}

    def __len__(self) -> int:
        return sum(len(v) for v in self._by_ip.values())

    def add(self, session: UdpSession) -> None:
        session.client_ip = norm_ip(session.client_ip)
        session.agent_addr = (norm_ip(session.agent_addr[0]), session.agent_addr[1])
        self._by_ip.setdefault(session.client_ip, []).append(session)
        self._by_agent.setdefault(session.agent_addr, session)

    def remove(self, session: UdpSession) -> None:
        sessions = self._by_ip.get(session.client_ip)
        if sessions and session in sessions:
            sessions.remove(session)
            if not sessions:
                del self._by_ip[session.client_ip]
        if session.client_addr and self._by_client.get(session.client_addr) is session:
            del self._by_client[session.client_addr]
        if self._by_agent.get(session.agent_addr) is session:
            del self._by_agent[session.agent_addr]
            # Another session to the same agent address takes over its replies.
            for others in self._by_ip.values():
                for other in others:
                    if other.agent_addr == session.agent_addr:
                        self._by_agent[session.agent_addr] = other
                        return

    def from_client(self, addr: Addr) -> UdpSession | None:
        """The session a client datagram belongs to, or None (drop it)."""
        session = self._by_client.get(addr)
        if session is None:
            ip = norm_ip(addr[0])
            sessions = self._by_ip.get(ip)
            if not sessions:
                return None
            session = sessions[-1]
            if session.client_addr and self._by_client.get(session.client_addr) is session:
                del self._by_client[session.client_addr]  # the client's port changed (NAT rebinding)
            session.client_addr = addr
            self._by_client[addr] = session
        self._by_agent[session.agent_addr] = session
        return session

    def from_agent(self, addr: Addr) -> UdpSession | None:
        """The session an agent datagram answers, if its client has sent anything yet."""
        session = self._by_agent.get((norm_ip(addr[0]), addr[1]))
        if session is None or session.client_addr is None:
            return None
        return session
