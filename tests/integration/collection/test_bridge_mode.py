"""gatehouse.access.cmsg with its production defaults: ``network_mode: bridge`` and published ports.

The module deploys the CM and SG containers on the Docker network it creates, with internal TLS
verified (a deployment CA from tests/pki.py: the CM's ``cm`` identity, ``agent_ca_cert``,
``broker_ca_cert``). A broker and an agent run as real processes on the host, bound to the
network's gateway address (the bridge's .1, which the containers reach and the certificates
name). Clients use the published ports: on 127.0.0.1, and, for the flood test, from two network
namespaces of their own (``ClientHost``) standing in for clients on other hosts.

What the services see as the client address. A client from another host reaches a published
port through the engine's iptables DNAT rule, which keeps its source address; the namespaces do
the same by dialling the host side of their veth pair (an address local to the host, so the
PREROUTING rule applies). Operator note: clients that reach a bridge-mode CM through Docker's
userland proxy (docker-proxy) instead, that is clients on the host's loopback, or every client
of an engine running with ``"iptables": false`` (or rootless Docker with its builtin port
driver), all arrive from the network's gateway address, and so share one set of per-source caps
(the CM's MaxPreAuthSessionsPerSource and MaxConnectionsPerSource, the SG's
MaxConnectionsPerSource); putting the gateway address into trusted_proxies would trust
X-Forwarded-For from every local client.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import secrets
import socket
import ssl
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "security"))

import pki as pkimod
from bridge_helpers import (
    ADMIN_TOKEN,
    USER,
    USER_PW,
    host_services,
    management,
    metric,
    relayed_session,
    task_result,
)
from collection_helpers import run_module, run_playbook
from deploy_helpers import (
    cleanup,
    docker_client,
    free_cidr,
    network_gateway,
    require_service_images,
    unique_prefix,
)
from services import ServiceProcess, free_port
from stack import assert_session_ok

from gatehouse import linechan, tls
from gatehouse import protocol as p
from gatehouse.client.flow import Holding, SessionReport, Step, run_session

pytestmark = [pytest.mark.docker, pytest.mark.images]

PRE_AUTH_PER_SOURCE = 16  # the CM's default MaxPreAuthSessionsPerSource


@dataclass
class Deployment:
    cli: Any
    prefix: str
    gateway: str
    cm_url: str
    broker: ServiceProcess
    agent: ServiceProcess
    client_ctx: ssl.SSLContext
    data_dir: Path
    ca: Path
    https_port: int
    pcoip_port: int
    clients_cidr: str  # the /29 of the client namespaces; the public certificate names its hosts' sides
    module_args: dict[str, Any]  # the cmsg module's arguments of this deployment

    async def session(self) -> SessionReport:
        return await run_session(
            self.cm_url, USER, USER_PW, domain="CORP", ssl_context=self.client_ctx, tcp_bytes=8192
        )

    async def cm_health(self) -> int:
        connector = aiohttp.TCPConnector(ssl=self.client_ctx)
        async with aiohttp.ClientSession(connector=connector) as http:
            async with http.get(f"{self.cm_url}/health", timeout=aiohttp.ClientTimeout(total=2)) as resp:
                return resp.status

    def container(self, role: str):
        return self.cli.containers.get(f"{self.prefix}-{role}")


@pytest.fixture(scope="module")
def deployment(pki: pkimod.TestPKI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    cli = docker_client()
    require_service_images(cli, "cm", "sg")
    prefix = unique_prefix("bridge")
    root = tmp_path_factory.mktemp("bridge")
    cidr = free_cidr(cli)
    clients_cidr = free_cidr(cli, pool="10.202.0.0/16", prefixlen=29)
    # The gateway address exists once the module created the network; the module's containers do
    # not need the broker or the agent to start, so those come after it, on that address.
    gateway = str(ipaddress.ip_network(cidr).network_address + 1)
    public = pki.issue(f"{prefix}-public", ["localhost", "127.0.0.1", "::1", *host_sides(clients_cidr)])
    identity = pki.issue(f"{prefix}-cm", [gateway], role="cm")
    broker_port = free_port()
    https_port, http_port, pcoip_port = free_port(), free_port(), free_port()
    try:
        module_args = {
            "accept_policies": True,
            "broker_url": f"https://{gateway}:{broker_port}",
            "broker_ca_cert": str(pki.ca),
            "identity_cert": str(identity.cert),
            "identity_key": str(identity.key),
            "agent_ca_cert": str(pki.ca),
            "ssl_cert": str(public.cert),
            "ssl_key": str(public.key),
            "ca_cert": str(pki.ca),
            # What the CM hands out: the client reaches the published SG port on loopback.
            "external_pcoip_ip": ["127.0.0.1"],
            "data_dir": str(root / "cmsg"),
            "name_prefix": prefix,
            "docker_network_cidr": cidr,
            "https_port": https_port,
            "http_port": http_port,
            "pcoip_port": pcoip_port,
            "host_label": "bridge1",
            "wait_timeout": 60,
        }
        run = run_module("cmsg", module_args)
        assert not run.failed, run.result
        assert run.result["config"]["network_mode"] == "bridge"
        assert network_gateway(cli, f"{prefix}-cmsg") == gateway

        with host_services(pki, root, gateway, prefix, broker_port) as services:
            yield Deployment(
                cli,
                prefix,
                gateway,
                f"https://127.0.0.1:{https_port}",
                services.broker,
                services.agent,
                tls.client_context(pki.ca, verify=True, role="sg"),
                root / "cmsg",
                ca=pki.ca,
                https_port=https_port,
                pcoip_port=pcoip_port,
                clients_cidr=clients_cidr,
                module_args=module_args,
            )
    finally:
        cleanup(cli, prefix)


async def test_a_session_through_the_published_ports(deployment: Deployment) -> None:
    """hello → allocate → TLS CONNECT to the published SG port → TCP echo → UDP echo (published udp)."""
    started = time.time()
    report = await deployment.session()
    assert_session_ok(report)
    assert report.target.endswith(f":{deployment.container('sg').ports['4172/udp'][0]['HostPort']}")
    # Through docker-proxy both services see the bridge gateway as the client (module docstring).
    assert logged(deployment, "cm", "client_ip", started) == {deployment.gateway}
    assert logged(deployment, "sg", "client", started) == {deployment.gateway}


async def test_a_udp_burst_goes_both_ways_whole_through_the_published_port(deployment: Deployment) -> None:
    """64 equal-sized datagrams at once: the SG sends them on as segmented runs (UDP GSO) to the
    agent, and the echoes back through Docker's NAT of the published udp port; every one comes
    back unchanged and in order."""
    burst = [n.to_bytes(4, "big") + os.urandom(1196) for n in range(64)]
    echoed: list[bytes] = []

    def exchange(holding: Holding) -> None:
        channel = holding.channel
        key, key_id = linechan.udp_bind_key(channel.target.connect_tag)
        channel.udp_binds += 1
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            udp.bind((channel.writer.get_extra_info("sockname")[0], 0))
            udp.settimeout(5)
            udp.connect(channel.address)
            udp.send(linechan.bind_datagram(key, key_id, channel.udp_binds))
            assert udp.recv(2048) == linechan.bind_ack(key, key_id, channel.udp_binds)
            for datagram in burst:
                udp.send(datagram)
            echoed.extend(udp.recv(2048) for _n in burst)

    async def hold(holding: Holding) -> None:
        await asyncio.to_thread(exchange, holding)

    report = await run_session(
        deployment.cm_url, USER, USER_PW, domain="CORP", ssl_context=deployment.client_ctx, hold=hold
    )
    assert_session_ok(report)
    assert echoed == burst


async def test_a_session_is_served_by_every_cm_worker_through_the_published_port(
    deployment: Deployment,
) -> None:
    """The CM's default, one worker per CPU, behind docker-proxy: each new connection through the
    published port reaches a worker by its source port, and the session's cookie is answered on
    every one of them (forwarded to the worker that holds it)."""
    _status, text = await asyncio.to_thread(management, 9180, "/metrics")
    workers = metric(text, "gatehouse_cm_workers")
    answered = 'gatehouse_cm_forwarded_requests_total{outcome="answered"}'
    before = metric(text, answered)
    url = deployment.cm_url + p.PATH_BROKER

    async def ask(message: p.Message, cookie: str = "") -> tuple[p.Message, str]:
        # A connection of its own for each request: a new source port, so any worker.
        connector = aiohttp.TCPConnector(ssl=deployment.client_ctx, force_close=True)
        headers = {"Content-Type": p.CONTENT_TYPE, **({"Cookie": f"JSESSIONID={cookie}"} if cookie else {})}
        async with aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar()) as http:
            async with http.post(url, data=p.render("pcoip-client", message), headers=headers) as resp:
                morsel = resp.cookies.get("JSESSIONID")
                return p.parse(await resp.read(), "pcoip-client"), morsel.value if morsel else cookie

    _reply, cookie = await ask(p.Hello(client_info=p.ClientInfo(product_name="bridge")))
    reply, cookie = await ask(p.Authenticate(USER, USER_PW, "CORP"), cookie)
    assert isinstance(reply, p.AuthenticateResp) and reply.result_id == p.AUTH_OK, reply
    for _round in range(16):
        reply, _cookie = await ask(p.GetResourceList(), cookie)
        assert isinstance(reply, p.GetResourceListResp) and reply.result_id == p.LIST_OK, reply
    await ask(p.Bye(), cookie)
    _status, text = await asyncio.to_thread(management, 9180, "/metrics")
    assert workers == metric(text, "gatehouse_cm_workers") == float(len(os.sched_getaffinity(0)))
    if workers > 1:
        # 18 connections, each to a worker by its source port: some reached the other worker.
        assert metric(text, answered) > before


def test_the_containers_are_hardened(deployment: Deployment) -> None:
    for role in ("cm", "sg"):
        host_config = deployment.container(role).attrs["HostConfig"]
        assert host_config["CapDrop"] == ["ALL"] and not host_config["CapAdd"], role
        assert host_config["SecurityOpt"] == ["no-new-privileges:true"], role
        assert host_config["ReadonlyRootfs"] is True, role
        assert set(host_config["Tmpfs"]) == {"/tmp"}, role
        assert host_config["Memory"] == 1 << 30, role
        assert host_config["PidsLimit"] == 512, role
        (nofile,) = host_config["Ulimits"]
        assert nofile["Name"] == "nofile" and nofile["Soft"] == nofile["Hard"] <= 65536, role
        assert host_config["NetworkMode"] == f"{deployment.prefix}-cmsg", role


async def test_a_dead_gateway_takes_the_cm_out_of_rotation(deployment: Deployment) -> None:
    """The CM follows the SG's /health at http://<prefix>-sg:9172 over the module's network."""
    sg = deployment.container("sg")
    assert await deployment.cm_health() == 200
    await asyncio.to_thread(sg.stop, timeout=5)
    stopped = time.monotonic()
    while await deployment.cm_health() != 503:
        assert time.monotonic() - stopped < 2.0, "CM /health still 200 two seconds after the SG stopped"
        await asyncio.sleep(0.05)
    await asyncio.to_thread(sg.start)
    started = time.monotonic()
    while await deployment.cm_health() != 200:
        assert time.monotonic() - started < 15.0, "CM /health not back after the SG started again"
        await asyncio.sleep(0.1)
    assert_session_ok(await deployment.session())


REPO = Path(__file__).resolve().parents[3]


def wait_drained(tmp_path: Path, drain_timeout: int, **node_vars: Any) -> Any:
    """playbooks/upgrade.yml's drain wait (playbooks/tasks/wait-drained.yml) on this host, whose
    CM and SG publish their management ports on 127.0.0.1 in bridge mode; ``node_vars`` are the
    node's inventory variables (cmsg_cm_admin_host_port, cmsg_sg_admin_host_port)."""
    playbook = tmp_path / "wait.yml"
    playbook.write_text(
        json.dumps(
            [
                {
                    "name": "The upgrade's drain wait against the bridge-mode node",
                    "hosts": "localhost",
                    "connection": "local",
                    "gather_facts": False,
                    "vars": {
                        "gatehouse__upgrade_node": "localhost",
                        "gatehouse__behind_halb": True,
                        "gatehouse__upgrade_drain_timeout": drain_timeout,
                        "gatehouse__upgrade_grace": 0,
                        **node_vars,
                    },
                    "tasks": [
                        {
                            "name": "Wait until the node is drained",
                            "ansible.builtin.include_tasks": str(
                                REPO / "playbooks" / "tasks" / "wait-drained.yml"
                            ),
                        }
                    ],
                }
            ]
        )
    )
    return run_playbook("-i", "localhost,", str(playbook), timeout=120)


async def test_the_upgrades_drain_wait_reads_the_published_management_ports(
    deployment: Deployment, tmp_path: Path
) -> None:
    """In bridge mode 9180/9172 are published on 127.0.0.1 only, where playbooks/upgrade.yml waits."""
    for role, port in (("cm", 9180), ("sg", 9172)):
        (binding,) = deployment.container(role).ports[f"{port}/tcp"]
        assert binding == {"HostIp": "127.0.0.1", "HostPort": str(port)}, role
    held = await relayed_session(deployment.cm_url, deployment.client_ctx)
    try:
        busy = await asyncio.to_thread(wait_drained, tmp_path, 2)
        assert busy.returncode != 0, "the wait ended while the SG relayed a session"
        assert not task_result(busy, "Wait until the node's CM").get("failed")
        assert task_result(busy, "Wait until the node's SG").get("failed")
    finally:
        held.close()
    idle = await asyncio.to_thread(wait_drained, tmp_path, 20)
    assert idle.returncode == 0, idle.stdout[-3000:]
    assert "gatehouse_sg_sessions_active 0.0" in task_result(idle, "Wait until the node's SG")["content"]
    assert (
        "gatehouse_cm_establishments_in_flight 0.0"
        in task_result(idle, "Wait until the node's CM")["content"]
    )


async def test_a_second_deployment_on_the_same_host_uses_its_own_management_ports(
    deployment: Deployment, tmp_path: Path
) -> None:
    """Two bridge-mode cmsg deployments side by side on one engine: the second (its own prefix,
    data_dir, network and ports) publishes its management listeners at cm_admin_host_port and
    sg_admin_host_port, both pairs are healthy on their own loopback ports, a second run changes
    nothing, and the upgrade's drain wait reads the second node's ports."""
    cli = deployment.cli
    prefix = unique_prefix("bridge2")
    cm_admin, sg_admin = free_port(), free_port()
    args = dict(
        deployment.module_args,
        name_prefix=prefix,
        data_dir=str(tmp_path / "cmsg2"),
        docker_network_cidr=free_cidr(cli),
        https_port=free_port(),
        http_port=free_port(),
        pcoip_port=free_port(),
        cm_admin_host_port=cm_admin,
        sg_admin_host_port=sg_admin,
        host_label="bridge2",
    )
    try:
        run = await asyncio.to_thread(run_module, "cmsg", args)
        assert not run.failed and run.changed, run.result
        assert run.result["config"]["management_urls"] == {
            "cm": f"http://127.0.0.1:{cm_admin}",
            "sg": f"http://127.0.0.1:{sg_admin}",
        }
        # The containers keep their own ports; only the host side differs between the two.
        for prefix_of, ports in (
            (deployment.prefix, {"cm": 9180, "sg": 9172}),
            (prefix, {"cm": cm_admin, "sg": sg_admin}),
        ):
            for role, container_port in (("cm", 9180), ("sg", 9172)):
                container = cli.containers.get(f"{prefix_of}-{role}")
                assert container.status == "running", container.name
                (binding,) = container.ports[f"{container_port}/tcp"]
                assert binding == {"HostIp": "127.0.0.1", "HostPort": str(ports[role])}, container.name
        # Each pair answers on its own loopback ports, and each CM follows its own SG (over its own
        # network, at <prefix>-sg:9172).
        for cm_port, sg_port in ((9180, 9172), (cm_admin, sg_admin)):
            deadline = time.monotonic() + 15
            while True:
                _status, text = await asyncio.to_thread(management, cm_port, "/metrics")
                if metric(text, "gatehouse_cm_security_gateway_up") == 1.0:
                    break
                assert time.monotonic() < deadline, f"the CM on {cm_port} does not see its SG"
                await asyncio.sleep(0.2)
            assert (await asyncio.to_thread(management, cm_port, "/health"))[0] == 200, cm_port
            status, text = await asyncio.to_thread(management, sg_port, "/metrics")
            assert status == 200 and "gatehouse_sg_sessions_active" in text, sg_port
            assert (await asyncio.to_thread(management, sg_port, "/health"))[0] == 200, sg_port
        # The public side of both pairs is healthy as well.
        assert await deployment.cm_health() == 200
        connector = aiohttp.TCPConnector(ssl=deployment.client_ctx)
        async with aiohttp.ClientSession(connector=connector) as http:
            url = f"https://127.0.0.1:{args['https_port']}/health"
            async with http.get(url, timeout=aiohttp.ClientTimeout(total=5)) as resp:
                assert resp.status == 200
        again = await asyncio.to_thread(run_module, "cmsg", args)
        assert not again.failed and not again.changed, again.result
        # The upgrade's drain wait on the second node asks its ports, not the first node's.
        node_vars = {"cmsg_cm_admin_host_port": cm_admin, "cmsg_sg_admin_host_port": sg_admin}
        idle = await asyncio.to_thread(wait_drained, tmp_path, 20, **node_vars)
        assert idle.returncode == 0, idle.stdout[-3000:]
        assert task_result(idle, "Wait until the node's CM")["url"] == f"http://127.0.0.1:{cm_admin}/metrics"
        assert task_result(idle, "Wait until the node's SG")["url"] == f"http://127.0.0.1:{sg_admin}/metrics"
    finally:
        cleanup(cli, prefix)


def logged(deployment: Deployment, role: str, key: str, since: float = 0) -> set[str]:
    """The values of ``key`` in the JSON log lines of a container since ``since`` (epoch seconds)."""
    return {entry[key] for entry in log_entries(deployment, role, since) if entry.get(key)}


def log_entries(deployment: Deployment, role: str, since: float = 0) -> list[dict[str, Any]]:
    """The JSON log lines of a container since ``since`` (epoch seconds)."""
    kwargs = {"since": since} if since else {}
    raw = deployment.container(role).logs(**kwargs).decode("utf-8", "replace")
    entries = []
    for line in raw.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict):
            entries.append(entry)
    return entries


def host_sides(cidr: str) -> list[str]:
    """The host-side addresses of the two client namespaces: the first host of each /30 of ``cidr``."""
    return [str(next(net.hosts())) for net in ipaddress.ip_network(cidr).subnets(new_prefix=30)]


# Runs inside a client namespace (``ClientHost.run``): ``flood URL CA COUNT`` sends COUNT anonymous
# hellos (8 at a time) and prints the count of each answer; ``session URL CA HOST:PORT`` runs a
# whole session, with the session channel dialled at HOST:PORT, and prints its report.
NS_CLIENT = """
import asyncio, collections, json, os, sys
import aiohttp
from gatehouse import protocol as p, tls
from gatehouse.client.flow import run_session

mode, url, ca, arg = sys.argv[1:5]
ctx = tls.client_context(ca, verify=True, role="sg")

async def hello(http):
    body = p.render("pcoip-client", p.Hello())
    async with http.post(url + p.PATH_BROKER, data=body, headers={"Content-Type": p.CONTENT_TYPE}) as resp:
        reply = p.parse(await resp.read(), "pcoip-client")
    return getattr(reply, "result_id", "") or "OK"

async def flood(count):
    connector = aiohttp.TCPConnector(ssl=ctx, limit=8)
    async with aiohttp.ClientSession(
        connector=connector, cookie_jar=aiohttp.DummyCookieJar(), timeout=aiohttp.ClientTimeout(total=15)
    ) as http:
        return collections.Counter(await asyncio.gather(*(hello(http) for _n in range(count))))

async def session():
    host, port = arg.rsplit(":", 1)
    report = await run_session(
        url, os.environ["GH_USER"], os.environ["GH_PASSWORD"], domain="CORP", ssl_context=ctx,
        tcp_bytes=8192, step_timeout=10, connect_to=(host, int(port)),
    )
    return report.to_dict()

print(json.dumps(asyncio.run(flood(int(arg)) if mode == "flood" else session())))
"""


@dataclass(frozen=True)
class ClientHost:
    """A network namespace standing in for a client on another host.

    It has its own ``address`` on a veth pair whose host side is ``host_address``; the client
    dials ``host_address`` (local to the host), so the engine's DNAT rule for published ports
    applies and the CM and SG see ``address``.
    """

    netns: str
    veth: str
    address: str
    host_address: str

    async def run(self, *argv: str) -> dict[str, Any]:
        env = {**os.environ, "GH_USER": USER, "GH_PASSWORD": USER_PW}
        proc = await asyncio.create_subprocess_exec(
            "ip", "netns", "exec", self.netns, sys.executable, "-c", NS_CLIENT, *argv,
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        try:
            out, err = await asyncio.wait_for(proc.communicate(), 60)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise
        assert proc.returncode == 0, err.decode("utf-8", "replace")
        return json.loads(out)

    async def flood(self, deployment: Deployment, count: int) -> Counter[str]:
        url = f"https://{self.host_address}:{deployment.https_port}"
        return Counter(await self.run("flood", url, str(deployment.ca), str(count)))

    async def session(self, deployment: Deployment) -> SessionReport:
        """A whole session; the CM hands out 127.0.0.1 (for the loopback tests), so the session
        channel is dialled at the published SG port on ``host_address`` (TLS names unchanged)."""
        url = f"https://{self.host_address}:{deployment.https_port}"
        sg = f"{self.host_address}:{deployment.pcoip_port}"
        raw = await self.run("session", url, str(deployment.ca), sg)
        return SessionReport(**{**raw, "steps": [Step(**step) for step in raw["steps"]]})


def ip_command(*argv: str) -> None:
    subprocess.run(["ip", *argv], check=True, capture_output=True, text=True, timeout=10)


@contextlib.contextmanager
def client_hosts(cidr: str, tag: str) -> Iterator[tuple[ClientHost, ClientHost]]:
    """Two client namespaces, one /30 of ``cidr`` each; removed on the way out, even on failure."""
    hosts = []
    for index, net in enumerate(ipaddress.ip_network(cidr).subnets(new_prefix=30)):
        host_side, inside = (str(a) for a in net.hosts())
        hosts.append(ClientHost(f"{tag}-client{index}", f"gh{tag[-8:]}{index}", inside, host_side))
    try:
        for host in hosts:
            ip_command("netns", "add", host.netns)
            ip_command("link", "add", host.veth, "type", "veth", "peer", "name", "eth0", "netns", host.netns)
            ip_command("addr", "add", f"{host.host_address}/30", "dev", host.veth)
            ip_command("link", "set", host.veth, "up")
            ip_command("-n", host.netns, "addr", "add", f"{host.address}/30", "dev", "eth0")
            ip_command("-n", host.netns, "link", "set", "eth0", "up")
            ip_command("-n", host.netns, "link", "set", "lo", "up")
            ip_command("-n", host.netns, "route", "add", "default", "via", host.host_address)
        yield hosts[0], hosts[1]
    finally:
        for host in hosts:
            # Deleting the namespace deletes its end of the pair, and with it the host's end.
            subprocess.run(["ip", "netns", "del", host.netns], capture_output=True, check=False)
            subprocess.run(["ip", "link", "del", host.veth], capture_output=True, check=False)


async def test_an_anonymous_hello_flood_through_the_published_port(deployment: Deployment) -> None:
    """An attacker host floods the published CM port with anonymous hellos; a user host gets in.

    Both are client namespaces reaching the published ports the way internet clients do (DNAT,
    source kept): the attacker is held at PRE_AUTH_PER_SOURCE unauthenticated sessions while the
    user's whole session (TCP and UDP echo through the published SG port) completes during the
    flood and after it, with the attacker's sessions still alive.
    """
    if os.geteuid() != 0:
        pytest.skip("client network namespaces need root (ip netns)")
    begun = time.time()
    with client_hosts(deployment.clients_cidr, deployment.prefix) as (attacker, user):
        flood = await attacker.flood(deployment, 2 * PRE_AUTH_PER_SOURCE)
        assert flood == {"OK": PRE_AUTH_PER_SOURCE, p.E_BUSY: PRE_AUTH_PER_SOURCE}, flood

        # During: the attacker keeps knocking (every hello refused) while the user runs a session.
        more, during = await asyncio.gather(
            attacker.flood(deployment, 4 * PRE_AUTH_PER_SOURCE), user.session(deployment)
        )
        assert more == {p.E_BUSY: 4 * PRE_AUTH_PER_SOURCE}, more
        assert_session_ok(during)

        # After: the flood stopped, its sessions still hold the attacker's cap; the user gets in.
        assert_session_ok(await user.session(deployment))
        assert await attacker.flood(deployment, 1) == {p.E_BUSY: 1}

    # The services told the two hosts apart: the CM by address, the SG saw the user.
    cm_log = [e for e in log_entries(deployment, "cm", since=begun) if e.get("client_ip")]
    assert {e["client_ip"] for e in cm_log} == {attacker.address, user.address}
    refused = Counter(e["client_ip"] for e in cm_log if e.get("result") == p.E_BUSY)
    assert refused == {attacker.address: PRE_AUTH_PER_SOURCE + 4 * PRE_AUTH_PER_SOURCE + 1}, refused
    assert logged(deployment, "sg", "client", since=begun) == {user.address}

    logs = deployment.container("cm").logs().decode("utf-8", "replace")
    logs += deployment.container("sg").logs().decode("utf-8", "replace")
    logs += deployment.broker.logs() + deployment.agent.logs()
    env = (deployment.data_dir / "data" / "cmsg.env").read_text()
    grant_secret = env.split("GATEHOUSE_GRANTSECRET=")[1].split("\n")[0]
    for secret in (USER_PW, ADMIN_TOKEN, grant_secret):
        assert secret not in logs


# ---------------------------------------------------------------- IPv6 (last: it redeploys)


async def test_enable_ipv6_serves_ipv6_clients_through_the_published_ports(deployment: Deployment) -> None:
    """enable_ipv6 on the same deployment: the network gains a unique local IPv6 subnet, the SG
    listens on both families, a second run changes nothing, and a client on the host's IPv6
    loopback completes a session (TCP and UDP) through the published ports, sent to the SG's IPv6
    address; an IPv4 client still works. (The engine's userland proxy carries the host's IPv6
    loopback to the containers, so both arrive from the network's gateway address.)"""
    v6 = f"fd00:{secrets.randbelow(0xFFFF) + 1:x}:{secrets.randbelow(0xFFFF) + 1:x}::/64"
    args = dict(
        deployment.module_args,
        enable_ipv6=True,
        external_pcoip_ip=["127.0.0.1", "::1"],
        docker_network_cidr_v6=v6,
    )
    run = run_module("cmsg", args)
    assert not run.failed and run.changed, run.result
    network = deployment.cli.networks.get(f"{deployment.prefix}-cmsg")
    assert network.attrs["EnableIPv6"] is True
    assert sorted(c["Subnet"] for c in network.attrs["IPAM"]["Config"]) == sorted(
        [deployment.module_args["docker_network_cidr"], v6]
    )
    assert run.result["config"]["security_gateway_conf"]["ListenAddress"] == "::"
    assert run.result["config"]["network"]["subnet_v6"] == v6
    again = run_module("cmsg", args)
    assert not again.failed and not again.changed, again.result
    for url, prefer_ipv6, target in (
        (f"https://[::1]:{deployment.https_port}", True, "::1"),
        (deployment.cm_url, False, "127.0.0.1"),
    ):
        report = await run_session(
            url,
            USER,
            USER_PW,
            domain="CORP",
            ssl_context=deployment.client_ctx,
            tcp_bytes=8192,
            prefer_ipv6=prefer_ipv6,
        )
        assert report.ok, [(st.name, st.result, st.detail) for st in report.steps if not st.ok]
        assert report.target == f"{target}:{deployment.pcoip_port}"
