"""A forwarding SG deployed by gatehouse.access.cmsg in ``network_mode: bridge`` behind a VIP on the host.

The production path of the double-hop DMZ's forwarders (docs/dmz.md, "Behind a VIP of their own"):
the forwarder runs in a container on the module's Docker network with 4172/tcp and 4172/udp
published; the forwarders' VIP is an address of the host (here a /32 on the host side of a client
namespace's veth pair, which this test creates and removes; keepalived would put it on the host's
interface). The container does not hold the VIP, so the SG listens on every address of its
container (the module refuses ``listen_address`` in bridge mode, before changing anything).

A client in a network namespace of its own (standing in for a client on the internet) dials the
VIP: the engine's PREROUTING DNAT sends TCP and UDP to the container with the client's address
kept, and conntrack sends the answers back from the VIP. The client's UDP socket is connected to
VIP:port, so a UDP echo that completes proves that the answers come from the VIP (the kernel drops
datagrams from any other address on a connected socket). Behind the forwarder the inner chain runs
as processes on the host, as tests/integration/collection/test_bridge_mode.py runs its broker and
agent: the inner SG on the Docker network's gateway address (which the container reaches),
requiring a PROXY v2 header from the forwarder's container address, the CM that hands out the VIP,
a broker and an agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "security"))

import pki as pkimod
from bridge_helpers import USER, USER_PW, host_services
from collection_helpers import run_module
from deploy_helpers import (
    cleanup,
    docker_client,
    free_cidr,
    network_gateway,
    require_service_images,
    unique_prefix,
)
from services import ServiceProcess, cm_config, free_port, start_cm, start_sg
from stack import assert_session_ok

from gatehouse.client.flow import SessionReport, Step
from gatehouse.grant import generate_secret

pytestmark = [pytest.mark.docker, pytest.mark.images]

SECRET = generate_secret()

# Runs inside the client namespace: ``CM_URL CA HOST:PORT`` runs a whole session (TCP and UDP echo)
# with the session channel dialled at HOST:PORT, and prints its report.
NS_SESSION = """
import asyncio, json, os, sys
from gatehouse import tls
from gatehouse.client.flow import run_session

url, ca, target = sys.argv[1:4]
host, port = target.rsplit(":", 1)
report = asyncio.run(run_session(
    url, os.environ["GH_USER"], os.environ["GH_PASSWORD"], domain="CORP",
    ssl_context=tls.client_context(ca, verify=True, role="sg"), tcp_bytes=8192, udp_datagrams=5,
    step_timeout=10, connect_to=(host, int(port)),
))
print(json.dumps(report.to_dict()))
"""


@dataclass(frozen=True)
class Client:
    """A network namespace with ``address`` on a veth pair whose host side is ``host_address``; the
    host side also carries the ``vip`` (/32), an address of the host as a keepalived VIP is."""

    netns: str
    veth: str
    address: str
    host_address: str
    vip: str

    async def session(self, cm_url: str, ca: Path, target: str) -> SessionReport:
        env = {**os.environ, "GH_USER": USER, "GH_PASSWORD": USER_PW}
        proc = await asyncio.create_subprocess_exec(
            "ip", "netns", "exec", self.netns, sys.executable, "-c", NS_SESSION, cm_url, str(ca), target,
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        try:
            out, err = await asyncio.wait_for(proc.communicate(), 90)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise
        assert proc.returncode == 0, err.decode("utf-8", "replace")
        raw = json.loads(out)
        return SessionReport(**{**raw, "steps": [Step(**step) for step in raw["steps"]]})


def ip_command(*argv: str) -> None:
    subprocess.run(["ip", *argv], check=True, capture_output=True, text=True, timeout=10)


@contextlib.contextmanager
def client_with_vip(cidr: str, vip: str, tag: str) -> Iterator[Client]:
    """The client namespace on the first /30 of ``cidr``, the VIP on the host side of its veth pair;
    everything is removed on the way out (the veth pair with the namespace, the VIP with the veth)."""
    first = ipaddress.ip_network(cidr).network_address  # the first /30: .1 the host's side, .2 the client's
    host_side, inside = str(first + 1), str(first + 2)
    client = Client(f"{tag}-client", f"gh{tag[-8:]}v", inside, host_side, vip)
    try:
        ip_command("netns", "add", client.netns)
        ip_command("link", "add", client.veth, "type", "veth", "peer", "name", "eth0", "netns", client.netns)
        ip_command("addr", "add", f"{host_side}/30", "dev", client.veth)
        ip_command("addr", "add", f"{vip}/32", "dev", client.veth)
        ip_command("link", "set", client.veth, "up")
        ip_command("-n", client.netns, "addr", "add", f"{inside}/30", "dev", "eth0")
        ip_command("-n", client.netns, "link", "set", "eth0", "up")
        ip_command("-n", client.netns, "link", "set", "lo", "up")
        ip_command("-n", client.netns, "route", "add", "default", "via", host_side)
        yield client
    finally:
        subprocess.run(["ip", "netns", "del", client.netns], capture_output=True, check=False)
        subprocess.run(["ip", "link", "del", client.veth], capture_output=True, check=False)


@dataclass
class BridgedForwarder:
    cli: Any
    prefix: str
    module_args: dict[str, Any]
    data_dir: Path
    pcoip_port: int
    forwarder_ip: str  # the container's address on the module's network (the inner SG's PROXY source)
    client: Client
    cm_url: str
    ca: Path
    inner: ServiceProcess

    def container(self):
        return self.cli.containers.get(f"{self.prefix}-sg")

    async def session(self) -> SessionReport:
        return await self.client.session(self.cm_url, self.ca, f"{self.client.vip}:{self.pcoip_port}")


def clients_logged(text: str) -> set[str]:
    """The client addresses (without a port) in the JSON log lines ``text``."""
    found = set()
    for line in text.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and entry.get("client"):
            value = str(entry["client"])
            found.add(
                value.split(":", maxsplit=1)[0] if value.count(":") == 1 else value
            )  # IPv4 "address:port"
    return found


@pytest.fixture(scope="module")
def bridged(pki: pkimod.TestPKI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BridgedForwarder]:
    if os.geteuid() != 0:
        pytest.skip("the client network namespace and the VIP need root (ip netns, ip addr)")
    cli = docker_client()
    require_service_images(cli, "sg")
    prefix = unique_prefix("fwdbridge")
    root = tmp_path_factory.mktemp("fwdbridge")
    cidr = free_cidr(cli, pool=os.environ.get("GATEHOUSE_TEST_FWD_POOL", "10.231.1.0/24"), prefixlen=26)
    clients = free_cidr(
        cli, pool=os.environ.get("GATEHOUSE_TEST_FWD_CLIENTS", "10.231.11.0/24"), prefixlen=28
    )
    vip = str(ipaddress.ip_network(clients).broadcast_address - 1)  # the /28's last host
    gateway = str(ipaddress.ip_network(cidr).network_address + 1)
    inner_port = free_port()
    pcoip_port = free_port()
    module_args = {
        "accept_policies": True,
        "forward_to": [f"{gateway}:{inner_port}"],
        "data_dir": str(root / "cmsg"),
        "name_prefix": prefix,
        "docker_network_cidr": cidr,
        "pcoip_port": pcoip_port,
        "sg_admin_host_port": free_port(),
        "host_label": "fwd1",
        "log_level": "debug",  # the forwarder logs each client it forwards at debug level
        "wait_timeout": 60,
    }
    try:
        run = run_module("cmsg", module_args)
        assert not run.failed, run.result
        assert run.result["config"]["network_mode"] == "bridge"
        assert network_gateway(cli, f"{prefix}-cmsg") == gateway
        container = cli.containers.get(f"{prefix}-sg")
        forwarder_ip = container.attrs["NetworkSettings"]["Networks"][f"{prefix}-cmsg"]["IPAddress"]
        with (
            client_with_vip(clients, vip, prefix) as client,
            host_services(pki, root, "127.0.0.1", prefix) as services,
        ):
            # The inner SG of the second perimeter, on the gateway address the forwarder's container
            # reaches; PROXY v2 required from the forwarder's address only.
            inner = start_sg(
                pki,
                root / "inner",
                f"{prefix}-inner",
                SECRET,
                ListenAddress=gateway,
                Port=inner_port,
                ProxyProtocolSources=f"{forwarder_ip}/32",
            )
            cm_certs = pki.issue(f"{prefix}-cm", ["localhost", "127.0.0.1", client.host_address])
            cm = start_cm(
                root / "cm",
                cm_config(
                    pki,
                    cm_certs,
                    services.broker_url,
                    ListenAddress="0.0.0.0",
                    SecurityGatewayEnabled=True,
                    ExternalPcoipIp=vip,  # the forwarders' VIP
                    SecurityGatewayPort=pcoip_port,
                ),
                SECRET,
            )
            try:
                yield BridgedForwarder(
                    cli,
                    prefix,
                    module_args,
                    root / "cmsg",
                    pcoip_port,
                    forwarder_ip,
                    client,
                    f"https://{client.host_address}:{cm.config['ListenPort']}",
                    pki.ca,
                    inner,
                )
            finally:
                cm.stop()
                inner.stop()
    finally:
        cleanup(cli, prefix)


async def test_a_client_session_through_the_vip_of_a_bridged_forwarder(bridged: BridgedForwarder) -> None:
    """TCP (TLS passed through to the inner SG) and UDP echo from the client namespace to VIP:port;
    the forwarder and the inner SG see the client's own address, the inner SG via PROXY v2."""
    begun = time.time()
    conf = (bridged.data_dir / "data" / "SecurityGateway.conf").read_text(encoding="utf-8")
    assert "ListenAddress=0.0.0.0" in conf.replace(" ", ""), conf
    assert bridged.container().status == "running"
    for _attempt in range(2):
        report = await bridged.session()
        assert_session_ok(report)
        assert [s.name for s in report.steps][-3:] == ["tcp-echo", "udp-echo", "bye"], report.steps
    assert report.target.split(":")[0] == bridged.client.vip, report.target
    forwarder_log = bridged.container().logs(since=int(begun)).decode("utf-8", "replace")
    assert clients_logged(forwarder_log) == {bridged.client.address}, forwarder_log[-3000:]
    assert bridged.client.address in clients_logged(bridged.inner.logs())


def test_the_module_refuses_listen_address_in_bridge_mode_and_changes_nothing(
    bridged: BridgedForwarder,
) -> None:
    """listen_address=<VIP> would make the SG fail to bind (the container has no VIP): the task
    fails with the reason, and the running forwarder and its files stay as they are."""
    conf = bridged.data_dir / "data" / "SecurityGateway.conf"
    before = (bridged.container().id, conf.read_text(encoding="utf-8"))
    run = run_module("cmsg", {**bridged.module_args, "listen_address": bridged.client.vip})
    assert run.failed, run.result
    message = json.dumps(run.result)
    assert f"listen_address {bridged.client.vip} cannot be used with network_mode=bridge" in message, message
    assert "DNATs the published ports" in message
    assert (bridged.container().id, conf.read_text(encoding="utf-8")) == before
    assert bridged.container().status == "running"
    again = run_module("cmsg", bridged.module_args)
    assert not again.failed and not again.changed, again.result
