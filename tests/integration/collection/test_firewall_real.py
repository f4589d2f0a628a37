"""gatehouse.access.firewall through playbooks/site.yml against a real firewalld.

Two containers of gatehouse/firewalld-test (hack/build-debian-image.sh firewalld-test) run firewalld with
its nftables backend in their own network namespace (``--cap-add NET_ADMIN``, not privileged):
``cm1``, a connection manager with its security gateway in host network mode (the CM listens on
8443 and 8080 itself; 443 and 80 are forwarded to them, for IPv6 too), and ``h1``, a HALB node
with two virtual servers (443, and 4172 in front of the gateways) and its stick-table peers on
10001. The inventory also names a broker, a desktop and the second HALB node by address, so the
rich rules get real sources. site.yml (tags firewall, limited to the two containers, connection
community.docker.docker) runs for real, then again to show that nothing changes.

Then firewalld's permanent and runtime configuration must equal what the role's task "The
firewall rules of this node" says it adds, and the filtering must happen: listeners in the two
containers are probed from three client containers with fixed addresses on the same network -
``h2`` (the other HALB node), ``admin`` (inside gatehouse_firewall_admin_sources) and
``outsider`` (in no group). firewalld rejects with ICMP "administratively prohibited", which a
client sees as EHOSTUNREACH ("unreachable"); an open port without listener would be "refused".
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from collection_helpers import REPO_ROOT, PlaybookRun, run_playbook
from deploy_helpers import docker_client, free_cidr, unique_prefix

try:
    import docker
except ImportError:  # pragma: no cover - the virtualenv has it
    docker = None

# Two site.yml runs; a busy machine needs more than the default 300 s for the module's set-up.
pytestmark = [pytest.mark.docker, pytest.mark.images, pytest.mark.timeout(600)]

VERSION = str(yaml.safe_load((REPO_ROOT / "galaxy.yml").read_text())["version"])
IMAGE = f"gatehouse/firewalld-test:{VERSION}"
LABELS = {"gatehouse.test": "firewall"}
# Host part of each address in the test network; cm1 and h1 are the firewalld containers.
HOSTS = {"b1": 10, "cm1": 20, "d1": 30, "h1": 41, "h2": 42, "admin": 130, "outsider": 200}
FIREWALLS = ("cm1", "h1")
CLIENTS = ("h2", "admin", "outsider")
# The management hosts (gatehouse_firewall_admin_sources): .128/26 holds "admin", not "outsider".
ADMIN_OFFSET, ADMIN_PREFIXLEN = 128, 26
PEERS_PORT = 10001

# cm1: the CM on 8443 and 8080, its admin port 9180, the SG on 4172 (tcp, udp) and 9172.
# h1: the virtual servers 443 and 4172, the peers port 10001. Nobody may reach 5000, nor h1's
# 10000 (the default peers port, not the one configured).
LISTEN = {
    "cm1": ([8443, 8080, 9180, 4172, 9172, 5000], [4172, 5000]),
    "h1": ([443, 4172, PEERS_PORT, 10000, 5000], [5000]),
}

# Listeners in a firewalld container: every TCP connection gets "<local port>\n", every UDP
# datagram the same as answer; VRRP (IP protocol 112) packets are logged by source address.
LISTENER = r"""
import socket, sys, threading
tcp, udp = [int(p) for p in sys.argv[1].split(",") if p], [int(p) for p in sys.argv[2].split(",") if p]
def serve_tcp(port):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port)); s.listen(16)
    while True:
        c, _ = s.accept(); c.sendall(b"%d\n" % port); c.close()
def serve_udp(port):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("0.0.0.0", port))
    while True:
        _, peer = s.recvfrom(512); s.sendto(b"%d\n" % port, peer)
def log_vrrp():
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, 112)
    while True:
        _, peer = s.recvfrom(512)
        with open("/tmp/vrrp.log", "a") as f: f.write(peer[0] + "\n")
for target, ports in ((serve_tcp, tcp), (serve_udp, udp), (log_vrrp, [None])):
    for port in ports:
        threading.Thread(target=target, args=() if port is None else (port,)).start()
"""

# Probes from a container: argv[1] is a JSON list of [proto, address, port]; prints a JSON list
# of "open:<answer>", "refused", "unreachable", "timeout" or "sent" (vrrp: nothing comes back).
PROBE = r"""
import json, socket, sys
out = []
for proto, address, port in json.loads(sys.argv[1]):
    kind = {"tcp": socket.SOCK_STREAM, "udp": socket.SOCK_DGRAM, "vrrp": socket.SOCK_RAW}[proto]
    s = socket.socket(socket.AF_INET, kind, 112 if proto == "vrrp" else 0); s.settimeout(1.5)
    try:
        if proto == "vrrp":
            s.sendto(bytes([0x31, 51, 100, 1, 0, 25, 0, 0]), (address, 0)); out.append("sent"); continue
        s.connect((address, port))
        if proto == "udp":
            s.send(b"ping")
        out.append("open:" + s.recv(64).decode().strip())
    except ConnectionRefusedError:
        out.append("refused")
    except TimeoutError:
        out.append("timeout")
    except OSError as exc:
        out.append("unreachable" if exc.errno == 113 else repr(exc))
    finally:
        s.close()
print(json.dumps(out))
"""

Target = tuple[str, str, int]  # (protocol, firewalld host, port)


@dataclass
class Lab:
    prefix: str
    network: ipaddress.IPv4Network

    def ip(self, host: str) -> str:
        return str(self.network.network_address + HOSTS[host])

    @property
    def admin_sources(self) -> str:
        return str(ipaddress.ip_network((int(self.network.network_address) + ADMIN_OFFSET, ADMIN_PREFIXLEN)))

    def container(self, host: str) -> str:
        return f"{self.prefix}-{host}"

    def exec(self, host: str, *command: str, detach: bool = False) -> str:
        return _docker("exec", *(["--detach"] if detach else []), self.container(host), *command)

    def probe(self, client: str, targets: list[Target]) -> dict[Target, str]:
        """What ``client`` gets from each target."""
        wire = [[proto, self.ip(host), port] for proto, host, port in targets]
        answers = json.loads(self.exec(client, "python3", "-c", PROBE, json.dumps(wire)))
        return dict(zip(targets, answers, strict=True))

    def zone(self, host: str, *, permanent: bool) -> dict[str, list[str]]:
        """``firewall-cmd [--permanent] --zone=public --list-all`` as {setting: sorted entries}."""
        out = self.exec(
            host, "firewall-cmd", *(["--permanent"] if permanent else []), "--zone=public", "--list-all"
        )
        settings: dict[str, list[str]] = {}
        key = ""
        for line in out.splitlines()[1:]:
            if line.startswith("\t"):  # forward ports and rich rules: one a line below their key
                settings[key].append(line.strip())
            else:
                key, value = (line.strip() + ":").split(":", 1)
                settings[key] = value.rstrip(":").split()
        return {key: sorted(entries) for key, entries in settings.items()}


def _docker(*args: str, timeout: float = 120) -> str:
    proc = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout, check=False)
    assert proc.returncode == 0, f"docker {' '.join(args[:3])} ...: {proc.stdout}{proc.stderr}"
    return proc.stdout


def _start(lab: Lab, host: str) -> None:
    firewall = host in FIREWALLS
    # Not privileged: firewalld needs NET_ADMIN (nftables) in its own network namespace; NET_RAW
    # (Docker's default anyway) serves the VRRP listener and probe.
    caps = ["--cap-add=NET_ADMIN", "--cap-add=NET_RAW"] if firewall else []
    labels = [f"--label={key}={value}" for key, value in LABELS.items()]
    _docker(
        "run", "--detach", f"--name={lab.container(host)}", f"--hostname={host}", *labels, *caps,
        f"--network={lab.prefix}", f"--ip={lab.ip(host)}", IMAGE, "firewalld" if firewall else "idle",
    )  # fmt: skip
    if firewall:
        tcp, udp = (",".join(map(str, ports)) for ports in LISTEN[host])
        lab.exec(host, "python3", "-c", LISTENER, tcp, udp, detach=True)


def _wait(lab: Lab, host: str, timeout: float = 90) -> None:
    """Until firewalld answers and the listeners accept (probed from inside: lo is never filtered)."""
    tcp, udp = LISTEN[host]
    own = [("tcp", host, port) for port in tcp] + [("udp", host, port) for port in udp]
    deadline = time.monotonic() + timeout
    while True:
        proc = subprocess.run(
            ["docker", "logs", lab.container(host)], capture_output=True, text=True, check=False
        )
        logs = proc.stdout + proc.stderr
        if "gatehouse-firewalld: ready" in logs and all(
            a.startswith("open:") for a in lab.probe(host, own).values()
        ):
            return
        if time.monotonic() > deadline or "gatehouse-firewalld: firewalld " in logs:
            pytest.fail(f"firewalld or the listeners did not start in {host}:\n{logs[-3000:]}")
        time.sleep(0.3)


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    cli = docker_client()
    try:
        cli.images.get(IMAGE)
    except docker.errors.ImageNotFound:
        pytest.skip(
            f"image {IMAGE} is missing: make images (only it: IMAGES=firewalld-test hack/build-images.sh)"
        )
    prefix = unique_prefix("firewall")
    network = None
    try:
        # Another test may take the same free /24 in the meantime: then the next one.
        for _attempt in range(5):
            cidr = free_cidr(cli, pool="10.207.0.0/16", prefixlen=24)
            ipam = docker.types.IPAMConfig(pool_configs=[docker.types.IPAMPool(subnet=cidr)])
            try:
                network = cli.networks.create(prefix, driver="bridge", ipam=ipam, labels=LABELS)
                break
            except docker.errors.APIError as exc:
                if "overlap" not in str(exc):
                    raise
        assert network is not None, "no free /24 in 10.207.0.0/16"
        lab = Lab(prefix, ipaddress.ip_network(cidr))
        with ThreadPoolExecutor(max_workers=len(HOSTS)) as pool:
            list(pool.map(lambda host: _start(lab, host), (*FIREWALLS, *CLIENTS)))
            list(pool.map(lambda host: _wait(lab, host), FIREWALLS))
        yield lab
    finally:
        for host in (*FIREWALLS, *CLIENTS):
            subprocess.run(["docker", "rm", "--force", f"{prefix}-{host}"], capture_output=True, check=False)
        if network is not None:
            network.remove()


@dataclass
class Applied:
    first: PlaybookRun
    second: PlaybookRun
    # The role's task "The firewall rules of this node" of the first run, by host.
    shown: dict[str, dict[str, Any]]


@pytest.fixture(scope="module")
def applied(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Applied:
    tmp = tmp_path_factory.mktemp("firewall-real")
    container = {
        "ansible_connection": "community.docker.docker",
        "ansible_python_interpreter": "/usr/bin/python3",
        "ansible_pipelining": True,
    }
    inventory = {
        "all": {
            "vars": {
                "gatehouse_manage_firewall": True,
                "gatehouse_secrets_dir": str(tmp / "secrets"),
                "gatehouse_firewall_admin_sources": [lab.admin_sources],
                # The CM listens on 8443 and 8080 of the host; the HALB's backend port is 8443.
                "gatehouse_network_mode": "host",
                "ansible_connection": "local",
                "ansible_python_interpreter": sys.executable,
            },
            "children": {
                "brokers": {"hosts": {"b1": {"gatehouse_address": lab.ip("b1")}}},
                "cmsg": {
                    "hosts": {
                        "cm1": {
                            "gatehouse_address": lab.ip("cm1"),
                            "ansible_host": lab.container("cm1"),
                            "firewall_enable_ipv6": True,
                            **container,
                        }
                    }
                },
                "desktops": {"hosts": {"d1": {"gatehouse_address": lab.ip("d1")}}},
                "halb": {
                    "vars": {
                        "halb_virtual_servers": [
                            {"name": "cm", "vip": lab.ip("h1"), "port": 443},
                            {"name": "sg", "vip": lab.ip("h1"), "port": 4172, "mode": "tcp"},
                        ],
                        "halb_stick_table_peers_port": PEERS_PORT,
                    },
                    "hosts": {
                        "h1": {
                            "gatehouse_address": lab.ip("h1"),
                            "ansible_host": lab.container("h1"),
                            **container,
                        },
                        "h2": {"gatehouse_address": lab.ip("h2")},
                    },
                },
            },
        }
    }
    path = tmp / "hosts.yml"
    path.write_text(yaml.safe_dump(inventory))
    args = ("-i", str(path), str(REPO_ROOT / "playbooks" / "site.yml"), "--tags", "firewall")
    args += ("--limit", ",".join(FIREWALLS))
    first = run_playbook(*args)
    assert first.returncode == 0, first.stdout[-8000:] + first.stderr[-3000:]
    second = run_playbook(*args)
    assert second.returncode == 0, second.stdout[-8000:] + second.stderr[-3000:]
    shown: dict[str, dict[str, Any]] = {}
    for play in first.report["plays"]:
        for task in play["tasks"]:
            if task["task"]["name"].endswith("The firewall rules of this node"):
                shown.update({host: result["msg"] for host, result in task["hosts"].items()})
    assert set(shown) == set(FIREWALLS), shown
    return Applied(first, second, shown)


def rich(source: str, port: int) -> str:
    return f'rule family="ipv4" source address="{source}" port port="{port}" protocol="tcp" accept'


def test_first_run_changes_the_firewall_and_the_second_changes_nothing(applied: Applied) -> None:
    for host in FIREWALLS:
        first, second = applied.first.report["stats"][host], applied.second.report["stats"][host]
        assert first["failures"] == first["unreachable"] == 0, first
        assert first["changed"] > 0, first
        assert second["failures"] == second["unreachable"] == 0, second
        assert second["changed"] == 0, (host, second)
    # firewalld was found: the role did not skip its firewalld tasks.
    for play in applied.first.report["plays"]:
        for task in play["tasks"]:
            if task["task"]["name"].endswith("Skip the firewall where firewalld is not running"):
                assert all(result.get("skipped") for result in task["hosts"].values()), task["hosts"]


def test_the_role_shows_the_rules_of_each_node(lab: Lab, applied: Applied) -> None:
    halb = [lab.ip("h1"), lab.ip("h2")]
    cm = applied.shown["cm1"]
    assert sorted(cm["public_ports"]) == ["4172/tcp", "4172/udp", "443/tcp", "80/tcp"]
    assert sorted(cm["rich_rules"]) == sorted(
        [rich(source, port) for source in [*halb, lab.admin_sources] for port in (9180, 9172)]
        + [rich(source, 8443) for source in halb]
        + [
            f'rule family="ipv6" forward-port port="{p}" protocol="tcp" to-port="{to}"'
            for p, to in ((443, 8443), (80, 8080))
        ]
    )
    assert cm["forward_ports"] == [
        "port=443:proto=tcp:toport=8443:toaddr=",
        "port=80:proto=tcp:toport=8080:toaddr=",
    ]
    h1 = applied.shown["h1"]
    assert sorted(h1["public_ports"]) == ["4172/tcp", "443/tcp"]
    assert sorted(h1["rich_rules"]) == sorted(
        [rich(source, PEERS_PORT) for source in halb]
        + [f'rule family="ipv4" source address="{source}" protocol value="vrrp" accept' for source in halb]
    )
    assert h1["forward_ports"] == []


@pytest.mark.parametrize("permanent", [False, True], ids=["runtime", "permanent"])
def test_firewalld_holds_exactly_the_rules_shown(lab: Lab, applied: Applied, permanent: bool) -> None:
    for host in FIREWALLS:
        shown, zone = applied.shown[host], lab.zone(host, permanent=permanent)
        assert zone["ports"] == sorted(shown["public_ports"]), host
        assert zone["rich rules"] == sorted(shown["rich_rules"]), host
        assert zone["forward-ports"] == sorted(shown["forward_ports"]), host
        # The role adds nothing else: the zone's own settings stay as shipped.
        assert zone["services"] == ["dhcpv6-client", "ssh"], host
        assert zone["target"] == ["default"], host
        assert zone["sources"] == zone["protocols"] == zone["source-ports"] == [], host
        assert zone["masquerade"] == ["no"], host


def test_public_ports_answer_everyone(lab: Lab, applied: Applied) -> None:
    # 443 and 80 of the CM node reach the CM's own 8443 and 8080 (forward ports).
    expected = {
        ("tcp", "cm1", 443): "open:8443",
        ("tcp", "cm1", 80): "open:8080",
        ("tcp", "cm1", 4172): "open:4172",
        ("udp", "cm1", 4172): "open:4172",
        ("tcp", "h1", 443): "open:443",
        ("tcp", "h1", 4172): "open:4172",
    }
    for client in CLIENTS:
        assert lab.probe(client, list(expected)) == expected, client


def test_internal_ports_answer_only_their_sources(lab: Lab, applied: Applied) -> None:
    cm_backend, cm_admin, sg_admin = ("tcp", "cm1", 8443), ("tcp", "cm1", 9180), ("tcp", "cm1", 9172)
    peers = ("tcp", "h1", PEERS_PORT)
    reachable = {
        "h2": {cm_backend, cm_admin, sg_admin, peers},  # the other HALB node
        "admin": {cm_admin, sg_admin},  # management: the admin ports only
        "outsider": set(),
    }
    targets = [cm_backend, cm_admin, sg_admin, peers]
    for client, allowed in reachable.items():
        expected = {target: f"open:{target[2]}" if target in allowed else "unreachable" for target in targets}
        assert lab.probe(client, targets) == expected, client


def test_other_ports_answer_nobody(lab: Lab, applied: Applied) -> None:
    targets = [
        ("tcp", "cm1", 5000),
        ("udp", "cm1", 5000),
        ("tcp", "cm1", 8080),  # reached through 80 only
        ("tcp", "h1", 5000),
        ("udp", "h1", 5000),
        ("tcp", "h1", 10000),  # not the configured peers port
    ]
    for client in CLIENTS:
        assert lab.probe(client, targets) == dict.fromkeys(targets, "unreachable"), client


def test_vrrp_only_from_the_other_halb_node(lab: Lab, applied: Applied) -> None:
    lab.exec("h1", "rm", "-f", "/tmp/vrrp.log")
    for client in CLIENTS:
        assert lab.probe(client, [("vrrp", "h1", 0)]) == {("vrrp", "h1", 0): "sent"}
    # The listener logs what passed the firewall; a packet from the others would have come first.
    deadline = time.monotonic() + 5
    while not (seen := lab.exec("h1", "sh", "-c", "cat /tmp/vrrp.log 2>/dev/null || true").split()):
        assert time.monotonic() < deadline, "no VRRP packet reached h1"
        time.sleep(0.2)
    assert seen == [lab.ip("h2")]
