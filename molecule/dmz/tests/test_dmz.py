"""dmz: a session from the internet through the forwarders' VIP to the inner SG; the outer tier reaches nothing else."""

from __future__ import annotations

from typing import Any

import gatehouse_verify as gv
import pytest

SCENARIO = "dmz"
INTERNET = "gh-mol-dmz-internet"
VIP = gv.address(11, 100)
FORWARDER = gv.address(11, 21)
FORWARDERS = ("gh-dmz-fwd1", "gh-dmz-fwd2")
FORWARDER_VIP = gv.address(11, 200)  # the forwarders' keepalived VIP, the inner CM's external_pcoip_ip
FORWARDER_DMZ = gv.address(12, 21)
INNER_DMZ = gv.address(12, 31)
INNER_LAN = gv.address(13, 31)
BROKER = gv.address(13, 10)
DESKTOP = gv.address(13, 41)
PYTHON = "/opt/gatehouse/node-venv/bin/python"

# TCP connection attempts from a network namespace, one per "address/port" argument: prints
# "<address> <port> open" or "<address> <port> closed <error>" for each.
PROBE = """
import socket, sys
for target in sys.argv[1:]:
    address, port = target.rsplit("/", 1)
    try:
        socket.create_connection((address, int(port)), timeout=3).close()
        print(address, port, "open")
    except OSError as exc:
        print(address, port, "closed", type(exc).__name__, exc)
"""


def probe(name: str, address: str, port: int) -> str:
    """ "open" or "closed <error>" for one connection attempt from the host container ``name``."""
    code, output = gv.engine().containers.get(name).exec_run([PYTHON, "-c", PROBE, f"{address}/{port}"])
    assert code == 0, output
    return output.decode().strip().split(" ", 2)[2]


def test_services_where_the_topology_puts_them(host: Any, groups: list[str]) -> None:
    name = host.backend.get_hostname()
    found = gv.services(name)
    if "sg_forwarders" in groups:
        # The forwarder runs the SG container alone (no CM, no grant secret); the HALB shares the host.
        assert set(found) == {"sg", "halb"}, found
    else:
        assert set(found) == gv.expected_roles(groups), found
    for containers in found.values():
        assert all(c.status == "running" for c in containers)


@pytest.mark.parametrize("name", ["gh-dmz-fwd1", "gh-dmz-fwd2"])
def test_forwarder_holds_no_secret(name: str) -> None:
    """ForwardTo = the inner SG's dmz address; no TLS key, no grant secret in its data directory."""
    root = gv.STATE_ROOT / SCENARIO / name / "cmsg"
    conf = (root / "data" / "SecurityGateway.conf").read_text(encoding="utf-8")
    assert f"ForwardTo={INNER_DMZ}:4172" in conf.replace(" ", ""), conf
    assert not (root / "certs" / "key.pem").exists()
    env = root / "data" / "cmsg.env"
    assert not env.exists() or "GRANT" not in env.read_text(encoding="utf-8").upper()


def test_hosts_are_attached_only_where_the_topology_puts_them() -> None:
    expected = {
        "gh-dmz-fwd1": {"gh-mol-dmz-internet", "gh-mol-dmz-dmz"},
        "gh-dmz-fwd2": {"gh-mol-dmz-internet", "gh-mol-dmz-dmz"},
        "gh-dmz-cmsg1": {"gh-mol-dmz-dmz", "gh-mol-dmz-lan"},
        "gh-dmz-broker": {"gh-mol-dmz-lan"},
        "gh-dmz-desk1": {"gh-mol-dmz-lan"},
    }
    for name, networks in expected.items():
        container = gv.engine().containers.get(name)
        assert set(container.attrs["NetworkSettings"]["Networks"]) == networks, name


def test_the_vip_is_on_the_internet_side_of_one_forwarder_host() -> None:
    holders = []
    for name, own in (("gh-dmz-fwd1", FORWARDER), ("gh-dmz-fwd2", gv.address(11, 22))):
        code, output = gv.engine().containers.get(name).exec_run(["ip", "-o", "-4", "addr", "show", "eth1"])
        assert code == 0, output
        text = output.decode()
        assert f" {own}/24 " in text, text  # eth1 is the internet side (halb_interface)
        if f" {VIP}/24 " in text:
            holders.append(name)
    assert len(holders) == 1, holders


def test_the_forwarder_vip_is_on_the_internet_side_of_one_forwarder() -> None:
    assert gv.wait_for(lambda: [gv.holds_vip(n, FORWARDER_VIP) for n in FORWARDERS].count(True) == 1, 20)


def session_through_the_forwarder_vip() -> None:
    """The client on the internet network only: CM through the HALB VIP, PCoIP (TCP + UDP echo)
    to the forwarders' VIP, which the inner CM handed out; the inner SG checks the grant against
    the client's address from the forwarder's PROXY v2 header."""
    report = gv.run_client(INTERNET, f"https://{VIP}:443", gv.password(SCENARIO))
    gv.assert_session(report, target_ip=FORWARDER_VIP)


def test_session_from_the_internet_through_both_hops() -> None:
    for _attempt in range(2):
        session_through_the_forwarder_vip()


def sessions_accepted(name: str) -> float:
    read = "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:9172/metrics').read().decode())"
    code, output = gv.engine().containers.get(name).exec_run([PYTHON, "-c", read])
    assert code == 0, output
    accepted = [
        line for line in output.decode().splitlines() if line.startswith("gatehouse_sg_sessions_accepted")
    ]
    assert accepted, output.decode()[-2000:]
    return float(accepted[0].split()[-1])


def test_forwarder_passed_the_sessions_to_the_inner_sg() -> None:
    """The sessions above went through the forwarder that holds the VIP: its SG metrics count them."""
    holder = next(n for n in FORWARDERS if gv.holds_vip(n, FORWARDER_VIP))
    assert sessions_accepted(holder) >= 2


def test_sessions_move_with_the_forwarder_vip() -> None:
    """Stopping the keepalived container of the forwarder that holds the VIP moves the VIP to the
    other forwarder, which completes a new session (TCP and UDP) through it; then it is restored."""
    holder = next(n for n in FORWARDERS if gv.holds_vip(n, FORWARDER_VIP))
    other = next(n for n in FORWARDERS if n != holder)
    before = sessions_accepted(other)
    keepalived = gv.engine().containers.get(f"{holder}-forwarder-vip")
    keepalived.stop(timeout=10)
    try:
        assert gv.wait_for(lambda: gv.holds_vip(other, FORWARDER_VIP)), f"{other} did not take the VIP"
        assert not gv.holds_vip(holder, FORWARDER_VIP)
        session_through_the_forwarder_vip()
        assert sessions_accepted(other) >= before + 1
    finally:
        keepalived.start()
    assert gv.wait_for(lambda: [gv.holds_vip(n, FORWARDER_VIP) for n in FORWARDERS].count(True) == 1, 40)


def test_the_forwarder_vip_follows_the_forwarder_sg() -> None:
    """The keepalived pair tracks the forwarder SG's /health (halb vrrp.track_url): stopping only the
    SG container of the forwarder that holds the VIP (its keepalived keeps running) moves the VIP to
    the other forwarder, which completes a new session (TCP and UDP) through it; then the SG is
    started again and the pair settles with one holder that serves sessions."""
    holder = next(n for n in FORWARDERS if gv.holds_vip(n, FORWARDER_VIP))
    other = next(n for n in FORWARDERS if n != holder)
    conf = gv.STATE_ROOT / SCENARIO / holder / "forwarder-vip" / "keepalived" / "keepalived.conf"
    assert "http://127.0.0.1:9172/health" in conf.read_text(encoding="utf-8")
    before = sessions_accepted(other)
    sg = gv.engine().containers.get(f"{holder}-sg")
    sg.stop(timeout=10)
    try:
        assert gv.wait_for(lambda: gv.holds_vip(other, FORWARDER_VIP)), f"{other} did not take the VIP"
        assert not gv.holds_vip(holder, FORWARDER_VIP)
        keepalived = gv.engine().containers.get(f"{holder}-forwarder-vip")
        assert keepalived.status == "running", "the VIP moved because keepalived stopped, not the SG check"
        session_through_the_forwarder_vip()
        assert sessions_accepted(other) >= before + 1
    finally:
        sg.start()
    # Back to normal: the SG answers again, and the primary (the pair's first node, no nopreempt)
    # holds the VIP once its check passed twice.
    assert gv.wait_for(lambda: sessions_accepted_or_none(holder) is not None, 60)
    assert gv.wait_for(lambda: gv.holds_vip(FORWARDERS[0], FORWARDER_VIP), 60)
    assert not gv.holds_vip(FORWARDERS[1], FORWARDER_VIP)
    session_through_the_forwarder_vip()


def sessions_accepted_or_none(name: str) -> float | None:
    """sessions_accepted() once the forwarder's SG answers again, else None."""
    try:
        return sessions_accepted(name)
    except AssertionError:
        return None


def test_the_internet_reaches_no_inner_host() -> None:
    """A container on the internet network (where the clients are) has no way to the broker, the
    agent or the inner CM/SG host, nor the forwarder's management port; it reaches the forwarders'
    4172 on their VIP (the forwarders listen there only)."""
    targets = [
        (BROKER, 8443),
        (DESKTOP, 4172),
        (INNER_DMZ, 8443),
        (INNER_DMZ, 4172),
        (FORWARDER, 9172),
        (FORWARDER, 4172),
        (FORWARDER_VIP, 4172),
    ]
    output = gv.engine().containers.run(
        gv.CLIENT_IMAGE,
        entrypoint=["python3", "-c", PROBE],
        command=[f"{a}/{p}" for a, p in targets],
        network=INTERNET,
        labels={"gatehouse.role": "client"},
        remove=True,
    )
    lines = output.decode().strip().splitlines()
    assert len(lines) == len(targets), lines
    for (address, port), line in zip(targets, lines, strict=True):
        expected = "open" if (address, port) == (FORWARDER_VIP, 4172) else "closed"
        assert line.split()[:3] == [address, str(port), expected], line


@pytest.mark.parametrize(
    ("address", "port", "what"),
    [
        (BROKER, 8443, "broker"),
        (DESKTOP, 60443, "agent control"),
        (DESKTOP, 4172, "agent session"),
        (INNER_DMZ, 9180, "inner CM admin"),
        (INNER_LAN, 9180, "inner CM admin (lan side)"),
        (INNER_DMZ, 9172, "inner SG admin"),
    ],
)
def test_forwarder_host_cannot_connect(address: str, port: int, what: str) -> None:
    result = probe("gh-dmz-fwd1", address, port)
    assert result.startswith("closed"), f"{what} {address}:{port} from the forwarder host: {result}"


def test_the_probe_sees_open_ports() -> None:
    """The probe is not vacuous: the forwarder reaches the inner SG's 4172 and the inner CM's 8443
    (the HALB's backend), and the inner host reaches the broker, the agent and its own admin port."""
    assert probe("gh-dmz-fwd1", INNER_DMZ, 4172) == "open"
    assert probe("gh-dmz-fwd1", INNER_DMZ, 8443) == "open"
    assert probe("gh-dmz-cmsg1", BROKER, 8443) == "open"
    assert probe("gh-dmz-cmsg1", DESKTOP, 60443) == "open"
    assert probe("gh-dmz-cmsg1", DESKTOP, 4172) == "open"
    assert probe("gh-dmz-cmsg1", "127.0.0.1", 9180) == "open"
