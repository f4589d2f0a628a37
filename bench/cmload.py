"""Load generator for the CM benchmarks (aiohttp on uvloop; run several for more clients).

Reads JSON on stdin: url, clients, mode, rounds, envelope, start_at (time.time() at which every
generator process starts), resource, logins. Modes:

- ``keepalive``: each client keeps one TLS connection (its own connector and cookie jar), says
  hello and authenticates (arrivals spread evenly over ``ramp_seconds``), waits until every
  client of this process has, then sends ``rounds`` get-resource-list requests, each after a
  random think time around ``think_seconds``. Latency per request.
- ``establish``: each client opens its own connection and runs hello, authenticate,
  get-resource-list, allocate-resource, bye. Latency = hello sent → allocate-resource answered.
- ``handshake``: ``clients`` concurrent loops open a TLS connection, complete the handshake and
  close, for ``seconds``; counts full handshakes (no session resumption).
- ``logins``: ``clients`` concurrent loops share the list ``logins`` (``[user, password, domain]``
  each); a loop takes the next one, opens its own connection and runs hello, authenticate, bye.
  Latency = hello sent → authenticate answered; a refused login is an error.

Prints JSON: latencies (ms), error count and the first few errors, CPU seconds of this process.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import ssl
import sys
import time
from collections import Counter
from typing import Any

import aiohttp

from gatehouse import protocol as p
from gatehouse.web import install_uvloop

TIMEOUT = aiohttp.ClientTimeout(total=60)


class Failure(Exception):
    pass


def _ctx() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


async def _send(http: aiohttp.ClientSession, url: str, envelope: str, msg: p.Message) -> p.Message:
    async with http.post(url, data=p.render(envelope, msg), headers={"Content-Type": p.CONTENT_TYPE}) as resp:
        body = await resp.read()
        if resp.status != 200:
            raise Failure(f"HTTP {resp.status}")
    reply = p.parse(body, envelope)
    if isinstance(reply, p.ErrorResp):
        raise Failure(f"error-resp {reply.result_id}")
    return reply


def _client(ctx: ssl.SSLContext) -> aiohttp.ClientSession:
    # keepalive_timeout: aiohttp's client closes a pooled connection idle for 15 s by default.
    connector = aiohttp.TCPConnector(ssl=ctx, limit=1, keepalive_timeout=600, enable_cleanup_closed=True)
    return aiohttp.ClientSession(
        connector=connector, cookie_jar=aiohttp.CookieJar(unsafe=True), timeout=TIMEOUT
    )


async def _login(
    http: aiohttp.ClientSession,
    url: str,
    env: str,
    username: str = "bench",
    password: str = "bench-pw",
    domain: str = "CORP",
) -> None:
    await _send(http, url, env, p.Hello(client_info=p.ClientInfo(hostname="bench")))
    reply = await _send(http, url, env, p.Authenticate(username=username, password=password, domain=domain))
    if not isinstance(reply, p.AuthenticateResp) or reply.result_id != p.AUTH_OK:
        raise Failure("authenticate refused")


async def keepalive(job: dict[str, Any], lat: list[float], errors: Counter[str]) -> None:
    url, env, ctx = job["url"], job["envelope"], _ctx()
    logged_in = asyncio.Event()
    pending = [job["clients"]]

    ramp = job.get("ramp_seconds", 0.0) / max(1, job["clients"])

    async def one(k: int) -> None:
        await asyncio.sleep(k * ramp)  # arrivals spread over the ramp, not one thundering herd
        async with _client(ctx) as http:
            try:
                await _login(http, url, env)
            except Exception as exc:
                errors[f"login: {type(exc).__name__}: {exc}"[:120]] += 1
                return
            finally:
                pending[0] -= 1
                if pending[0] == 0:
                    logged_in.set()
            # Like a polling client, keep the connection in use while the others log in (the
            # server closes connections idle for its keep-alive timeout); not measured.
            while not logged_in.is_set():
                try:
                    await asyncio.wait_for(logged_in.wait(), 10)
                except TimeoutError:
                    try:
                        await _send(http, url, env, p.GetResourceList())
                    except Exception as exc:
                        errors[f"poll: {type(exc).__name__}: {exc}"[:120]] += 1
            think = job.get("think_seconds", 0.0)
            for _ in range(job["rounds"]):
                # Spread like real clients (random think time), not one burst of every client at once.
                await asyncio.sleep(random.uniform(0.5 * think, 1.5 * think))
                started = time.perf_counter()
                try:
                    reply = await _send(http, url, env, p.GetResourceList())
                    if not isinstance(reply, p.GetResourceListResp) or not reply.resources:
                        raise Failure("no resources")
                except Exception as exc:
                    errors[f"list: {type(exc).__name__}: {exc}"[:120]] += 1
                    continue
                lat.append((time.perf_counter() - started) * 1000)
            await _send(http, url, env, p.Bye())

    await asyncio.gather(*(one(k) for k in range(job["clients"])))


async def establish(job: dict[str, Any], lat: list[float], errors: Counter[str]) -> None:
    url, env, ctx = job["url"], job["envelope"], _ctx()

    async def one() -> None:
        async with _client(ctx) as http:
            started = time.perf_counter()
            try:
                await _login(http, url, env)
                listing = await _send(http, url, env, p.GetResourceList())
                assert isinstance(listing, p.GetResourceListResp) and listing.resources
                reply = await _send(
                    http, url, env, p.AllocateResource(resource_id=listing.resources[0].resource_id)
                )
                if not isinstance(reply, p.AllocateResourceResp) or reply.result_id != p.ALLOC_OK:
                    raise Failure(f"allocate: {getattr(reply, 'result_id', reply.tag)}")
            except Exception as exc:
                errors[f"{type(exc).__name__}: {exc}"[:120]] += 1
                return
            lat.append((time.perf_counter() - started) * 1000)
            await _send(http, url, env, p.Bye())

    await asyncio.gather(*(one() for _ in range(job["clients"])))


async def handshake(job: dict[str, Any], lat: list[float], errors: Counter[str]) -> None:
    host, port = job["host"], job["port"]
    ctx = _ctx()
    ctx.options |= ssl.OP_NO_TICKET  # full handshakes only
    end = time.monotonic() + job["seconds"]
    loop = asyncio.get_running_loop()

    async def one() -> None:
        while time.monotonic() < end:
            started = time.perf_counter()
            try:
                transport, _ = await loop.create_connection(asyncio.Protocol, host, port, ssl=ctx)
            except Exception as exc:
                errors[f"{type(exc).__name__}: {exc}"[:120]] += 1
                continue
            lat.append((time.perf_counter() - started) * 1000)
            transport.abort()

    await asyncio.gather(*(one() for _ in range(job["clients"])))


async def logins(job: dict[str, Any], lat: list[float], errors: Counter[str]) -> None:
    url, env, ctx = job["url"], job["envelope"], _ctx()
    todo = iter(job["logins"])  # shared: each loop takes the next login when its last one is done

    async def loop() -> None:
        for username, password, domain in todo:
            async with _client(ctx) as http:
                started = time.perf_counter()
                try:
                    await _login(http, url, env, username, password, domain)
                except Exception as exc:
                    errors[f"login: {type(exc).__name__}: {exc}"[:120]] += 1
                    continue
                lat.append((time.perf_counter() - started) * 1000)
                try:
                    await _send(http, url, env, p.Bye())
                except Exception as exc:
                    errors[f"bye: {type(exc).__name__}: {exc}"[:120]] += 1

    await asyncio.gather(*(loop() for _ in range(job["clients"])))


async def main_async(job: dict[str, Any]) -> dict[str, Any]:
    lat: list[float] = []
    errors: Counter[str] = Counter()
    delay = job.get("start_at", 0) - time.time()
    if delay > 0:
        await asyncio.sleep(delay)
    cpu0 = os.times()
    started = time.perf_counter()
    modes = {"keepalive": keepalive, "establish": establish, "handshake": handshake, "logins": logins}
    await modes[job["mode"]](job, lat, errors)
    elapsed = time.perf_counter() - started
    cpu1 = os.times()
    return {
        "latencies_ms": [round(x, 2) for x in lat],
        "errors": sum(errors.values()),
        "error_kinds": dict(errors.most_common(5)),
        "seconds": elapsed,
        "cpu": (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system),
    }


def main() -> None:
    job = json.loads(sys.stdin.read())
    install_uvloop()
    print(json.dumps(asyncio.run(main_async(job))))


if __name__ == "__main__":
    main()
