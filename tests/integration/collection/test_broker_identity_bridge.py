"""gatehouse.access.broker with a directory, in its production network mode: ``network_mode:
bridge`` (Docker's default bridge network) with the broker port published on the host.

The directory is the real slapd of identity_servers.py. A broker container on the bridge reaches
the host at the bridge's gateway address, so a relay (latency.py, no delay) listens there and
passes the bytes on to slapd's LDAPS port; TLS runs end to end, and slapd's certificate names
the gateway address. The deploy-time identity check runs in the same network mode: it must
refuse a wrong service-account password and an unreachable directory before anything is
created, and, on a later run, leave the running broker and its files as they were. A directory
user logs in through the published port, speaking the broker protocol as a CM does (its `cm`
certificate, verified by the broker).
"""

from __future__ import annotations

import http.client
import ipaddress
import sys
import time
import uuid
from collections.abc import Iterator
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import identity_servers
import latency
from collection_helpers import no_secret, run_module
from deploy_helpers import cleanup, docker_client, objects_named, require_service_images, unique_prefix
from pki import TestPKI
from services import cm_identity, free_port

from gatehouse import protocol as p
from gatehouse import tls

pytestmark = [pytest.mark.docker, pytest.mark.images]

ADMIN = "admin-" + uuid.uuid4().hex
ENVELOPE = "pcoip-broker"


def bridge_gateway(cli: Any) -> str:
    """The host's address on Docker's default bridge network, where bridge-mode containers run."""
    config = cli.networks.get("bridge").attrs["IPAM"]["Config"]
    gateway = next((c.get("Gateway") for c in config if c.get("Gateway")), None)
    if gateway is None:  # some engines leave it out: the first address of the subnet
        gateway = str(ipaddress.ip_network(config[0]["Subnet"]).network_address + 1)
    return gateway


class Deployed:
    def __init__(self, pki: TestPKI, tmp_path: Path, prefix: str, identity: identity_servers.IdentityServers):
        self.pki = pki
        self.tmp_path = tmp_path
        self.prefix = prefix
        self.identity = identity
        self.https_port = free_port()
        self.certs = pki.issue(f"{prefix}-broker", ["localhost", "127.0.0.1"], role="broker")

    def args(self, **directory: object) -> dict[str, object]:
        d = self.identity.directory
        entry = {
            "domain": "CORP",
            "ca_cert": str(d.ca),
            "bind_dn": d.bind_dn,
            "bind_password": d.bind_password,
            "base_dn": d.people_dn,
            "group_base_dn": d.groups_dn,
            "group_mode": "memberof",
            "timeout": 3,
            **directory,
        }
        return {
            "admin_token": ADMIN,
            "ssl_cert": str(self.certs.cert),
            "ssl_key": str(self.certs.key),
            "ca_cert": str(self.pki.ca),
            "client_ca_cert": str(self.pki.ca),
            "domains": ["CORP", "LAB"],
            "data_dir": str(self.tmp_path / "broker"),
            "name_prefix": self.prefix,
            "network_mode": "bridge",
            "https_port": self.https_port,
            "directories": [entry],
        }

    def wait_ready(self, container: Any, timeout: float = 60.0) -> None:
        """Until the broker answers at the published port (it starts listening after its container)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.send(p.Hello(pcm_info=p.PcmInfo(str(uuid.uuid4()), "192.0.2.10")))
                return
            except OSError as exc:
                if time.monotonic() > deadline:
                    logs = container.logs()[-3000:].decode(errors="replace")
                    raise AssertionError(f"no answer at the published port: {exc}\n{logs}") from None
                time.sleep(0.5)

    def send(self, message: p.Message, cookie: str = "") -> tuple[p.Message, str]:
        """One request at the published port as a CM sends it (its `cm` certificate); the answer
        and the session cookie."""
        identity = cm_identity(self.pki)
        ctx = tls.client_context(self.pki.ca, cert=identity.cert, key=identity.key)
        conn = http.client.HTTPSConnection("127.0.0.1", self.https_port, context=ctx, timeout=30)
        try:
            headers = {
                "Content-Type": p.CONTENT_TYPE,
                **({"Cookie": f"JSESSIONID={cookie}"} if cookie else {}),
            }
            conn.request("POST", p.PATH_BROKER, p.render(ENVELOPE, message), headers)
            resp = conn.getresponse()
            body = resp.read()
            assert resp.status == 200, (resp.status, body[:200])
            if resp.headers.get("Set-Cookie"):
                cookie = SimpleCookie(resp.headers["Set-Cookie"])["JSESSIONID"].value
        finally:
            conn.close()
        return p.parse(body, ENVELOPE), cookie

    def login(self, user: str, password: str) -> p.Message:
        """hello and the password step, as a CM relays a client's login."""
        hello, cookie = self.send(p.Hello(pcm_info=p.PcmInfo(str(uuid.uuid4()), "192.0.2.10")))
        assert isinstance(hello, p.HelloResp), hello
        reply, _cookie = self.send(p.Authenticate(user, password, "CORP"), cookie)
        return reply


@pytest.fixture
def deployed(pki: TestPKI, tmp_path: Path) -> Iterator[tuple[Deployed, latency.Relay, Any]]:
    cli = docker_client()
    require_service_images(cli, "broker")
    gateway = bridge_gateway(cli)
    prefix = unique_prefix("broker-bridge")
    with identity_servers.running(pki, tmp_path / "identity", prefix, ldap_names=(gateway,)) as identity:
        d = identity.directory
        try:
            with latency.relay((d.host, d.ldaps_port), 0.0, host=gateway) as relay:
                yield Deployed(pki, tmp_path, prefix, identity), relay, cli
        finally:
            cleanup(cli, prefix)


def test_a_bridge_mode_broker_logs_directory_users_in(deployed: tuple[Deployed, latency.Relay, Any]) -> None:
    dep, relay, cli = deployed
    d = dep.identity.directory
    secrets = tuple(d.passwords.values())
    data_dir = dep.tmp_path / "broker"
    good = f"ldaps://{relay.address}"
    # Nothing listens there: the bridge gateway's address, another port.
    unreachable = f"ldaps://{relay.host}:{free_port()}"

    # A first deployment whose check fails leaves nothing behind.
    wrong = no_secret(
        run_module("broker", dep.args(servers=[good], bind_password="not-the-password")),
        secrets,
        result_only=True,
    )
    assert wrong.failed and not wrong.changed, wrong.result
    assert f"invalid credentials for {d.bind_dn}" in wrong.result["msg"]
    assert "nothing was deployed" in wrong.result["msg"]
    down = no_secret(run_module("broker", dep.args(servers=[unreachable])), secrets, result_only=True)
    assert down.failed and not down.changed, down.result
    assert unreachable in down.result["msg"] and "cannot connect" in down.result["msg"]
    assert not data_dir.exists() and objects_named(cli, dep.prefix + "-broker") == []

    run = no_secret(run_module("broker", dep.args(servers=[good])), secrets, result_only=True)
    assert run.changed and not run.failed, run.result
    assert run.result["identity_check"]["exit_code"] == 0
    assert run.result["config"]["network_mode"] == "bridge"
    container = cli.containers.get(f"{dep.prefix}-broker")
    assert container.attrs["HostConfig"]["NetworkMode"] in ("bridge", "default")
    bindings = container.attrs["HostConfig"]["PortBindings"]["8443/tcp"]
    assert [int(b["HostPort"]) for b in bindings] == [dep.https_port]

    # Through the published port: the directory decides.
    dep.wait_ready(container)
    before = relay.replies
    ok = dep.login("alice", d.passwords["alice"])
    assert isinstance(ok, p.AuthenticateResp) and ok.result_id == p.AUTH_OK, ok
    assert relay.replies > before  # the directory answered through the bridge
    bad = dep.login("alice", d.passwords["bob"])
    assert isinstance(bad, p.AuthenticateResp) and bad.result_id == p.AUTH_FAILED, bad

    # A later run whose check fails (the directory moved, and the new address is down) changes
    # nothing: same container, same files.
    props = (data_dir / "data" / "broker.properties").read_bytes()
    secret_file = (data_dir / "secrets" / "ldap-CORP.password").read_bytes()
    refused = no_secret(run_module("broker", dep.args(servers=[unreachable])), secrets, result_only=True)
    assert refused.failed and not refused.changed, refused.result
    assert "cannot connect" in refused.result["msg"] and "left unchanged" in refused.result["msg"]
    now = cli.containers.get(f"{dep.prefix}-broker")
    assert now.id == container.id and now.status == "running"
    assert (data_dir / "data" / "broker.properties").read_bytes() == props
    assert (data_dir / "secrets" / "ldap-CORP.password").read_bytes() == secret_file
    again = dep.login("alice", d.passwords["alice"])
    assert isinstance(again, p.AuthenticateResp) and again.result_id == p.AUTH_OK, again
