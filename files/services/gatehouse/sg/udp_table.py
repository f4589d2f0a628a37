"""Which client address each session's datagrams come from (pure bookkeeping, no sockets).

Invariants (docs/architecture.md, "UDP"):

- A client address (IP and port) is bound to at most one session, and a session to at most one
  client address. Only datagrams from a bound address are relayed, and only to that session.
- An address is bound only by a bind datagram whose MAC verifies under the session's key (derived
  from its connect-tag, which only the client and the SG know), sent from the IP address of the
  session's TLS channel, with a counter higher than the last one accepted for that session. The
  same datagram resent from the address it bound is answered again (lost ack) and changes nothing.
- Replies need no lookup here: each session has its own agent-side socket (see udp.py). A session
  is bound to its first address only once that socket is open (``admit``).
- Through a trusted forwarder (docs/dmz.md) the client address checked is the one its PROXY v2
  header names; the session is then bound to the pair (forwarder socket, client address), and
  replies go to the forwarder socket (``reply_addr``), which passes them to that client only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from gatehouse import linechan
from gatehouse.web import norm_ip

Addr = tuple[Any, ...]  # as the socket reports it: (ip, port) or (ip, port, flowinfo, scope)


@dataclass(eq=False)
class UdpSession:
    session_id: str
    client_ip: str
    agent_addr: tuple[str, int]
    key: bytes = field(repr=False)
    key_id: bytes = field(repr=False)
    client_addr: Addr | None = None  # the bound key: the client's address, or (forwarder, client)
    reply_addr: Addr | None = None  # where replies go: the client, or the forwarder's socket for it
    counter: int = 0  # of the last bind datagram accepted
    local_ip: str = ""  # the SG's address on the session's TCP connection to the agent (udp.py)
    port: int = 0  # agent-side source port (udp.py)
    sock: Any = field(default=None, repr=False)  # agent-side socket, from the first bind (udp.py)
    no_port: bool = False  # a bind found no agent-side port free (counted and logged once)
    # Runs of equal-sized datagrams go as one UDP_SEGMENT send until a path refuses it (udp.py).
    segment_out: bool = True  # towards the agent
    segment_back: bool = True  # towards the client


class UdpTable:
    def __init__(self) -> None:
        self.by_client: dict[Addr, UdpSession] = {}
        self._by_key: dict[bytes, UdpSession] = {}

    def __len__(self) -> int:
        return len(self._by_key)

    def add(self, session: UdpSession) -> None:
        session.client_ip = norm_ip(session.client_ip)
        self._by_key[session.key_id] = session

    def remove(self, session: UdpSession) -> None:
        """Forget the session and its address (idempotent)."""
        if self._by_key.get(session.key_id) is session:
            del self._by_key[session.key_id]
        if session.client_addr is not None and self.by_client.get(session.client_addr) is session:
            del self.by_client[session.client_addr]

    def from_client(self, addr: Addr) -> UdpSession | None:
        """The session a (non-bind) datagram from ``addr`` belongs to, or None (drop it)."""
        return self.by_client.get(addr)

    def bind(
        self,
        data: bytes,
        addr: Addr,
        admit: Callable[[UdpSession], bool] = lambda _s: True,
        client: Addr | None = None,
    ) -> tuple[UdpSession | None, str]:
        """Check a bind datagram from ``addr``: ``(session, "")`` when bound (acknowledge it to
        ``session.reply_addr``), or ``(None, reason)`` with the drop reason. ``admit(session)`` is
        asked last, before anything changes: False leaves the session as it was
        (``agent-ports-exhausted``). ``client``: the client's address that a trusted forwarder's
        PROXY v2 header names when the datagram came through that forwarder's socket ``addr``."""
        reply, key = addr, (addr if client is None else forwarded_key(addr, client))
        addr = key
        parts = linechan.split_signed(data, linechan.BIND_MAGIC)
        if parts is None:
            return None, "unbound"  # not a bind datagram, from an address no session has bound
        key_id, counter, _mac = parts
        session = self._by_key.get(key_id)
        if session is None:
            return None, "bind-unknown"
        if not linechan.mac_ok(session.key, data):
            return None, "bind-forged"
        if norm_ip((client or reply)[0]) != session.client_ip:
            return None, "bind-wrong-client"
        if counter < session.counter or (counter == session.counter and addr != session.client_addr):
            return None, "bind-replayed"
        if counter == session.counter:
            return session, ""  # the same bind again from its address: its ack was lost
        holder = self.by_client.get(addr)
        if holder is not None and holder is not session:
            return None, "bind-address-in-use"
        if not admit(session):
            return None, "agent-ports-exhausted"
        if session.client_addr is not None and self.by_client.get(session.client_addr) is session:
            del self.by_client[session.client_addr]  # NAT rebinding: the old address is released
        session.client_addr = addr
        session.reply_addr = reply
        session.counter = counter
        self.by_client[addr] = session
        return session, ""


def forwarded_key(forwarder: Addr, client: Addr) -> Addr:
    """The bound key of a client reached through a forwarder's socket (never a plain address)."""
    return (forwarder, (norm_ip(client[0]), client[1]))
