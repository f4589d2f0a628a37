"""A relay in front of a real server that can hold its replies back: network latency, or a
server that accepts and then never answers, without touching the server.

The server stays real (slapd, FreeRADIUS): the relay passes every TCP chunk or UDP datagram on
unchanged (TLS runs end to end through it), and holds what the server sends back ``delay``
seconds, in order; :meth:`Relay.stall` holds it back until :meth:`Relay.resume`. It listens on
127.0.0.1, or on another address of this host (``host``), and runs on its own thread and event
loop, so synchronous and asynchronous tests use it alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Coroutine, Iterator
from typing import Any, cast

from services import free_port


class Relay:
    """``host``:``port`` relays to ``target``; replies wait ``delay`` seconds (and a stall)."""

    def __init__(
        self, target: tuple[str, int], delay: float, *, udp: bool = False, host: str = "127.0.0.1"
    ) -> None:
        self.target = target
        self.delay = delay
        self.udp = udp
        self.host = host
        self.port = free_port()
        self.replies = 0  # chunks or datagrams passed back to clients
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="relay", daemon=True)
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._closers: list[Any] = []
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def stall(self) -> None:
        """Hold every reply from now on (the connections stay open)."""
        self._loop.call_soon_threadsafe(self._flowing.clear)

    def resume(self) -> None:
        """Let the held replies go, in order, and the later ones after their delay."""
        self._loop.call_soon_threadsafe(self._flowing.set)

    def start(self) -> Relay:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def close(self) -> None:
        async def stop() -> None:
            for item in self._closers:
                with contextlib.suppress(Exception):
                    item.close()
            # The relay's own tasks and the connection handlers start_server made.
            others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in others:
                task.cancel()
            await asyncio.gather(*others, return_exceptions=True)

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _start(self) -> None:
        if self.udp:
            transport, _proto = await self._loop.create_datagram_endpoint(
                lambda: _UdpFront(self), local_addr=(self.host, self.port)
            )
            self._closers.append(transport)
        else:
            server = await asyncio.start_server(self._tcp, self.host, self.port)
            self._closers.append(server)

    async def _hold(self, arrived: float) -> None:
        """Until ``delay`` seconds after ``arrived``, and for as long as a stall lasts."""
        await asyncio.sleep(max(0.0, arrived + self.delay - self._loop.time()))
        await self._flowing.wait()

    async def _tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self._closers.extend((writer, up_writer))

        async def upstream() -> None:
            while data := await reader.read(65536):
                up_writer.write(data)
                await up_writer.drain()
            up_writer.write_eof()

        async def downstream() -> None:
            # Each chunk keeps its own arrival time: latency, not a slower link.
            queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

            async def forward() -> None:
                while True:
                    arrived, data = await queue.get()
                    await self._hold(arrived)
                    if not data:
                        writer.close()
                        return
                    writer.write(data)
                    self.replies += 1
                    await writer.drain()

            sender = asyncio.ensure_future(forward())
            while data := await up_reader.read(65536):
                queue.put_nowait((self._loop.time(), data))
            queue.put_nowait((self._loop.time(), b""))
            await sender

        with contextlib.suppress(OSError, asyncio.CancelledError):
            await asyncio.gather(upstream(), downstream())
        for w in (writer, up_writer):
            w.close()


class _UdpFront(asyncio.DatagramProtocol):
    """The relay's listening socket: one upstream socket per client address."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.transport: asyncio.DatagramTransport | None = None
        self.upstreams: dict[tuple[str, int], asyncio.DatagramTransport] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.relay._spawn(self._forward(data, addr))

    async def _forward(self, data: bytes, addr: tuple[str, int]) -> None:
        upstream = self.upstreams.get(addr)
        if upstream is None:
            loop = asyncio.get_running_loop()
            upstream, _proto = await loop.create_datagram_endpoint(
                lambda: _UdpBack(self, addr), remote_addr=self.relay.target
            )
            self.upstreams[addr] = upstream
            self.relay._closers.append(upstream)
        upstream.sendto(data)


class _UdpBack(asyncio.DatagramProtocol):
    def __init__(self, front: _UdpFront, client: tuple[str, int]) -> None:
        self.front = front
        self.client = client

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.front.relay._spawn(self._back(data, self.front.relay._loop.time()))

    async def _back(self, data: bytes, arrived: float) -> None:
        await self.front.relay._hold(arrived)
        if self.front.transport is not None:
            self.front.transport.sendto(data, self.client)
            self.front.relay.replies += 1


@contextlib.contextmanager
def relay(
    target: tuple[str, int], delay: float = 0.0, *, udp: bool = False, host: str = "127.0.0.1"
) -> Iterator[Relay]:
    r = Relay(target, delay, udp=udp, host=host).start()
    try:
        yield r
    finally:
        r.close()
