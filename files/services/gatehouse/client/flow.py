"""One client session, step by step: the broker protocol with a CM, then the session channel.

hello → authenticate → get-resource-list → allocate-resource → TLS to the target and
``CONNECT <connect-tag>`` → TCP echo → UDP echo → bye. Each step is timed and reported; the report
never holds the password, a passcode, the session cookie or the connect-tag.

Multi-step authentication: the first method is the first one hello-resp lists; each
``AUTH_SUCCESSFUL_BUT_INCOMPLETE`` names the next. A password step is reported as
``authenticate``, a passcode step as ``passcode``, and a passcode asked for again right after one
(a RADIUS Access-Challenge) as ``challenge``, with the server's prompt in the step's detail. The
passcodes come from callables, read when the step is sent (a TOTP code is computed then).

Collaboration: an owner's ``run_session(..., hold=...)`` keeps its session channel open while
``hold`` runs, which may ask for invitations (:meth:`Holding.invite`, step ``invite``) and echo again;
a collaborator's :func:`join_session` logs in, redeems the code (step ``redeem-invitation``) and
runs connect, tcp-echo and udp-echo on the owner's desktop session. A report never holds a code.

Primary and secondary connections (:func:`run_failover`): an ordered list of CM URLs; the first
whose ``hello`` is answered within the per-attempt deadline serves the whole session, and the
report names it and every attempt before it. Failover happens only at ``hello``: once a CM has
started a session, a later failure is the session's, not a reason to log in elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import aiohttp

from gatehouse import linechan
from gatehouse import protocol as p

ENVELOPE = "pcoip-client"
UDP_ATTEMPTS = 3
UDP_WAIT = 1.0
MAX_AUTH_STEPS = 6
T = TypeVar("T")
PasscodeSource = Callable[[], str]


@dataclass
class Step:
    name: str
    ok: bool
    result: str
    ms: float
    detail: str = ""


@dataclass
class Attempt:
    """One CM tried at hello: its URL, the hello step's result and how long it took."""

    url: str
    ok: bool
    result: str
    ms: float
    detail: str = ""


@dataclass
class SessionReport:
    url: str
    ok: bool = False
    session_id: str = ""
    resource: str = ""
    # Every resource the user was offered (names, or ids of unnamed ones), in the broker's order.
    resources: list[str] = field(default_factory=list)
    target: str = ""
    mode: str = ""
    steps: list[Step] = field(default_factory=list)
    # With a list of CM URLs (run_failover): each CM tried, in order; the last one served.
    attempts: list[Attempt] = field(default_factory=list)

    def step(self, name: str) -> Step | None:
        return next((s for s in self.steps if s.name == name), None)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class StepFailed(Exception):
    def __init__(self, result: str, detail: str = "") -> None:
        super().__init__(detail or result)
        self.result = result
        self.detail = detail


def endpoint(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ValueError(f"expected an https://host[:port] URL, got {url!r}")
    path = parts.path if parts.path not in ("", "/") else p.PATH_BROKER
    return urlunsplit((parts.scheme, parts.netloc, path, "", ""))


class CmConnection:
    """The broker-protocol conversation with one CM, with the session cookie (or only Client-Log-Id)."""

    def __init__(
        self,
        url: str,
        ssl_context: ssl.SSLContext | None,
        *,
        use_cookie: bool = True,
        log_id: str | None = None,
        source_address: str | None = None,
        timeout: float = 30.0,
        server_name: str | None = None,
    ) -> None:
        """``server_name``: the host name to ask for (TLS SNI and Host) while connecting to the
        URL's address, as a client does whose DNS resolves a tenant's name to the CM (or VIP)."""
        self.url = endpoint(url)
        self.server_name = server_name
        self._host_header = ""
        if server_name:
            port = urlsplit(self.url).port
            self._host_header = server_name if port in (None, 443) else f"{server_name}:{port}"
        jar: aiohttp.abc.AbstractCookieJar = (
            aiohttp.CookieJar(unsafe=True) if use_cookie else aiohttp.DummyCookieJar()
        )
        connector = aiohttp.TCPConnector(
            ssl=ssl_context if ssl_context is not None else True,
            local_addr=(source_address, 0) if source_address else None,
        )
        self.http = aiohttp.ClientSession(
            connector=connector,
            cookie_jar=jar,
            timeout=aiohttp.ClientTimeout(total=timeout),
            headers={"Client-Log-Id": log_id or str(uuid.uuid4()), "User-Agent": "Gatehouse-Client/0.1"},
        )

    async def close(self) -> None:
        await self.http.close()

    async def post_raw(self, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        send = {"Content-Type": p.CONTENT_TYPE, **(headers or {})}
        if self._host_header:
            send.setdefault("Host", self._host_header)
        async with self.http.post(
            self.url, data=body, headers=send, server_hostname=self.server_name
        ) as resp:
            return resp.status, await resp.read()

    async def send(self, message: p.Message) -> p.Message:
        """One request; an ``<error-resp>`` is returned like any other answer."""
        try:
            _status, body = await self.post_raw(p.render(ENVELOPE, message))
        except TimeoutError:
            raise StepFailed("TIMEOUT", "no answer from the connection manager") from None
        except (aiohttp.ClientError, OSError, ssl.SSLError) as exc:
            raise StepFailed("CONNECTION_FAILED", f"{type(exc).__name__}: {exc}") from None
        try:
            return p.parse(body, ENVELOPE)
        except p.ProtocolError as exc:
            raise StepFailed("BAD_ANSWER", exc.message) from None


def _expect(reply: p.Message, cls: type[p.Message], ok_result: str | None) -> Any:
    if isinstance(reply, p.ErrorResp):
        raise StepFailed(reply.result_id, reply.result_str)
    if not isinstance(reply, cls):
        raise StepFailed("BAD_ANSWER", f"unexpected <{reply.tag}>")
    result = getattr(reply, "result_id", None)
    if ok_result is not None and result != ok_result:
        raise StepFailed(result or "FAILED", getattr(reply, "result_str", ""))
    return reply


def choose_resource(resources: list[p.Resource], wanted: str | None) -> p.Resource:
    if not resources:
        raise StepFailed("NO_RESOURCES", "the user is entitled to no resource")
    if not wanted:
        return resources[0]
    for resource in resources:
        if wanted in (resource.name, resource.resource_id):
            return resource
    raise StepFailed("NO_SUCH_RESOURCE", f"no resource named {wanted!r}")


async def _tcp_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, size: int) -> None:
    payload = os.urandom(size)

    async def send() -> None:
        for offset in range(0, size, 16384):
            writer.write(payload[offset : offset + 16384])
            await writer.drain()

    async def receive() -> bytes:
        return await reader.readexactly(size)

    _sent, echoed = await asyncio.gather(send(), receive())
    if echoed != payload:
        raise StepFailed("MISMATCH", "the echoed bytes differ from the sent bytes")


class _UdpEcho(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes] = asyncio.Queue()
        self.error: Exception | None = None

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.queue.put_nowait(data)

    def error_received(self, exc: Exception) -> None:
        self.error = exc


async def _exchange(
    transport: asyncio.DatagramTransport, proto: _UdpEcho, datagram: bytes, answers: Callable[[bytes], bool]
) -> bool:
    """Send ``datagram`` until a datagram that ``answers`` it arrives: UDP_ATTEMPTS tries of UDP_WAIT."""
    for _attempt in range(UDP_ATTEMPTS):
        transport.sendto(datagram)
        try:
            async with asyncio.timeout(UDP_WAIT):
                while not answers(await proto.queue.get()):
                    pass
            return True
        except TimeoutError:
            continue
    return False


def _mac_address() -> str:
    """This host's MAC address for the agent's client-mac, or "" when there is no real one."""
    node = uuid.getnode()
    if node >> 40 & 1:  # the multicast bit: uuid made the number up
        return ""
    return ":".join(f"{node >> shift & 0xFF:02x}" for shift in range(40, -8, -8))


async def _udp_bind(
    transport: asyncio.DatagramTransport, proto: _UdpEcho, connect_tag: str, counter: int = 1
) -> None:
    """Bind our UDP address to the session (docs/architecture.md, "UDP"): send the bind datagram
    until the SG acknowledges it. An agent reached directly echoes it instead: nothing to bind.
    Each new address of the session (a new UDP socket) binds with a higher ``counter``."""
    key, key_id = linechan.udp_bind_key(connect_tag)
    bind = linechan.bind_datagram(key, key_id, counter)

    def acknowledges(data: bytes) -> bool:
        if data == bind:
            return True
        ack = linechan.split_signed(data, linechan.ACK_MAGIC)
        return ack is not None and ack[:2] == (key_id, counter) and linechan.mac_ok(key, data)

    if not await _exchange(transport, proto, bind, acknowledges):
        raise StepFailed("NO_BIND_ACK", "the UDP bind datagram was not acknowledged")


async def _udp_echo(
    host: str, port: int, local_ip: str, count: int, connect_tag: str, counter: int = 1
) -> int:
    """Bind, then send ``count`` datagrams from our TCP source IP; each must come back unchanged."""
    loop = asyncio.get_running_loop()
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    transport, proto = await loop.create_datagram_endpoint(
        _UdpEcho, local_addr=(local_ip, 0), remote_addr=(host, port), family=family
    )
    try:
        await _udp_bind(transport, proto, connect_tag, counter)
        for seq in range(count):
            payload = seq.to_bytes(4, "big") + os.urandom(60)
            if not await _exchange(transport, proto, payload, payload.__eq__):
                raise StepFailed("NO_ECHO", f"datagram {seq + 1} of {count} got no echo")
        return count
    finally:
        transport.close()


async def _logged_in(
    cm: CmConnection,
    report: SessionReport,
    hello_resp: p.HelloResp | None,
    username: str,
    password: str,
    domain: str,
    passcode: PasscodeSource | None,
    challenge_passcode: PasscodeSource | None,
) -> bool:
    """Whether the user is logged in: authenticate after an answered hello (none sent without one)."""
    return hello_resp is not None and await authenticate(
        cm, report, hello_resp.methods, username, password, domain, passcode, challenge_passcode
    )


async def _step(
    report: SessionReport, name: str, action: Callable[[], Awaitable[tuple[T, str, str]]]
) -> tuple[bool, T | None]:
    """Run and record one step: its result and time; a StepFailed is a failed step, not an error."""
    started = time.monotonic()
    try:
        value, result, detail = await action()
    except StepFailed as exc:
        report.steps.append(Step(name, False, exc.result, _ms(started), exc.detail))
        return False, None
    report.steps.append(Step(name, True, result, _ms(started), detail))
    return True, value


def _ms(started: float) -> float:
    return round((time.monotonic() - started) * 1000, 1)


async def authenticate(
    cm: CmConnection,
    report: SessionReport,
    methods: list[str],
    username: str,
    password: str,
    domain: str,
    passcode: PasscodeSource | None,
    challenge_passcode: PasscodeSource | None,
) -> bool:
    """Every step the broker asks for, from the first method of hello-resp; True at the end."""

    async def auth_step(method: str, challenged: bool) -> tuple[p.AuthenticateResp, str, str]:
        if method == p.AUTH_PASSCODE:
            source = challenge_passcode if challenged else passcode
            if source is None:
                wanted = (
                    "--challenge-passcode-env"
                    if challenged
                    else "--passcode-env, --passcode-file or --totp-secret-file"
                )
                raise StepFailed("NO_PASSCODE", f"the broker asks for a passcode: give {wanted}")
            request = p.Authenticate(username, "", domain, p.METHOD_PASSCODE, source())
        else:
            request = p.Authenticate(username, password, domain)
        reply = _expect(await cm.send(request), p.AuthenticateResp, None)
        if reply.result_id == p.AUTH_INCOMPLETE:
            return reply, p.AUTH_INCOMPLETE, reply.result_str
        if reply.result_id != p.AUTH_OK:
            raise StepFailed(reply.result_id or "FAILED", reply.result_str)
        return reply, p.AUTH_OK, ""

    method = next((m for m in methods if m in p.AUTH_METHODS), p.AUTH_PASSWORD)
    challenged = False
    for _attempt in range(MAX_AUTH_STEPS):
        name = "authenticate" if method == p.AUTH_PASSWORD else "challenge" if challenged else "passcode"

        async def action(m: str = method, c: bool = challenged) -> tuple[p.AuthenticateResp, str, str]:
            return await auth_step(m, c)

        ok, reply = await _step(report, name, action)
        if not ok or reply is None:
            return False
        if reply.result_id == p.AUTH_OK:
            return True
        following = next(iter(reply.next_methods), "")
        if following not in p.AUTH_METHODS:
            report.steps.append(Step(name, False, "BAD_ANSWER", 0.0, "no known next authentication method"))
            return False
        challenged = following == p.AUTH_PASSCODE and method == p.AUTH_PASSCODE
        method = following
    report.steps.append(Step("authenticate", False, "TOO_MANY_STEPS", 0.0, f"more than {MAX_AUTH_STEPS}"))
    return False


async def _hello(cm: CmConnection, deadline: float | None = None) -> tuple[p.HelloResp, str, str]:
    """hello, within ``deadline`` seconds when given (the per-attempt deadline of run_failover)."""
    info = p.ClientInfo(hostname=socket.gethostname(), mac_address=_mac_address())
    try:
        async with asyncio.timeout(deadline):
            answer = await cm.send(p.Hello(client_info=info))
    except TimeoutError:
        raise StepFailed("TIMEOUT", "no answer from the connection manager") from None
    reply = _expect(answer, p.HelloResp, None)
    return reply, "OK", ""


async def _bye(cm: CmConnection) -> tuple[None, str, str]:
    _expect(await cm.send(p.Bye()), p.ByeResp, None)
    return None, "OK", ""


async def run_session(
    url: str,
    username: str,
    password: str,
    *,
    domain: str = "",
    resource: str | None = None,
    ssl_context: ssl.SSLContext | None = None,
    tcp_bytes: int = 65536,
    udp_datagrams: int = 3,
    source_address: str | None = None,
    use_cookie: bool = True,
    log_id: str | None = None,
    prefer_ipv6: bool = False,
    step_timeout: float = 30.0,
    connect_to: tuple[str, int] | None = None,
    connect: bool = True,
    passcode: PasscodeSource | None = None,
    challenge_passcode: PasscodeSource | None = None,
    hold: Callable[[Holding], Awaitable[None]] | None = None,
    hello_timeout: float | None = None,
    server_name: str | None = None,
) -> SessionReport:
    """Run the whole session; never raises for a failed step (it is in the report).

    ``hello_timeout`` bounds the hello step (the per-attempt deadline of :func:`run_failover`);
    by default it has ``step_timeout`` like every step.

    ``hold`` runs after udp-echo with the session channel still open (the owner's side of
    collaboration: :meth:`Holding.invite`); the channel closes and bye follows when it returns.

    ``passcode`` gives the passcode step's code, ``challenge_passcode`` the answer to a RADIUS
    challenge; a step the broker asks for without its source fails as NO_PASSCODE.

    ``connect=False`` stops after allocate-resource (and says bye): the broker-protocol part only.

    ``connect_to`` replaces the target address (e.g. to reach an SG that advertises an external
    address through a local port); the TLS name still comes from the target.

    ``server_name`` is the CM's host name to ask for (SNI and Host) while connecting to ``url``'s
    address: a tenant's name (docs/tenants.md).
    """
    report = SessionReport(url=url)
    cm = CmConnection(
        url,
        ssl_context,
        use_cookie=use_cookie,
        log_id=log_id,
        source_address=source_address,
        timeout=step_timeout,
        server_name=server_name,
    )

    async def resource_list() -> tuple[p.Resource, str, str]:
        reply = _expect(await cm.send(p.GetResourceList()), p.GetResourceListResp, p.LIST_OK)
        report.resources = [r.name or r.resource_id for r in reply.resources]
        chosen = choose_resource(reply.resources, resource)
        report.resource = chosen.name or chosen.resource_id
        return chosen, p.LIST_OK, f"{len(reply.resources)} resource(s)"

    async def allocate() -> tuple[p.Target, str, str]:
        request = p.AllocateResource(chosen.resource_id, chosen.resource_type)
        reply = _expect(await cm.send(request), p.AllocateResourceResp, p.ALLOC_OK)
        if reply.target is None:
            raise StepFailed("NO_TARGET", "allocate-resource-resp holds no target")
        report.session_id = reply.target.session_id
        report.target = f"{_host(reply.target, prefer_ipv6)}:{reply.target.port}"
        return reply.target, p.ALLOC_OK, report.target

    said_hello = False
    try:
        said_hello, hello_resp = await _step(report, "hello", lambda: _hello(cm, hello_timeout))
        if not await _logged_in(
            cm, report, hello_resp, username, password, domain, passcode, challenge_passcode
        ):
            return report
        ok, found = await _step(report, "get-resource-list", resource_list)
        if not ok or found is None:
            return report
        chosen = found
        ok, target = await _step(report, "allocate-resource", allocate)
        if not ok or target is None or not connect:
            return report
        await session_channel(
            report,
            target,
            _host(target, prefer_ipv6),
            ssl_context,
            tcp_bytes,
            udp_datagrams,
            source_address,
            step_timeout,
            connect_to,
            (lambda channel: hold(Holding(cm, channel, report))) if hold else None,
        )
    finally:
        if said_hello:
            await _step(report, "bye", lambda: _bye(cm))
        await cm.close()
        done = report.step("tcp-echo" if connect else "allocate-resource") is not None
        report.ok = done and all(s.ok for s in report.steps)
    return report


async def run_failover(
    urls: list[str],
    username: str,
    password: str,
    *args: Any,
    attempt_timeout: float = 10.0,
    session: Callable[..., Awaitable[SessionReport]] = run_session,
    **options: Any,
) -> SessionReport:
    """The session at the first CM of ``urls`` (primary, then the secondaries in order) that
    answers hello within ``attempt_timeout`` seconds: ``session`` (:func:`run_session`, or
    :func:`join_session` with the code in ``args``) with ``args`` and ``options``.

    The report is the serving CM's (or, when none answered, the last one's), with ``attempts``
    listing every CM tried. Any failed hello moves on: refused connection, timeout, TLS failure,
    an answer that is not a hello-resp (a load balancer with no backend left, a busy CM).
    """
    if not urls:
        raise ValueError("no connection manager URL")
    attempts: list[Attempt] = []
    report = SessionReport(url=urls[0])
    for url in urls:
        report = await session(url, username, password, *args, hello_timeout=attempt_timeout, **options)
        hello = report.step("hello")
        if hello is None:  # not reached: a session always records hello
            break
        attempts.append(Attempt(url, hello.ok, hello.result, hello.ms, hello.detail))
        if hello.ok:
            break
    report.attempts = attempts
    return report


def _host(target: p.Target, prefer_ipv6: bool) -> str:
    return target.ipv6_address if prefer_ipv6 and target.ipv6_address else target.ip_address


class OpenChannel:
    """A session channel that is up (``CONNECT`` answered ``200 OK``): echo on it, then close it."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        target: p.Target,
        address: tuple[str, int],
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.target = target
        self.address = address
        self.udp_binds = 0  # each udp_echo binds a new socket: its bind counter is one higher

    async def tcp_echo(self, size: int) -> None:
        await _tcp_echo(self.reader, self.writer, size)

    async def udp_echo(self, count: int) -> int:
        # From the TCP channel's source address: the SG relays datagrams only for that address.
        local_ip = self.writer.get_extra_info("sockname")[0]
        self.udp_binds += 1
        return await _udp_echo(
            self.address[0], self.address[1], local_ip, count, self.target.connect_tag, self.udp_binds
        )

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await self.writer.wait_closed()


async def open_channel(
    target: p.Target,
    host: str,
    ssl_context: ssl.SSLContext | None,
    source_address: str | None,
    step_timeout: float,
    connect_to: tuple[str, int] | None = None,
) -> OpenChannel:
    """TLS to the target and ``CONNECT <connect-tag>``; raises StepFailed unless ``200 OK``."""
    address = connect_to or (host, target.port)
    where = f"{address[0]}:{address[1]}"
    ctx = ssl_context or ssl.create_default_context()
    try:
        async with asyncio.timeout(step_timeout):
            reader, writer = await asyncio.open_connection(
                address[0],
                address[1],
                ssl=ctx,
                server_hostname=target.sni or target.hostname or host,
                local_addr=(source_address, 0) if source_address else None,
            )
            writer.write(linechan.connect_line(target.connect_tag))
            await writer.drain()
            line = await reader.readline()
    except TimeoutError:
        raise StepFailed("TIMEOUT", f"no answer from {where}") from None
    except (OSError, ssl.SSLError) as exc:
        raise StepFailed("CONNECTION_FAILED", f"{type(exc).__name__}: {exc}") from None
    if line != linechan.OK:
        writer.close()
        answer = line.decode("ascii", "replace").strip() or "CLOSED"
        raise StepFailed(answer, "the session channel was refused")
    return OpenChannel(reader, writer, target, address)


async def echo_steps(
    report: SessionReport,
    channel: OpenChannel,
    tcp_bytes: int,
    udp_datagrams: int,
    step_timeout: float,
    suffix: str = "",
) -> bool:
    """The tcp-echo and udp-echo steps (named with ``suffix``) on an open channel; True when both pass."""

    async def tcp_echo() -> tuple[None, str, str]:
        try:
            async with asyncio.timeout(step_timeout):
                await channel.tcp_echo(tcp_bytes)
        except TimeoutError:
            raise StepFailed("TIMEOUT", "the echo did not come back") from None
        except (OSError, asyncio.IncompleteReadError) as exc:
            raise StepFailed("CONNECTION_LOST", type(exc).__name__) from None
        return None, "OK", f"{tcp_bytes} bytes"

    async def udp_echo() -> tuple[None, str, str]:
        try:
            count = await channel.udp_echo(udp_datagrams)
        except OSError as exc:
            raise StepFailed("UDP_ERROR", f"{type(exc).__name__}: {exc}") from None
        return None, "OK", f"{count} datagrams"

    # The TCP channel stays up while datagrams flow.
    if not (await _step(report, "tcp-echo" + suffix, tcp_echo))[0]:
        return False
    if udp_datagrams > 0:
        return (await _step(report, "udp-echo" + suffix, udp_echo))[0]
    return True


async def session_channel(
    report: SessionReport,
    target: p.Target,
    host: str,
    ssl_context: ssl.SSLContext | None,
    tcp_bytes: int,
    udp_datagrams: int,
    source_address: str | None,
    step_timeout: float,
    connect_to: tuple[str, int] | None = None,
    hold: Callable[[OpenChannel], Awaitable[None]] | None = None,
) -> None:
    """connect (TLS + ``CONNECT <connect-tag>``), tcp-echo and udp-echo steps on the target; then
    ``hold``, when given and the echoes passed, with the channel still open."""
    where = "{}:{}".format(*(connect_to or (host, target.port)))

    async def connect() -> tuple[OpenChannel, str, str]:
        opened = await open_channel(target, host, ssl_context, source_address, step_timeout, connect_to)
        return opened, "200 OK", where

    ok, channel = await _step(report, "connect", connect)
    if not ok or channel is None:
        return
    try:
        if await echo_steps(report, channel, tcp_bytes, udp_datagrams, step_timeout) and hold:
            await hold(channel)
    finally:
        await channel.close()


class Holding:
    """The owner's session while ``run_session``'s ``hold`` runs: its CM conversation and its open
    channel. Steps it takes go into the owner's report."""

    def __init__(self, cm: CmConnection, channel: OpenChannel, report: SessionReport) -> None:
        self.cm = cm
        self.channel = channel
        self.report = report

    async def invite(self) -> str | None:
        """One ``invite`` step: a collaboration invitation's code, or None when refused (the step
        holds the result-id). The code is a bearer secret: it is not put in the report."""

        async def action() -> tuple[str, str, str]:
            reply = _expect(await self.cm.send(p.CreateInvitation()), p.CreateInvitationResp, p.INVITE_OK)
            if not reply.invitation_code:
                raise StepFailed("BAD_ANSWER", "create-invitation-resp holds no code")
            where = f" at {reply.hostname}" if reply.hostname else ""
            return reply.invitation_code, p.INVITE_OK, f"valid {reply.expires_in} s{where}"

        _ok, code = await _step(self.report, "invite", action)
        return code

    async def echo(self, tcp_bytes: int, udp_datagrams: int, step_timeout: float, suffix: str) -> bool:
        """Echo again on the owner's channel (steps ``tcp-echo<suffix>``, ``udp-echo<suffix>``)."""
        return await echo_steps(self.report, self.channel, tcp_bytes, udp_datagrams, step_timeout, suffix)


async def join_session(
    url: str,
    username: str,
    password: str,
    invitation_code: str,
    *,
    domain: str = "",
    ssl_context: ssl.SSLContext | None = None,
    tcp_bytes: int = 65536,
    udp_datagrams: int = 3,
    source_address: str | None = None,
    prefer_ipv6: bool = False,
    step_timeout: float = 30.0,
    connect_to: tuple[str, int] | None = None,
    connect: bool = True,
    passcode: PasscodeSource | None = None,
    challenge_passcode: PasscodeSource | None = None,
    hold: Callable[[OpenChannel], Awaitable[None]] | None = None,
    hello_timeout: float | None = None,
    server_name: str | None = None,
) -> SessionReport:
    """A collaborator's session: hello, authenticate (any user), redeem-invitation with the owner's
    code, then connect, tcp-echo, udp-echo on the owner's desktop session, and bye. Never raises
    for a failed step. ``report.session_id`` is the collaborator's own session id; ``hello_timeout``
    as for :func:`run_session`."""
    report = SessionReport(url=url)
    cm = CmConnection(
        url, ssl_context, source_address=source_address, timeout=step_timeout, server_name=server_name
    )

    async def redeem() -> tuple[p.Target, str, str]:
        request = p.RedeemInvitation(invitation_code)
        reply = _expect(await cm.send(request), p.RedeemInvitationResp, p.JOIN_OK)
        if reply.target is None:
            raise StepFailed("NO_TARGET", "redeem-invitation-resp holds no target")
        report.session_id = reply.target.session_id
        report.target = f"{_host(reply.target, prefer_ipv6)}:{reply.target.port}"
        return reply.target, p.JOIN_OK, report.target

    said_hello = False
    try:
        said_hello, hello_resp = await _step(report, "hello", lambda: _hello(cm, hello_timeout))
        if not await _logged_in(
            cm, report, hello_resp, username, password, domain, passcode, challenge_passcode
        ):
            return report
        ok, target = await _step(report, "redeem-invitation", redeem)
        if not ok or target is None or not connect:
            return report
        await session_channel(
            report,
            target,
            _host(target, prefer_ipv6),
            ssl_context,
            tcp_bytes,
            udp_datagrams,
            source_address,
            step_timeout,
            connect_to,
            hold,
        )
    finally:
        if said_hello:
            await _step(report, "bye", lambda: _bye(cm))
        await cm.close()
        done = report.step("tcp-echo" if connect else "redeem-invitation") is not None
        report.ok = done and all(s.ok for s in report.steps)
    return report
