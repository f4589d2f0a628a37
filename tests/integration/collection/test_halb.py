# Copyright (c) Gatehouse contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""A real HALB pair: two gatehouse/halb containers deployed by the halb module, two HTTPS backends.

Everything runs on a private Docker network that the test creates (a free 10.199.x.0/24) and
removes at the end; the host reaches the VIP through the network's bridge. Failover times are
measured and printed (see docs/halb.md), never asserted beyond a generous bound.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from collection_helpers import ensure_importable
from tls_probe import OLD_VERSIONS, assert_probe_offers, handshake, probe_context

docker = pytest.importorskip("docker")

from halb_helpers import (  # noqa: E402
    ADVERT_INT,
    HALB_IMAGE,
    Pair,
    docker_client,
    get_name,
    image_id,
    wait_for,
)

RECOVERY_BOUND = 30.0  # seconds; a generous bound, the measured numbers are printed


_CLIENT = docker_client()
pytestmark = [
    pytest.mark.docker,
    pytest.mark.images,
    pytest.mark.skipif(_CLIENT is None, reason="needs the local Docker engine"),
    pytest.mark.skipif(
        _CLIENT is not None and image_id(_CLIENT, HALB_IMAGE) is None,
        reason=f"needs the {HALB_IMAGE} image (run `make images`)",
    ),
]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory, pki) -> Iterator[Pair]:
    topology = Pair(_CLIENT, tmp_path_factory.mktemp("halb"), pki)
    try:
        topology.start()
        yield topology
    finally:
        topology.stop()


FAILOVER_TIMES: dict[str, float] = {}  # filled by the failover tests, printed with -s


def test_first_run_reports_files_without_the_private_key(pair: Pair):
    key_body = Path(pair.vip_key).read_text().splitlines()[1]
    for node, result in pair.first_runs.items():
        assert result["actions"][:2] == ["validated", "set up directories"], result["actions"]
        assert "created container" in result["actions"]
        bundle = str(pair.config_dir(node) / "haproxy" / "certs" / "web.pem")
        assert bundle in result["files_changed"]
        assert (Path(bundle).stat().st_mode & 0o777) == 0o600
        assert key_body not in json.dumps(result)
        assert "<private key, sha256" in json.dumps(result["diff"])


def test_second_run_changes_nothing_and_check_mode_touches_nothing(pair: Pair):
    for node in ("halb1", "halb2"):
        again = pair.deploy(node)
        assert again["changed"] is False, again["actions"]
        assert again["actions"] == []
    cfg = pair.config_dir("halb1") / "haproxy" / "haproxy.cfg"
    before = _sha256(cfg)
    params = pair.params("halb1")
    params["virtual_servers"][0]["backends"][0]["weight"] = 10
    checked = pair.deploy("halb1", params, check=True)
    assert checked["changed"] is True
    assert "validated" in checked["actions"] and "wrote files" not in checked["actions"]
    assert any("weight 10" in d["after"] for d in checked["diff"])
    assert _sha256(cfg) == before
    # The real run makes exactly the change check mode predicted; then the node is put back.
    applied = pair.deploy("halb1", params)
    assert applied["changed"] is True and applied["diff"] == checked["diff"]
    assert pair.deploy("halb1")["changed"] is True


def test_vip_is_on_the_primary_only_and_serves(pair: Pair):
    assert pair.vip_holders() == ["halb1"]
    names = {pair.via_vip(4444) for _i in range(10)}
    assert names == {"be1", "be2"}


def test_metrics_frontend_shows_each_nodes_vrrp_state_and_the_backends(pair: Pair):
    pair.wait_master("halb1")

    def scrape(node: str, path: str) -> str:
        url = f"http://{pair.node_ip[node]}:8405{path}"
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.read().decode()

    # keepalived's notify commands and the Lua service: the master says 1, the backup 0.
    master = re.findall(
        r'^gatehouse_halb_vrrp_master\{router_id="(\d+)"\} (\d)$', scrape("halb1", "/vrrp"), re.M
    )
    backup = re.findall(
        r'^gatehouse_halb_vrrp_master\{router_id="(\d+)"\} (\d)$', scrape("halb2", "/vrrp"), re.M
    )
    assert master == [(master[0][0], "1")] and backup == [(master[0][0], "0")]
    # HAProxy's exporter: both backends of each virtual server are UP.
    up = re.findall(
        r'^haproxy_server_status\{proxy="[^"]+",server="(be\d)",state="UP"\} 1$',
        scrape("halb1", "/metrics"),
        re.M,
    )
    assert sorted(set(up)) == ["be1", "be2"]
    with pytest.raises(urllib.error.HTTPError) as missing:
        scrape("halb1", "/")
    assert missing.value.code == 404


def _metrics_sessions(pair: Pair, node: str) -> int:
    """Current sessions of the metrics frontend, from HAProxy's runtime API inside the node."""
    script = (
        "import socket; s = socket.socket(socket.AF_UNIX); s.connect('/run/haproxy/admin.sock'); "
        "s.sendall(b'show stat\\n'); import sys; "
        "sys.stdout.write(b''.join(iter(lambda: s.recv(65536), b'')).decode())"
    )
    container = pair.client.containers.get(pair.container_name(node))
    code, out = container.exec_run(["python3", "-c", script])
    assert code == 0, out
    for row in out.decode().splitlines():
        fields = row.split(",")
        if fields[:2] == ["gatehouse_metrics", "FRONTEND"]:
            return int(fields[4])  # scur
    raise AssertionError("no gatehouse_metrics frontend in show stat:\n" + out.decode())


def test_slow_clients_on_the_metrics_port_hold_few_slots_briefly_and_the_vip_serves(pair: Pair):
    """Attack: 60 clients open the metrics port and trickle a request header they never finish.

    The frontend's maxconn holds them to 16 sessions (with its listen backlog of the same size, the
    kernel drops the connection attempts beyond), its request deadline closes each within 5 s,
    traffic through the VIP is served meanwhile, and a scrape succeeds once they are gone.
    """
    ensure_importable()
    from ansible_collections.gatehouse.access.plugins.module_utils._halb import render

    node = pair.node_ip["halb1"]
    slow = []
    for _i in range(60):
        try:
            sock = socket.create_connection((node, 8405), timeout=0.5)
        except OSError:
            continue  # dropped at the full backlog
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # never the final empty line
        slow.append(sock)
    try:
        assert len(slow) >= render.METRICS_MAXCONN
        time.sleep(1.0)
        held = _metrics_sessions(pair, "halb1")
        assert 0 < held <= render.METRICS_MAXCONN, held
        assert {pair.via_vip(4444) for _i in range(10)} == {"be1", "be2"}
        # Every slow client is closed by the server, in batches of maxconn, at most 5 s each.
        deadline = time.monotonic() + 30
        for sock in slow:
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            while sock.recv(4096):  # HAProxy answers 408, then closes
                pass
    finally:
        for sock in slow:
            sock.close()
    with urllib.request.urlopen(f"http://{node}:8405/vrrp", timeout=5) as response:
        assert b"gatehouse_halb_vrrp_master" in response.read()


def _tls12_cipher_names() -> list[str]:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.set_ciphers("ALL:COMPLEMENTOFALL:@SECLEVEL=0")
    return sorted({c["name"] for c in ctx.get_ciphers() if c["protocol"] != "TLSv1.3"})


def test_vip_tls_offers_exactly_the_seeds_cm_cipher_table(pair: Pair, pki):
    """sslscan, in Python: every TLS 1.2 suite OpenSSL knows, one handshake each, against the VIP."""
    from gatehouse.tls import CM_CIPHERS

    pair.wait_master("halb1")
    # The probe itself can offer old protocols and weak suites, so a refusal below is the HALB's.
    tls = pki.issue("probe-self-check")
    assert_probe_offers(tls.cert, tls.key)

    accepted = set()
    names = _tls12_cipher_names()
    assert len(names) > 50
    for name in names:
        result = handshake(pair.vip, 443, probe_context(name, ssl.TLSVersion.TLSv1_2))
        if result is not None:
            assert result == ("TLSv1.2", name)
            accepted.add(name)
    print(f"\nVIP TLS 1.2: {len(names)} suites tried, accepted {sorted(accepted)}")
    assert accepted == set(CM_CIPHERS.split(":"))
    for version in OLD_VERSIONS:
        assert handshake(pair.vip, 443, probe_context("ALL", version)) is None, version
    # Server preference: a client that prefers the weakest suite still gets the seed's first one.
    reverse = ":".join(reversed(CM_CIPHERS.split(":")))
    assert handshake(pair.vip, 443, probe_context(reverse, ssl.TLSVersion.TLSv1_2)) == (
        "TLSv1.2",
        CM_CIPHERS.split(":", maxsplit=1)[0],
    )
    # TLS 1.3 with OpenSSL's default suites, the first of them preferred.
    assert handshake(pair.vip, 443, probe_context(None, ssl.TLSVersion.TLSv1_3)) == (
        "TLSv1.3",
        "TLS_AES_256_GCM_SHA384",
    )


def _process_owners(container) -> list[tuple[str, int]]:
    """(command name, real uid) of every process in the container."""
    script = "for d in /proc/[0-9]*; do echo \"$(cat $d/comm 2>/dev/null) $(awk '/^Uid:/{print $2}' $d/status 2>/dev/null)\"; done"
    code, out = container.exec_run(["sh", "-c", script])
    assert code == 0, out
    owners = []
    for line in out.decode().splitlines():
        words = line.split()
        if len(words) == 2 and words[1].isdigit():
            owners.append((words[0], int(words[1])))
    return owners


def test_haproxy_workers_run_as_the_haproxy_user(pair: Pair):
    container = pair.client.containers.get(pair.container_name("halb1"))
    code, out = container.exec_run(["id", "-u", "haproxy"])
    assert code == 0, out
    haproxy_uid = int(out.decode().strip())
    master = int(container.exec_run(["cat", "/run/haproxy.pid"])[1].decode().strip())
    code, out = container.exec_run(["sh", "-c", f"awk '/^Uid:/{{print $2}}' /proc/{master}/status"])
    assert int(out.decode().strip()) == 0  # the master re-reads certificates and rebinds on reloads
    uids = {uid for name, uid in _process_owners(container) if name == "haproxy"}
    # The master (root) and at least one worker (haproxy), nothing else.
    assert uids == {0, haproxy_uid}, _process_owners(container)


def _engine_nofile(pair: Pair) -> int:
    """The open files limit the engine gives a container by default (the cap of container_limits.nofile)."""
    out = pair.client.containers.run(
        pair.halb_image, entrypoint=["sh", "-c", "ulimit -Hn"], command=[], network_mode="none", remove=True
    )
    text = out.decode().strip()
    return int(text) if text.isdigit() else 1 << 30


def test_halb_container_is_locked_down(pair: Pair):
    for node in ("halb1", "halb2"):
        host_config = pair.client.containers.get(pair.container_name(node)).attrs["HostConfig"]
        assert host_config["CapDrop"] == ["ALL"]
        assert sorted(host_config["CapAdd"]) == [
            "KILL",
            "NET_ADMIN",
            "NET_BIND_SERVICE",
            "NET_BROADCAST",
            "NET_RAW",
            "SETGID",
            "SETUID",
        ]
        assert host_config["SecurityOpt"] == ["no-new-privileges:true"]
        assert host_config["ReadonlyRootfs"] is True
        assert set(host_config["Tmpfs"]) == {"/tmp", "/run"}
        assert host_config["Memory"] == 1 << 30
        assert host_config["PidsLimit"] == 1024
        nofile = min(65536, _engine_nofile(pair))
        assert host_config["Ulimits"] == [{"Name": "nofile", "Soft": nofile, "Hard": nofile}]


def test_halb_container_carries_the_labels_of_every_gatehouse_container(pair: Pair):
    for node in ("halb1", "halb2"):
        labels = pair.client.containers.get(pair.container_name(node)).labels
        assert labels["gatehouse.role"] == "halb"
        assert labels["gatehouse.host"] == node
        assert labels["gatehouse.managed-by"] == "gatehouse.access.halb"
        assert len(labels["gatehouse.spec-hash"]) == 64


def test_a_halb_container_of_an_earlier_release_is_recreated_once(pair: Pair):
    """It carried gatehouse.halb.spec instead of gatehouse.managed-by and gatehouse.spec-hash."""
    name = pair.container_name("halb2")
    pair.client.containers.get(name).remove(force=True)
    pair.client.containers.run(
        pair.halb_image,
        name=name,
        entrypoint=["/usr/bin/tini", "--", "sleep", "600"],
        network_mode="none",
        labels={"gatehouse.role": "halb", "gatehouse.host": "halb2", "gatehouse.halb.spec": "0" * 64},
        detach=True,
    )
    result = pair.deploy("halb2")
    assert result["changed"] is True
    assert result["actions"] == ["removed outdated container", "created container"]
    assert pair.client.containers.get(name).labels["gatehouse.managed-by"] == "gatehouse.access.halb"
    assert pair.deploy("halb2")["changed"] is False
    pair.wait_master("halb1")


@pytest.mark.parametrize(
    ("labels", "words"),
    [
        ({"gatehouse.managed-by": "gatehouse.access.cmsg", "gatehouse.role": "cm"}, "not a halb one"),
        ({}, "was not created by Gatehouse"),
    ],
)
def test_a_container_of_another_role_or_owner_is_left_alone(pair: Pair, tmp_path: Path, labels, words):
    name = f"{pair.prefix}-foreign"
    pair.names.append(name)
    foreign = pair.client.containers.create(
        pair.halb_image, name=name, labels=labels, network_mode="none", entrypoint=["true"]
    )
    try:
        params = pair.params("halb2")
        params.update(container_name=name, config_dir=str(tmp_path / "foreign"))
        refused = pair.deploy("halb2", params, expect_failure=True)
        assert words in refused["msg"]
        assert not (tmp_path / "foreign").exists()
        absent = {"state": "absent", "container_name": name, "config_dir": str(tmp_path / "foreign")}
        assert words in pair.deploy("halb2", absent, expect_failure=True)["msg"]
        foreign.reload()
    finally:
        foreign.remove(force=True)


def test_backends_whose_certificate_another_ca_signed_get_no_traffic(pair: Pair, tmp_path: Path):
    """backend_tls_verify=required (the default) checks the chain: a stranger's CA marks every CM down."""
    from pki import TestPKI

    pair.wait_master("halb1")
    stranger = TestPKI(tmp_path / "stranger")
    ctx = ssl.create_default_context(cafile=str(pair.pki.ca))
    params = pair.params("halb1")
    params["virtual_servers"][0]["backend_ca_file"] = str(stranger.ca)
    try:
        result = pair.deploy("halb1", params)
        assert "reloaded haproxy" in result["actions"], result["actions"]
        assert not any("backend_tls_verify" in w for w in result.get("warnings", [])), result.get("warnings")
        # Checks fail verification (fall 2 x 500 ms): the HALB answers 503 itself, no CM is asked.
        wait_for(lambda: _status(pair.vip, 443, ctx) == 503, 15, "both backends to be marked down")
        assert get_name(pair.vip, 443, ctx, "/whoami") is None
    finally:
        pair.deploy("halb1")
    wait_for(lambda: get_name(pair.vip, 443, ctx, "/whoami") in ("be1", "be2"), 15, "the backends to return")


def test_verification_off_is_explicit_and_warned(pair: Pair):
    params = pair.params("halb2")
    params["virtual_servers"][0]["backend_tls_verify"] = "none"
    del params["virtual_servers"][0]["backend_ca_file"]
    try:
        checked = pair.deploy("halb2", params, check=True)
        assert any("backend_tls_verify=none" in w and "passwords" in w for w in checked.get("warnings", []))
        del params["virtual_servers"][0]["backend_tls_verify"]
        refused = pair.deploy("halb2", params, check=True, expect_failure=True)
        assert "backend_ca_file" in refused["msg"] and "gatehouse__ca_cert" in refused["msg"]
    finally:
        assert pair.deploy("halb2")["changed"] is False


def _status(host: str, port: int, ctx: ssl.SSLContext) -> int | None:
    conn = http.client.HTTPSConnection(host, port, context=ctx, timeout=1)
    try:
        conn.request("GET", "/whoami")
        return conn.getresponse().status
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()


def test_http_mode_passes_the_client_address_in_x_forwarded_for(pair: Pair):
    conn = http.client.HTTPSConnection(
        pair.vip, 443, context=ssl.create_default_context(cafile=str(pair.pki.ca))
    )
    try:
        conn.request("GET", "/", headers={"X-Forwarded-For": "203.0.113.66"})
        response = conn.getresponse()
        response.read()
    finally:
        conn.close()
    assert response.status == 200
    # The host reaches the network through its gateway address; the spoofed value is gone.
    assert response.getheader("X-Seen-Forwarded-For") == pair.gateway
    assert response.getheader("Set-Cookie", "").startswith("JSESSIONID=")


@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM", "haproxy"])
def test_failover_when_the_primary_dies(pair: Pair, how: str):
    pair.wait_master("halb1")
    start = time.monotonic()
    killed = pair.kill("halb1", how)
    # Probe only (no docker exec in the loop) so the measurement is not slowed down.
    wait_for(lambda: pair.via_vip(4444, timeout=0.3) is not None, RECOVERY_BOUND, "the VIP", 0.02)
    recovered = time.monotonic() - start
    FAILOVER_TIMES[how] = recovered
    print(
        f"\nHALB failover ({how} of the primary, advert_int {ADVERT_INT}): first successful /health "
        f"through the VIP {recovered:.2f} s after the kill"
    )
    holders = pair.vip_holders()
    assert len(holders) <= 1, holders

    # The primary comes back (restart policy or docker start) and takes the VIP back
    # (preemption); at no sampled moment do both nodes hold it.
    pair.ensure_running("halb1", killed)
    seen = []
    deadline = time.monotonic() + RECOVERY_BOUND
    for _attempt in range(400):
        holders = pair.vip_holders()
        seen.append(tuple(holders))
        assert len(holders) <= 1, f"VIP on both nodes: {holders}"
        if holders == ["halb1"] or time.monotonic() > deadline:
            break
    assert seen[-1] == ("halb1",), seen[-5:]
    for _attempt in range(10):
        assert len(pair.vip_holders()) == 1
        time.sleep(0.1)
    pair.wait_master("halb1")


def test_source_persistence_holds_for_1000_reconnects_and_across_a_failover(pair: Pair):
    pair.wait_master("halb1")
    first = pair.via_vip(4443)
    assert first in ("be1", "be2")
    ctx = pair.tls_context()
    names = set()
    for _attempt in range(1000):
        names.add(get_name(pair.vip, 4443, ctx, "/whoami"))
    assert names == {first}
    # Control: without persistence the same client is spread over both backends.
    assert {get_name(pair.vip, 4444, ctx, "/whoami") for _i in range(20)} == {"be1", "be2"}
    # The secondary learnt the entry through the peers section; after a failover it is still used.
    killed = pair.kill("halb1", "SIGTERM")
    wait_for(lambda: pair.vip_holders() == ["halb2"], RECOVERY_BOUND, "the VIP on halb2")
    wait_for(lambda: pair.via_vip(4443) is not None, RECOVERY_BOUND, "the VIP to serve")
    after = {get_name(pair.vip, 4443, ctx, "/whoami") for _i in range(50)}
    assert after == {first}
    pair.ensure_running("halb1", killed)
    pair.wait_master("halb1")
    back = {get_name(pair.vip, 4443, ctx, "/whoami") for _i in range(50)}
    assert back == {first}


def _deploy_both(pair: Pair) -> list[dict]:
    return [pair.deploy(node) for node in ("halb1", "halb2")]


def test_drain_stops_new_sessions_while_established_ones_continue(pair: Pair):
    pair.wait_master("halb1")
    ctx = pair.tls_context()
    # An established TCP connection through the no-persistence virtual server that landed on be1.
    established = None
    for _attempt in range(10):
        conn = http.client.HTTPSConnection(pair.vip, 4444, context=ctx, timeout=5)
        conn.request("GET", "/whoami")
        response = conn.getresponse()
        if response.read().decode().strip() == "be1":
            established = conn
            break
        conn.close()
    assert established is not None
    # An HTTP session (JSESSIONID) on be1 through the http virtual server.
    web = ssl.create_default_context(cafile=str(pair.pki.ca))
    cookie = None
    for _attempt in range(10):
        conn = http.client.HTTPSConnection(pair.vip, 443, context=web, timeout=5)
        conn.request("GET", "/login")
        response = conn.getresponse()
        response.read()
        conn.close()
        if response.getheader("X-Backend") == "be1":
            cookie = response.getheader("Set-Cookie").split(";")[0]
            break
    assert cookie and cookie.startswith("JSESSIONID=be1~")

    pair.states["be1"] = "drain"
    try:
        results = _deploy_both(pair)
        for result in results:
            assert result["changed"] is True
            assert "set server be_spread/be1 state drain" in " ".join(result["actions"])
            assert not any(a.startswith("reloaded") for a in result["actions"])
        new_sessions = {get_name(pair.vip, 4444, ctx, "/whoami") for _i in range(30)}
        assert new_sessions == {"be2"}
        fresh_web = set()
        for _attempt in range(20):
            conn = http.client.HTTPSConnection(pair.vip, 443, context=web, timeout=5)
            conn.request("GET", "/login")
            response = conn.getresponse()
            response.read()
            conn.close()
            fresh_web.add(response.getheader("X-Backend"))
        assert fresh_web == {"be2"}
        # The established connection and the existing session still reach be1.
        established.request("GET", "/whoami")
        assert established.getresponse().read().decode().strip() == "be1"
        conn = http.client.HTTPSConnection(pair.vip, 443, context=web, timeout=5)
        conn.request("GET", "/desktop", headers={"Cookie": cookie})
        response = conn.getresponse()
        response.read()
        conn.close()
        assert response.getheader("X-Backend") == "be1"
        # The state is in the file as well: a reload keeps it.
        primary = pair.client.containers.get(pair.container_name("halb1"))
        code, out = primary.exec_run(["gatehouse-halb-reload", "haproxy"])
        assert code == 0, out
        time.sleep(1)
        assert {get_name(pair.vip, 4444, ctx, "/whoami") for _i in range(20)} == {"be2"}
        # The connection opened before the reload is served by the old worker until it ends.
        established.request("GET", "/whoami")
        assert established.getresponse().read().decode().strip() == "be1"
        assert _deploy_both(pair)[0]["changed"] is False
    finally:
        established.close()
        pair.states["be1"] = "enabled"
        results = _deploy_both(pair)
    assert all("set server be_spread/be1 state ready" in " ".join(r["actions"]) for r in results)
    assert "be1" in {get_name(pair.vip, 4444, ctx, "/whoami") for _i in range(20)}


@pytest.mark.parametrize("breakage", ["haproxy_option", "backend_port_0"])
def test_invalid_configuration_is_refused_and_the_running_one_stays(pair: Pair, breakage: str):
    pair.wait_master("halb1")
    cfg = pair.config_dir("halb1") / "haproxy" / "haproxy.cfg"
    conf = pair.config_dir("halb1") / "keepalived" / "keepalived.conf"
    before = (_sha256(cfg), _sha256(conf))
    container = pair.client.containers.get(pair.container_name("halb1"))
    started = container.attrs["State"]["StartedAt"]
    params = pair.params("halb1")
    if breakage == "haproxy_option":
        params["virtual_servers"][1]["haproxy_options"] = ["stick-table type nonsense size 1k"]
        expected = "haproxy -c refused the configuration"
    else:
        params["virtual_servers"][1]["backends"][0]["port"] = 0
        expected = "port 0 is out of range 1-65535"
    result = pair.deploy("halb1", params, expect_failure=True)
    print(f"\nrefused ({breakage}): {result['msg']}")
    assert expected in result["msg"]
    assert "nothing was changed" in result["msg"] or breakage == "backend_port_0"
    assert (_sha256(cfg), _sha256(conf)) == before
    container.reload()
    assert container.status == "running"
    assert container.attrs["State"]["StartedAt"] == started
    assert pair.via_vip(4444) in ("be1", "be2")
    assert pair.deploy("halb1")["changed"] is False


def test_config_changes_reload_without_dropping_connections_or_moving_the_vip(pair: Pair):
    pair.wait_master("halb1")
    ctx = pair.tls_context()
    established = http.client.HTTPSConnection(pair.vip, 4444, context=ctx, timeout=5)
    established.request("GET", "/whoami")
    first = established.getresponse().read().decode().strip()
    try:
        for node in ("halb1", "halb2"):
            params = pair.params(node)
            params["virtual_servers"][2]["backends"][1]["weight"] = 50
            params["vrrp"]["garp_master_refresh"] = 30
            result = pair.deploy(node, params)
            assert result["actions"] == [
                "validated",
                "wrote files",
                "reloaded haproxy",
                "reloaded keepalived",
            ]
            cfg = (pair.config_dir(node) / "haproxy" / "haproxy.cfg").read_text()
            assert "weight 50" in cfg
        assert pair.vip_holders() == ["halb1"]
        # The connection opened before the reload is still served (by the old worker).
        established.request("GET", "/whoami")
        assert established.getresponse().read().decode().strip() == first
        assert pair.via_vip(4444) in ("be1", "be2")
    finally:
        established.close()
        for node in ("halb1", "halb2"):
            pair.deploy(node)


def test_a_tracked_url_that_stops_answering_moves_the_vip(pair: Pair):
    """vrrp.track_url: halb1 also tracks a URL in its own network namespace (here its metrics
    frontend). Check mode shows the keepalived.conf change and writes nothing; while the URL answers
    200 the VIP stays; a URL that answers 404 puts halb1 into FAULT and the VIP moves to halb2, which
    serves; a second run changes nothing; without track_url the VIP comes back to halb1."""
    pair.wait_master("halb1")
    conf = pair.config_dir("halb1") / "keepalived" / "keepalived.conf"
    params = pair.params("halb1")
    params["vrrp"]["track_url"] = "http://127.0.0.1:8405/metrics"
    before = _sha256(conf)
    checked = pair.deploy("halb1", params, check=True)
    assert checked["changed"] is True and "wrote files" not in checked["actions"], checked["actions"]
    assert any("gatehouse_track_url" in d["after"] for d in checked["diff"])
    assert _sha256(conf) == before
    try:
        applied = pair.deploy("halb1", params)
        assert "reloaded keepalived" in applied["actions"], applied["actions"]
        assert "http://127.0.0.1:8405/metrics" in conf.read_text()
        assert pair.deploy("halb1", params)["changed"] is False
        time.sleep(3 * 2)  # three checks (every 2 s): the URL answers, the VIP stays
        assert pair.vip_holders() == ["halb1"]
        params["vrrp"]["track_url"] = "http://127.0.0.1:8405/not-there"
        pair.deploy("halb1", params)
        moved = wait_for(lambda: pair.vip_holders() == ["halb2"], RECOVERY_BOUND, "the VIP on halb2")
        print(f"\nHALB failover (tracked URL answers 404): the VIP on halb2 after {moved:.2f} s")
        assert pair.via_vip(4444) in ("be1", "be2")
        assert pair.client.containers.get(pair.container_name("halb1")).status == "running"
    finally:
        pair.deploy("halb1")
    pair.wait_master("halb1")
    assert "gatehouse_track_url" not in conf.read_text()


def test_absent_removes_the_node_and_the_peer_serves(pair: Pair):
    pair.wait_master("halb1")
    params = {
        "state": "absent",
        "config_dir": str(pair.config_dir("halb1")),
        "container_name": pair.container_name("halb1"),
    }
    checked = pair.deploy("halb1", params, check=True)
    assert checked["changed"] is True
    assert pair.client.containers.get(pair.container_name("halb1")).status == "running"
    removed = pair.deploy("halb1", params)
    assert removed["changed"] is True
    assert f"removed container {pair.container_name('halb1')}" in removed["actions"]
    with pytest.raises(docker.errors.NotFound):
        pair.client.containers.get(pair.container_name("halb1"))
    assert not pair.config_dir("halb1").exists()
    wait_for(lambda: pair.vip_holders() == ["halb2"], RECOVERY_BOUND, "the VIP on halb2")
    assert pair.via_vip(4444) in ("be1", "be2")
    assert pair.deploy("halb1", params)["changed"] is False
    # Back again: the primary takes the VIP back (preemption).
    assert pair.deploy("halb1")["changed"] is True
    pair.wait_master("halb1")


def test_role_derives_the_same_pair_from_the_inventory_group(pair: Pair):
    """The halb role (peers from the group, priority from a host variable) converges to what runs."""
    pair.wait_master("halb1")
    hosts = {}
    for node in ("halb1", "halb2"):
        p = pair.params(node)
        hosts[node] = {
            "halb_address": pair.node_ip[node],
            "halb_priority": p["vrrp"]["priority"],
            "halb_config_dir": p["config_dir"],
            "halb_container_name": p["container_name"],
            "halb_ipv4_address": p["ipv4_address"],
        }
    common = pair.params("halb1")
    inventory = {
        "all": {
            "children": {
                "halb": {
                    "hosts": hosts,
                    "vars": {
                        "ansible_connection": "local",
                        "ansible_python_interpreter": sys.executable,
                        "halb_image": common["image"],
                        "halb_network_mode": common["network_mode"],
                        "halb_vips": common["vrrp"]["vips"],
                        "halb_advert_int": ADVERT_INT,
                        "halb_virtual_servers": common["virtual_servers"],
                    },
                }
            }
        }
    }
    work = pair.tmp / ("role-" + uuid.uuid4().hex[:6])
    work.mkdir()
    (work / "inventory.json").write_text(json.dumps(inventory))
    (work / "play.yml").write_text(
        "- hosts: halb\n  gather_facts: false\n  roles:\n    - gatehouse.access.halb\n"
    )
    env = dict(os.environ, ANSIBLE_COLLECTIONS_PATH=str(pair.collections), ANSIBLE_STDOUT_CALLBACK="json")
    argv = [str(Path(sys.executable).parent / "ansible-playbook"), "-i", str(work / "inventory.json")]
    for extra in (["--check", "--diff"], []):
        proc = subprocess.run(
            [*argv, *extra, str(work / "play.yml")],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
        report = json.loads(proc.stdout)
        converge = next(
            t for t in report["plays"][0]["tasks"] if t["task"]["name"].endswith("Converge the HALB node")
        )
        for node in ("halb1", "halb2"):
            assert converge["hosts"][node]["changed"] is False, converge["hosts"][node].get("diff")
        assert converge["hosts"]["halb1"]["vips_held"] == [pair.vip]
        assert converge["hosts"]["halb2"]["vips_held"] == []
