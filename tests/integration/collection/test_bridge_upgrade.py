"""playbooks/upgrade.yml end to end against a CM/SG node in the production default network mode,
``bridge`` (published ports), on this host's own Docker engine.

The topology is deployed by playbooks/site.yml from an inventory whose hosts are all this host
(``ansible_connection: local``), each with its own ``gatehouse_name_prefix``, data root, Docker
network and published ports:

* ``cmsg``: node1, CM + SG in bridge mode (no ``gatehouse_network_mode``: the roles' default),
  every port published at a free one, the management listeners on 127.0.0.1;
* ``halb``: lb1 and lb2, a HALB pair on a Docker network the test creates (the HALB module's
  user-defined network mode; its production default, ``host``, would put the VIP on the host's
  own interface). Its virtual server passes TLS through (mode tcp) to ``gatehouse__halb_backends``:
  node1's published CM port on the gateway address of the HALB's network (the host side of its
  bridge), which the engine's userland proxy carries to the CM container. Without a HALB the
  upgrade has no drain to wait for; a pair, because the HALB role makes VRRP peers of its group;
* a broker and an agent as processes on the host, bound to that gateway address too (the
  containers of every network reach it), with certificates from the test CA, which is also the
  deployment CA (``gatehouse_ca_dir``).

The "new version" is the 0.1.0 CM and SG images under a second tag (``gatehouse_cmsg_image_tag``),
removed again at the end. A session relayed by node1's SG is held open while the upgrade starts:
the playbook drains node1 at the HALB and waits, and replaces node1's containers only after the
session was closed. One CM/SG node keeps the test short (three playbook runs of some fifty
tasks each; a second node would add about half of that again); the rolling order over several
nodes is what the Molecule upgrade scenario checks, in ``container:`` network mode.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import secrets
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "security"))

import pki as pkimod
from bridge_helpers import USER, USER_PW, host_services, management, relayed_session, tasks
from collection_helpers import PlaybookRun, run_playbook
from deploy_helpers import IMAGE_TAG, cleanup, docker_client, free_cidr, require_service_images, unique_prefix
from services import free_port
from stack import assert_session_ok

from gatehouse import tls
from gatehouse.client.flow import run_session

docker = pytest.importorskip("docker")
pytestmark = [pytest.mark.docker, pytest.mark.images]

REPO = Path(__file__).resolve().parents[3]
NODE = "node1"
HALBS = ("lb1", "lb2")
HOLD = 4.0  # seconds the held session stays open once the upgrade waits for it
SG_WAIT = "Wait until the node's SG relays no session"

# A notification callback beside the json one (which reports only at the end): it appends each
# retry of an until loop to $GATEHOUSE_RETRY_LOG, so the test sees the drain wait polling.
RETRY_CALLBACK = """
import json, os
from ansible.plugins.callback import CallbackBase

class CallbackModule(CallbackBase):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "notification"
    CALLBACK_NAME = "gatehouse_retries"
    CALLBACK_NEEDS_ENABLED = True

    def v2_runner_retry(self, result):
        event = {"host": result._host.get_name(), "task": result._task.get_name(),
                 "attempts": result._result.get("attempts")}
        with open(os.environ["GATEHOUSE_RETRY_LOG"], "a", encoding="utf-8") as log:
            log.write(json.dumps(event) + "\\n")
"""


@dataclass(frozen=True)
class Node:
    name: str
    prefix: str  # gatehouse_name_prefix: containers <prefix>-cm, <prefix>-sg, network <prefix>-cmsg
    https_port: int
    pcoip_port: int
    cm_admin_port: int
    sg_admin_port: int

    @property
    def cm_url(self) -> str:
        return f"https://127.0.0.1:{self.https_port}"


@dataclass
class Site:
    cli: Any
    root: Path
    inventory: Path
    node: Node
    gateway: str  # the host side of the HALB's network: where the HALB reaches the node
    vip: str
    new_tag: str  # the "new version" of the CM and SG images
    client_ctx: Any

    def playbook(self, name: str, *args: str) -> PlaybookRun:
        """Run playbooks/``name``; its report is kept beside the inventory (<name>-<n>.json) and
        every retry of an ``until`` loop is appended to ``retries`` as it happens."""
        plugins = self.root / "callbacks"
        plugins.mkdir(exist_ok=True)
        (plugins / "gatehouse_retries.py").write_text(RETRY_CALLBACK)
        env = {
            "ANSIBLE_CALLBACK_PLUGINS": str(plugins),
            "ANSIBLE_CALLBACKS_ENABLED": "gatehouse_retries",
            "GATEHOUSE_RETRY_LOG": str(self.retries),
        }
        run = run_playbook(
            "-i", str(self.inventory), str(REPO / "playbooks" / name), *args, timeout=300, env=env
        )
        runs = len(list(self.root.glob("*-[0-9]*.json")))
        (self.root / f"{Path(name).stem}-{runs}.json").write_text(run.stdout)
        return run

    def upgrade(self) -> PlaybookRun:
        return self.playbook("upgrade.yml", "-e", f"gatehouse_cmsg_image_tag={self.new_tag}")

    @property
    def retries(self) -> Path:
        return self.root / "retries.jsonl"

    def retried(self, host: str, task: str) -> int:
        """How many times ``task`` (name prefix) was retried on ``host`` so far."""
        if not self.retries.exists():
            return 0
        events = [json.loads(line) for line in self.retries.read_text().splitlines() if line]
        return sum(1 for e in events if e["host"] == host and e["task"].startswith(task))

    def container(self, role: str) -> Any:
        return self.cli.containers.get(f"{self.node.prefix}-{role}")

    def container_ids(self) -> dict[str, str]:
        return {c.name: c.id for c in (self.container("cm"), self.container("sg"))}

    def haproxy_cfg(self, halb: str) -> str:
        return (self.root / halb / "halb" / "haproxy" / "haproxy.cfg").read_text()


def require_image(cli: Any, ref: str) -> None:
    try:
        cli.images.get(ref)
    except Exception:
        pytest.skip(f"image {ref} is not built yet (run make images)")


@dataclass(frozen=True)
class HalbNetwork:
    """The Docker network of the HALB pair (created by the test) and its addresses."""

    name: str
    cidr: str
    gateway: str  # the host side of its bridge: the node's gatehouse_address, the broker, the agent
    lb: dict[str, str]  # HALB node -> its address
    vip: str


def inventory(
    prefix: str, root: Path, node: Node, cidr: str, net: HalbNetwork, broker_url: str, ca: str
) -> dict:
    """The inventory of site.yml and upgrade.yml; ``cidr`` is the node's Docker network."""
    cmsg_hosts = {
        node.name: {
            "gatehouse_name_prefix": node.prefix,
            "gatehouse_data_root": str(root / node.name),
            # Where the HALB reaches the node's published CM port; the node's certificate names it.
            "gatehouse_address": net.gateway,
            "cmsg_docker_network_cidr": cidr,
            "cmsg_https_port": node.https_port,
            "cmsg_http_port": 0,
            "cmsg_pcoip_port": node.pcoip_port,
            "cmsg_cm_admin_host_port": node.cm_admin_port,
            "cmsg_sg_admin_host_port": node.sg_admin_port,
        }
    }
    halb_hosts = {
        name: {
            "gatehouse_name_prefix": f"{prefix}-{name}",
            "gatehouse_data_root": str(root / name),
            "gatehouse_network_mode": net.name,
            "halb_address": address,
            "halb_ipv4_address": address,
        }
        for name, address in net.lb.items()
    }
    return {
        "all": {
            "vars": {
                "ansible_connection": "local",
                "ansible_python_interpreter": sys.executable,
                "gatehouse_secrets_dir": str(root / "secrets"),
                "gatehouse_broker_url": broker_url,
                "gatehouse_broker_ca_cert": ca,
                "gatehouse_upgrade_grace": 1,
                "gatehouse_upgrade_drain_timeout": 120,
            },
            "children": {
                "cmsg": {
                    "hosts": cmsg_hosts,
                    "vars": {
                        "cmsg_accept_policies": True,
                        # The CM serves its certificate from the deployment CA (cm.pem), which the
                        # HALB verifies; clients reach it on 127.0.0.1 and through the VIP.
                        "cmsg_self_signed": True,
                        "gatehouse_cert_names": ["127.0.0.1", net.vip],
                        # What the CM hands out: the client reaches the published SG port on loopback.
                        "cmsg_external_pcoip_ip": ["127.0.0.1"],
                        # The preflight is for real hosts (swap, disk); the upgrade skips it as well.
                        "cmsg_preflight": False,
                    },
                },
                "halb": {
                    "hosts": halb_hosts,
                    "vars": {
                        "halb_vips": [f"{net.vip}/{ipaddress.ip_network(net.cidr).prefixlen}"],
                        "halb_router_id": 61,
                        "halb_virtual_servers": [
                            {
                                "name": "cm",
                                "vip": net.vip,
                                "port": 443,
                                "mode": "tcp",
                                "persistence": "source",
                                "health_check": {"interval": "500ms", "rise": 1, "fall": 2},
                                "backends": "{{ gatehouse__halb_backends }}",
                            }
                        ],
                    },
                },
            },
        }
    }


@pytest.fixture(scope="module")
def site(pki: pkimod.TestPKI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    cli = docker_client()
    require_service_images(cli, "cm", "sg")
    require_image(cli, f"gatehouse/halb:{IMAGE_TAG}")
    prefix = unique_prefix("upgrade")
    root = tmp_path_factory.mktemp("upgrade")
    new_tag = f"{IMAGE_TAG}-upgrade-{secrets.token_hex(4)}"
    cidr = ipaddress.ip_network(free_cidr(cli))
    net = HalbNetwork(
        f"{prefix}-halbnet",
        str(cidr),
        str(cidr.network_address + 1),
        {name: str(cidr.network_address + 11 + n) for n, name in enumerate(HALBS)},
        str(cidr.network_address + 100),
    )
    node = Node(NODE, f"{prefix}-{NODE}", free_port(), free_port(), free_port(), free_port())
    tagged: list[str] = []
    try:
        ipam = docker.types.IPAMConfig(
            pool_configs=[docker.types.IPAMPool(subnet=net.cidr, gateway=net.gateway)]
        )
        cli.networks.create(net.name, driver="bridge", ipam=ipam)
        node_cidr = free_cidr(cli)  # after the HALB's network exists: not the same one
        for role in ("cm", "sg"):
            cli.images.get(f"gatehouse/{role}:{IMAGE_TAG}").tag(f"gatehouse/{role}", new_tag)
            tagged.append(f"gatehouse/{role}:{new_tag}")
        pki.export_ca(root / "secrets" / "ca")
        with host_services(pki, root, net.gateway, prefix) as services:
            path = root / "inventory.json"
            path.write_text(
                json.dumps(inventory(prefix, root, node, node_cidr, net, services.broker_url, str(pki.ca)))
            )
            site = Site(
                cli,
                root,
                path,
                node,
                net.gateway,
                net.vip,
                new_tag,
                tls.client_context(pki.ca, verify=True, role="sg"),
            )
            deployed = site.playbook("site.yml")
            assert deployed.returncode == 0, deployed.stdout[-4000:] + deployed.stderr[-2000:]
            yield site
    finally:
        cleanup(cli, prefix)
        for ref in tagged:
            # Only the extra tag goes: the image keeps its 0.1.0 tag.
            cli.images.remove(ref)


@dataclass
class Upgrade:
    run: PlaybookRun
    before: dict[str, str]  # container name -> id before the upgrade
    closed_at: datetime.datetime  # (just before) the held session was closed (UTC)
    drained_config: dict[str, str]  # lb -> haproxy.cfg while the upgrade waited


def started(task: dict[str, Any]) -> datetime.datetime:
    return datetime.datetime.fromisoformat(task["task"]["duration"]["start"].replace("Z", "+00:00"))


def ended(task: dict[str, Any]) -> datetime.datetime:
    return datetime.datetime.fromisoformat(task["task"]["duration"]["end"].replace("Z", "+00:00"))


@pytest.fixture(scope="module")
def upgrade(site: Site) -> Upgrade:
    """The upgrade, started while the node's SG relays a session; the session is closed HOLD
    seconds after the playbook's drain wait first found it still open."""
    before = site.container_ids()

    async def scenario() -> Upgrade:
        held = await relayed_session(site.node.cm_url, site.client_ctx)
        running = asyncio.ensure_future(asyncio.to_thread(site.upgrade))
        try:
            deadline = time.monotonic() + 120
            while not site.retried(NODE, SG_WAIT):
                assert not running.done(), "the upgrade ended without waiting for the node's session"
                assert time.monotonic() < deadline, "the upgrade never waited for the node's SG"
                await asyncio.sleep(0.1)
            drained = {lb: site.haproxy_cfg(lb) for lb in HALBS}
            await asyncio.sleep(HOLD)
            assert not running.done(), "the upgrade ended while the node's SG relayed a session"
            # Still the old containers: nothing replaced them while the session was open.
            assert site.container_ids() == before
        finally:
            closed_at = datetime.datetime.now(datetime.UTC)
            held.close()
        return Upgrade(await running, before, closed_at, drained)

    return asyncio.run(scenario())


def test_the_upgrade_drains_the_node_and_waits_for_the_relayed_session(site: Site, upgrade: Upgrade) -> None:
    run = upgrade.run
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    node = site.node
    # While the upgrade waited, both HALB nodes had the node drained (no new sessions), at its
    # published CM port on the host side of the HALB's network (gatehouse__halb_backends).
    for lb, config in upgrade.drained_config.items():
        (server,) = [line.strip() for line in config.splitlines() if line.strip().startswith("server ")]
        assert server.startswith(f"server {NODE} {site.gateway}:{node.https_port} "), (lb, server)
        assert " weight 0" in server and server.endswith("# state: drain"), (lb, server)
    # The drain wait read the node's own published management ports; the CM had nothing in flight.
    (cm_wait,) = tasks(run, "Wait until the node's CM")
    assert cm_wait["hosts"][NODE]["url"] == f"http://127.0.0.1:{node.cm_admin_port}/metrics"
    assert cm_wait["hosts"][NODE]["attempts"] == 1
    (sg_wait,) = tasks(run, SG_WAIT)
    assert sg_wait["hosts"][NODE]["url"] == f"http://127.0.0.1:{node.sg_admin_port}/metrics"
    # The SG wait polled until the session was closed; only then did the containers go.
    assert sg_wait["hosts"][NODE]["attempts"] > 1, sg_wait["hosts"][NODE]
    assert ended(sg_wait) >= upgrade.closed_at
    assert ended(sg_wait) - started(sg_wait) >= datetime.timedelta(seconds=HOLD)
    (converge,) = tasks(run, "Converge the connection manager and security gateway")
    assert list(converge["hosts"]) == [NODE] and converge["hosts"][NODE]["changed"] is True
    assert started(converge) >= upgrade.closed_at
    # Healthy on its published CM port, then back into service at the HALB.
    (health,) = tasks(run, "Check that the upgraded CM is healthy")
    assert health["hosts"][NODE]["url"] == f"https://127.0.0.1:{node.https_port}/health"
    drain, enable = tasks(run, "Converge the HALB node")
    assert all(set(t["hosts"]) == set(HALBS) for t in (drain, enable))
    assert ended(drain) <= started(sg_wait) and ended(health) <= started(enable)


def test_the_node_runs_the_new_tag_and_is_healthy(site: Site, upgrade: Upgrade) -> None:
    assert upgrade.run.returncode == 0
    for role in ("cm", "sg"):
        container = site.container(role)
        assert container.id != upgrade.before[container.name], f"{container.name} was not replaced"
        assert container.status == "running", container.name
        assert container.attrs["Config"]["Image"] == f"gatehouse/{role}:{site.new_tag}", container.name
        assert container.attrs["HostConfig"]["NetworkMode"] == f"{site.node.prefix}-cmsg", container.name
    for port in (site.node.cm_admin_port, site.node.sg_admin_port):
        assert management(port, "/health")[0] == 200, port
    # Back in service at both HALB nodes: nothing drained.
    for lb in HALBS:
        assert "# state:" not in site.haproxy_cfg(lb), lb


async def test_new_sessions_after_the_upgrade(site: Site, upgrade: Upgrade) -> None:
    """hello → allocate → TLS CONNECT → TCP echo → UDP echo through the node's published ports,
    and the CM's /health through the HALB's VIP."""
    assert upgrade.run.returncode == 0
    report = await run_session(
        site.node.cm_url, USER, USER_PW, domain="CORP", ssl_context=site.client_ctx, tcp_bytes=8192
    )
    assert_session_ok(report)
    assert report.target == f"127.0.0.1:{site.node.pcoip_port}"
    connector = aiohttp.TCPConnector(ssl=site.client_ctx)
    async with aiohttp.ClientSession(connector=connector) as http:
        deadline = time.monotonic() + 15
        while True:
            try:
                async with http.get(
                    f"https://{site.vip}/health", timeout=aiohttp.ClientTimeout(total=2)
                ) as resp:
                    if resp.status == 200:
                        break
            except (aiohttp.ClientError, TimeoutError):
                pass
            assert time.monotonic() < deadline, "no CM answers through the VIP"
            await asyncio.sleep(0.2)


def test_a_second_run_with_the_same_tag_changes_nothing_on_the_node(site: Site, upgrade: Upgrade) -> None:
    """Every task on the node reports no change (the HALB nodes drain and enable it again)."""
    assert upgrade.run.returncode == 0
    ids = site.container_ids()
    again = site.upgrade()
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-2000:]
    stats = again.report["stats"][NODE]
    assert stats["failures"] == 0 and stats["ok"] > 0
    changed = [t["task"]["name"] for t in tasks(again, "") if t["hosts"].get(NODE, {}).get("changed")]
    assert stats["changed"] == 0, changed
    (converge,) = tasks(again, "Converge the connection manager and security gateway")
    assert converge["hosts"][NODE]["changed"] is False
    assert site.container_ids() == ids
