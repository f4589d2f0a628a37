"""A hardened Gatehouse stack as real processes on loopback, for the attack tests.

Every internal hop uses the test deployment CA with role certificates, as the collection deploys
it: the broker accepts only CM and agent certificates where it must, the agents accept
launch-session only from a CM, the CM and SG verify the agents. ``Stack.session()`` runs a whole
legitimate session (TCP and UDP echo) through the gateway CM; the attack tests call it during and
after their attack.
"""

from __future__ import annotations

import json
import ssl
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pki as pkimod
from services import ServiceProcess, free_port

from gatehouse import tls
from gatehouse.client.flow import SessionReport, run_session
from gatehouse.grant import generate_secret

ADMIN_TOKEN = "admin-token-" + "5ec0b1a2c3d4e5f60718"
USER = "alice"
USER_PW = "Alice-Hardened-pw!1"
OTHER = "bob"
OTHER_PW = "Bob-Hardened-pw!2"
SECRET = generate_secret()
# Values that must never appear in any service log.
SECRETS = (ADMIN_TOKEN, USER_PW, OTHER_PW, SECRET)


@dataclass
class Stack:
    pki: pkimod.TestPKI
    root: Path
    broker_url: str
    cm_url: str
    sg_port: int
    sg_admin_port: int
    agents: dict[str, tuple[str, int, int]]
    procs: dict[str, ServiceProcess] = field(default_factory=dict)
    identities: dict[str, pkimod.CertFiles] = field(default_factory=dict)

    def client_ctx(self) -> ssl.SSLContext:
        return tls.client_context(self.pki.ca, verify=True, role="sg")

    def admin(self, method: str, path: str, body: object | None = None) -> dict:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(
            f"{self.broker_url}/api/v1{path}",
            data=data,
            method=method,
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, context=tls.client_context(self.pki.ca), timeout=10) as resp:
            raw = resp.read()
        return json.loads(raw) if raw else {}

    async def session(
        self, user: str = USER, password: str = USER_PW, *, resource: str | None = None, **kwargs: object
    ) -> SessionReport:
        """One whole legitimate session through the gateway CM and the SG."""
        return await run_session(
            self.cm_url,
            user,
            password,
            domain="CORP",
            resource=resource,
            ssl_context=self.client_ctx(),
            **kwargs,  # type: ignore[arg-type]
        )

    def logs(self) -> dict[str, str]:
        return {name: proc.logs() for name, proc in self.procs.items()}

    def assert_no_secrets_logged(self, *extra: str) -> None:
        for name, text in self.logs().items():
            for secret in (*SECRETS, *extra):
                assert secret not in text, f"a secret reached the {name} log"

    def stop(self) -> None:
        for proc in reversed(list(self.procs.values())):
            proc.stop()


def build(
    pki: pkimod.TestPKI,
    root: Path,
    *,
    broker: dict[str, object] | None = None,
    agent: dict[str, object] | None = None,
    sg: dict[str, object] | None = None,
    cm: dict[str, object] | None = None,
) -> Stack:
    """Start broker, two agents (desk-a on 127.0.0.2, desk-b on 127.0.0.3), SG and a gateway CM.

    The keyword dicts override each service's configuration keys. alice is entitled to both
    desktops, bob to desk-b.
    """
    procs: dict[str, ServiceProcess] = {}
    ids: dict[str, pkimod.CertFiles] = {}
    try:
        broker_port, broker_admin = free_port(), free_port()
        ids["broker"] = pki.issue("hard-broker", ["localhost", "127.0.0.1"], role="broker")
        procs["broker"] = ServiceProcess(
            "broker",
            root / "broker",
            {
                "ListenAddress": "127.0.0.1",
                "ListenPort": broker_port,
                "AdminAddress": "127.0.0.1",
                "AdminPort": broker_admin,
                "SslCert": ids["broker"].cert,
                "SslKey": ids["broker"].key,
                "ClientCaCert": pki.ca,
                "Database": root / "broker.db",
                "AdminToken": ADMIN_TOKEN,
                "Domains": "CORP",
                "LogLevel": "debug",
                **(broker or {}),
            },
            health_url=f"https://127.0.0.1:{broker_port}/health",
        ).start()
        broker_url = f"https://127.0.0.1:{broker_port}"
        agents: dict[str, tuple[str, int, int]] = {}
        for name, address in (("desk-a", "127.0.0.2"), ("desk-b", "127.0.0.3")):
            control, session_port, admin = free_port(), free_port(), free_port()
            ids[name] = pki.issue(f"hard-{name}", [f"{name}.test", address], role="agent")
            procs[name] = ServiceProcess(
                "agent",
                root / name,
                {
                    "ListenAddress": address,
                    "ControlPort": control,
                    "SessionPort": session_port,
                    "AdminAddress": address,
                    "AdminPort": admin,
                    "SslCert": ids[name].cert,
                    "SslKey": ids[name].key,
                    "ClientCaCert": pki.ca,
                    "Hostname": f"{name}.test",
                    "AdvertiseAddress": address,
                    "BrokerUrl": broker_url,
                    "BrokerCaCert": pki.ca,
                    "ReportInterval": 2,
                    "Capacity": 50,
                    "LogLevel": "debug",
                    **(agent or {}),
                },
                config_name="agent.properties",
                health_url=f"https://{address}:{control}/health",
            ).start()
            agents[name] = (address, control, session_port)
        sg_port, sg_admin = free_port(), free_port()
        ids["sg"] = pki.issue("hard-sg", ["localhost", "127.0.0.1"], role="sg")
        procs["sg"] = ServiceProcess(
            "sg",
            root / "sg",
            {
                "ListenAddress": "127.0.0.1",
                "Port": sg_port,
                "AgentUdpSourcePort": free_port(),
                "SslCert": ids["sg"].cert,
                "SslKey": ids["sg"].key,
                "AgentCaCert": pki.ca,
                "AdminAddress": "127.0.0.1",
                "AdminPort": sg_admin,
                "LogLevel": "debug",
                **(sg or {}),
            },
            config_name="SecurityGateway.conf",
            env_file={"GATEHOUSE_GRANTSECRET": SECRET},
            health_url=f"http://127.0.0.1:{sg_admin}/health",
        ).start()
        cm_port = free_port()
        ids["cm"] = pki.issue("hard-cm", ["localhost", "127.0.0.1"], role="cm")
        ids["cm-public"] = pki.issue("hard-cm-public", ["localhost", "127.0.0.1"])
        procs["cm"] = ServiceProcess(
            "cm",
            root / "cm",
            {
                "ListenAddress": "127.0.0.1",
                "ListenPort": cm_port,
                "RedirectPort": free_port(),
                "AdminAddress": "127.0.0.1",
                "AdminPort": free_port(),
                "SslCert": ids["cm-public"].cert,
                "SslKey": ids["cm-public"].key,
                "IdentityCert": ids["cm"].cert,
                "IdentityKey": ids["cm"].key,
                "BrokerUrl": broker_url,
                "BrokerCaCert": pki.ca,
                "AgentCaCert": pki.ca,
                "SecurityGatewayEnabled": True,
                "ExternalPcoipIp": "127.0.0.1",
                "SecurityGatewayPort": sg_port,
                "SecurityGatewayHealthUrl": f"http://127.0.0.1:{sg_admin}/health",
                "BrokerTimeout": 5,
                "AgentTimeout": 5,
                "HostAddress": "localhost",
                "LogLevel": "debug",
                **(cm or {}),
            },
            config_name="config.properties",
            env_file={"GATEHOUSE_GRANTSECRET": SECRET},
            health_url=f"https://127.0.0.1:{cm_port}/health",
        ).start()
        st = Stack(
            pki, root, broker_url, f"https://127.0.0.1:{cm_port}", sg_port, sg_admin, agents, procs, ids
        )
        seed(st)
        return st
    except BaseException:
        for proc in reversed(list(procs.values())):
            proc.stop()
        raise


def seed(st: Stack) -> None:
    for name, (address, control, session_port) in st.agents.items():
        st.admin(
            "PUT",
            f"/desktops/{name}",
            {
                "address": address,
                "hostname": f"{name}.test",
                "agent_port": control,
                "session_port": session_port,
            },
        )
    st.admin("PUT", f"/users/CORP/{USER}", {"password": USER_PW})
    st.admin("PUT", f"/users/CORP/{OTHER}", {"password": OTHER_PW})
    for user, desktop in ((USER, "desk-a"), (USER, "desk-b"), (OTHER, "desk-b")):
        st.admin("PUT", f"/entitlements/user/CORP/{user}/desktop/{desktop}")


def assert_session_ok(report: SessionReport) -> None:
    failed = [(s.name, s.result, s.detail) for s in report.steps if not s.ok]
    assert report.ok, f"legitimate session failed: {failed}"
    names = [s.name for s in report.steps]
    assert "tcp-echo" in names and "udp-echo" in names, names
