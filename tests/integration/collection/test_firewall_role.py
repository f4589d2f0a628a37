"""gatehouse.access.firewall through playbooks/site.yml in check mode on localhost.

The test containers have no firewalld, so the role skips the firewalld tasks; it still shows the
rules it would add (task "The firewall rules of this node"), computed from the inventory groups by
site.yml. The firewalld tasks loop over exactly these lists.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from collection_helpers import REPO_ROOT, run_playbook


def firewall_rules(directory: Path, inventory: dict) -> dict[str, dict]:
    """Run site.yml's firewall part in check mode on ``inventory``: each host's planned rules."""
    inventory_path = directory / "hosts.yml"
    inventory_path.write_text(yaml.safe_dump(inventory))
    run = run_playbook(
        "-i", str(inventory_path), str(REPO_ROOT / "playbooks" / "site.yml"), "--check", "--tags", "firewall"
    )
    assert run.returncode == 0, run.stdout[-5000:]
    return {
        host: result["msg"]
        for play in run.report["plays"]
        for task in play["tasks"]
        if task["task"]["name"].endswith("The firewall rules of this node")
        for host, result in task["hosts"].items()
    }


def inventory_of(tmp: Path, children: dict, **extra_vars: object) -> dict:
    """An inventory of ``children`` on localhost with the firewall managed and management 198.51.100.0/24."""
    return {
        "all": {
            "vars": {
                "gatehouse_manage_firewall": True,
                "gatehouse_secrets_dir": str(tmp / "secrets"),
                "gatehouse_firewall_admin_sources": ["198.51.100.0/24"],
                "ansible_connection": "local",
                "ansible_python_interpreter": sys.executable,
                **extra_vars,
            },
            "children": children,
        }
    }


def rule(source: str, port: int, proto: str = "tcp") -> str:
    family = "ipv6" if ":" in source else "ipv4"
    return f'rule family="{family}" source address="{source}" port port="{port}" protocol="{proto}" accept'


@pytest.fixture(scope="module")
def rules(tmp_path_factory) -> dict[str, dict]:
    tmp = tmp_path_factory.mktemp("firewall")
    inventory = inventory_of(
        tmp,
        {
            "brokers": {
                "hosts": {
                    "b1": {
                        "gatehouse_address": "10.0.0.10",
                        # Secrets are not needed to work out the connections (no module runs).
                        "broker_directories": [
                            {
                                "domain": "CORP",
                                "servers": ["ldaps://dc1.corp.example", "ldap://dc2.corp.example"],
                            },
                            {"domain": "LAB", "servers": ["ldaps://[fd00::389]:3269"]},
                        ],
                        "broker_second_factor": {
                            "method": "radius",
                            "radius_servers": [
                                "10.0.0.5",
                                "radius2.corp.example:1645",
                                "[fd00::5]:1812",
                                "fd00::6",
                            ],
                        },
                    }
                }
            },
            "cmsg": {
                "hosts": {
                    "c1": {"gatehouse_address": "10.0.0.21"},
                    "c2": {"gatehouse_address": "10.0.0.22", "cmsg_enable_security_gateway": False},
                    "c3": {
                        "gatehouse_address": "10.0.0.23",
                        "gatehouse_network_mode": "host",
                        "firewall_enable_ipv6": True,
                    },
                }
            },
            "desktops": {
                "hosts": {
                    "d1": {
                        "gatehouse_address": "10.0.0.31",
                        "agent_instances": [{"name": "d1a"}, {"name": "d1b", "control_port": 60444}],
                    }
                }
            },
            "halb": {
                "vars": {
                    # A second virtual server (TLS passthrough to the gateways) and another peers port.
                    "halb_virtual_servers": [
                        {"name": "cm", "vip": "10.0.0.40", "port": 443},
                        {"name": "sg", "vip": "10.0.0.40", "port": "4172", "mode": "tcp"},
                    ],
                    "halb_stick_table_peers_port": 10010,
                },
                "hosts": {
                    # VRRP and the stick-table peers use halb_address (here another interface).
                    "h1": {"gatehouse_address": "10.0.0.41", "halb_address": "10.0.1.41"},
                    "h2": {"ansible_host": "fd00::42"},
                },
            },
        },
    )
    found = firewall_rules(tmp, inventory)
    assert set(found) == {"b1", "c1", "c2", "c3", "d1", "h1", "h2"}, found
    return found


# The HALB nodes as sources: each one's address, and h1's halb_address (its VRRP and peers source).
HALB = ("10.0.0.41", "10.0.1.41", "fd00::42")
FORWARDS = ["port=443:proto=tcp:toport=8443:toaddr=", "port=80:proto=tcp:toport=8080:toaddr="]


def test_broker_port_only_to_cms_desktops_halb_and_management(rules) -> None:
    broker = rules["b1"]
    assert broker["public_ports"] == []
    sources = ["10.0.0.21", "10.0.0.22", "10.0.0.23", "10.0.0.31", *HALB, "198.51.100.0/24"]
    assert sorted(broker["rich_rules"]) == sorted(rule(s, 443) for s in sources)
    assert broker["closed_ports"] == ["443/tcp"]
    assert broker["forward_ports"] == []


def test_agent_control_ports_only_to_the_cms(rules) -> None:
    desk = rules["d1"]
    assert sorted(desk["public_ports"]) == ["4172/tcp", "4172/udp"]
    assert sorted(desk["rich_rules"]) == sorted(
        rule(s, p) for s in ("10.0.0.21", "10.0.0.22", "10.0.0.23") for p in (60443, 60444)
    )
    assert sorted(desk["closed_ports"]) == ["60443/tcp", "60444/tcp"]


def test_cm_sg_public_ports_and_admin_ports_to_halb_and_management(rules) -> None:
    gateway = rules["c1"]
    assert sorted(gateway["public_ports"]) == ["4172/tcp", "4172/udp", "443/tcp", "80/tcp"]
    admin = (*HALB, "198.51.100.0/24")
    assert sorted(gateway["rich_rules"]) == sorted(rule(s, p) for s in admin for p in (9180, 9172))
    assert gateway["forward_ports"] == FORWARDS
    # No security gateway: no 4172, no 9172.
    lan = rules["c2"]
    assert sorted(lan["public_ports"]) == ["443/tcp", "80/tcp"]
    assert sorted(lan["rich_rules"]) == sorted(rule(s, 9180) for s in admin)
    # Host network mode: the HALB reaches the CM on 8443 itself (443 is only forwarded to it); with
    # IPv6 the forwards are rich rules too (firewalld's forward ports are IPv4 only).
    host_mode = rules["c3"]
    assert sorted(host_mode["public_ports"]) == ["4172/tcp", "4172/udp", "443/tcp", "80/tcp"]
    assert sorted(host_mode["rich_rules"]) == sorted(
        [rule(s, p) for s in admin for p in (9180, 9172)]
        + [rule(s, 8443) for s in HALB]
        + [
            'rule family="ipv6" forward-port port="443" protocol="tcp" to-port="8443"',
            'rule family="ipv6" forward-port port="80" protocol="tcp" to-port="8080"',
        ]
    )
    assert host_mode["forward_ports"] == FORWARDS
    assert "8443/tcp" in host_mode["closed_ports"]


def test_halb_virtual_server_ports_peers_and_vrrp_only_from_the_pair(rules) -> None:
    halb = rules["h1"]
    # Every virtual server's port, from halb_virtual_servers.
    assert sorted(halb["public_ports"]) == ["4172/tcp", "443/tcp"]
    # The stick-table peers port from halb_stick_table_peers_port.
    expected = [rule(s, 10010) for s in HALB]
    expected += [
        'rule family="ipv4" source address="10.0.0.41" protocol value="vrrp" accept',
        'rule family="ipv4" source address="10.0.1.41" protocol value="vrrp" accept',
        'rule family="ipv6" source address="fd00::42" protocol value="vrrp" accept',
    ]
    assert sorted(halb["rich_rules"]) == sorted(expected)
    assert not any("vrrp" in r and "source" not in r for r in halb["rich_rules"])
    assert halb["closed_ports"] == ["10010/tcp"]
    assert halb["forward_ports"] == []


def test_broker_outbound_only_to_its_directories_and_radius_servers(rules) -> None:
    """Shown, not opened: firewalld zones filter incoming traffic; the answers are established traffic."""
    broker = rules["b1"]
    assert broker["outbound"] == [
        {"destination": "dc1.corp.example", "port": 636, "protocol": "tcp", "purpose": "directory of CORP"},
        {"destination": "dc2.corp.example", "port": 389, "protocol": "tcp", "purpose": "directory of CORP"},
        {"destination": "fd00::389", "port": 3269, "protocol": "tcp", "purpose": "directory of LAB"},
        {"destination": "10.0.0.5", "port": 1812, "protocol": "udp", "purpose": "RADIUS"},
        {"destination": "radius2.corp.example", "port": 1645, "protocol": "udp", "purpose": "RADIUS"},
        {"destination": "fd00::5", "port": 1812, "protocol": "udp", "purpose": "RADIUS"},
        {"destination": "fd00::6", "port": 1812, "protocol": "udp", "purpose": "RADIUS"},
    ]
    # Nothing incoming is opened for them, and no other node shows them.
    assert not any(p.startswith(("389/", "636/", "1812/", "3269/")) for p in broker["public_ports"])
    assert not any('port="636"' in r or 'port="1812"' in r for r in broker["rich_rules"])
    for host in ("c1", "c2", "c3", "d1", "h1", "h2"):
        assert rules[host]["outbound"] == [], host


def test_metrics_ports_only_to_the_monitoring_host_and_prometheus_only_to_management(tmp_path) -> None:
    """With a monitoring host m1 (its own host), every node opens its metrics endpoint to m1 only."""
    inventory = inventory_of(
        tmp_path,
        {
            "brokers": {"hosts": {"b1": {"gatehouse_address": "10.0.0.10"}}},
            "cmsg": {"hosts": {"c1": {"gatehouse_address": "10.0.0.21"}}},
            "halb": {
                "vars": {"halb_virtual_servers": [{"name": "cm", "vip": "10.0.0.40", "port": 443}]},
                "hosts": {"h1": {"gatehouse_address": "10.0.0.41", "halb_metrics_port": 8406}},
            },
            "monitoring": {"hosts": {"m1": {"gatehouse_address": "10.0.0.50", "monitoring_port": 9091}}},
        },
    )
    found = firewall_rules(tmp_path, inventory)
    admin, monitor = "198.51.100.0/24", "10.0.0.50"
    # Prometheus' own port: management only, nothing public.
    assert found["m1"]["public_ports"] == []
    assert found["m1"]["rich_rules"] == [rule(admin, 9091)]
    # The broker's management port 9181 to the monitoring host only; its TLS port as before.
    assert sorted(found["b1"]["rich_rules"]) == sorted(
        [rule(s, 443) for s in ("10.0.0.21", "10.0.0.41", admin)] + [rule(monitor, 9181)]
    )
    # CM and SG admin ports: the HALB, management and the monitoring host.
    assert sorted(found["c1"]["rich_rules"]) == sorted(
        rule(s, p) for s in ("10.0.0.41", admin, monitor) for p in (9180, 9172)
    )
    # The HALB's metrics frontend (halb_metrics_port) to the monitoring host only.
    assert rule(monitor, 8406) in found["h1"]["rich_rules"]
    assert [r for r in found["h1"]["rich_rules"] if "8406" in r] == [rule(monitor, 8406)]
    assert "8406/tcp" not in found["h1"]["public_ports"]


def test_double_hop_dmz_rules_per_tier(tmp_path) -> None:
    """Forwarder f1 (outer DMZ, also the HALB node of the CM's virtual server) -> inner CM/SG c1 ->
    broker b1 and desktop d1. The forwarder opens 4172 to the world and reaches only c1's 4172; c1's
    4172 is open to the forwarder only; the broker and the agents accept the inner tier only."""
    inventory = inventory_of(
        tmp_path,
        {
            "brokers": {"hosts": {"b1": {"gatehouse_address": "10.0.2.10"}}},
            "cmsg": {
                "hosts": {"c1": {"gatehouse_address": "10.0.2.21", "gatehouse_dmz_address": "10.0.1.21"}}
            },
            "desktops": {"hosts": {"d1": {"gatehouse_address": "10.0.2.31"}}},
            "sg_forwarders": {
                "hosts": {"f1": {"gatehouse_address": "203.0.113.21", "gatehouse_dmz_address": "10.0.1.11"}}
            },
            "halb": {
                "vars": {"halb_virtual_servers": [{"name": "cm", "vip": "203.0.113.40", "port": 443}]},
                "hosts": {"f1": {}},
            },
        },
    )
    found = firewall_rules(tmp_path, inventory)
    assert set(found) == {"b1", "c1", "d1", "f1"}, found
    admin, outer = "198.51.100.0/24", ("203.0.113.21", "10.0.1.11")
    # Outer tier: 4172 for the world (and the HALB's virtual server), SG admin to management only;
    # its one connection out is its inner SG's 4172.
    forwarder = found["f1"]
    assert sorted(forwarder["public_ports"]) == ["4172/tcp", "4172/udp", "443/tcp"]
    assert rule(admin, 9172) in forwarder["rich_rules"]
    assert not any(
        f'source address="{s}" port port="9172"' in r for s in outer for r in forwarder["rich_rules"]
    )
    assert forwarder["outbound"] == [
        {"destination": "10.0.1.21", "port": 4172, "protocol": "tcp", "purpose": "inner security gateway"},
        {"destination": "10.0.1.21", "port": 4172, "protocol": "udp", "purpose": "inner security gateway"},
    ]
    # Inner SG: 4172 from the forwarder only (no longer public); admin ports never from the outer tier.
    inner = found["c1"]
    assert sorted(inner["public_ports"]) == ["443/tcp", "80/tcp"]
    assert sorted(inner["rich_rules"]) == sorted(
        [rule(admin, 9180), rule(admin, 9172)] + [rule(s, 4172, p) for s in outer for p in ("tcp", "udp")]
    )
    assert {"4172/tcp", "4172/udp"} <= set(inner["closed_ports"])
    # Broker: the inner tier and management only, not the forwarder (although it is a HALB node).
    assert sorted(found["b1"]["rich_rules"]) == sorted(
        rule(s, 443) for s in ("10.0.2.21", "10.0.2.31", admin)
    )
    # Agents: control and session ports from the inner CM/SG only; nothing public.
    desk = found["d1"]
    assert desk["public_ports"] == []
    assert sorted(desk["rich_rules"]) == sorted(
        [rule("10.0.2.21", 60443)] + [rule("10.0.2.21", 4172, p) for p in ("tcp", "udp")]
    )
    for host in ("b1", "c1", "d1"):
        assert not any(s in r for s in outer for r in found[host]["rich_rules"] if 'port="4172"' not in r), (
            host
        )


def test_multisite_rules_per_site(tmp_path) -> None:
    """Two sites (gatehouse_site on each site's group): every site's CMs reach every site's agent
    control port, each site's HALB node only its own site's CMs and peers, and - where the session
    ports are internal (a forwarder in front of site 1) - each site's desktops accept the session
    ports from their own site's SG only."""
    secret = {"cmsg_grant_secret": "x" * 40}
    inventory = inventory_of(
        tmp_path,
        {
            "brokers": {"hosts": {"b1": {"gatehouse_address": "10.0.0.10"}}},
            "cmsg": {
                "hosts": {
                    "c1": {"gatehouse_address": "10.1.0.21", **secret},
                    "c2": {"gatehouse_address": "10.2.0.21", **secret},
                }
            },
            "desktops": {
                "hosts": {
                    "d1": {"gatehouse_address": "10.1.0.31"},
                    "d2": {"gatehouse_address": "10.2.0.31"},
                }
            },
            "halb": {
                "vars": {"halb_virtual_servers": [{"name": "cm", "vip": "10.0.0.40", "port": 443}]},
                "hosts": {
                    "h1": {"gatehouse_address": "10.1.0.41"},
                    "h2": {"gatehouse_address": "10.2.0.41"},
                },
            },
            "sg_forwarders": {"hosts": {"f1": {"gatehouse_address": "203.0.113.21"}}},
            "site1": {"vars": {"gatehouse_site": "site1"}, "hosts": {"c1": {}, "d1": {}, "h1": {}}},
            "site2": {"vars": {"gatehouse_site": "site2"}, "hosts": {"c2": {}, "d2": {}, "h2": {}}},
        },
        gatehouse_firewall_admin_sources=[],
    )
    found = firewall_rules(tmp_path, inventory)
    assert set(found) == {"b1", "c1", "c2", "d1", "d2", "h1", "h2", "f1"}, found
    # Agents: the control port from both sites' CMs; the session ports from their own site's SG.
    for desk, own in (("d1", "10.1.0.21"), ("d2", "10.2.0.21")):
        assert sorted(found[desk]["rich_rules"]) == sorted(
            [rule("10.1.0.21", 60443), rule("10.2.0.21", 60443)]
            + [rule(own, 4172, p) for p in ("tcp", "udp")]
        ), desk
    # CM/SG admin ports from their own site's HALB node only.
    for cm, halb, other in (("c1", "10.1.0.41", "10.2.0.41"), ("c2", "10.2.0.41", "10.1.0.41")):
        assert rule(halb, 9180) in found[cm]["rich_rules"]
        assert rule(halb, 9172) in found[cm]["rich_rules"]
        assert not any(f'source address="{other}"' in r for r in found[cm]["rich_rules"]), cm
    # HALB nodes: peers and VRRP from their own site's node only.
    for halb, own, other in (("h1", "10.1.0.41", "10.2.0.41"), ("h2", "10.2.0.41", "10.1.0.41")):
        assert rule(own, 10000) in found[halb]["rich_rules"]
        assert (
            f'rule family="ipv4" source address="{own}" protocol value="vrrp" accept'
            in found[halb]["rich_rules"]
        )
        assert not any(other in r for r in found[halb]["rich_rules"]), halb
    # The broker: every site's CMs, desktops and HALB nodes.
    assert sorted(found["b1"]["rich_rules"]) == sorted(
        rule(s, 443) for s in ("10.1.0.21", "10.2.0.21", "10.1.0.31", "10.2.0.31", "10.1.0.41", "10.2.0.41")
    )


def test_multisite_without_a_shared_grant_secret_fails_early(tmp_path) -> None:
    local = {"ansible_connection": "local", "ansible_python_interpreter": sys.executable}
    inventory = {
        "all": {
            "vars": {"gatehouse_secrets_dir": str(tmp_path / "secrets"), **local},
            "children": {
                "cmsg": {
                    "hosts": {
                        "c1": {"gatehouse_address": "10.1.0.21"},
                        "c2": {"gatehouse_address": "10.2.0.21"},
                    }
                },
                "site1": {"vars": {"gatehouse_site": "site1"}, "hosts": {"c1": {}}},
                "site2": {"vars": {"gatehouse_site": "site2"}, "hosts": {"c2": {}}},
            },
        }
    }
    inventory_path = tmp_path / "hosts.yml"
    inventory_path.write_text(yaml.safe_dump(inventory))
    run = run_playbook("-i", str(inventory_path), str(REPO_ROOT / "playbooks" / "site.yml"), "--check")
    assert run.returncode != 0
    assert "need one grant secret shared by every CM/SG node" in run.stdout, run.stdout[-3000:]
    # It stops in the first play, before anything is deployed.
    assert "Work out each host's tenant, site" in run.stdout and "Connection broker" not in run.stdout, (
        run.stdout[-3000:]
    )


def test_each_tenant_broker_takes_load_reports_from_its_own_desktops_only(tmp_path) -> None:
    """Two tenants behind one CM/SG: each tenant's broker port is open to the CMs, the HALB and its
    own tenant's desktops - never to the other tenant's desktops (docs/tenants.md)."""
    inventory = inventory_of(
        tmp_path,
        {
            "brokers": {
                "hosts": {
                    "b-a": {
                        "gatehouse_address": "10.31.0.10",
                        "gatehouse_tenant": "tenant-a",
                        "gatehouse_tenant_host_names": ["desktops.a.example"],
                    },
                    "b-b": {
                        "gatehouse_address": "10.32.0.10",
                        "gatehouse_tenant": "tenant-b",
                        "gatehouse_tenant_host_names": ["desktops.b.example"],
                    },
                }
            },
            "cmsg": {"hosts": {"c1": {"gatehouse_address": "10.30.0.21"}}},
            "desktops": {
                "hosts": {
                    "d-a": {"gatehouse_address": "10.31.0.31", "gatehouse_tenant": "tenant-a"},
                    "d-b": {"gatehouse_address": "10.32.0.31", "gatehouse_tenant": "tenant-b"},
                }
            },
            "halb": {
                "vars": {"halb_virtual_servers": [{"name": "cm", "vip": "10.30.0.40", "port": 443}]},
                "hosts": {"h1": {"gatehouse_address": "10.30.0.41"}},
            },
        },
        gatehouse_firewall_admin_sources=[],
    )
    found = firewall_rules(tmp_path, inventory)
    for broker, own in (("b-a", "10.31.0.31"), ("b-b", "10.32.0.31")):
        assert sorted(found[broker]["rich_rules"]) == sorted(
            rule(s, 443) for s in ("10.30.0.21", own, "10.30.0.41")
        ), broker
    # The agents' control port is the shared CM's, whatever the tenant.
    for desk in ("d-a", "d-b"):
        assert rule("10.30.0.21", 60443) in found[desk]["rich_rules"], desk


PG_URL = "postgresql://broker@10.0.0.61:5432,10.0.0.62:5432/broker"


def two_brokers(second_url: str | None = PG_URL) -> dict:
    """Brokers b1 and b2 behind the HALB's virtual server "broker" (port 8443) beside the CMs' one."""
    return {
        "brokers": {
            "hosts": {
                "b1": {"gatehouse_address": "10.0.0.10", "broker_database_url": PG_URL},
                "b2": {"gatehouse_address": "10.0.0.11"}
                | ({"broker_database_url": second_url} if second_url else {}),
            }
        },
        "cmsg": {"hosts": {"c1": {"gatehouse_address": "10.0.0.21"}}},
        "desktops": {"hosts": {"d1": {"gatehouse_address": "10.0.0.31"}}},
        "halb": {
            "vars": {
                "halb_virtual_servers": [
                    {
                        "name": "cm",
                        "vip": "10.0.0.40",
                        "port": 443,
                        "backends": "{{ gatehouse__halb_backends }}",
                    },
                    {
                        "name": "broker",
                        "vip": "10.0.0.40",
                        "port": 8443,
                        "backends": "{{ gatehouse__broker_backends }}",
                    },
                ]
            },
            "hosts": {"h1": {"gatehouse_address": "10.0.0.41"}},
        },
    }


def test_the_brokers_virtual_server_is_internal_like_the_brokers_port(tmp_path) -> None:
    found = firewall_rules(
        tmp_path, inventory_of(tmp_path, two_brokers(), gatehouse_broker_url="https://10.0.0.40:8443")
    )
    halb = found["h1"]
    # The CMs' virtual server is public; the brokers' is open to the CMs, the desktops and management only.
    assert halb["public_ports"] == ["443/tcp"]
    assert sorted(r for r in halb["rich_rules"] if "8443" in r) == sorted(
        rule(s, 8443) for s in ("10.0.0.21", "10.0.0.31", "198.51.100.0/24")
    )
    # Each broker node takes the HALB's connections (its health checks and the balanced traffic).
    for broker in ("b1", "b2"):
        assert rule("10.0.0.41", 443) in found[broker]["rich_rules"]


def test_several_brokers_without_a_shared_postgresql_database_are_refused(tmp_path) -> None:
    inventory_path = tmp_path / "hosts.yml"
    inventory_path.write_text(yaml.safe_dump(inventory_of(tmp_path, two_brokers(second_url=None))))
    run = run_playbook(
        "-i", str(inventory_path), str(REPO_ROOT / "playbooks" / "site.yml"), "--check", "--tags", "firewall"
    )
    assert run.returncode != 0
    assert "each needs broker_database_url" in run.stdout and "without it: b2." in run.stdout
    assert not any(  # refused in the first play, before any host's firewall
        task["task"]["name"].endswith("The firewall rules of this node")
        for play in run.report["plays"]
        for task in play["tasks"]
    )


def test_database_ports_only_between_the_hosts_that_need_them(tmp_path) -> None:
    """Three database nodes (db1 shares broker b1's host address) and a monitoring host."""
    children = two_brokers()
    children["databases"] = {
        "hosts": {
            "db1": {"gatehouse_address": "10.0.0.61"},
            "db2": {"gatehouse_address": "10.0.0.62"},
            "db3": {"gatehouse_address": "10.0.0.63"},
        }
    }
    children["monitoring"] = {"hosts": {"m1": {"gatehouse_address": "10.0.0.50"}}}
    found = firewall_rules(
        tmp_path, inventory_of(tmp_path, children, gatehouse_broker_url="https://10.0.0.40:8443")
    )
    admin, monitor = "198.51.100.0/24", "10.0.0.50"
    nodes = ("10.0.0.61", "10.0.0.62", "10.0.0.63")
    for db in ("db1", "db2", "db3"):
        assert found[db]["public_ports"] == []
        assert sorted(found[db]["rich_rules"]) == sorted(
            [rule(s, 5432) for s in ("10.0.0.10", "10.0.0.11", *nodes, admin)]
            + [rule(s, 8008) for s in (*nodes, monitor, admin)]
            + [rule(s, p) for s in nodes for p in (2379, 2380)]
        ), db
    # Nothing of the database on the other hosts.
    assert not any(str(p) in r for r in found["c1"]["rich_rules"] for p in (5432, 8008, 2379, 2380))
