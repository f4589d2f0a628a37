"""HALB pair in ``network_mode: host`` (the role's default), planned by site.yml in check mode.

A real run would put the VIP on this machine's own interface, so the pair is only planned:
``site.yml --check --diff`` for two HALB nodes (both run here, connection local, each with its own
data directory and container names) in front of two connection managers in host network mode
(addresses of TEST-NET-2; check mode sends them nothing). The module still renders the
configuration and has ``haproxy -c`` and ``keepalived -t`` accept it in a throwaway container
without network, as in a real run.

Asserted: the container the run would create (host network, no published ports, the HALB's
capabilities, computed by the same code the real run creates it with from the arguments the role
passed), the rendered haproxy.cfg and keepalived.conf (the CM virtual server's backends on 8443,
the connection managers' own port in host mode), nothing created or written, and that the
firewall role (``site.yml --tags firewall``, check mode) opens on the connection managers exactly
the ports the HALB connects to, to the HALB nodes only, and on the HALB nodes the virtual server,
the stick-table peers port and VRRP.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from collection_helpers import REPO_ROOT, PlaybookRun, ensure_importable, run_playbook
from deploy_helpers import unique_prefix
from pki import TestPKI

pytestmark = [pytest.mark.docker, pytest.mark.images, pytest.mark.timeout(600)]

VERSION = str(yaml.safe_load((REPO_ROOT / "galaxy.yml").read_text())["version"])
IMAGE = f"gatehouse/halb:{VERSION}"
VIP = "198.51.100.100"
CMS = {"cm1": "198.51.100.21", "cm2": "198.51.100.22"}
HALBS = {"h1": "198.51.100.41", "h2": "198.51.100.42"}
CONVERGE = "Converge the HALB node"
SHOWN = "The firewall rules of this node"


def interface() -> str:
    """The interface of this machine's default route: in host mode the module requires the VRRP
    interface to exist (Docker's bridges come and go with other tests' networks)."""
    for line in Path("/proc/net/route").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] == "00000000":
            return fields[0]
    return "lo"


def task_results(run: PlaybookRun, name: str) -> dict[str, dict[str, Any]]:
    return {
        host: result
        for play in run.report["plays"]
        for task in play["tasks"]
        if task["task"]["name"].endswith(name)
        for host, result in task["hosts"].items()
    }


class Planned:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.prefix = unique_prefix("halbhost")
        pki = TestPKI(tmp / "pki")
        pki.export_ca(tmp / "secrets" / "ca")
        vip_tls = pki.issue("halb-vip", [VIP])
        self.interface = interface()
        local = {"ansible_connection": "local", "ansible_python_interpreter": sys.executable}
        inventory = {
            "all": {
                "vars": {
                    "gatehouse_secrets_dir": str(tmp / "secrets"),
                    "gatehouse_manage_firewall": True,
                    **local,
                },
                "children": {
                    "cmsg": {
                        "hosts": {
                            name: {"gatehouse_address": address, "gatehouse_network_mode": "host"}
                            for name, address in CMS.items()
                        }
                    },
                    "halb": {
                        "vars": {
                            "halb_vips": [f"{VIP}/24"],
                            "halb_interface": self.interface,
                            "halb_virtual_servers": [
                                {
                                    "name": "cm",
                                    "vip": VIP,
                                    "port": 443,
                                    "mode": "http",
                                    "tls_cert": str(vip_tls.cert),
                                    "tls_key": str(vip_tls.key),
                                    "persistence": "cookie",
                                    "backend_ca_file": str(pki.ca),
                                    "backends": "{{ gatehouse__halb_backends }}",
                                },
                                # In front of the gateways, checked on the SG's plain admin port.
                                {
                                    "name": "sg",
                                    "vip": VIP,
                                    "port": 4172,
                                    "mode": "tcp",
                                    "backends": [
                                        {"name": name, "address": address, "port": 4172}
                                        for name, address in CMS.items()
                                    ],
                                    "health_check": {"tls": False, "port": 9172},
                                },
                            ],
                        },
                        # No gatehouse_network_mode: the halb role's default, host.
                        "hosts": {
                            name: {
                                "gatehouse_address": address,
                                "gatehouse_data_root": str(tmp / name),
                                "gatehouse_name_prefix": f"{self.prefix}-{name}",
                            }
                            for name, address in HALBS.items()
                        },
                    },
                },
            }
        }
        self.inventory = tmp / "hosts.yml"
        self.inventory.write_text(yaml.safe_dump(inventory))

    def site(self, *args: str) -> PlaybookRun:
        run = run_playbook("-i", str(self.inventory), str(REPO_ROOT / "playbooks" / "site.yml"), *args)
        assert run.returncode == 0, run.stdout[-8000:] + run.stderr[-3000:]
        return run

    def container(self, host: str) -> str:
        return f"{self.prefix}-{host}-halb"


@pytest.fixture(scope="module")
def planned(tmp_path_factory: pytest.TempPathFactory) -> Planned:
    if subprocess.run(["docker", "image", "inspect", IMAGE], capture_output=True, check=False).returncode:
        pytest.skip(f"image {IMAGE} is missing: make images")
    return Planned(tmp_path_factory.mktemp("halb-host"))


@pytest.fixture(scope="module")
def halb_run(planned: Planned) -> dict[str, dict[str, Any]]:
    run = planned.site("--check", "--diff", "--limit", "halb")
    results = task_results(run, CONVERGE)
    assert set(results) == set(HALBS), results
    return results


@pytest.fixture(scope="module")
def firewall_run(planned: Planned) -> dict[str, dict[str, Any]]:
    run = planned.site("--check", "--tags", "firewall", "--limit", "cm1,h1")
    shown = {host: result["msg"] for host, result in task_results(run, SHOWN).items()}
    assert set(shown) == {"cm1", "h1"}, shown
    return shown


def after(result: dict[str, Any], suffix: str) -> str:
    texts = [d["after"] for d in result["diff"] if d.get("after_header", "").endswith(suffix)]
    assert len(texts) == 1, [d.get("after_header") for d in result["diff"]]
    return texts[0]


def test_the_planned_container_uses_the_host_network_without_published_ports(
    planned: Planned, halb_run: dict[str, dict[str, Any]]
) -> None:
    ensure_importable()
    from ansible_collections.gatehouse.access.plugins.module_utils._docker import containers as ctr
    from ansible_collections.gatehouse.access.plugins.module_utils._halb import runtime as hd

    for host, result in halb_run.items():
        assert result["changed"] is True
        assert {"validated", "created container"} <= set(result["actions"]), result["actions"]
        assert result["container"]["status"] == "absent"
        args = result["invocation"]["module_args"]
        assert args["network_mode"] == "host" and not args["ipv4_address"]
        spec = hd.container_spec(
            name=args["container_name"],
            image=f"gatehouse/halb:{args['image_tag']}",
            host_label=args["host_label"],
            config_dir=args["config_dir"],
            network_mode=args["network_mode"],
            ipv4_address=args["ipv4_address"],
            container_limits=args["container_limits"],
        )
        create = ctr._create_args(spec, spec["labels"])
        host_config = create["host_config"]
        assert host_config["network_mode"] == "host"
        assert "ports" not in create and "port_bindings" not in host_config and "endpoint" not in create
        # keepalived moves the VIP and sends VRRP; HAProxy binds 443 and drops to its user.
        assert host_config["cap_add"] == [
            "KILL", "NET_ADMIN", "NET_BIND_SERVICE", "NET_BROADCAST", "NET_RAW", "SETGID", "SETUID",
        ]  # fmt: skip
        assert host_config["cap_drop"] == ["ALL"]
        # Check mode: nothing created, nothing written.
        assert args["container_name"] == planned.container(host)
        inspect = subprocess.run(
            ["docker", "container", "inspect", args["container_name"]], capture_output=True, check=False
        )
        assert inspect.returncode != 0
        assert not Path(args["config_dir"]).exists()


def test_the_rendered_configuration_sends_the_cm_virtual_server_to_8443(
    planned: Planned, halb_run: dict[str, dict[str, Any]]
) -> None:
    for host, result in halb_run.items():
        haproxy = after(result, "haproxy.cfg")
        assert re.search(rf"^\s*bind {re.escape(VIP)}:443\b", haproxy, re.M), haproxy
        assert re.search(rf"^\s*bind {re.escape(VIP)}:4172\b", haproxy, re.M), haproxy
        servers = {
            (address, int(port)) for address, port in re.findall(r"^\s*server \S+ (\S+):(\d+)", haproxy, re.M)
        }
        # The CM virtual server on the connection managers' own 8443 (host mode), the SG one on 4172.
        assert servers == {(address, port) for address in CMS.values() for port in (8443, 4172)}, haproxy
        keepalived = after(result, "keepalived.conf")
        assert re.search(rf"^\s*interface {re.escape(planned.interface)}$", keepalived, re.M), keepalived
        assert f"{VIP}/24" in keepalived
        peer = HALBS["h2" if host == "h1" else "h1"]
        assert re.search(rf"^\s*{re.escape(peer)}$", keepalived, re.M), keepalived


def _ports_to(haproxy: str, address: str) -> set[int]:
    """The ports HAProxy connects to on ``address``: its servers' ports and their check ports."""
    ports = set()
    for line in re.findall(rf"^\s*server \S+ {re.escape(address)}:.*$", haproxy, re.M):
        ports.add(int(re.search(r":(\d+)", line).group(1)))
        ports.update(int(p) for p in re.findall(r"\bport (\d+)", line))
    return ports


def test_the_firewall_opens_exactly_the_ports_the_halb_uses(
    halb_run: dict[str, dict[str, Any]], firewall_run: dict[str, dict[str, Any]]
) -> None:
    haproxy = after(halb_run["h1"], "haproxy.cfg")
    used = _ports_to(haproxy, CMS["cm1"])
    assert used == {8443, 4172, 9172}, haproxy
    cm1 = firewall_run["cm1"]
    public = {int(p.split("/")[0]) for p in cm1["public_ports"] if p.endswith("/tcp")}
    to_halb = {
        int(port)
        for rule in cm1["rich_rules"]
        for source, port in re.findall(r'source address="([^"]+)" port port="(\d+)"', rule)
        if source == HALBS["h1"]
    }
    # Every port the HALB connects to is open to it: 8443 only to the HALB nodes (host mode: the
    # CM's own port; clients come in on 443, forwarded), the admin ports to the HALB nodes and the
    # management hosts (9180 serves a check of the CM's admin port).
    assert used <= public | to_halb
    assert to_halb == {8443, 9172, 9180}
    assert cm1["public_ports"] == ["80/tcp", "443/tcp", "4172/tcp", "4172/udp"]
    assert cm1["forward_ports"] == [
        "port=443:proto=tcp:toport=8443:toaddr=",
        "port=80:proto=tcp:toport=8080:toaddr=",
    ]
    # On the HALB node: both virtual servers to everyone; peers and VRRP from the pair only.
    h1 = firewall_run["h1"]
    assert h1["public_ports"] == ["443/tcp", "4172/tcp"]
    assert sorted(h1["rich_rules"]) == sorted(
        [
            *(
                f'rule family="ipv4" source address="{address}" port port="10000" protocol="tcp" accept'
                for address in HALBS.values()
            ),
            *(
                f'rule family="ipv4" source address="{address}" protocol value="vrrp" accept'
                for address in HALBS.values()
            ),
        ]
    )
