# Copyright (c) Gatehouse contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""Rendering and validation of HALB configurations (plugins/module_utils/_halb/render.py)."""

from __future__ import annotations

import copy
import http.server
import importlib.util
import re
import shlex
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[3] / "plugins" / "module_utils" / "_halb" / "render.py"
_spec = importlib.util.spec_from_file_location("gatehouse_halb_render", _PATH)
assert _spec and _spec.loader
halb = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(halb)


def base_params() -> dict:
    return {
        "node_name": "halb1",
        "vrrp": {
            "router_id": 51,
            "priority": 150,
            "peers": ["10.199.7.12"],
            "vips": ["10.199.7.100/24"],
            "interface": "eth0",
        },
        "stick_table_peers": [
            {"name": "halb1", "address": "10.199.7.11"},
            {"name": "halb2", "address": "10.199.7.12"},
        ],
        "virtual_servers": [
            {
                "name": "cm",
                "vip": "10.199.7.100",
                "port": 443,
                "mode": "http",
                "tls_cert": "/etc/tls/halb.pem",
                "backend_ca_file": "/etc/tls/deployment-ca.pem",
                "backends": [
                    {"name": "cm1", "address": "10.199.7.21", "port": 8443},
                    {"name": "cm2", "address": "10.199.7.22", "port": 8443},
                ],
            },
            {
                "name": "sg",
                "vip": "10.199.7.100",
                "port": 4172,
                "mode": "tcp",
                "health_check": {"tls": False, "port": 9172},
                "backends": [
                    {"name": "sg1", "address": "10.199.7.21", "port": 4172},
                    {"name": "sg2", "address": "sg2.example.net", "port": 4172},
                ],
            },
        ],
    }


def render(params: dict) -> tuple[str, str]:
    config = halb.normalize(params)
    return halb.render_haproxy(config), halb.render_keepalived(config)


def section(text: str, header: str) -> list[str]:
    """Lines of one HAProxy section (without its header line)."""
    lines = text.splitlines()
    start = lines.index(header)
    out = []
    for line in lines[start + 1 :]:
        if line and not line[0].isspace():
            break
        if line.strip() and not line.lstrip().startswith("#"):
            out.append(line.strip())
    return out


def test_both_files_start_with_the_managed_by_comment():
    haproxy_cfg, keepalived_conf = render(base_params())
    assert haproxy_cfg.splitlines()[0] == "# " + halb.MANAGED_BY
    assert keepalived_conf.splitlines()[0] == "# " + halb.MANAGED_BY


def test_http_virtual_server_terminates_tls_forwards_client_address_and_sticks_on_jsessionid():
    haproxy_cfg, _keepalived_conf = render(base_params())
    fe = section(haproxy_cfg, "frontend fe_cm")
    assert "bind 10.199.7.100:443 transparent ssl crt /etc/haproxy/certs/cm.pem alpn http/1.1" in fe
    assert "mode http" in fe
    # The client's own X-Forwarded-For is removed before HAProxy adds the address it saw.
    assert fe.index("http-request del-header X-Forwarded-For") < fe.index("option forwardfor")
    be = section(haproxy_cfg, "backend be_cm")
    assert "cookie JSESSIONID prefix nocache" in be
    assert "http-check send meth GET uri /health ver HTTP/1.1 hdr Host cm" in be
    servers = [line for line in be if line.startswith("server ")]
    assert servers == [
        "server cm1 10.199.7.21:8443 ssl verify required ca-file /etc/haproxy/certs/cm-ca.pem check inter 2s "
        "rise 2 fall 2 check-ssl cookie cm1 weight 100",
        "server cm2 10.199.7.22:8443 ssl verify required ca-file /etc/haproxy/certs/cm-ca.pem check inter 2s "
        "rise 2 fall 2 check-ssl cookie cm2 weight 100",
    ]
    assert not any(line.startswith("stick") for line in be)


def test_tcp_virtual_server_passes_tls_through_with_synced_source_persistence():
    haproxy_cfg, _keepalived_conf = render(base_params())
    fe = section(haproxy_cfg, "frontend fe_sg")
    assert "bind 10.199.7.100:4172 transparent" in fe
    assert not any("forwardfor" in line or "ssl" in line for line in fe)
    be = section(haproxy_cfg, "backend be_sg")
    assert "stick-table type ipv6 size 1m expire 30m peers gatehouse" in be
    assert "stick on src" in be
    assert "timeout tunnel 1h" in be
    # TLS passes through (no "ssl" on the server); plain HTTP check on the admin port.
    assert "server sg1 10.199.7.21:4172 check inter 2s rise 2 fall 2 port 9172 weight 100" in be
    assert any(line.startswith("server sg2 sg2.example.net:4172 ") for line in be)


def test_peers_section_lists_both_nodes_and_the_local_peer_is_named():
    haproxy_cfg, _keepalived_conf = render(base_params())
    assert section(haproxy_cfg, "peers gatehouse") == [
        "peer halb1 10.199.7.11:10000",
        "peer halb2 10.199.7.12:10000",
    ]
    assert "localpeer halb1" in section(haproxy_cfg, "global")
    assert "stats socket /run/haproxy/admin.sock mode 600 level admin expose-fd listeners" in section(
        haproxy_cfg, "global"
    )


def test_without_stick_table_peers_a_local_peer_keeps_tables_across_reloads():
    params = base_params()
    params["stick_table_peers"] = []
    haproxy_cfg, _keepalived_conf = render(params)
    assert section(haproxy_cfg, "peers gatehouse") == ["peer halb1 127.0.0.1:10000"]


def test_drain_and_disabled_states_render_and_read_back():
    params = base_params()
    backends = params["virtual_servers"][0]["backends"]
    backends[0]["state"] = "drain"
    backends[1]["state"] = "disabled"
    haproxy_cfg, _keepalived_conf = render(params)
    servers = [line for line in section(haproxy_cfg, "backend be_cm") if line.startswith("server ")]
    assert servers[0].endswith("cookie cm1 weight 0  # state: drain")
    assert servers[1].endswith("cookie cm2 weight 100 disabled  # state: disabled")
    assert halb.backend_states(haproxy_cfg) == {
        ("be_cm", "cm1"): "drain",
        ("be_cm", "cm2"): "disabled",
        ("be_sg", "sg1"): "enabled",
        ("be_sg", "sg2"): "enabled",
    }


def test_layout_hash_ignores_backend_states_only():
    params = base_params()
    enabled, _keepalived_conf = render(params)
    params["virtual_servers"][0]["backends"][0]["state"] = "drain"
    drained, _keepalived_conf = render(params)
    assert enabled != drained
    assert halb.layout_of(enabled) == halb.layout_of(drained)
    params["virtual_servers"][0]["backends"][0]["weight"] = 50
    reweighted, _keepalived_conf = render(params)
    assert halb.layout_of(reweighted) != halb.layout_of(drained)
    assert halb.layout_of("global\n") is None


def test_runtime_commands_for_each_state():
    assert halb.runtime_commands("be_cm", "cm1", "drain", 100) == ["set server be_cm/cm1 state drain"]
    assert halb.runtime_commands("be_cm", "cm1", "disabled", 100) == ["set server be_cm/cm1 state maint"]
    # A server loaded drained from the file has weight 0: enabling restores the configured weight too.
    assert halb.runtime_commands("be_cm", "cm1", "enabled", 70) == [
        "set server be_cm/cm1 state ready",
        "set server be_cm/cm1 weight 70",
    ]


def test_keepalived_vrrp3_unicast_track_script_and_backup_start():
    _haproxy_cfg, conf = render(base_params())
    assert re.search(
        r"^vrrp_script gatehouse_haproxy \{\n    script \"/usr/bin/pgrep -x haproxy\"", conf, re.M
    )
    instance = conf[conf.index("vrrp_instance gatehouse_51 {") :]
    for line in (
        "state BACKUP",
        "interface eth0",
        "virtual_router_id 51",
        "priority 150",
        "version 3",
        "advert_int 0.1",
        "unicast_peer {\n        10.199.7.12\n    }",
        "virtual_ipaddress {\n        10.199.7.100/24 dev eth0\n    }",
        "track_script {\n        gatehouse_haproxy\n    }",
    ):
        assert line in instance
    assert "nopreempt" not in conf
    assert "enable_script_security" in conf


def test_keepalived_options_nopreempt_source_and_no_tracking():
    params = base_params()
    params["vrrp"].update(nopreempt=True, unicast_src_ip="10.199.7.11", track_haproxy=False, advert_int=1)
    _haproxy_cfg, conf = render(params)
    assert "    nopreempt\n" in conf
    assert "    unicast_src_ip 10.199.7.11\n" in conf
    assert "    advert_int 1\n" in conf
    assert "vrrp_script" not in conf and "track_script" not in conf


def test_without_virtual_servers_the_pair_holds_the_vips_only():
    """A keepalived-only pair: VRRP with the VIPs, HAProxy with its peers and metrics, no frontend."""
    params = base_params()
    params["virtual_servers"] = []
    haproxy_cfg, conf = render(params)
    assert "virtual_ipaddress {\n        10.199.7.100/24 dev eth0\n    }" in conf
    assert "track_script {\n        gatehouse_haproxy\n    }" in conf
    assert section(haproxy_cfg, "peers gatehouse") == [
        "peer halb1 10.199.7.11:10000",
        "peer halb2 10.199.7.12:10000",
    ]
    frontends = [
        line for line in haproxy_cfg.splitlines() if line.startswith(("frontend ", "backend ", "listen "))
    ]
    assert frontends == [f"frontend {halb.METRICS_FRONTEND}"]
    assert halb.desired_states(halb.normalize(params)) == {}


def track_url_script(conf: str) -> list[str]:
    """The argv keepalived runs for the gatehouse_track_url vrrp_script (it splits on unquoted
    spaces and keeps a single-quoted argument whole, as shlex does for this script)."""
    block = conf[conf.index("vrrp_script gatehouse_track_url {") :]
    (script,) = re.findall(r'^    script "(.*)"$', block[: block.index("\n}")], re.M)
    return shlex.split(script)


def test_a_keepalived_only_pair_can_track_a_health_url():
    """vrrp.track_url: a second vrrp_script GETs the URL; the instance tracks it beside HAProxy."""
    params = base_params()
    params["virtual_servers"] = []
    params["vrrp"]["track_url"] = "http://127.0.0.1:9172/health"
    _haproxy_cfg, conf = render(params)
    block = conf[conf.index("vrrp_script gatehouse_track_url {") :]
    for line in ("interval 2", "timeout 2", "fall 2", "rise 2"):
        assert f"\n    {line}\n" in block[: block.index("\n}") + 1]
    argv = track_url_script(conf)
    assert argv[:3] == ["/usr/bin/python3", "-I", "-c"] and argv[4:] == ["http://127.0.0.1:9172/health"]
    # keepalived's parser ends a line at '#' or '!' and nests on braces: the code holds none.
    assert not set(argv[3]) & set('#!{}"')
    instance = conf[conf.index("vrrp_instance gatehouse_51 {") :]
    assert "track_script {\n        gatehouse_haproxy\n        gatehouse_track_url\n    }" in instance
    # Without HAProxy tracking the URL alone is tracked; a URL without a path checks "/".
    params["vrrp"].update(track_haproxy=False, track_url="http://[::1]:9172")
    _haproxy_cfg, conf = render(params)
    assert "vrrp_script gatehouse_haproxy" not in conf
    assert "track_script {\n        gatehouse_track_url\n    }" in conf
    assert track_url_script(conf)[4:] == ["http://[::1]:9172/"]
    # Empty (the default) renders no such script.
    params["vrrp"]["track_url"] = ""
    assert "gatehouse_track_url" not in render(params)[1]


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        self.send_response(self.server.status if self.path == "/health" else 404)  # type: ignore[attr-defined]
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *_args) -> None:
        pass


def test_the_track_url_script_exits_0_only_for_a_200_answer():
    """The rendered command itself against a real HTTP server: 200 → 0; 503, 404, a closed port,
    a server that never answers → not 0 (keepalived counts those as failures)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    server.status = 200  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(1)
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    closed_port = closed.getsockname()[1]
    closed.close()
    port = server.server_address[1]

    def exit_status(url: str) -> int:
        params = base_params()
        params["vrrp"]["track_url"] = url
        argv = track_url_script(render(params)[1])
        python = argv[0] if Path(argv[0]).exists() else sys.executable
        # An http_proxy in the environment must not divert the check.
        env = {"PATH": "/usr/bin:/bin", "http_proxy": f"http://127.0.0.1:{closed_port}"}
        return subprocess.run(
            [python, *argv[1:]], env=env, timeout=10, capture_output=True, check=False
        ).returncode

    try:
        assert exit_status(f"http://127.0.0.1:{port}/health") == 0
        assert exit_status(f"http://127.0.0.1:{port}/other") != 0
        server.status = 503  # type: ignore[attr-defined]
        assert exit_status(f"http://127.0.0.1:{port}/health") != 0
        assert exit_status(f"http://127.0.0.1:{closed_port}/health") != 0
        started = time.monotonic()
        assert exit_status(f"http://127.0.0.1:{silent.getsockname()[1]}/health") != 0
        assert time.monotonic() - started < halb.TRACK_URL_INTERVAL + 1
    finally:
        server.shutdown()
        silent.close()


def test_failover_estimate_follows_rfc5798():
    config = halb.normalize(base_params())
    # 3 * 0.1 + (256 - 150) * 0.1 / 256
    assert halb.failover_estimate(config) == pytest.approx(0.3 + 106 * 0.1 / 256, abs=0.001)
    params = base_params()
    params["vrrp"].update(advert_int=1, priority=100)
    assert halb.failover_estimate(halb.normalize(params)) == pytest.approx(3.609, abs=0.001)


def test_ipv6_backend_uses_the_ipv6_prefix():
    params = base_params()
    params["virtual_servers"][1]["backends"][1]["address"] = "2001:db8::21"
    haproxy_cfg, _keepalived_conf = render(params)
    assert any(
        line.startswith("server sg2 ipv6@2001:db8::21:4172 ")
        for line in section(haproxy_cfg, "backend be_sg")
    )


def mutate(path: str, value) -> dict:
    params = copy.deepcopy(base_params())
    target = params
    keys = path.split(".")
    for key in keys[:-1]:
        target = target[int(key)] if key.isdigit() else target[key]
    last = keys[-1]
    if value is KeyError:
        del target[last]
    elif last.isdigit():
        target[int(last)] = value
    else:
        target[last] = value
    return params


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("virtual_servers.0.vip", "10.199.7.101", "not one of the pair's VIPs"),
        ("virtual_servers.1.name", "cm", "duplicate virtual server name 'cm'"),
        ("virtual_servers.0.backends.1.name", "cm1", "duplicate backend name"),
        ("virtual_servers.0.backends.1.port", 0, "port 0 is out of range"),
        ("virtual_servers.0.backends.1.port", 70000, "out of range 1-65535"),
        ("virtual_servers.0.backends.1.address", "bad host!", "neither an IP address nor a host name"),
        ("virtual_servers.0.backends.1.address", "10.199.7.100", "is a VIP of this pair"),
        ("virtual_servers.0.backends.0.weight", 0, "use state drain"),
        ("virtual_servers.0.backends.0.state", "paused", "must be enabled, drain or disabled"),
        ("virtual_servers.0.backends", [], "at least one backend"),
        ("virtual_servers.1.persistence", "cookie", "needs mode http"),
        ("virtual_servers.0.tls_cert", None, "needs a certificate"),
        ("virtual_servers.0.timeouts", {"client": "ten seconds"}, "not an HAProxy time"),
        ("virtual_servers.0.timeouts", {"idle": "1s"}, "unknown timeout"),
        ("virtual_servers.0.haproxy_options", ["option a\nfrontend x"], "one non-empty line"),
        ("virtual_servers.0.health_check", {"path": "health"}, "absolute URL path"),
        ("vrrp.priority", 0, "out of range 1-254"),
        ("vrrp.priority", 255, "out of range 1-254"),
        ("vrrp.router_id", 256, "out of range 1-255"),
        ("vrrp.peers", [], "unicast addresses of the other node(s) are required"),
        ("vrrp.peers", KeyError, "required"),
        ("vrrp.peers", ["10.199.7.100"], "is a VIP"),
        ("vrrp.peers", ["10.199.8.12"], "outside the peers' network"),
        ("vrrp.peers", ["not-an-ip"], "not an IP address"),
        ("vrrp.vips", [], "at least one virtual IP"),
        ("vrrp.vips", ["10.199.7.100/24", "2001:db8::100/64"], "mix of IPv4 and IPv6"),
        ("vrrp.vips", ["10.199.7.0/24"], "network or broadcast address"),
        ("vrrp.advert_int", 0.257, "steps of 0.01"),
        ("vrrp.advert_int", 50, "0.01-40.95"),
        ("vrrp.interface", "eth0; reboot", "not an interface name"),
        ("vrrp.track_url", "https://127.0.0.1:9172/health", "must be http://<IP address>"),
        ("vrrp.track_url", "http://localhost:9172/health", "must be http://<IP address>"),
        ("vrrp.track_url", "http://127.0.0.1:99999/health", "a port 1-65535"),
        ("vrrp.track_url", "http://999.0.0.1/health", "must be http://<IP address>"),
        ("vrrp.track_url", "http://127.0.0.1/health' x", "must be http://<IP address>"),
        ("vrrp.track_url", "http://127.0.0.1/health#x", "must be http://<IP address>"),
        ("vrrp.track_url", 'http://127.0.0.1/"', "must be http://<IP address>"),
        ("stick_table_peers.0.name", "other", "must include this node"),
        ("stick_table_peers.1.address", "10.199.7.100", "is a VIP"),
        ("node_name", "bad name", "not a valid name"),
    ],
)
def test_bad_input_is_refused_with_a_message_naming_the_option(path, value, message):
    with pytest.raises(halb.HalbConfigError, match=re.escape(message)):
        halb.normalize(mutate(path, value))


def test_vrrp2_needs_whole_seconds_and_ipv4():
    params = base_params()
    params["vrrp"].update(version=2, advert_int=0.25)
    with pytest.raises(halb.HalbConfigError, match="whole number of seconds"):
        halb.normalize(params)
    params["vrrp"]["advert_int"] = 1
    assert "version 2" in render(params)[1]


def test_host_route_vip_may_be_outside_the_peers_network():
    params = base_params()
    params["vrrp"]["vips"] = ["192.0.2.50/32"]
    for vs in params["virtual_servers"]:
        vs["vip"] = "192.0.2.50"
    _haproxy_cfg, conf = render(params)
    assert "192.0.2.50/32 dev eth0" in conf


def test_bare_vip_gets_a_host_prefix():
    params = base_params()
    params["vrrp"]["vips"] = ["10.199.7.100"]
    _haproxy_cfg, conf = render(params)
    assert "10.199.7.100/32 dev eth0" in conf


def test_default_persistence_follows_the_mode():
    config = halb.normalize(base_params())
    assert [vs["persistence"] for vs in config["virtual_servers"]] == ["cookie", "source"]


def test_rendering_is_deterministic():
    assert render(base_params()) == render(base_params())


def test_tcp_mode_checks_over_tls_without_reencrypting_the_traffic():
    params = base_params()
    params["virtual_servers"][1]["health_check"] = {}
    params["virtual_servers"][1]["backend_tls_verify"] = "required"
    params["virtual_servers"][1]["backend_ca_file"] = "/etc/tls/ca.pem"
    haproxy_cfg, _keepalived_conf = render(params)
    server = next(line for line in section(haproxy_cfg, "backend be_sg") if line.startswith("server sg1 "))
    assert server == (
        "server sg1 10.199.7.21:4172 check inter 2s rise 2 fall 2 check-ssl verify required "
        "ca-file /etc/haproxy/certs/sg-ca.pem weight 100"
    )


def test_http_mode_plain_check_on_another_port_while_traffic_is_reencrypted():
    params = base_params()
    params["virtual_servers"][0]["health_check"] = {"tls": False, "port": 8080}
    haproxy_cfg, _keepalived_conf = render(params)
    server = next(line for line in section(haproxy_cfg, "backend be_cm") if line.startswith("server cm1 "))
    assert server.startswith(
        "server cm1 10.199.7.21:8443 ssl verify required ca-file /etc/haproxy/certs/cm-ca.pem check inter 2s "
        "rise 2 fall 2 no-check-ssl port 8080 "
    )


# --- hostile-internet hardening: TLS table, privileges, backend verification ------------------


def _services_tls():
    """gatehouse.tls of the services package (the one source of the seed's cipher tables)."""
    return pytest.importorskip("gatehouse.tls")


def test_cipher_table_is_the_services_cm_table():
    # The modules cannot import the services package on the managed host, so _halb.py carries a
    # copy; this keeps the copy equal to the one source.
    assert halb.CM_CIPHERS == _services_tls().CM_CIPHERS


def test_every_tls_bind_offers_the_cm_table_tls_1_2_and_later_with_server_preference():
    haproxy_cfg, _keepalived_conf = render(base_params())
    glob = section(haproxy_cfg, "global")
    assert (
        "ssl-default-bind-ciphers ECDHE-RSA-AES256-GCM-SHA384:ECDHE-RSA-AES128-GCM-SHA256:"
        "AES256-GCM-SHA384:AES128-GCM-SHA256" in glob
    )
    assert (
        "ssl-default-bind-ciphersuites TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256:"
        "TLS_AES_128_GCM_SHA256" in glob
    )
    options = next(line for line in glob if line.startswith("ssl-default-bind-options "))
    assert "ssl-min-ver TLSv1.2" in options.split(" ", 1)[1]
    # Server preference is HAProxy's default; prefer-client-ciphers would turn it off.
    assert "prefer-client-ciphers" not in haproxy_cfg
    assert f"ssl-default-server-ciphers {halb.CM_CIPHERS}" in glob
    # No bind line overrides the defaults.
    assert not re.search(r"^\s*bind .*(ciphers|ssl-min-ver|force-tls|no-tlsv12)", haproxy_cfg, re.M)
    # No DHE suite is offered, so no DH parameters are set either.
    assert "dh-param" not in haproxy_cfg


def test_haproxy_workers_drop_root():
    haproxy_cfg, _keepalived_conf = render(base_params())
    glob = section(haproxy_cfg, "global")
    assert "user haproxy" in glob and "group haproxy" in glob


def test_backend_verification_is_required_by_default_and_needs_the_ca():
    params = base_params()
    del params["virtual_servers"][0]["backend_ca_file"]
    with pytest.raises(
        halb.HalbConfigError, match=r"virtual_servers\[cm\]\.backend_ca_file: .*gatehouse__ca_cert"
    ):
        halb.normalize(params)
    config = halb.normalize(base_params())
    assert config["warnings"] == []
    assert config["virtual_servers"][0]["backend_tls_verify"] == "required"


def test_verification_off_only_when_asked_for_and_then_with_a_warning():
    params = base_params()
    del params["virtual_servers"][0]["backend_ca_file"]
    params["virtual_servers"][0]["backend_tls_verify"] = "none"
    config = halb.normalize(params)
    assert len(config["warnings"]) == 1
    assert "virtual_servers[cm]: backend_tls_verify=none" in config["warnings"][0]
    assert "passwords" in config["warnings"][0]
    server = next(
        line
        for line in section(halb.render_haproxy(config), "backend be_cm")
        if line.startswith("server cm1 ")
    )
    assert server.startswith("server cm1 10.199.7.21:8443 ssl verify none check ")


def test_plain_http_to_the_backends_is_warned_about():
    params = base_params()
    params["virtual_servers"][0]["backend_tls"] = False
    config = halb.normalize(params)
    assert any("clear text" in w for w in config["warnings"])


def test_tcp_passthrough_with_plain_checks_needs_no_ca():
    # The sg virtual server passes TLS through and checks plain HTTP: the HALB speaks no TLS to it.
    config = halb.normalize(base_params())
    sg = config["virtual_servers"][1]
    assert sg["backend_ca"] is False and sg["warnings"] == []


def test_fast_cm_health_check_renders_as_given():
    params = base_params()
    params["virtual_servers"][0]["health_check"] = {"interval": "500ms", "rise": 2, "fall": 2}
    haproxy_cfg, _keepalived_conf = render(params)
    be = section(haproxy_cfg, "backend be_cm")
    assert "http-check send meth GET uri /health ver HTTP/1.1 hdr Host cm" in be
    server = next(line for line in be if line.startswith("server cm1 "))
    # The check goes to the traffic port (the CM's /health), over TLS, verified.
    assert "check inter 500ms rise 2 fall 2 check-ssl" in server
    assert " port " not in server


def test_role_argument_specs_document_exactly_the_defaults():
    yaml = pytest.importorskip("yaml")
    role = Path(__file__).resolve().parents[3] / "roles" / "halb"
    defaults = yaml.safe_load((role / "defaults" / "main.yml").read_text())
    options = yaml.safe_load((role / "meta" / "argument_specs.yml").read_text())["argument_specs"]["main"][
        "options"
    ]
    assert set(options) == set(defaults)
    for name, spec in options.items():
        assert spec.get("default") == defaults[name], name
    # The CM virtual server's check marks a CM whose SG is down out of service within 2 s.
    check = defaults["halb_health_check"]
    interval_ms = int(check["interval"].removesuffix("ms"))
    assert interval_ms * check["fall"] <= 1000
    assert defaults["halb_backend_tls_verify"] == "required"
    assert "gatehouse__ca_cert" in defaults["halb_backend_ca_file"]


def test_metrics_frontend_serves_the_exporter_and_the_vrrp_state_of_the_router():
    haproxy_cfg, conf = render(base_params())
    assert "    lua-load /etc/haproxy/gatehouse-metrics.lua" in section_block(haproxy_cfg, "global")
    assert section(haproxy_cfg, "frontend gatehouse_metrics") == [
        "bind :8405",
        "mode http",
        "no log",
        "maxconn 16",
        "timeout client 10s",
        "timeout http-request 5s",
        "timeout http-keep-alive 5s",
        "http-request set-var(txn.gatehouse_router_id) str(51)",
        "http-request use-service prometheus-exporter if { path /metrics }",
        "http-request use-service lua.gatehouse_vrrp if { path /vrrp }",
        "http-request return status 404",
    ]
    # keepalived keeps the file the Lua service reads: present only in MASTER state.
    instance = conf[conf.index("vrrp_instance gatehouse_51 {") :]
    assert '    notify_master "/usr/bin/install -m 0644 /dev/null /run/haproxy/vrrp-master"\n' in instance
    for state in ("backup", "fault", "stop"):
        assert f'    notify_{state} "/usr/bin/rm -f /run/haproxy/vrrp-master"\n' in instance
    assert 'io.open("/run/haproxy/vrrp-master", "r")' in halb.METRICS_LUA_SOURCE


def test_metrics_port_zero_renders_no_frontend_and_a_virtual_server_port_is_refused():
    haproxy_cfg, _conf = render(dict(base_params(), metrics_port=0))
    assert "gatehouse_metrics" not in haproxy_cfg and "lua-load" not in haproxy_cfg
    haproxy_cfg, _conf = render(dict(base_params(), metrics_port=9405))
    assert "bind :9405" in section(haproxy_cfg, "frontend gatehouse_metrics")[0]
    with pytest.raises(halb.HalbConfigError, match="metrics_port 4172 is the port of a virtual server"):
        render(dict(base_params(), metrics_port=4172))


def section_block(text: str, header: str) -> str:
    lines = text.splitlines()
    start = lines.index(header)
    out = []
    for line in lines[start + 1 :]:
        if line and not line[0].isspace():
            break
        out.append(line)
    return "\n".join(out)
