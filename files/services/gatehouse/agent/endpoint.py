"""The agent's session endpoint: TLS ``CONNECT <session-tag>`` then echo; UDP echo for live peers.

A session is the owner's channel (its tag came from launch-session) and the collaborators'
channels (tags from join-session for that session id). Collaborators are admitted only while an
owner channel of the session is up, and their channels are closed when the last one goes.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from typing import Any, cast

from gatehouse.agent.tags import TagStore
from gatehouse.linechan import FORBIDDEN, MAX_LINE, OK, LineError, parse_connect_line
from gatehouse.logs import SessionLogger

log = logging.getLogger("gatehouse.agent.session")
LINE_TIMEOUT = 10.0
HIGH_WATER = 64 * 1024


class Endpoint:
    """Shared state: the tag store, the session channels that are up, counters."""

    def __init__(self, tags: TagStore) -> None:
        self.tags = tags
        self.channels: set[_Channel] = set()
        self.peers: Counter[str] = Counter()  # peer IP -> open channels (gates UDP)
        self.owners: Counter[str] = Counter()  # session id -> owner channels up
        self.refused = 0
        self.udp_echoed = 0
        self.udp_dropped = 0
        self.udp: asyncio.DatagramTransport | None = None

    @property
    def active(self) -> int:
        return len(self.channels)

    def running(self, session_id: str) -> bool:
        """An owner channel of ``session_id`` is up: collaborators may join it."""
        return self.owners[session_id] > 0

    def collaborators(self, session_id: str) -> list[_Channel]:
        return [c for c in self.channels if c.collaborator and c.session_id == session_id]

    def protocol(self) -> _Channel:
        return _Channel(self)

    def close_all(self) -> None:
        for channel in list(self.channels):
            if channel.transport:
                channel.transport.close()
        if self.udp:
            self.udp.close()

    async def start_udp(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        self.udp, _protocol = await loop.create_datagram_endpoint(
            lambda: _Datagrams(self), local_addr=(host, port)
        )


class _Channel(asyncio.Protocol):
    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.echoing = False
        self.peer_ip = ""
        self.session_id = ""
        self.collaborator = False
        self.slog: SessionLogger | None = None
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's SSL transport is duck-typed
        transport = self.transport
        self.peer_ip = (transport.get_extra_info("peername") or ("", 0))[0]
        transport.set_write_buffer_limits(HIGH_WATER)
        self.timer = asyncio.get_running_loop().call_later(LINE_TIMEOUT, self._refuse, "timeout")

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        if self.echoing:
            self.transport.write(data)
            return
        self.buf += data
        end = self.buf.find(b"\n")
        if end < 0:
            if len(self.buf) > MAX_LINE:
                self._refuse("malformed")
            return
        line, rest = self.buf[: end + 1], self.buf[end + 1 :]
        self.buf = b""
        if self.timer:
            self.timer.cancel()
        try:
            tag = parse_connect_line(line)
        except LineError:
            self._refuse("malformed")
            return
        issued = self.endpoint.tags.consume(tag)
        if issued is None:
            self._refuse("unknown, used or expired session-tag")
            return
        if issued.collaborator and not self.endpoint.running(issued.session_id):
            self._refuse("the session the collaborator was invited to has ended")
            return
        self.echoing = True
        self.session_id = issued.session_id
        self.collaborator = issued.collaborator
        self.endpoint.channels.add(self)
        self.endpoint.peers[self.peer_ip] += 1
        if not self.collaborator:
            self.endpoint.owners[self.session_id] += 1
        self.slog = SessionLogger(log, issued.session_id)
        self.slog.info("session channel up", extra={"peer": self.peer_ip, "collaborator": self.collaborator})
        self.transport.write(OK)
        if rest:
            self.transport.write(rest)

    def _refuse(self, reason: str) -> None:
        if self.echoing or self.transport is None or self.transport.is_closing():
            return
        self.endpoint.refused += 1
        log.warning("session channel refused: %s", reason, extra={"peer": self.peer_ip})
        self.transport.write(FORBIDDEN)
        self.transport.close()

    def eof_received(self) -> bool | None:
        return False

    # Echo: stop reading what we cannot write back.
    def pause_writing(self) -> None:
        if self.transport:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport:
            self.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer:
            self.timer.cancel()
        if self.echoing:
            self.echoing = False
            self.endpoint.channels.discard(self)
            self.endpoint.peers[self.peer_ip] -= 1
            if self.endpoint.peers[self.peer_ip] <= 0:
                del self.endpoint.peers[self.peer_ip]
            if self.slog:
                self.slog.info("session channel closed", extra={"collaborator": self.collaborator})
            if not self.collaborator:
                self.endpoint.owners[self.session_id] -= 1
                if self.endpoint.owners[self.session_id] <= 0:
                    del self.endpoint.owners[self.session_id]
                    # The owner left: the session ends for its collaborators too.
                    for channel in self.endpoint.collaborators(self.session_id):
                        if channel.transport:
                            channel.transport.close()


class _Datagrams(asyncio.DatagramProtocol):
    """Echo to the sender, for senders whose IP has a session channel up.

    Gated by IP only: an SG sends each session's datagrams from its own source port (its
    AgentUdpSourcePort range), from the address of its TCP connection to this agent.
    """

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        endpoint = self.endpoint
        if addr[0] in endpoint.peers and endpoint.udp is not None:
            endpoint.udp.sendto(data, addr)
            endpoint.udp_echoed += 1
        else:
            endpoint.udp_dropped += 1
