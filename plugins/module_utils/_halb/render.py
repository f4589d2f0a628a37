# Copyright (c) Gatehouse contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""Validation and rendering of a HALB node's configuration (private to the collection).

Pure functions: the module's parameters go in, haproxy.cfg and keepalived.conf come out as
text, with no file system or Docker access, so everything here is unit-testable. The module
(plugins/modules/halb.py) and _halb_docker.py do the I/O.

The rendered haproxy.cfg carries a "layout" hash in its second line: the hash of the same
configuration rendered with every backend enabled. Two configurations with the same layout
differ only in backend states, which the module applies through the HAProxy runtime API
instead of a reload.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re

MANAGED_BY = "Managed by the gatehouse.access.halb module; local changes are overwritten."

# Paths inside the gatehouse/halb container (the module mounts config_dir subdirectories there).
HAPROXY_DIR = "/etc/haproxy"
HAPROXY_CFG = HAPROXY_DIR + "/haproxy.cfg"
CERTS_DIR = HAPROXY_DIR + "/certs"
KEEPALIVED_DIR = "/etc/keepalived"
KEEPALIVED_CONF = KEEPALIVED_DIR + "/keepalived.conf"
RUN_DIR = "/run/haproxy"
ADMIN_SOCKET = RUN_DIR + "/admin.sock"
PEERS_SECTION = "gatehouse"
# keepalived runs this with enable_script_security: the binary is root-owned in the image.
TRACK_SCRIPT = "/usr/bin/pgrep -x haproxy"
# vrrp.track_url: the image's python3 (from gatehouse/base) GETs the URL, with no proxy from the
# environment; exit status 0 only for a 200 answer within the timeout (an error status or a refused
# connection raises). keepalived splits the script on unquoted spaces and keeps a single-quoted
# argument whole; the code holds no double quote, no '#' or '!' (comments) and no braces.
TRACK_URL_CODE = (
    "import sys,urllib.request as u; "
    "sys.exit(0 if u.build_opener(u.ProxyHandler(dict())).open(sys.argv[1],timeout=%s).status==200 else 1)"
)
# The default VRRP advertisement interval (s): a vanished master is replaced within about 0.36 s
# at priority 100, with no false failover measured with every core busy (docs/halb.md).
ADVERT_INT = 0.1
TRACK_URL_INTERVAL = 2  # seconds between two checks; each may take at most this long
TRACK_URL_FALL = 2  # failed checks in a row before the node gives the VIPs up
TRACK_URL_RISE = 2  # good checks in a row before it may take them again
# http://<IPv4 or [IPv6]>[:port][/path]: no name to resolve (the check runs every few seconds, and a
# DNS outage must not move the VIPs), and only characters that keepalived's parser keeps as they are.
TRACK_URL_RE = re.compile(
    r"^http://(?P<host>[0-9.]+|\[[0-9A-Fa-f:.]+\])(?::(?P<port>[0-9]{1,5}))?(?P<path>/[A-Za-z0-9._~%/?=&+-]*)?$"
)
# The node's VRRP state for the monitoring: keepalived's notify commands create this file while the
# node is master and remove it in every other state; the metrics frontend's Lua service reads it.
VRRP_MASTER_FILE = RUN_DIR + "/vrrp-master"
METRICS_LUA_NAME = "gatehouse-metrics.lua"
METRICS_LUA = HAPROXY_DIR + "/" + METRICS_LUA_NAME
METRICS_FRONTEND = "gatehouse_metrics"
DEFAULT_METRICS_PORT = 8405
# The metrics frontend's own connection cap and request deadline: a scraper needs one connection
# per node, so a few Prometheus servers fit; a client that floods or trickles the port holds at
# most this many of the node's global maxconn slots, each for at most the deadline.
METRICS_MAXCONN = 16
METRICS_REQUEST_TIMEOUT = "5s"
# gatehouse_halb_vrrp_master{router_id} at /vrrp of the metrics frontend (the halb module writes it
# next to haproxy.cfg). Lua, because only it can read a file that changes while HAProxy runs.
METRICS_LUA_SOURCE = r"""-- Managed by the gatehouse.access.halb module; local changes are overwritten.
-- /vrrp of the metrics frontend: 1 while keepalived holds this node in VRRP master state.
core.register_service("gatehouse_vrrp", "http", function(applet)
    local master = 0
    local handle = io.open("%s", "r")
    if handle then
        handle:close()
        master = 1
    end
    local body = "# HELP gatehouse_halb_vrrp_master 1 while this node is VRRP master (holds the VIPs)\n"
        .. "# TYPE gatehouse_halb_vrrp_master gauge\n"
        .. string.format('gatehouse_halb_vrrp_master{router_id="%%s"} %%d\n',
            applet:get_var("txn.gatehouse_router_id") or "", master)
    applet:set_status(200)
    applet:add_header("content-type", "text/plain; version=0.0.4")
    applet:add_header("content-length", tostring(#body))
    applet:start_response()
    applet:send(body)
end)
""" % (VRRP_MASTER_FILE,)

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
HOSTNAME_RE = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
)
TIME_RE = re.compile(r"^[0-9]+(us|ms|s|m|h|d)?$")
IFACE_RE = re.compile(r"^[A-Za-z0-9_.:@-]{1,15}$")
HTTP_PATH_RE = re.compile(r"^/[!-~]*$")

BACKEND_STATES = ("enabled", "drain", "disabled")
# HAProxy runtime API state names for each backend state.
RUNTIME_STATE = {"enabled": "ready", "drain": "drain", "disabled": "maint"}

# The seed's connection manager TLS table: the one list every TLS bind of the HALB offers (TLS 1.2
# part, decreasing preference, with server preference). A copy of gatehouse.tls.CM_CIPHERS, which
# the modules cannot import on the managed host; tests/unit/plugins/test_halb_render.py keeps them equal.
CM_CIPHERS = "ECDHE-RSA-AES256-GCM-SHA384:ECDHE-RSA-AES128-GCM-SHA256:AES256-GCM-SHA384:AES128-GCM-SHA256"
# TLS 1.3: OpenSSL's defaults, which are the seed's order.
TLS13_CIPHERSUITES = "TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256:TLS_AES_128_GCM_SHA256"
# HAProxy drops to this account (packaged in the image) after binding; the master stays root
# to re-read certificates and rebind on a reload.
HAPROXY_USER = "haproxy"
HAPROXY_GROUP = "haproxy"

DEFAULT_TIMEOUTS = {
    "connect": "5s",
    "client": "60s",
    "server": "60s",
    "check": "2s",
    "tunnel": "1h",
    "http_request": "10s",
    "http_keep_alive": "10s",
    "queue": "30s",
}


class HalbConfigError(ValueError):
    """A parameter set that cannot be rendered into a working configuration."""


def _ip(value: str, what: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        return ipaddress.ip_address(str(value))
    except ValueError:
        raise HalbConfigError("%s: %r is not an IP address" % (what, value)) from None


def _interface(value: str, what: str) -> ipaddress.IPv4Interface | ipaddress.IPv6Interface:
    text = str(value)
    try:
        iface = ipaddress.ip_interface(text)
    except ValueError:
        raise HalbConfigError(
            "%s: %r is not an address with an optional prefix length (CIDR)" % (what, value)
        ) from None
    if "/" not in text:
        # A bare address gets the host prefix; keepalived would otherwise assume /32 anyway.
        iface = ipaddress.ip_interface("%s/%d" % (text, iface.max_prefixlen))
    return iface


def _name(value: str, what: str) -> str:
    if not isinstance(value, str) or not NAME_RE.match(value):
        raise HalbConfigError(
            "%s: %r is not a valid name (letters, digits, '_', '.', '-'; at most 63 characters, "
            "starting with a letter or digit)" % (what, value)
        )
    return value


def _port(value: object, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 65535:
        raise HalbConfigError("%s: port %r is out of range 1-65535" % (what, value))
    return value


def _time(value: object, what: str) -> str:
    text = str(value)
    if not TIME_RE.match(text):
        raise HalbConfigError(
            "%s: %r is not an HAProxy time (a number with an optional unit us, ms, s, m, h, d)"
            % (what, value)
        )
    return text


def _address(value: str, what: str) -> str:
    text = str(value)
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        pass
    if not HOSTNAME_RE.match(text):
        raise HalbConfigError("%s: %r is neither an IP address nor a host name" % (what, value))
    return text


def _unique(items: list[str], what: str) -> None:
    seen: set[str] = set()
    for item in items:
        if item in seen:
            raise HalbConfigError("duplicate %s %r" % (what, item))
        seen.add(item)


def _hostport(address: str, port: int) -> str:
    # HAProxy accepts [v6]:port and v6 written bare with the port after the last colon;
    # brackets are not accepted everywhere in 2.6, so use the "ipv6@" prefix for clarity.
    if ":" in address:
        return "ipv6@%s:%d" % (address, port)
    return "%s:%d" % (address, port)


def normalize(params: dict) -> dict:
    """Validate the module's parameters and return a complete, normalised copy.

    Raises HalbConfigError with a message that names the offending option.
    """
    node_name = _name(params.get("node_name") or "", "node_name")
    vrrp_in = params.get("vrrp") or {}
    vrrp = _normalize_vrrp(vrrp_in)
    vip_addresses = {str(i.ip) for i in vrrp["vip_interfaces"]}

    # No virtual server is a keepalived-only pair: the VIPs move between the nodes, and services
    # that listen on the node's addresses themselves answer on them (HAProxy keeps its peers).
    virtual_servers_in = params.get("virtual_servers") or []
    virtual_servers = [_normalize_vs(vs, index, vip_addresses) for index, vs in enumerate(virtual_servers_in)]
    _unique([vs["name"] for vs in virtual_servers], "virtual server name")
    _unique(
        ["%s:%d" % (vs["vip"], vs["port"]) for vs in virtual_servers], "virtual server address (vip:port)"
    )

    peers_port = _port(params.get("stick_table_peers_port", 10000), "stick_table_peers_port")
    peers = []
    for index, peer in enumerate(params.get("stick_table_peers") or []):
        what = "stick_table_peers[%d]" % index
        peers.append(
            {
                "name": _name(peer.get("name") or "", what + ".name"),
                "address": str(_ip(peer.get("address") or "", what + ".address")),
            }
        )
    _unique([p["name"] for p in peers], "stick table peer name")
    _unique([p["address"] for p in peers], "stick table peer address")
    if peers and node_name not in {p["name"] for p in peers}:
        raise HalbConfigError(
            "stick_table_peers must include this node (node_name %r) with its own address; HAProxy binds "
            "the local peer there" % node_name
        )
    for peer in peers:
        if peer["address"] in vip_addresses:
            raise HalbConfigError(
                "stick_table_peers: %s is a VIP; peers use the nodes' own addresses" % peer["address"]
            )
    if not peers:
        # A local-only peers section still carries the stick tables from the old to the new
        # HAProxy process on a reload.
        peers = [{"name": node_name, "address": "127.0.0.1"}]

    for vs in virtual_servers:
        for backend in vs["backends"]:
            if backend["address"] in vip_addresses:
                raise HalbConfigError(
                    "virtual_servers[%s].backends[%s]: the address %s is a VIP of this pair"
                    % (vs["name"], backend["name"], backend["address"])
                )

    return {
        "node_name": node_name,
        "virtual_servers": virtual_servers,
        "vrrp": vrrp,
        "stick_table_peers": peers,
        "stick_table_peers_port": peers_port,
        "maxconn": _positive(params["maxconn"], "maxconn") if params.get("maxconn") is not None else None,
        "hard_stop_after": _time(params.get("hard_stop_after", "1h"), "hard_stop_after"),
        "metrics_port": _metrics_port(params.get("metrics_port", DEFAULT_METRICS_PORT), virtual_servers),
        "warnings": [w for vs in virtual_servers for w in vs["warnings"]],
    }


def _metrics_port(value: object, virtual_servers: list[dict]) -> int:
    """0 (no metrics frontend) or a port no virtual server uses."""
    if value is None or value == 0:
        return 0
    port = _port(value, "metrics_port")
    if port in {vs["port"] for vs in virtual_servers}:
        raise HalbConfigError("metrics_port %d is the port of a virtual server; choose another one" % port)
    return port


def _positive(value: object, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise HalbConfigError("%s: %r must be a positive integer" % (what, value))
    return value


def _normalize_vrrp(vrrp: dict) -> dict:
    router_id = vrrp.get("router_id")
    if not isinstance(router_id, int) or isinstance(router_id, bool) or not 1 <= router_id <= 255:
        raise HalbConfigError(
            "vrrp.router_id: %r is out of range 1-255 (the VRRP virtual router id)" % (router_id,)
        )
    priority = vrrp.get("priority")
    if not isinstance(priority, int) or isinstance(priority, bool) or not 1 <= priority <= 254:
        raise HalbConfigError(
            "vrrp.priority: %r is out of range 1-254 (255 is reserved for an address owner, 0 for a node "
            "that stops)" % (priority,)
        )
    version = vrrp.get("version", 3)
    if version not in (2, 3):
        raise HalbConfigError("vrrp.version: %r must be 2 or 3" % (version,))
    advert_int = vrrp.get("advert_int", ADVERT_INT)
    try:
        advert = float(advert_int)
    except (TypeError, ValueError):
        raise HalbConfigError("vrrp.advert_int: %r is not a number of seconds" % (advert_int,)) from None
    if version == 3:
        # VRRPv3 carries the interval in centiseconds in a 12-bit field (RFC 5798).
        if not 0.01 <= advert <= 40.95 or round(advert * 100) != advert * 100:
            raise HalbConfigError(
                "vrrp.advert_int: %r must be 0.01-40.95 seconds in steps of 0.01 with VRRP version 3"
                % (advert_int,)
            )
    elif advert != int(advert) or not 1 <= advert <= 255:
        raise HalbConfigError(
            "vrrp.advert_int: %r must be a whole number of seconds 1-255 with VRRP version 2" % (advert_int,)
        )
    interface = str(vrrp.get("interface") or "eth0")
    if not IFACE_RE.match(interface):
        raise HalbConfigError("vrrp.interface: %r is not an interface name" % interface)

    vips_in = vrrp.get("vips") or []
    if not vips_in:
        raise HalbConfigError("vrrp.vips: at least one virtual IP address (CIDR) is required")
    vip_interfaces = [_interface(v, "vrrp.vips") for v in vips_in]
    _unique([str(i.ip) for i in vip_interfaces], "VIP")
    family = vip_interfaces[0].version
    if any(i.version != family for i in vip_interfaces):
        raise HalbConfigError("vrrp.vips: mix of IPv4 and IPv6; a VRRP instance carries one address family")
    if family == 6 and version == 2:
        raise HalbConfigError("vrrp.vips: IPv6 VIPs need VRRP version 3")

    peers_in = vrrp.get("peers") or []
    if not peers_in:
        raise HalbConfigError(
            "vrrp.peers: the unicast addresses of the other node(s) are required; multicast VRRP is "
            "unreliable on container and cloud networks and is not used"
        )
    peers = [str(_ip(p, "vrrp.peers")) for p in peers_in]
    _unique(peers, "VRRP peer")
    src = vrrp.get("unicast_src_ip")
    if src:
        src = str(_ip(src, "vrrp.unicast_src_ip"))
        if src in peers:
            raise HalbConfigError(
                "vrrp.peers: %s is this node's own unicast_src_ip; list the other nodes" % src
            )
    vip_set = {str(i.ip) for i in vip_interfaces}
    for peer in [*peers, *([src] if src else [])]:
        address = ipaddress.ip_address(peer)
        if address.version != family:
            raise HalbConfigError("vrrp.peers: %s is not of the VIPs' address family" % peer)
        if peer in vip_set:
            raise HalbConfigError("vrrp.peers: %s is a VIP; peers are the nodes' own addresses" % peer)
    # A VIP with a real prefix moves by gratuitous ARP / unsolicited NA, which only works on the
    # nodes' own segment: the peers must be inside that network. Host routes (/32, /128) are exempt.
    for iface in vip_interfaces:
        if iface.network.prefixlen == iface.max_prefixlen:
            continue
        for peer in peers:
            if ipaddress.ip_address(peer) not in iface.network:
                raise HalbConfigError(
                    "vrrp.vips: %s is outside the peers' network (peer %s is not in %s); a VIP must be on the "
                    "nodes' segment, or give it as a host route (/%d)"
                    % (iface, peer, iface.network, iface.max_prefixlen)
                )
        if iface.ip == iface.network.network_address or (
            family == 4 and iface.ip == iface.network.broadcast_address
        ):
            raise HalbConfigError("vrrp.vips: %s is the network or broadcast address of its prefix" % iface)

    garp_refresh = vrrp.get("garp_master_refresh", 60)
    if not isinstance(garp_refresh, int) or isinstance(garp_refresh, bool) or garp_refresh < 0:
        raise HalbConfigError(
            "vrrp.garp_master_refresh: %r must be a whole number of seconds >= 0" % (garp_refresh,)
        )
    return {
        "router_id": router_id,
        "priority": priority,
        "version": version,
        "advert_int": advert,
        "interface": interface,
        "nopreempt": bool(vrrp.get("nopreempt", False)),
        "vip_interfaces": vip_interfaces,
        "peers": peers,
        "unicast_src_ip": src or None,
        "track_haproxy": bool(vrrp.get("track_haproxy", True)),
        "track_url": _track_url(vrrp.get("track_url")),
        "garp_master_refresh": garp_refresh,
    }


def _track_url(value: object) -> str:
    """vrrp.track_url: "" (none) or a plain-HTTP URL with an IP address (see TRACK_URL_RE)."""
    if not value:
        return ""
    text = str(value).strip()
    match = TRACK_URL_RE.match(text)
    if match:
        try:
            ipaddress.ip_address(match.group("host").strip("[]"))
        except ValueError:
            match = None
    if not match or (match.group("port") is not None and not 1 <= int(match.group("port")) <= 65535):
        raise HalbConfigError(
            "vrrp.track_url: %r must be http://<IP address>[:port][/path] (plain HTTP, an IPv4 address or an IPv6 "
            "address in brackets, a port 1-65535, a path of letters, digits and ._~%%/?=&+-)" % (value,)
        )
    return text if match.group("path") else text + "/"


def _normalize_vs(vs: dict, index: int, vip_addresses: set[str]) -> dict:
    name = _name(vs.get("name") or "", "virtual_servers[%d].name" % index)
    what = "virtual_servers[%s]" % name
    vip = str(_ip(vs.get("vip") or "", what + ".vip"))
    if vip not in vip_addresses:
        raise HalbConfigError(
            "%s.vip: %s is not one of the pair's VIPs (vrrp.vips: %s)"
            % (what, vip, ", ".join(sorted(vip_addresses)))
        )
    port = _port(vs.get("port", 443), what + ".port")
    mode = vs.get("mode") or "tcp"
    if mode not in ("tcp", "http"):
        raise HalbConfigError("%s.mode: %r must be tcp or http" % (what, mode))
    balance = vs.get("balance") or "roundrobin"
    if balance not in ("roundrobin", "leastconn", "source"):
        raise HalbConfigError("%s.balance: %r must be roundrobin, leastconn or source" % (what, balance))
    persistence = vs.get("persistence") or ("cookie" if mode == "http" else "source")
    if persistence not in ("none", "source", "cookie"):
        raise HalbConfigError("%s.persistence: %r must be none, source or cookie" % (what, persistence))
    if persistence == "cookie" and mode != "http":
        raise HalbConfigError(
            "%s.persistence: cookie persistence reads the JSESSIONID cookie and needs mode http (TLS terminated "
            "at the HALB); use persistence source in mode tcp" % what
        )
    cookie_name = str(vs.get("cookie_name") or "JSESSIONID")
    if not re.match(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,64}$", cookie_name):
        raise HalbConfigError("%s.cookie_name: %r is not a cookie name" % (what, cookie_name))
    tls_cert = vs.get("tls_cert")
    tls_key = vs.get("tls_key")
    if mode == "http" and not tls_cert:
        raise HalbConfigError(
            "%s.tls_cert: mode http terminates TLS and needs a certificate (and tls_key)" % what
        )
    if mode == "tcp" and (tls_cert or tls_key):
        raise HalbConfigError(
            "%s: tls_cert/tls_key are only used in mode http (tcp passes TLS through)" % what
        )
    backend_tls = bool(vs.get("backend_tls", True))
    verify = vs.get("backend_tls_verify") or "required"
    if verify not in ("none", "required"):
        raise HalbConfigError("%s.backend_tls_verify: %r must be none or required" % (what, verify))
    ca_file = vs.get("backend_ca_file")

    check = dict(vs.get("health_check") or {})
    check_path = str(check.get("path") or "/health")
    if not HTTP_PATH_RE.match(check_path):
        raise HalbConfigError(
            "%s.health_check.path: %r must be an absolute URL path without spaces" % (what, check_path)
        )
    health = {
        "enabled": bool(check.get("enabled", True)),
        "path": check_path,
        "tls": bool(check["tls"]) if check.get("tls") is not None else backend_tls,
        "port": _port(check["port"], what + ".health_check.port") if check.get("port") is not None else None,
        "interval": _time(check.get("interval", "2s"), what + ".health_check.interval"),
        "rise": _positive(check.get("rise", 2), what + ".health_check.rise"),
        "fall": _positive(check.get("fall", 2), what + ".health_check.fall"),
        "host": str(check.get("host") or name),
    }
    if not HOSTNAME_RE.match(health["host"]) and not NAME_RE.match(health["host"]):
        raise HalbConfigError("%s.health_check.host: %r is not a host name" % (what, health["host"]))

    # Verification matters wherever the HALB itself speaks TLS to a backend: re-encrypted traffic
    # (mode http, which carries the users' passwords) and TLS health checks.
    speaks_tls = (mode == "http" and backend_tls) or (health["enabled"] and health["tls"])
    warnings = []
    if speaks_tls and verify == "required" and not ca_file:
        raise HalbConfigError(
            "%s.backend_ca_file: backend_tls_verify=required (the default) needs the CA bundle that signs the "
            "backends' certificates (the deployment CA, gatehouse__ca_cert in the playbooks); "
            "backend_tls_verify=none turns verification off" % what
        )
    if speaks_tls and verify == "none":
        warnings.append(
            "%s: backend_tls_verify=none - the HALB does not verify the backends' certificates, so anyone on the "
            "path to them can impersonate a backend%s"
            % (what, " and read the users' passwords" if mode == "http" and backend_tls else "")
        )
    if mode == "http" and not backend_tls:
        warnings.append(
            "%s: backend_tls=false - the HALB forwards the decrypted requests, passwords included, to the "
            "backends in clear text" % what
        )

    timeouts = dict(DEFAULT_TIMEOUTS)
    for key, value in (vs.get("timeouts") or {}).items():
        if value is None:
            continue
        if key not in DEFAULT_TIMEOUTS:
            raise HalbConfigError(
                "%s.timeouts: unknown timeout %r (known: %s)" % (what, key, ", ".join(DEFAULT_TIMEOUTS))
            )
        timeouts[key] = _time(value, "%s.timeouts.%s" % (what, key))

    extra = []
    for line in vs.get("haproxy_options") or []:
        text = str(line)
        if "\n" in text or "\r" in text or not text.strip():
            raise HalbConfigError("%s.haproxy_options: each entry is one non-empty line" % what)
        extra.append(text.strip())

    backends_in = vs.get("backends") or []
    if not backends_in:
        raise HalbConfigError("%s.backends: at least one backend is required" % what)
    backends = []
    for bindex, backend in enumerate(backends_in):
        bname = _name(backend.get("name") or "", "%s.backends[%d].name" % (what, bindex))
        bwhat = "%s.backends[%s]" % (what, bname)
        weight = backend.get("weight", 100)
        if not isinstance(weight, int) or isinstance(weight, bool) or not 1 <= weight <= 256:
            raise HalbConfigError(
                "%s.weight: %r is out of range 1-256 (use state drain for no new sessions)" % (bwhat, weight)
            )
        state = backend.get("state") or "enabled"
        if state not in BACKEND_STATES:
            raise HalbConfigError("%s.state: %r must be enabled, drain or disabled" % (bwhat, state))
        backends.append(
            {
                "name": bname,
                "address": _address(backend.get("address") or "", bwhat + ".address"),
                "port": _port(backend.get("port"), bwhat + ".port"),
                "weight": weight,
                "state": state,
                "check_port": (
                    _port(backend["check_port"], bwhat + ".check_port")
                    if backend.get("check_port") is not None
                    else None
                ),
            }
        )
    _unique([b["name"] for b in backends], "backend name in %s" % what)
    _unique(["%s:%d" % (b["address"], b["port"]) for b in backends], "backend address in %s" % what)
    maxconn = vs.get("maxconn")
    return {
        "name": name,
        "vip": vip,
        "port": port,
        "mode": mode,
        "balance": balance,
        "persistence": persistence,
        "persistence_timeout": _time(vs.get("persistence_timeout", "30m"), what + ".persistence_timeout"),
        "cookie_name": cookie_name,
        "tls": bool(tls_cert),
        "backend_tls": backend_tls,
        "backend_tls_verify": verify,
        "backend_ca": bool(ca_file) and speaks_tls,
        "health_check": health,
        "timeouts": timeouts,
        "maxconn": _positive(maxconn, what + ".maxconn") if maxconn is not None else None,
        "haproxy_options": extra,
        "backends": backends,
        "warnings": warnings,
    }


def cert_file(vs_name: str) -> str:
    """Path (inside the container) of a virtual server's certificate + key bundle."""
    return "%s/%s.pem" % (CERTS_DIR, vs_name)


def ca_file(vs_name: str) -> str:
    """Path (inside the container) of a virtual server's backend CA bundle."""
    return "%s/%s-ca.pem" % (CERTS_DIR, vs_name)


def _server_line(vs: dict, backend: dict, neutral: bool) -> str:
    state = "enabled" if neutral else backend["state"]
    parts = ["server", backend["name"], _hostport(backend["address"], backend["port"])]
    # Mode http opens TLS again to the backend; mode tcp passes the client's TLS through untouched.
    reencrypt = vs["mode"] == "http" and vs["backend_tls"]
    verify = ["verify", vs["backend_tls_verify"]]
    if vs["backend_ca"]:
        verify += ["ca-file", ca_file(vs["name"])]
    if reencrypt:
        parts += ["ssl", *verify]
    check = vs["health_check"]
    if check["enabled"]:
        parts += ["check", "inter", check["interval"], "rise", str(check["rise"]), "fall", str(check["fall"])]
        if check["tls"]:
            parts += ["check-ssl"]
            if not reencrypt:
                parts += verify
        elif reencrypt:
            # The traffic is TLS but the check is plain HTTP (e.g. an admin port).
            parts += ["no-check-ssl"]
        port = backend["check_port"] or check["port"]
        if port:
            parts += ["port", str(port)]
    if vs["persistence"] == "cookie":
        parts += ["cookie", backend["name"]]
    # Drain is weight 0 in a configuration file (no new sessions, persistent ones still arrive),
    # the same effect as "set server ... state drain" at run time.
    parts += ["weight", "0" if state == "drain" else str(backend["weight"])]
    if state == "disabled":
        parts += ["disabled"]
    line = " ".join(parts)
    if state != "enabled":
        line += "  # state: %s" % state
    return line


def render_haproxy(config: dict, managed: str = MANAGED_BY) -> str:
    """haproxy.cfg for one node; ``config`` comes from normalize()."""
    body = _haproxy_body(config, neutral=False)
    layout = hashlib.sha256(_haproxy_body(config, neutral=True).encode()).hexdigest()
    return "%s\n# gatehouse-halb layout %s\n%s" % (_comment(managed), layout, body)


def layout_of(haproxy_cfg: str | None) -> str | None:
    """The layout hash recorded in a rendered haproxy.cfg (None for other files)."""
    if not haproxy_cfg:
        return None
    match = re.search(r"^# gatehouse-halb layout ([0-9a-f]{64})$", haproxy_cfg, re.M)
    return match.group(1) if match else None


def backend_states(haproxy_cfg: str | None) -> dict[tuple[str, str], str]:
    """{(backend section, server): state} read back from a rendered haproxy.cfg."""
    states: dict[tuple[str, str], str] = {}
    if not haproxy_cfg:
        return states
    section = None
    for line in haproxy_cfg.splitlines():
        if line.startswith("backend "):
            section = line.split()[1]
        elif line and not line[0].isspace():
            section = None
        elif section and line.strip().startswith("server "):
            words = line.split()
            state = "enabled"
            if "# state:" in line:
                state = line.rsplit("# state:", 1)[1].strip()
            states[(section, words[1])] = state
    return states


def desired_states(config: dict) -> dict[tuple[str, str], str]:
    return {
        (backend_section(vs["name"]), b["name"]): b["state"]
        for vs in config["virtual_servers"]
        for b in vs["backends"]
    }


def backend_weights(config: dict) -> dict[tuple[str, str], int]:
    return {
        (backend_section(vs["name"]), b["name"]): b["weight"]
        for vs in config["virtual_servers"]
        for b in vs["backends"]
    }


def backend_section(vs_name: str) -> str:
    return "be_%s" % vs_name


def frontend_section(vs_name: str) -> str:
    return "fe_%s" % vs_name


def runtime_commands(section: str, server: str, state: str, weight: int) -> list[str]:
    """HAProxy runtime API commands that put a server into ``state`` (enabled/drain/disabled)."""
    target = "%s/%s" % (section, server)
    commands = ["set server %s state %s" % (target, RUNTIME_STATE[state])]
    if state == "enabled":
        # A server loaded drained from the file has weight 0; "ready" alone would keep it so.
        commands.append("set server %s weight %d" % (target, weight))
    return commands


def _comment(text: str) -> str:
    return "\n".join("# " + line if line else "#" for line in text.splitlines())


def _haproxy_body(config: dict, neutral: bool) -> str:
    out: list[str] = []
    add = out.append
    add("global")
    add("    log stdout format raw local0 info")
    if config["maxconn"]:
        # Without it HAProxy derives the limit from the open files limit of the container.
        add("    maxconn %d" % config["maxconn"])
    # expose-fd listeners: a reload hands the listening sockets to the new workers, so no
    # connection attempt is refused while the old workers finish their connections.
    add("    stats socket %s mode 600 level admin expose-fd listeners" % ADMIN_SOCKET)
    add("    stats timeout 30s")
    if config.get("metrics_port"):
        add("    lua-load %s" % METRICS_LUA)
    add("    localpeer %s" % config["node_name"])
    add("    hard-stop-after %s" % config["hard_stop_after"])
    # The master binds (VIPs, 443) as root; the workers that handle the traffic run unprivileged.
    add("    user %s" % HAPROXY_USER)
    add("    group %s" % HAPROXY_GROUP)
    # Every TLS bind offers the seed's CM table, TLS 1.2 and 1.3 only. HAProxy picks by its own
    # order (server preference) because prefer-client-ciphers is not set.
    add("    ssl-default-bind-ciphers %s" % CM_CIPHERS)
    add("    ssl-default-bind-ciphersuites %s" % TLS13_CIPHERSUITES)
    add("    ssl-default-bind-options ssl-min-ver TLSv1.2 no-tls-tickets")
    add("    ssl-default-server-ciphers %s" % CM_CIPHERS)
    add("    ssl-default-server-ciphersuites %s" % TLS13_CIPHERSUITES)
    add("    ssl-default-server-options ssl-min-ver TLSv1.2")
    add("")
    add("defaults")
    add("    log global")
    add("    option dontlognull")
    add("    timeout connect %s" % DEFAULT_TIMEOUTS["connect"])
    add("    timeout client %s" % DEFAULT_TIMEOUTS["client"])
    add("    timeout server %s" % DEFAULT_TIMEOUTS["server"])
    # A backend name that does not resolve (yet) must not stop HAProxy from starting.
    add("    default-server init-addr last,libc,none")
    add("")
    add("# Stick tables are shared with the other node(s) so persistence survives a failover,")
    add("# and handed from the old to the new process on a reload.")
    add("peers %s" % PEERS_SECTION)
    for peer in config["stick_table_peers"]:
        add("    peer %s %s" % (peer["name"], _hostport(peer["address"], config["stick_table_peers_port"])))
    if config.get("metrics_port"):
        add("")
        out.extend(_metrics_frontend(config))
    for vs in config["virtual_servers"]:
        add("")
        out.extend(_virtual_server(vs, neutral))
    return "\n".join(out) + "\n"


def _metrics_frontend(config: dict) -> list[str]:
    """Prometheus' view of the node: HAProxy's own exporter at /metrics, the VRRP state at /vrrp.

    Plain HTTP on every address of the node (never only the VIP, which moves): the firewall role
    opens the port to the monitoring hosts only, and its own maxconn and request deadline keep a
    client that reaches it anyway from taking the virtual servers' connection slots.
    """
    return [
        "# Metrics for the monitoring (docs/monitoring.md)",
        "frontend %s" % METRICS_FRONTEND,
        "    bind :%d" % config["metrics_port"],
        "    mode http",
        "    no log",
        "    maxconn %d" % METRICS_MAXCONN,
        "    timeout client 10s",
        "    timeout http-request %s" % METRICS_REQUEST_TIMEOUT,
        "    timeout http-keep-alive %s" % METRICS_REQUEST_TIMEOUT,
        "    http-request set-var(txn.gatehouse_router_id) str(%d)" % config["vrrp"]["router_id"],
        "    http-request use-service prometheus-exporter if { path /metrics }",
        "    http-request use-service lua.gatehouse_vrrp if { path /vrrp }",
        "    http-request return status 404",
    ]


def _virtual_server(vs: dict, neutral: bool) -> list[str]:
    t = vs["timeouts"]
    out = ["# Virtual server %s: %s %s:%d" % (vs["name"], vs["mode"], vs["vip"], vs["port"])]
    add = out.append
    add("frontend %s" % frontend_section(vs["name"]))
    # transparent: bind the VIP even while the other node holds it (IP_TRANSPARENT/FREEBIND),
    # so a failover does not need a reload.
    bind = "    bind %s transparent" % _hostport(vs["vip"], vs["port"])
    if vs["tls"]:
        bind += " ssl crt %s alpn http/1.1" % cert_file(vs["name"])
    add(bind)
    add("    mode %s" % vs["mode"])
    if vs["maxconn"]:
        add("    maxconn %d" % vs["maxconn"])
    add("    timeout client %s" % t["client"])
    if vs["mode"] == "http":
        add("    option httplog")
        add("    timeout http-request %s" % t["http_request"])
        add("    timeout http-keep-alive %s" % t["http_keep_alive"])
        # The CM trusts X-Forwarded-For only from its TrustedProxies; a client-sent header is dropped
        # so the only value is the address HAProxy saw.
        add("    http-request del-header X-Forwarded-For")
        add("    option forwardfor")
        add("    http-request set-header X-Forwarded-Proto https")
    else:
        add("    option tcplog")
    add("    default_backend %s" % backend_section(vs["name"]))
    add("")
    add("backend %s" % backend_section(vs["name"]))
    add("    mode %s" % vs["mode"])
    add("    balance %s" % vs["balance"])
    add("    timeout connect %s" % t["connect"])
    add("    timeout server %s" % t["server"])
    add("    timeout queue %s" % t["queue"])
    if vs["mode"] == "tcp":
        add("    timeout tunnel %s" % t["tunnel"])
    check = vs["health_check"]
    if check["enabled"]:
        add("    timeout check %s" % t["check"])
        add("    option httpchk")
        add("    http-check send meth GET uri %s ver HTTP/1.1 hdr Host %s" % (check["path"], check["host"]))
        add("    http-check expect status 200")
    if vs["persistence"] == "source":
        add(
            "    stick-table type ipv6 size 1m expire %s peers %s"
            % (vs["persistence_timeout"], PEERS_SECTION)
        )
        add("    stick on src")
    elif vs["persistence"] == "cookie":
        # The seed's "sticky sessions by the jsessionid": the backend's session cookie gets the
        # server name as a prefix, which HAProxy strips again before the request reaches it.
        add("    cookie %s prefix nocache" % vs["cookie_name"])
    # Without redispatch a client stuck to a dead server would fail until its entry expires.
    add("    option redispatch")
    add("    retries 2")
    for line in vs["haproxy_options"]:
        add("    %s" % line)
    for backend in vs["backends"]:
        add("    " + _server_line(vs, backend, neutral))
    return out


def render_keepalived(config: dict, managed: str = MANAGED_BY) -> str:
    """keepalived.conf for one node; ``config`` comes from normalize()."""
    v = config["vrrp"]
    out = [_comment(managed)]
    add = out.append
    add("global_defs {")
    add("    router_id %s" % config["node_name"])
    add("    enable_script_security")
    add("    script_user root")
    add("    vrrp_garp_master_refresh %d" % v["garp_master_refresh"])
    add("}")
    add("")
    if v["track_haproxy"]:
        add("# A node whose HAProxy is gone goes to FAULT and gives up the VIP.")
        add("vrrp_script gatehouse_haproxy {")
        add('    script "%s"' % TRACK_SCRIPT)
        add("    interval 1")
        add("    timeout 1")
        add("    fall 1")
        add("    rise 2")
        add("}")
        add("")
    if v["track_url"]:
        add(
            "# A node whose tracked service does not answer %s with 200 goes to FAULT and gives up the VIP."
            % v["track_url"]
        )
        add("vrrp_script gatehouse_track_url {")
        code = TRACK_URL_CODE % _seconds(TRACK_URL_INTERVAL * 0.75)
        add("    script \"/usr/bin/python3 -I -c '%s' %s\"" % (code, v["track_url"]))
        add("    interval %d" % TRACK_URL_INTERVAL)
        add("    timeout %d" % TRACK_URL_INTERVAL)
        add("    fall %d" % TRACK_URL_FALL)
        add("    rise %d" % TRACK_URL_RISE)
        add("}")
        add("")
    add("vrrp_instance gatehouse_%d {" % v["router_id"])
    # Every node starts as BACKUP and becomes MASTER only after the advertisement timeout
    # (3 x advert_int + skew) without hearing a better master: a restarted node never holds
    # the VIP while another node does.
    add("    state BACKUP")
    add("    interface %s" % v["interface"])
    add("    virtual_router_id %d" % v["router_id"])
    add("    priority %d" % v["priority"])
    add("    version %d" % v["version"])
    add("    advert_int %s" % _seconds(v["advert_int"]))
    if v["nopreempt"]:
        add("    nopreempt")
    if v["unicast_src_ip"]:
        add("    unicast_src_ip %s" % v["unicast_src_ip"])
    add("    unicast_peer {")
    for peer in v["peers"]:
        add("        %s" % peer)
    add("    }")
    add("    virtual_ipaddress {")
    for iface in v["vip_interfaces"]:
        add("        %s dev %s" % (iface.with_prefixlen, v["interface"]))
    add("    }")
    add("    # The node's state for the monitoring (gatehouse_halb_vrrp_master).")
    # install, not touch: keepalived runs its scripts with umask 077 and the file is read by the
    # HAProxy workers (user haproxy).
    add('    notify_master "/usr/bin/install -m 0644 /dev/null %s"' % VRRP_MASTER_FILE)
    for state in ("backup", "fault", "stop"):
        add('    notify_%s "/usr/bin/rm -f %s"' % (state, VRRP_MASTER_FILE))
    tracked = (["gatehouse_haproxy"] if v["track_haproxy"] else []) + (
        ["gatehouse_track_url"] if v["track_url"] else []
    )
    if tracked:
        add("    track_script {")
        for name in tracked:
            add("        %s" % name)
        add("    }")
    add("}")
    return "\n".join(out) + "\n"


def _seconds(value: float) -> str:
    text = ("%.2f" % value).rstrip("0").rstrip(".")
    return text or "0"


def failover_estimate(config: dict) -> float:
    """Seconds until a backup takes over from a master that vanished (RFC 5798 Master_Down_Interval)."""
    v = config["vrrp"]
    skew = ((256 - v["priority"]) * v["advert_int"]) / 256.0
    return round(3 * v["advert_int"] + skew, 3)
