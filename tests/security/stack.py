"""A hardened Gatehouse stack as real processes on loopback, for the attack tests.

Every internal hop uses the test deployment CA with role certificates, as the collection deploys
it: the broker accepts only CM and agent certificates where it must, the agents accept
launch-session only from a CM, the CM and SG verify the agents. ``Stack.session()`` runs a whole
legitimate session (TCP and UDP echo) through the gateway CM; the attack tests call it during and
after their attack.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from pathlib import Path

import pki as pkimod
from services import (
    ServiceProcess,
    broker_admin,
    cm_config,
    cm_identity,
    start_agent,
    start_broker,
    start_cm,
    start_sg,
)

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
        return broker_admin(self.broker_url, ADMIN_TOKEN, tls.client_context(self.pki.ca), method, path, body)

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

    Each service starts from its starter in tests/integration/services.py (the configuration
    test_session.py uses too); the keyword dicts override its keys. alice is entitled to both
    desktops, bob to desk-b.
    """
    procs: dict[str, ServiceProcess] = {}
    try:
        procs["broker"] = start_broker(pki, root / "broker", "hard-broker", ADMIN_TOKEN, **(broker or {}))
        broker_url = f"https://127.0.0.1:{procs['broker'].config['ListenPort']}"
        agents: dict[str, tuple[str, int, int]] = {}
        for name, address in (("desk-a", "127.0.0.2"), ("desk-b", "127.0.0.3")):
            procs[name] = start_agent(
                pki, root / name, f"hard-{name}", name, address, broker_url, **(agent or {})
            )
            cfg = procs[name].config
            agents[name] = (address, int(cfg["ControlPort"]), int(cfg["SessionPort"]))
        procs["sg"] = start_sg(pki, root / "sg", "hard-sg", SECRET, **(sg or {}))
        sg_port, sg_admin = int(procs["sg"].config["Port"]), int(procs["sg"].config["AdminPort"])
        config = cm_config(
            pki,
            pki.issue("hard-cm-public", ["localhost", "127.0.0.1"]),
            broker_url,
            **{
                "SecurityGatewayEnabled": True,
                "ExternalPcoipIp": "127.0.0.1",
                "SecurityGatewayPort": sg_port,
                "SecurityGatewayHealthUrl": f"http://127.0.0.1:{sg_admin}/health",
                "BrokerTimeout": 5,
                **(cm or {}),
            },
        )
        procs["cm"] = start_cm(root / "cm", config, SECRET)
        ids = {name: proc.identity for name, proc in procs.items() if proc.identity is not None}
        ids["cm"] = cm_identity(pki)
        cm_url = f"https://127.0.0.1:{config['ListenPort']}"
        st = Stack(pki, root, broker_url, cm_url, sg_port, sg_admin, agents, procs, ids)
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
