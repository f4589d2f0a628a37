"""A broker as a real process on loopback with real TLS, and clients of its two APIs.

Shared by the broker's service tests and the collection tests of the broker object modules.
"""

from __future__ import annotations

import http.client
import json
import ssl
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any

from pki import TestPKI as CertAuthority
from services import ServiceProcess, free_port

from gatehouse import protocol as p

ADMIN_TOKEN = "adm-" + uuid.uuid4().hex
# A well-formed bearer token the broker does not know (the admin API must refuse it).
OTHER_TOKEN = "oth-" + uuid.uuid4().hex
ALICE_PW = "Alice-pw-" + uuid.uuid4().hex[:8]
BOB_PW = "Bob-pw-" + uuid.uuid4().hex[:8]
WRONG_PW = "Wrong-pw-" + uuid.uuid4().hex[:8]
ENVELOPE = "pcoip-broker"


class Http:
    def __init__(self, port: int, ctx: ssl.SSLContext) -> None:
        self.port = port
        self.ctx = ctx

    def as_peer(self, ctx: ssl.SSLContext) -> Http:
        """The same broker, reached with another TLS identity (a CM or agent certificate)."""
        return Http(self.port, ctx)

    def request(
        self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
    ) -> tuple[int, http.client.HTTPMessage, bytes]:
        conn = http.client.HTTPSConnection("localhost", self.port, context=self.ctx, timeout=20)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            return resp.status, resp.headers, resp.read()
        finally:
            conn.close()


class Admin:
    def __init__(self, http_: Http, token: str = ADMIN_TOKEN) -> None:
        self.http = http_
        self.token = token

    def call(self, method: str, path: str, body: Any = None, token: str | None = None) -> tuple[int, Any]:
        headers = {"Content-Type": "application/json"}
        if (token or self.token) != "-":
            headers["Authorization"] = f"Bearer {token or self.token}"
        data = json.dumps(body).encode() if body is not None else None
        status, _headers, raw = self.http.request(method, "/api/v1" + path, data, headers)
        return status, (json.loads(raw) if raw else None)

    def put(self, path: str, body: Any = None) -> Any:
        status, answer = self.call("PUT", path, body if body is not None else {})
        assert status == 200, answer
        return answer


class BrokerClient:
    """What the CM does: one cookie jar per client session."""

    def __init__(self, http_: Http) -> None:
        self.http = http_
        self.cookie: str | None = None
        self.last_set_cookie = ""

    def raw(
        self, body: bytes, headers: dict[str, str] | None = None
    ) -> tuple[int, http.client.HTTPMessage, bytes]:
        headers = dict(headers or {})
        headers.setdefault("Content-Type", p.CONTENT_TYPE)
        if self.cookie:
            headers["Cookie"] = f"JSESSIONID={self.cookie}"
        status, resp_headers, data = self.http.request("POST", p.PATH_BROKER, body, headers)
        set_cookie = resp_headers.get("Set-Cookie")
        if set_cookie:
            self.last_set_cookie = set_cookie
            morsel = SimpleCookie(set_cookie)["JSESSIONID"]
            self.cookie = morsel.value or None
        return status, resp_headers, data

    def send(self, message: p.Message) -> p.Message:
        status, headers, data = self.raw(p.render(ENVELOPE, message))
        assert status == 200
        assert headers["Content-Type"] == "application/xml; charset=UTF-8"
        assert headers["Transfer-Encoding"] == "chunked"
        return p.parse(data, ENVELOPE)

    def hello(self, session_id: str | None = None) -> p.HelloResp:
        sid = session_id or str(uuid.uuid4())
        reply = self.send(p.Hello(pcm_info=p.PcmInfo(sid, "192.0.2.10")))
        assert isinstance(reply, p.HelloResp)
        return reply

    def login(self, user: str, password: str, domain: str = "CORP") -> str:
        self.hello()
        reply = self.send(p.Authenticate(user, password, domain))
        assert isinstance(reply, p.AuthenticateResp)
        return reply.result_id

    def resources(self) -> dict[str, str]:
        reply = self.send(p.GetResourceList())
        assert isinstance(reply, p.GetResourceListResp) and reply.result_id == p.LIST_OK
        return {r.name: r.resource_id for r in reply.resources}

    def allocate(self, resource_id: str) -> p.AllocateResourceResp:
        reply = self.send(p.AllocateResource(resource_id))
        assert isinstance(reply, p.AllocateResourceResp), reply
        return reply


class Broker:
    def __init__(
        self, pki: CertAuthority, workdir: Path, processes: list[ServiceProcess], **extra: object
    ) -> None:
        self.pki = pki
        self.workdir = workdir
        self.processes = processes
        self.port = free_port()
        self.admin_port = free_port()
        certs = pki.issue("broker", role="broker")
        self.config: dict[str, object] = {
            "ListenAddress": "127.0.0.1",
            "ListenPort": self.port,
            "AdminPort": self.admin_port,
            "SslCert": certs.cert,
            "SslKey": certs.key,
            "ClientCaCert": pki.ca,
            "Database": workdir / "broker.db",
            "Domains": "CORP,LAB",
            "LogLevel": "debug",
            **extra,
        }
        # The admin API is called without a client certificate (as the modules do); the broker
        # protocol with a CM's certificate.
        self.ctx = ssl.create_default_context(cafile=str(pki.ca))
        self.http = Http(self.port, self.ctx)
        self.admin = Admin(self.http)
        self.cm_http = self.http.as_peer(self.peer_ctx("cm", ["localhost"], role="cm"))
        self.proc: ServiceProcess | None = None
        self.all_logs = ""

    def start(self) -> Broker:
        self.proc = ServiceProcess(
            "broker",
            self.workdir,
            self.config,
            env_file={"GATEHOUSE_ADMINTOKEN": ADMIN_TOKEN},
            health_url=f"https://localhost:{self.port}/health",
            health_ssl=self.ctx,
        )
        self.processes.append(self.proc)
        self.proc.start()
        return self

    def stop(self) -> int | None:
        assert self.proc is not None
        return self.proc.stop()

    def peer_ctx(self, name: str, hosts: list[str], role: str | None) -> ssl.SSLContext:
        certs = self.pki.issue(f"peer-{name}", hosts, role=role)
        ctx = ssl.create_default_context(cafile=str(self.pki.ca))
        ctx.load_cert_chain(certs.cert, certs.key)
        return ctx

    def metrics(self) -> str:
        """/metrics from the management listener (AdminAddress:AdminPort, plain HTTP)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.admin_port, timeout=10)
        try:
            conn.request("GET", "/metrics")
            resp = conn.getresponse()
            assert resp.status == 200
            return resp.read().decode()
        finally:
            conn.close()

    def client(self, http_: Http | None = None) -> BrokerClient:
        return BrokerClient(http_ or self.cm_http)

    def agent_http(self, address: str, role: str | None = "agent") -> Http:
        """The broker as the agent at ``address`` reaches it (its certificate names the address)."""
        return self.http.as_peer(self.peer_ctx(f"agent-{address}-{role}", [address], role=role))

    def report(
        self, address: str, active: int, capacity: int, http_: Http | None = None, **extra: Any
    ) -> int:
        status, _body = self.report_call(address, active, capacity, http_, **extra)
        return status

    def report_call(
        self, address: str, active: int, capacity: int, http_: Http | None = None, **extra: Any
    ) -> tuple[int, Any]:
        body = {
            "hostname": extra.pop("hostname", ""),
            "address": address,
            "agent_port": 60443,
            "session_port": 4172,
            "active_sessions": active,
            "capacity": capacity,
            **extra,
        }
        peer = http_ or self.agent_http(address)
        status, _headers, raw = peer.request(
            "POST", "/api/v1/agents/report", json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        return status, (json.loads(raw) if raw else None)

    def logs(self) -> str:
        return self.proc.logs() if self.proc else ""


@contextmanager
def running_broker(
    pki: CertAuthority, workdir: Path, secrets: Iterable[str] = (), **extra: object
) -> Iterator[Broker]:
    """A started broker (``extra``: more configuration keys), stopped at the end; its log then
    holds none of ``secrets`` and no traceback."""
    b = Broker(pki, workdir, [], **extra).start()
    try:
        yield b
    finally:
        b.stop()
    logs = b.logs()
    for secret in (ADMIN_TOKEN, *secrets):
        assert secret not in logs
    assert "Traceback" not in logs


def module_connection(broker: Broker, **extra: Any) -> dict[str, Any]:
    """The connection options of the broker object modules for ``broker``."""
    return {
        "broker_url": f"https://localhost:{broker.port}",
        "admin_token": ADMIN_TOKEN,
        "ca_cert": str(broker.pki.ca),
        **extra,
    }
