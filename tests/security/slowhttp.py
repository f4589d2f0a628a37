"""Slow and idle connections against the aiohttp services' TLS ports, and their management metrics.

The same ``gatehouse.web`` mechanism guards the CM, the broker and the agent; these helpers attack
whichever real process a test points them at.
"""

from __future__ import annotations

import asyncio
import ssl

import aiohttp

# idle: TCP only, no TLS ClientHello; partial: TLS up, headers never finished; stalled: headers
# complete, the declared body never arrives.
MODES = ("idle", "partial", "stalled")
Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def open_slow(host: str, port: int, ctx: ssl.SSLContext, source: str, mode: str, path: str) -> Conn:
    """One hostile connection from ``source`` in ``mode`` (see MODES), left open."""
    if mode == "idle":
        return await asyncio.open_connection(host, port, local_addr=(source, 0))
    reader, writer = await asyncio.open_connection(
        host, port, ssl=ctx, server_hostname=host, local_addr=(source, 0)
    )
    head = f"POST {path} HTTP/1.1\r\nHost: localhost\r\n".encode()
    if mode == "partial":
        writer.write(head + b"Content-Type: text/xml\r\n")
    else:
        writer.write(head + b"Content-Length: 4000\r\n\r\n<?xml")
    return reader, writer


async def try_open(host: str, port: int, source: str) -> Conn | None:
    """A plain TCP connection, or None when the server reset it before connect() returned."""
    try:
        return await asyncio.open_connection(host, port, local_addr=(source, 0))
    except ConnectionResetError:
        return None


async def closed_within(reader: asyncio.StreamReader, limit: float) -> bool:
    """True when the server closes (or resets) the connection within ``limit`` seconds."""

    async def until_eof() -> None:
        while await reader.read(65536):
            pass

    try:
        await asyncio.wait_for(until_eof(), limit)
    except TimeoutError:
        return False
    except (ConnectionError, ssl.SSLError):
        return True
    return True


def close_all(conns: list[Conn | None]) -> None:
    for conn in conns:
        if conn is not None:
            conn[1].close()


async def scrape(admin_url: str) -> dict[str, float]:
    """The samples of a management listener's /metrics, by name with labels."""
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{admin_url}/metrics") as resp:
            assert resp.status == 200
            text = await resp.text()
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _sep, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def timeouts(m: dict[str, float]) -> float:
    return m.get('gatehouse_http_request_timeouts_total{listener="public"}', 0.0)


def refused(m: dict[str, float], limit: str) -> float:
    return m.get(f'gatehouse_http_connections_refused_total{{limit="{limit}",listener="public"}}', 0.0)


def open_connections(m: dict[str, float]) -> float:
    return m.get('gatehouse_http_connections_open{listener="public"}', 0.0)
