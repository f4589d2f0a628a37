"""Workers > 1: what one CM worker asks of another, over the other's Unix socket.

A client session lives in the memory of the worker that answered its hello (its cookie ends in
".<worker>", see sessions.owner_of_cookie). A request that the kernel hands to another worker (a
new connection, say) is forwarded whole to the session's worker, which answers it as if it had
arrived there; its answer goes back to the client unchanged. An invitation code names its worker
the same way ("-<worker>"): a collaborator on another worker redeems it there.

Invariants:

- Only the workers of one CM reach these calls: the sockets are in the supervisor's 0700 run
  directory, not on the network. What the receiving worker learnt of the client (its address
  after TrustedProxies, the TLS server name, the Host) travels in headers and is taken as is.
- A worker that cannot be reached has ended, and its sessions with it: the request is answered
  here as one without a session (the client logs in again), never left waiting.
- A forward waits at most ``timeout`` (the longest the owner may take: broker and agent calls).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, TypeGuard

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from gatehouse import protocol as p
from gatehouse.cm.invitations import InvitationRefused

PATH_FORWARD = "/peer/forward"
PATH_REDEEM = "/peer/redeem"
_HEADERS = {
    "ip": "Gatehouse-Client-Ip",
    "cookie": "Gatehouse-Cookie",
    "log_id": "Gatehouse-Log-Id",
    "host": "Gatehouse-Host",
    "sni": "Gatehouse-Sni",
}
# Of the owner's answer, these go back to the client.
_PASSED_ON = ("Content-Type", "Cache-Control", "Set-Cookie")


class WorkerLate(Exception):
    """The other worker runs but did not answer within the deadline (stalled or overloaded)."""


@dataclass(frozen=True)
class Call:
    """What the CM needs of one client request, wherever it arrived: on this worker's listener, or
    on another worker's and forwarded here (``connection`` is then None: the client's TLS
    connection is in the other worker)."""

    ip: str
    cookie: str | None = None
    log_id: str = ""
    host: str = ""
    sni: str = ""
    connection: object | None = None

    def headers(self) -> dict[str, str]:
        return {
            header: getattr(self, name)
            for name, header in _HEADERS.items()
            if getattr(self, name) is not None
        }

    @classmethod
    def from_headers(cls, headers: Any) -> Call:
        values = {name: headers.get(header, "") for name, header in _HEADERS.items()}
        values["cookie"] = values["cookie"] or None
        return cls(**values)


@dataclass(frozen=True)
class Forwarded:
    """The answer of a session's worker, to be sent to the client as it is."""

    status: int
    headers: CIMultiDict[str]
    body: bytes

    async def send(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(status=self.status, headers=self.headers)
        resp.enable_chunked_encoding()  # as the CM answers every request
        await resp.prepare(request)
        await resp.write(self.body)
        await resp.write_eof()
        return resp


@dataclass(frozen=True)
class Redeemed:
    """An invitation taken from its owner's book: where the owner's desktop session is."""

    agent: p.AgentInfo
    agent_session_id: str
    owner_session_id: str


class Peers:
    def __init__(self, paths: tuple[str, ...], me: int, timeout: float) -> None:
        self.paths = paths
        self.me = me
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self._http: dict[int, aiohttp.ClientSession] = {}

    def other(self, index: int | None) -> TypeGuard[int]:
        """``index`` names another worker of this CM."""
        return index is not None and index != self.me and 0 <= index < len(self.paths)

    def _client(self, index: int) -> aiohttp.ClientSession:
        http = self._http.get(index)
        if http is None or http.closed:
            connector = aiohttp.UnixConnector(path=self.paths[index], limit=0)
            http = aiohttp.ClientSession(
                connector=connector, timeout=self.timeout, cookie_jar=aiohttp.DummyCookieJar()
            )
            self._http[index] = http
        return http

    async def forward(self, index: int, call: Call, body: bytes) -> Forwarded | None:
        """Worker ``index``'s answer to the client's request, or None when it cannot be reached
        (it has ended); raises WorkerLate."""
        try:
            async with self._client(index).post(
                f"http://worker{PATH_FORWARD}", data=body, headers=call.headers()
            ) as resp:
                answer = await resp.read()
                headers: CIMultiDict[str] = CIMultiDict()
                for name in _PASSED_ON:
                    for value in resp.headers.getall(name, []):
                        headers.add(name, value)
                return Forwarded(resp.status, headers, answer)
        except TimeoutError:  # caught first: aiohttp's timeouts are connection errors too
            raise WorkerLate() from None
        except (OSError, aiohttp.ClientConnectionError, aiohttp.ClientPayloadError):
            return None

    async def redeem(self, index: int, code: str, tenant: str) -> Redeemed:
        """Take invitation ``code`` from worker ``index``'s book; raises InvitationRefused or WorkerLate."""
        try:
            async with self._client(index).post(
                f"http://worker{PATH_REDEEM}", json={"code": code, "tenant": tenant}
            ) as resp:
                answer = await resp.json()
        except TimeoutError:  # caught first: aiohttp's timeouts are connection errors too
            raise WorkerLate() from None
        except (OSError, aiohttp.ClientConnectionError):
            # The owner's worker has ended, and its sessions: there is nothing left to join.
            raise InvitationRefused("ended", p.JOIN_ENDED, "the owner's session has ended") from None
        if "refused" in answer:
            refused = answer["refused"]
            raise InvitationRefused(refused["reason"], refused["result_id"], refused["message"])
        return Redeemed(
            p.AgentInfo(**answer["agent"]), answer["agent_session_id"], answer["owner_session_id"]
        )

    async def close(self) -> None:
        for http in self._http.values():
            await http.close()
        self._http.clear()


def redeemed_json(redeemed: Redeemed) -> str:
    return json.dumps(dataclasses.asdict(redeemed))


def refused_json(exc: InvitationRefused) -> str:
    return json.dumps({"refused": {"reason": exc.reason, "result_id": exc.result_id, "message": str(exc)}})
