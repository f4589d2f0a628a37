# Copyright (c) Gatehouse contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""Logic of the cmsg module: install, configure and uninstall a connection manager + security gateway.

Order of work: validate every option (nothing is touched when anything is wrong), then describe
the deployment (files, container specs, the bridge network) for the deploy engine
(_deploy/engine.py), which compares it with the host and, outside check mode, writes the files
atomically and converges the network and the containers.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
import os
import re
import secrets

from ansible_collections.gatehouse.access.plugins.module_utils._common.files import (
    SECRET_TEXT,
    PlannedFile,
    mask_env_values,
    read_bytes,
    sha256,
)
from ansible_collections.gatehouse.access.plugins.module_utils._deploy import common as dep
from ansible_collections.gatehouse.access.plugins.module_utils._deploy import engine
from ansible_collections.gatehouse.access.plugins.module_utils._docker import containers as ctr

DEFAULT_CIDR = "10.101.0.0/24"
DEFAULT_CIDR_V6 = "fd00:10:101::/64"
MAX_SG_CONNECTIONS = 5000
SECRET_KEY = "GATEHOUSE_GRANTSECRET"  # noqa: S105 - the name of the key, not a secret
BROKER_PATHS = ("", "/pcoip-broker/xml")
# The management listeners (AdminPort) inside the containers; in bridge mode they are published on
# the host's 127.0.0.1 at cm_admin_host_port and sg_admin_host_port (by default the same numbers).
CM_ADMIN_PORT = 9180
SG_ADMIN_PORT = 9172
# Names in certs/ of the internal identity and the CA bundles (container paths /certs/<name>).
IDENTITY_CERT, IDENTITY_KEY = "identity.pem", "identity-key.pem"
AGENT_CA, BROKER_CA = "agent-ca.pem", "broker-ca.pem"

ARGUMENT_SPEC: dict = dict(
    dep.COMMON_ARGUMENT_SPEC,
    accept_policies={"type": "bool", "default": False},
    broker_url={"type": "str"},
    broker_ca_cert={"type": "path"},
    broker_tls_verify={"type": "bool", "default": True},
    identity_cert={"type": "path"},
    identity_key={"type": "path", "no_log": True},
    agent_ca_cert={"type": "path"},
    agent_tls_verify={"type": "bool", "default": True},
    admin_address={"type": "str", "default": "0.0.0.0"},
    external_pcoip_ip={"type": "list", "elements": "str", "default": []},
    enable_security_gateway={"type": "bool", "default": True},
    enable_collaboration={"type": "bool", "default": True},
    enable_ipv6={"type": "bool", "default": False},
    host_address={"type": "list", "elements": "str", "default": []},
    license_server_url={"type": "str"},
    docker_network_cidr={"type": "str", "default": DEFAULT_CIDR},
    docker_network_cidr_v6={"type": "str", "default": DEFAULT_CIDR_V6},
    max_connections={"type": "int", "default": MAX_SG_CONNECTIONS},
    workers={"type": "int", "default": 0},
    max_concurrent_establishments={"type": "int", "default": 40},
    max_clients={"type": "int", "default": 400},
    trusted_proxies={"type": "list", "elements": "str", "default": []},
    forward_to={"type": "list", "elements": "str", "default": []},
    listen_address={"type": "str", "default": ""},
    proxy_protocol_sources={"type": "list", "elements": "str", "default": []},
    data_dir={"type": "path", "default": "/opt/gatehouse/cmsg"},
    https_port={"type": "int", "default": 443},
    http_port={"type": "int", "default": 80},
    pcoip_port={"type": "int", "default": 4172},
    cm_admin_host_port={"type": "int", "default": CM_ADMIN_PORT},
    sg_admin_host_port={"type": "int", "default": SG_ADMIN_PORT},
    site={"type": "str", "default": ""},
    site_gateways={"type": "dict", "default": {}},
    grant_secret={"type": "str", "no_log": True},
    tenants={
        "type": "list",
        "elements": "dict",
        "default": [],
        "options": {
            "name": {"type": "str", "required": True},
            "host_names": {"type": "list", "elements": "str", "required": True},
            "broker_url": {"type": "str", "required": True},
            "agent_networks": {"type": "list", "elements": "str", "default": []},
            "broker_ca_cert": {"type": "path"},
            "ssl_cert": {"type": "path"},
            "ssl_key": {"type": "path"},
        },
        "required_together": [("ssl_cert", "ssl_key")],
    },
)
# Tenants (docs/tenants.md): the option is written to data/tenants.json, which config.properties
# and SecurityGateway.conf name as TenantsFile only when there are tenants (other deployments keep
# their files and containers). The services take a changed tenants.json up on SIGHUP, so adding
# or removing a tenant keeps the containers and the other tenants' sessions.
TENANTS_FILE = "tenants.json"
TENANTS_KEY = "TenantsFile"
TENANT_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,31}$")
# A tenant's own files, copied into certs/ under names derived from the tenant's name (unique, as
# the name is; the dots, which no name holds, keep one tenant's names from another's): option ->
# file name pattern. They are named in tenants.json by their container
# path and taken up by the same SIGHUP as tenants.json (the services load them again on reload), so
# they never enter a spec hash; the files of a removed tenant (or option) are removed after it.
TENANT_FILES = {
    "ssl_cert": "tenant.%s.cert.pem",
    "ssl_key": "tenant.%s.key.pem",
    "broker_ca_cert": "tenant.%s.broker-ca.pem",
}
TENANT_FILE_RE = re.compile(r"^tenant\.[a-z0-9][a-z0-9-]{0,31}\.(cert|key|broker-ca)\.pem$")
# The options that reach the CM's config.properties as they are (after validation), and their keys.
# The keys are the seed-style ones; the CM's settings field of each has the option's name, which
# tests/unit/plugins/test_cmsg_names.py holds equal, so a concept keeps one name.
CM_OPTION_KEYS = {
    "broker_url": "BrokerUrl",
    "broker_tls_verify": "BrokerTlsVerify",
    "agent_tls_verify": "AgentTlsVerify",
    "enable_security_gateway": "SecurityGatewayEnabled",
    "external_pcoip_ip": "ExternalPcoipIp",
    "pcoip_port": "SecurityGatewayPort",
    "max_concurrent_establishments": "MaxConcurrentEstablishments",
    "max_clients": "MaxClients",
    "trusted_proxies": "TrustedProxies",
    "enable_ipv6": "EnableIpv6",
    "enable_collaboration": "EnableCollaboration",
    "host_address": "HostAddress",
    "license_server_url": "LicenseServerUrl",
    "log_level": "LogLevel",
    "site": "Site",
    "site_gateways": "SiteGateways",
    "workers": "Workers",
}
# The SG options of a double-hop DMZ and their SecurityGateway.conf keys (the SG's settings fields
# have the options' names). Written only when set, so that other deployments keep their files.
SG_OPTION_KEYS = {
    "forward_to": "ForwardTo",
    "proxy_protocol_sources": "ProxyProtocolSources",
    "workers": "Workers",
}
MAX_WORKERS = 64  # gatehouse/config.py
# broker_url is required with state=present unless forward_to makes the host a forwarder (validate).
REQUIRED_IF = list(dep.COMMON_REQUIRED_IF)
# Paired options written only when set: a single-site node keeps the files (and so the containers'
# spec hashes) of the releases before multi-site.
CM_KEYS_WHEN_SET = ("site", "site_gateways", "workers")
REQUIRED_TOGETHER = [*dep.COMMON_REQUIRED_TOGETHER, ("identity_cert", "identity_key")]


# Multi-site (docs/multisite.md): the services' rule for site names (gatehouse/sites.py).
SITE_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")


class Names:
    def __init__(self, prefix: str) -> None:
        self.cm = "%s-cm" % prefix
        self.sg = "%s-sg" % prefix
        self.network = "%s-cmsg" % prefix


# ------------------------------------------------------------------ validation


def split_external_pcoip_ip(values: list[str], errors: list[str]) -> tuple[str | None, str | None]:
    v4: list[str] = []
    v6: list[str] = []
    for value in values:
        address = dep.parse_ip(value.strip())
        if address is None:
            errors.append("external_pcoip_ip %r is not an IP address" % value)
        elif address.version == 4:
            v4.append(str(address))
        else:
            v6.append(str(address))
    if len(v4) > 1:
        errors.append(
            "external_pcoip_ip holds %d IPv4 addresses (%s); give at most one" % (len(v4), ", ".join(v4))
        )
    if len(v6) > 1:
        errors.append(
            "external_pcoip_ip holds %d IPv6 addresses (%s); give at most one" % (len(v6), ", ".join(v6))
        )
    return (v4[0] if v4 else None), (v6[0] if v6 else None)


def split_host_address(values: list[str], errors: list[str]) -> tuple[str | None, str | None]:
    ips: list[str] = []
    names: list[str] = []
    for value in values:
        value = value.strip()
        address = dep.parse_ip(value)
        if address is not None:
            ips.append(str(address))
        elif dep.is_fqdn(value):
            names.append(value.rstrip(".").lower())
        else:
            errors.append(
                "host_address %r is neither an IP address nor a fully qualified domain name" % value
            )
    if len(ips) > 1 or len(names) > 1:
        errors.append("host_address takes at most one IP address and one FQDN, got %s" % ", ".join(values))
    return (ips[0] if ips else None), (names[0] if names else None)


def site_options(params: dict, errors: list[str]) -> tuple[str, list[str]]:
    """``site`` and ``site_gateways`` as the CM and SG take them: the site, and sorted
    ``site=host:port`` items (IPv6 in brackets, port 4172 when not given)."""
    site = (params["site"] or "").strip()
    if site and not SITE_RE.match(site):
        errors.append(
            "site %r is not a site name: 1 to 63 lower-case letters, digits, '-' or '_', starting with a "
            "letter or digit" % site
        )
    gateways = []
    for name, address in sorted((params["site_gateways"] or {}).items()):
        if not SITE_RE.match(str(name)):
            errors.append(
                "site_gateways: %r is not a site name (lower-case letters, digits, '-', '_')" % name
            )
            continue
        text = str(address).strip()
        host, port = text, "4172"
        if text.startswith("["):
            host, _sep, rest = text[1:].partition("]")
            port = rest[1:] if rest.startswith(":") else ("" if rest else "4172")
        elif text.count(":") == 1:
            host, _sep, port = text.partition(":")
        ip = dep.parse_ip(host)
        if ip is None and not dep.is_fqdn(host):
            errors.append("site_gateways: %s: %r is neither an IP address nor an FQDN" % (name, host))
            continue
        if not port.isdigit() or not 1 <= int(port) <= 65535:
            errors.append("site_gateways: %s: %r needs a port from 1 to 65535" % (name, text))
            continue
        shown = ("[%s]" % ip if ip.version == 6 else str(ip)) if ip is not None else host.rstrip(".").lower()
        gateways.append("%s=%s:%d" % (name, shown, int(port)))
    return site, gateways


def check_grant_secret(params: dict, errors: list[str]) -> None:
    """``grant_secret``, when given, is base64 of 32 bytes (``openssl rand -base64 32``)."""
    secret = params["grant_secret"]
    if secret is None:
        return
    try:
        if len(base64.b64decode(secret.strip(), validate=True)) == 32:
            return
    except (binascii.Error, ValueError):
        pass
    errors.append("grant_secret must be 32 random bytes in base64 (openssl rand -base64 32)")


def validate(params: dict, used_networks) -> dict:
    """Check every option; returns normalised values or raises dep.ValidationError listing all problems.

    ``used_networks`` is called (only in bridge mode) for the (owner, CIDR) pairs in use on the host.
    """
    errors: list[str] = []
    forwarder = bool(params["forward_to"]) and params["state"] == "present"
    dep.check_common(params, errors, tls_required=not forwarder)
    values: dict = {}
    if params["state"] == "absent":
        if errors:
            raise dep.ValidationError(errors)
        return values
    values["forward_to"] = forward_to_entries(params["forward_to"], errors)
    values["proxy_protocol_sources"] = networks_of(params, "proxy_protocol_sources", errors)
    if forwarder:
        return validate_forwarder(params, values, errors)
    if params["listen_address"]:
        errors.append("listen_address is for a forwarding security gateway (forward_to) behind a VIP only")
    values["tenants"] = tenant_entries(params["tenants"], errors)
    if not params["broker_url"] and not values["tenants"]:
        errors.append(
            "broker_url is required with state=present (unless forward_to makes this host a forwarding "
            "security gateway, or tenants gives every tenant its broker_url)"
        )
    if not params["accept_policies"]:
        errors.append(
            "accept_policies must be true: installing the connection manager and security gateway requires "
            "accepting the EULA and privacy policy (the installer's --accept-policies)"
        )
    if params["broker_url"]:
        dep.validate_https_url(
            params["broker_url"], "broker_url", errors, require_port=True, paths=BROKER_PATHS
        )
    if params["license_server_url"]:
        url = params["license_server_url"]
        if not url.startswith(("http://", "https://")) or not dep.urlsplit(url).hostname:
            errors.append(
                "license_server_url %r must look like https://<license-server-address>:<port>/..." % url
            )
    v4, v6 = split_external_pcoip_ip(params["external_pcoip_ip"], errors)
    if v6 and not params["enable_ipv6"]:
        errors.append("external_pcoip_ip %s is an IPv6 address; set enable_ipv6=true to use IPv6" % v6)
    if params["enable_security_gateway"] and not v4 and not (v6 and params["enable_ipv6"]):
        errors.append(
            "external_pcoip_ip needs the public IPv4 or (with enable_ipv6) IPv6 address of this security gateway "
            "(clients connect to it on 4172) when enable_security_gateway is true; or set "
            "enable_security_gateway=false for LAN-only use"
        )
    values["external_pcoip_ip"] = [ip for ip in (v4, v6) if ip]
    host_ip, host_fqdn = split_host_address(params["host_address"], errors)
    values["host_address"] = [a for a in (host_fqdn, host_ip) if a]
    values["trusted_proxies"] = networks_of(params, "trusted_proxies", errors)
    values["site"], values["site_gateways"] = site_options(params, errors)
    check_grant_secret(params, errors)
    values["warnings"] = tls_verify_checks(params, errors)
    admin = dep.parse_ip(params["admin_address"].strip())
    if admin is None:
        errors.append(
            "admin_address %r must be an IP address (0.0.0.0 = every address of the container or host)"
            % params["admin_address"]
        )
    elif params["network_mode"] == "bridge" and admin.is_unspecified and admin.version == 6:
        # asyncio binds :: with IPV6_V6ONLY: the ports published on 127.0.0.1 and the CM's poll of
        # the SG arrive over IPv4 and would find nothing.
        errors.append(
            "admin_address '::': with network_mode=bridge the management listeners are reached over IPv4 "
            "(the ports published on the host's 127.0.0.1, the CM's poll of the SG) and a listener on :: "
            "accepts IPv6 only; keep 0.0.0.0"
        )
    elif (
        params["network_mode"] == "bridge" and params["enable_security_gateway"] and not admin.is_unspecified
    ):
        # The listeners bind inside the containers: the CM reaches the SG's /health by container
        # name over the Docker network, which a loopback or host address shuts out (or cannot bind).
        errors.append(
            "admin_address %r: with network_mode=bridge the management listeners are inside the containers "
            "(published on the host's 127.0.0.1 at cm_admin_host_port and sg_admin_host_port), and the CM polls "
            "the SG's /health over the Docker network; keep 0.0.0.0" % params["admin_address"]
        )
    values["sg_health_url"] = security_gateway_health_url(params, admin)
    values["management_urls"] = management_urls(params, admin)
    if not 1 <= params["max_connections"] <= MAX_SG_CONNECTIONS:
        errors.append(
            "max_connections must be between 1 and %d (a security gateway supports at most %d sessions; deploy "
            "more CM/SG nodes behind a load balancer for more)" % (MAX_SG_CONNECTIONS, MAX_SG_CONNECTIONS)
        )
    if not 0 <= params["workers"] <= MAX_WORKERS:
        errors.append(
            "workers must be between 0 (the CPUs available to the container) and %d, got %d"
            % (MAX_WORKERS, params["workers"])
        )
    for name in ("max_concurrent_establishments", "max_clients"):
        if not 1 <= params[name] <= 1000000:
            errors.append("%s must be between 1 and 1000000, got %d" % (name, params[name]))
    for name in ("https_port", "pcoip_port", "cm_admin_host_port", "sg_admin_host_port"):
        dep.port_option(params[name], name, errors)
    dep.port_option(params["http_port"], "http_port", errors, allow_zero=True)
    if params["network_mode"] == "bridge":
        published_port_clashes(params, errors)
    networks = {
        "docker_network_cidr": dep.check_private_cidr(
            params["docker_network_cidr"], "docker_network_cidr", errors
        )
    }
    if params["enable_ipv6"]:
        networks["docker_network_cidr_v6"] = dep.check_private_cidr(
            params["docker_network_cidr_v6"], "docker_network_cidr_v6", errors, version=6
        )
    if params["network_mode"] == "bridge" and not errors:
        used = used_networks()
        for name, network in networks.items():
            clashes = dep.overlaps(network, used)
            if clashes:
                errors.append(
                    "%s %s overlaps networks of this host: %s; choose another private range with %s"
                    % (name, network, ", ".join(clashes), name)
                )
    if errors:
        raise dep.ValidationError(errors)
    return values


def tenant_entries(tenants: list[dict], errors: list[str]) -> list[dict]:
    """The tenants option, checked and normalised as tenants.json holds it (docs/tenants.md)."""
    result: list[dict] = []
    owner: dict = {}
    for tenant in tenants:
        name = tenant["name"]
        if not TENANT_NAME.match(name or ""):
            errors.append("tenants: name %r must be 1-32 characters of a-z, 0-9 and '-'" % name)
            continue
        if any(t["name"] == name for t in result):
            errors.append("tenants: %s is listed twice" % name)
            continue
        hosts = []
        for host in tenant["host_names"] or []:
            host_name = host.strip().rstrip(".").lower()
            if not dep.is_fqdn(host_name):
                errors.append("tenants: %s: host name %r is not a fully qualified domain name" % (name, host))
            elif host_name in owner:
                errors.append(
                    "tenants: %s: host name %s is already tenant %s's" % (name, host_name, owner[host_name])
                )
            else:
                owner[host_name] = name
                hosts.append(host_name)
        if not tenant["host_names"]:
            errors.append("tenants: %s: host_names needs the tenant's public host name(s)" % name)
        dep.validate_https_url(
            tenant["broker_url"],
            "tenants: %s: broker_url" % name,
            errors,
            require_port=True,
            paths=BROKER_PATHS,
        )
        entry = {
            "name": name,
            "host_names": hosts,
            "broker_url": tenant["broker_url"],
            "agent_networks": networks_of(tenant, "agent_networks", errors),
        }
        # Only the options given: a tenant without them keeps the entry (and file) of before.
        for option, pattern in TENANT_FILES.items():
            if tenant.get(option):
                entry[option] = "/certs/" + pattern % name
        result.append(entry)
    return result


def tenant_files(
    tenants: list[dict], certs_dir: str, errors: list[str], warnings: list[str]
) -> list[PlannedFile]:
    """The tenants' own certificates, keys and broker CAs copied into certs/ (TENANT_FILES).

    A certificate and its key are checked with the rules of the certificate module (the key must
    match), a broker CA must hold certificates; on a problem the tenant's files are not planned
    and the task fails (the services would refuse the reload and keep the tenants they have).
    """
    planned: list[PlannedFile] = []
    for tenant in tenants:
        name = tenant["name"]
        if not TENANT_NAME.match(name or ""):
            continue  # refused by tenant_entries
        if tenant.get("ssl_cert") and tenant.get("ssl_key"):
            pair, _material = dep.provided_files(
                tenant,
                ("ssl_cert", os.path.join(certs_dir, TENANT_FILES["ssl_cert"] % name)),
                ("ssl_key", os.path.join(certs_dir, TENANT_FILES["ssl_key"] % name)),
                None,
                errors,
                warnings,
                prefix="tenants: %s: " % name,
            )
            planned.extend(pair)
        ca = dep.extra_file(
            tenant.get("broker_ca_cert"),
            os.path.join(certs_dir, TENANT_FILES["broker_ca_cert"] % name),
            "tenants: %s: broker_ca_cert" % name,
            errors,
        )
        if ca is not None:
            planned.append(ca)
    return planned


def stale_tenant_files(certs_dir: str, planned: list[PlannedFile]) -> list[str]:
    """Tenant files in certs/ that no tenant names any more (removed tenants or options)."""
    try:
        present = sorted(os.listdir(certs_dir))
    except OSError:
        return []
    kept = {os.path.basename(f.path) for f in planned}
    return [os.path.join(certs_dir, n) for n in present if TENANT_FILE_RE.match(n) and n not in kept]


def tenants_json(values: dict) -> bytes:
    """data/tenants.json: the tenants in option order, one stable rendering (no needless rewrite)."""
    return (json.dumps(values["tenants"], indent=2, sort_keys=True) + "\n").encode("utf-8")


def networks_of(params: dict, name: str, errors: list[str]) -> list[str]:
    """The entries of a list option of addresses or CIDRs, normalised to networks."""
    nets = []
    for cidr in params[name]:
        try:
            nets.append(str(ipaddress.ip_network(cidr.strip(), strict=False)))
        except ValueError:
            errors.append("%s entry %r is not an address or CIDR (like 10.0.0.0/24)" % (name, cidr))
    return nets


def forward_to_entries(entries: list[str], errors: list[str]) -> list[str]:
    """forward_to as ``host:port`` (``[v6]:port``): an IP address or FQDN and a port, each once."""
    result: list[str] = []
    for entry in entries:
        text = entry.strip()
        host, sep, port = text.rpartition(":")
        bracketed = host.startswith("[") and host.endswith("]")
        name = host[1:-1] if bracketed else host
        address = dep.parse_ip(name)
        ok = (
            sep
            and port.isdigit()
            and 1 <= int(port) <= 65535
            and (address is not None or (dep.is_fqdn(name) and not bracketed))
            and (bracketed == (address is not None and address.version == 6))
        )
        if not ok:
            errors.append(
                "forward_to entry %r must be host:port of an inner security gateway (an IPv4 address or "
                "FQDN, or [IPv6 address]:port, like 10.20.0.5:4172)" % entry
            )
            continue
        normal = "%s:%d" % (
            "[%s]" % address if bracketed else (str(address) if address else name.lower()),
            int(port),
        )
        if normal in result:
            errors.append("forward_to lists %s twice" % normal)
        result.append(normal)
    return result


def validate_forwarder(params: dict, values: dict, errors: list[str]) -> dict:
    """A forwarding SG (docs/dmz.md): the SG container alone, no CM, no grant secret, no TLS
    material (the clients' TLS passes through to the inner gateways), no agent CA."""
    if not params["enable_security_gateway"]:
        errors.append(
            "forward_to makes this host a forwarding security gateway; it needs enable_security_gateway=true"
        )
    if not params["accept_policies"]:
        errors.append(
            "accept_policies must be true: installing the security gateway requires accepting the EULA and "
            "privacy policy (the installer's --accept-policies)"
        )
    values["warnings"] = [
        "%s is not used on a forwarding security gateway (forward_to): it holds no %s" % (name, what)
        for name, what in (
            ("ssl_cert", "certificate or key; the clients' TLS passes through to the inner gateways"),
            ("self_signed", "certificate or key; the clients' TLS passes through to the inner gateways"),
            ("broker_url", "connection manager"),
            ("identity_cert", "connection manager"),
            ("agent_ca_cert", "connection to an agent"),
            ("grant_secret", "grant secret"),
            ("site_gateways", "connection manager"),
            ("tenants", "grant check; give the tenants to the inner gateways"),
        )
        if params[name]
    ]
    admin = dep.parse_ip(params["admin_address"].strip())
    if admin is None:
        errors.append(
            "admin_address %r must be an IP address (0.0.0.0 = every address of the container or host)"
            % params["admin_address"]
        )
    values["management_urls"] = management_urls(params, admin)
    values["sg_health_url"] = ""
    values["listen_address"] = ""
    if params["listen_address"]:
        listen = dep.parse_ip(params["listen_address"].strip())
        if listen is None:
            errors.append(
                "listen_address %r must be an IP address (the forwarders' VIP)" % params["listen_address"]
            )
        elif params["network_mode"] == "bridge":
            errors.append(
                "listen_address %s cannot be used with network_mode=bridge: the VIP is on the host, not in the "
                "forwarder's container, so the SG could not bind it; in bridge mode the engine DNATs the published "
                "ports to the container and its answers leave from the address the client sent to (the VIP), so "
                "leave listen_address empty (it is for network_mode host or container:<name>)" % listen
            )
        else:
            values["listen_address"] = str(listen)
    values["external_pcoip_ip"] = []
    values["host_address"] = []
    if not 1 <= params["max_connections"] <= MAX_SG_CONNECTIONS:
        errors.append("max_connections must be between 1 and %d" % MAX_SG_CONNECTIONS)
    if params["workers"] not in (0, 1):
        errors.append("workers: a forwarding security gateway runs as one process; leave workers at 0 or 1")
    for name in ("pcoip_port", "sg_admin_host_port"):
        dep.port_option(params[name], name, errors)
    if params["network_mode"] == "bridge":
        dep.check_private_cidr(params["docker_network_cidr"], "docker_network_cidr", errors)
    if errors:
        raise dep.ValidationError(errors)
    return values


def published_ports(params: dict) -> list[tuple[str, int]]:
    """The options whose host ports bridge mode publishes, with their values, in option order.

    Every one is a TCP port (pcoip_port is UDP as well); the management ports are bound to the
    host's 127.0.0.1, which still clashes with the same port on every address.
    """
    names = ["https_port"]
    if params["http_port"]:
        names.append("http_port")
    if params["enable_security_gateway"]:
        names.append("pcoip_port")
    names.append("cm_admin_host_port")
    if params["enable_security_gateway"]:
        names.append("sg_admin_host_port")
    return [(name, params[name]) for name in names]


def published_port_clashes(params: dict, errors: list[str]) -> None:
    """Two published ports of one deployment cannot share a host port (Docker would fail to bind)."""
    seen: dict[int, str] = {}
    for name, port in published_ports(params):
        if port in seen:
            errors.append(
                "%s and %s are both %d: with network_mode=bridge every published host port must differ "
                "(https_port, http_port, pcoip_port, and cm_admin_host_port, sg_admin_host_port on the host's "
                "127.0.0.1); choose another port" % (seen[port], name, port)
            )
        else:
            seen[port] = name


def bridge_subnets(params: dict) -> list[str]:
    """The subnets of the bridge network: IPv4, and with enable_ipv6 a unique local IPv6 network."""
    return [params["docker_network_cidr"]] + (
        [params["docker_network_cidr_v6"]] if params["enable_ipv6"] else []
    )


def listen_address(params: dict) -> str:
    """Where the SG listens: "::" (dual-stack, TCP and UDP) with enable_ipv6. The CM's config keeps
    0.0.0.0 and adds an IPv6 listener itself when EnableIpv6 is set."""
    return "::" if params["enable_ipv6"] else "0.0.0.0"


def tls_verify_checks(params: dict, errors: list[str]) -> list[str]:
    """Verification of the internal hops is on by default; turning it off is allowed but warned about."""
    warnings = []
    if params["agent_tls_verify"] and not params["agent_ca_cert"]:
        errors.append(
            "agent_ca_cert is required with agent_tls_verify=true: give the CA that issued the agents' "
            "certificates (the deployment CA), or set agent_tls_verify=false (tests only)"
        )
    if not params["agent_tls_verify"]:
        warnings.append(
            "agent_tls_verify=false: the CM and SG do not verify the agents' certificates; anyone on the "
            "path to a desktop can impersonate it, so the CM sends no user password to an agent unless its "
            "desktop pins the agent certificate (broker_desktop agent_cert_sha256 or agent_ca_pem)"
        )
    if not params["broker_tls_verify"]:
        warnings.append(
            "broker_tls_verify=false: the CM does not verify the broker's certificate; anyone on the path "
            "to the broker can impersonate it and read the users' credentials"
        )
    return warnings


def security_gateway_health_url(params: dict, admin) -> str:
    """The SG's /health as the CM reaches it: over the Docker network by container name in bridge
    mode (the container's own port, whatever sg_admin_host_port publishes it on), over the shared
    network namespace (host or container:<name>) otherwise."""
    if not params["enable_security_gateway"]:
        return ""
    if params["network_mode"] == "bridge":
        host = Names(params["name_prefix"]).sg
    else:
        host = _admin_host(admin)
    return "http://%s:%d/health" % (host, SG_ADMIN_PORT)


def _admin_host(admin) -> str:
    """The address (URL form) of the management listeners in a shared network namespace. A
    listener on :: accepts IPv6 only (asyncio sets IPV6_V6ONLY), so it is reached at ::1."""
    if admin is None or (admin.is_unspecified and admin.version == 4):
        return "127.0.0.1"
    if admin.is_unspecified:
        return "[::1]"
    return "[%s]" % admin if admin.version == 6 else str(admin)


def management_urls(params: dict, admin) -> dict:
    """Base URLs of the CM's and SG's management listeners (``/health``, ``/metrics``): in bridge
    mode the ports published on the host's 127.0.0.1, otherwise the listeners themselves in the
    network namespace the services share (the host's, or that of the container:<name>)."""
    if params["network_mode"] == "bridge":
        host, cm_port, sg_port = "127.0.0.1", params["cm_admin_host_port"], params["sg_admin_host_port"]
    else:
        host, cm_port, sg_port = _admin_host(admin), CM_ADMIN_PORT, SG_ADMIN_PORT
    return {
        "cm": None if params["forward_to"] else "http://%s:%d" % (host, cm_port),
        "sg": "http://%s:%d" % (host, sg_port) if params["enable_security_gateway"] else None,
    }


# ------------------------------------------------------------------ rendering


def _in_certs(option_value, name: str) -> str:
    return "/certs/" + name if option_value else ""


def config_properties(params: dict, values: dict) -> bytes:
    def option(name: str) -> tuple[str, object]:
        return CM_OPTION_KEYS[name], values[name] if name in values else params[name]

    broker_ca = _in_certs(params["broker_ca_cert"], BROKER_CA)
    return dep.render_properties(
        "Connection manager (CM) configuration",
        [
            ("ListenAddress", "0.0.0.0"),
            ("ListenPort", 8443),
            ("RedirectPort", 8080 if params["http_port"] else 0),
            ("SslCert", "/certs/cert.pem"),
            ("SslKey", "/certs/key.pem"),
            option("broker_url"),
            ("BrokerCaCert", broker_ca),
            option("broker_tls_verify"),
            ("IdentityCert", _in_certs(params["identity_cert"], IDENTITY_CERT)),
            ("IdentityKey", _in_certs(params["identity_key"], IDENTITY_KEY)),
            ("AgentCaCert", _in_certs(params["agent_ca_cert"], AGENT_CA)),
            option("agent_tls_verify"),
            option("enable_security_gateway"),
            option("external_pcoip_ip"),
            option("pcoip_port"),
            ("SecurityGatewayHealthUrl", values["sg_health_url"]),
            option("max_concurrent_establishments"),
            option("max_clients"),
            ("BrokerTimeout", 10),
            ("AgentTimeout", 10),
            ("SessionIdleTimeout", 900),
            option("trusted_proxies"),
            option("enable_ipv6"),
            option("enable_collaboration"),
            option("host_address"),
            option("license_server_url"),
            # Only with tenants: earlier files (and their containers) stay the same without.
            *([(TENANTS_KEY, "/data/" + TENANTS_FILE)] if values.get("tenants") else []),
            ("AdminAddress", params["admin_address"].strip()),
            ("AdminPort", CM_ADMIN_PORT),
            option("log_level"),
        ]
        + [option(name) for name in CM_KEYS_WHEN_SET if option(name)[1]],
    )


def security_gateway_conf(params: dict, values: dict | None = None) -> bytes:
    values = values or {}
    sources = values.get("proxy_protocol_sources") or []
    if values.get("forward_to"):
        return dep.render_properties(
            "Forwarding security gateway (double-hop DMZ): no grant secret, no TLS key, no agents",
            [
                # A VIP on the forwarders: its UDP answers must leave from the address the client sent to.
                ("ListenAddress", values.get("listen_address") or listen_address(params)),
                ("Port", 4172),
                (SG_OPTION_KEYS["forward_to"], values["forward_to"]),
                ("MaxConnections", params["max_connections"]),
                *([(SG_OPTION_KEYS["proxy_protocol_sources"], sources)] if sources else []),
                ("AdminAddress", params["admin_address"].strip()),
                ("AdminPort", SG_ADMIN_PORT),
                ("LogLevel", params["log_level"]),
            ],
        )
    return dep.render_properties(
        "Security gateway (SG) configuration; GrantSecret comes from cmsg.env",
        [
            ("ListenAddress", listen_address(params)),
            ("Port", 4172),
            ("AgentUdpSourcePort", 55000),
            ("MaxConnections", params["max_connections"]),
            # 0 (the default) is the service's own default, the CPUs it may use: the key is then
            # left out and earlier files stay the same.
            *([(SG_OPTION_KEYS["workers"], params["workers"])] if params["workers"] else []),
            ("SslCert", "/certs/cert.pem"),
            ("SslKey", "/certs/key.pem"),
            ("AgentCaCert", _in_certs(params["agent_ca_cert"], AGENT_CA)),
            ("AgentTlsVerify", params["agent_tls_verify"]),
            # An inner SG of a double-hop DMZ; absent otherwise (earlier files stay the same).
            *([(SG_OPTION_KEYS["proxy_protocol_sources"], sources)] if sources else []),
            *([(TENANTS_KEY, "/data/" + TENANTS_FILE)] if values.get("tenants") else []),
            ("AdminAddress", params["admin_address"].strip()),
            ("AdminPort", SG_ADMIN_PORT),
            ("LogLevel", params["log_level"]),
        ]
        # Only when set, as in config.properties (CM_KEYS_WHEN_SET).
        + ([("Site", params["site"].strip())] if (params["site"] or "").strip() else []),
    )


def identity_files(params: dict, certs_dir: str, errors: list[str], warnings: list[str]) -> list[PlannedFile]:
    """The CM's internal identity (its ``cm`` certificate and key) copied into certs/.

    The pair is checked with the rules of the certificate module (the key must match the certificate).
    """
    if not params["identity_cert"]:
        return []
    planned, _material = dep.provided_files(
        params,
        ("identity_cert", os.path.join(certs_dir, IDENTITY_CERT)),
        ("identity_key", os.path.join(certs_dir, IDENTITY_KEY)),
        None,
        errors,
        warnings,
        prefix="identity_cert: ",
    )
    return planned


def existing_secret(path: str) -> str | None:
    """The grant secret of an existing cmsg.env when it is a valid 32-byte key; kept across runs."""
    data = read_bytes(path)
    if data is None:
        return None
    for line in data.decode("utf-8", "replace").splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip() == SECRET_KEY:
            value = value.strip()
            try:
                if len(base64.b64decode(value, validate=True)) == 32:
                    return value
            except ValueError:
                return None
    return None


def grant_secret_for(params: dict, env_path: str) -> str:
    """The node's grant secret: the ``grant_secret`` option (a multi-site deployment gives every
    node the same one, docs/multisite.md), else the one cmsg.env holds, else a new random one."""
    return (
        (params["grant_secret"] or "").strip()
        or existing_secret(env_path)
        or base64.b64encode(secrets.token_bytes(32)).decode("ascii")
    )


def cmsg_env(secret: str | None, log_level: str) -> bytes:
    """The env file; a forwarder's (``secret`` None) holds no grant secret."""
    if secret is None:
        return ("GATEHOUSE_LOGLEVEL=%s\n" % log_level).encode("ascii")
    return ("%s=%s\nGATEHOUSE_LOGLEVEL=%s\n" % (SECRET_KEY, secret, log_level)).encode("ascii")


# ------------------------------------------------------------------ containers


def container_specs(params: dict, names: Names, image_refs: dict, host_label: str) -> list[dict]:
    data_dir = params["data_dir"]
    mounts = [
        {"source": os.path.join(data_dir, "data"), "target": "/data", "read_only": True},
        {"source": os.path.join(data_dir, "certs"), "target": "/certs", "read_only": True},
    ]
    mode = params["network_mode"]
    bridge = mode == "bridge"
    specs = []
    cm_ports = [{"host": params["https_port"], "container": 8443, "protocol": "tcp"}]
    if params["http_port"]:
        cm_ports.append({"host": params["http_port"], "container": 8080, "protocol": "tcp"})
    # The management listeners on the host's loopback only: playbooks/upgrade.yml waits for the
    # node to drain on them, and a Prometheus on the host scrapes them; nothing outside reaches them.
    # Their host ports are options so that two deployments (name_prefix, data_dir) fit on one host.
    cm_ports.append(_loopback(params["cm_admin_host_port"], CM_ADMIN_PORT))
    roles = [] if params["forward_to"] else [("cm", names.cm, cm_ports, "config.properties")]
    if params["enable_security_gateway"]:
        sg_ports = [
            {"host": params["pcoip_port"], "container": 4172, "protocol": "tcp"},
            {"host": params["pcoip_port"], "container": 4172, "protocol": "udp"},
            _loopback(params["sg_admin_host_port"], SG_ADMIN_PORT),
        ]
        roles.append(("sg", names.sg, sg_ports, "SecurityGateway.conf"))
    for role, name, ports, config in roles:
        specs.append(
            {
                "service": role,
                "name": name,
                "image": image_refs[role],
                # The service reads the env file itself: the grant secret stays out of `docker inspect`.
                "command": ["--config", "/data/%s" % config, "--env-file", "/data/cmsg.env"],
                "labels": {
                    ctr.LABEL_ROLE: role,
                    ctr.LABEL_HOST: host_label,
                    ctr.LABEL_MANAGED: "gatehouse.access.cmsg",
                },
                "mounts": mounts,
                "network_mode": mode,
                "network": names.network if bridge else None,
                "ports": ports if bridge else [],
                "restart_policy": "unless-stopped",
                "container_limits": params.get("container_limits"),
            }
        )
    return specs


def _loopback(host_port: int, container_port: int) -> dict:
    return {"host": host_port, "container": container_port, "protocol": "tcp", "host_ip": "127.0.0.1"}


# ------------------------------------------------------------------ driver

# The files each container reads (certs/ and the env file); its configuration file is the hash
# input "config". The compose file is documentation only.
READS = {
    "cm": ("cmsg.env", "cert.pem", "key.pem", "ca.pem", BROKER_CA, AGENT_CA, IDENTITY_CERT, IDENTITY_KEY),
    "sg": ("cmsg.env", "cert.pem", "key.pem", "ca.pem", AGENT_CA),
}
CONFIG_FILES = {"cm": "config.properties", "sg": "SecurityGateway.conf"}


def _used_networks(cli, names: Names):
    def probe() -> list[tuple[str, str]]:
        ours = ctr.find_network(cli, names.network)
        our_subnets = set(ctr.network_subnets(ours)) if ours is not None else set()
        used = [("docker network %s" % n, s) for n, s in ctr.docker_subnets(cli, exclude=names.network)]
        for ifname, net in dep.host_networks():
            # The bridge of our own network carries its subnet; it is no clash.
            if net not in our_subnets:
                used.append(("interface %s" % ifname, net))
        return used

    return probe


def _sighup(name: str):
    """The Reload of a kept CM or SG whose tenants.json changed: SIGHUP, which re-reads it."""

    def apply(cli, changed, removed, check_mode: bool) -> list:
        if not check_mode:
            container = ctr.find_container(cli, name)
            if container is not None and container.status == "running":
                try:
                    container.kill(signal="SIGHUP")
                except Exception as exc:  # the SDK's APIError, wrapped as the engine expects
                    raise ctr.ContainerError(
                        "cannot signal %s to reload its tenants: %s" % (name, exc)
                    ) from None
        return ["reloaded the tenants of %s (SIGHUP)" % name]

    return apply


def run(module) -> dict:
    params = module.params
    names = Names(params["name_prefix"])
    cli = ctr.client(params["docker_host"])
    values = validate(params, _used_networks(cli, names))
    if params["state"] == "absent":
        return uninstall(cli, params, names, module.check_mode)
    return install(module, cli, params, values, names)


def uninstall(cli, params: dict, names: Names, check_mode: bool) -> dict:
    return engine.uninstall(
        cli,
        check_mode,
        params["data_dir"],
        [names.sg, names.cm],
        data_files=(*CONFIG_FILES.values(), "cmsg.env", TENANTS_FILE),
        cert_files=(
            BROKER_CA,
            AGENT_CA,
            IDENTITY_CERT,
            IDENTITY_KEY,
            *(
                os.path.basename(p)
                for p in stale_tenant_files(os.path.join(params["data_dir"], engine.CERTS), [])
            ),
        ),
        managed_by="gatehouse.access.cmsg",
        network_name=names.network,
    )


def install(module, cli, params: dict, values: dict, names: Names) -> dict:
    check_mode = module.check_mode
    data_dir = params["data_dir"]
    data, certs_dir = os.path.join(data_dir, engine.DATA), os.path.join(data_dir, engine.CERTS)
    host_label = params["host_label"] or dep.default_host_label()
    errors: list[str] = []
    warnings: list[str] = []

    forwarder = bool(values["forward_to"])
    tls: list = []
    tls_info: dict = {"source": None}
    extra: list = []
    tenant_planned: list[PlannedFile] = []
    if not forwarder:  # a forwarder holds no TLS material: the clients' TLS passes through
        # The self-signed certificate names the host as clients reach it: host_address first.
        common_name = dep.certificate_name(
            values["host_address"][0] if values["host_address"] else host_label
        )
        sans = [*values["host_address"], *values["external_pcoip_ip"]]
        tls, tls_info = dep.tls_files(params, certs_dir, common_name, sans, errors, warnings)
        extra = [
            dep.extra_file(
                params["broker_ca_cert"], os.path.join(certs_dir, BROKER_CA), "broker_ca_cert", errors
            ),
            dep.extra_file(
                params["agent_ca_cert"], os.path.join(certs_dir, AGENT_CA), "agent_ca_cert", errors
            ),
            *identity_files(params, certs_dir, errors, warnings),
        ]
        # The tenants' own files go with tenants.json: changed, added or removed, they are reloaded.
        tenant_planned = tenant_files(params["tenants"], certs_dir, errors, warnings)
        extra.extend(tenant_planned)
    warnings.extend(values["warnings"])
    engine.check_network_target(cli, params, errors)
    if forwarder:
        services = ["sg"]
    else:
        services = ["cm", "sg"] if params["enable_security_gateway"] else ["cm"]
    refs, ids, loaded = engine.resolve_images(cli, params, services, check_mode, errors)
    if errors:
        raise dep.ValidationError(errors)

    env_path = os.path.join(data, "cmsg.env")
    secret = None
    if not forwarder:  # a forwarder's cmsg.env holds no grant secret (an earlier one is dropped)
        secret = grant_secret_for(params, env_path)
        module.no_log_values.add(secret)
    uid, gid = engine.service_owner()
    if uid is None:
        warnings.append(engine.NOT_ROOT % "the services run")

    network = None
    if params["network_mode"] == "bridge":
        network = {
            "key": "cmdeployment",
            "name": names.network,
            "subnets": bridge_subnets(params),
            "labels": {ctr.LABEL_MANAGED: "gatehouse.access.cmsg", ctr.LABEL_HOST: host_label},
        }
    configs = {
        "sg": PlannedFile(
            os.path.join(data, CONFIG_FILES["sg"]), security_gateway_conf(params, values), 0o644, uid, gid
        ),
    }
    if not forwarder:
        configs["cm"] = PlannedFile(
            os.path.join(data, CONFIG_FILES["cm"]), config_properties(params, values), 0o644, uid, gid
        )
    env = PlannedFile(
        env_path, cmsg_env(secret, params["log_level"]), 0o600, uid, gid, mask=mask_env_values({SECRET_KEY})
    )
    if values.get("tenants"):
        configs["tenants"] = PlannedFile(
            os.path.join(data, TENANTS_FILE), tenants_json(values), 0o644, uid, gid
        )
    files = [
        *(configs[k] for k in ("cm", "sg", "tenants") if k in configs),
        env,
        *tls,
        *(f for f in extra if f is not None),
    ]
    stale = stale_tenant_files(certs_dir, tenant_planned) if not forwarder else []
    reloaded = (
        TENANTS_FILE,
        *sorted({os.path.basename(p) for p in [f.path for f in tenant_planned] + stale}),
    )
    containers = [
        engine.Container(
            spec,
            reads=READS[spec["service"]],
            inputs={
                "config": sha256(configs[spec["service"]].data),
                "network": network["subnets"] if network else None,
            },
            reload=engine.Reload(apply=_sighup(spec["name"]), files=reloaded),
        )
        for spec in container_specs(params, names, refs, host_label)
    ]
    if forwarder:
        retired = [names.cm]
    else:
        retired = [] if params["enable_security_gateway"] else [names.sg]
    deployment = engine.Deployment(
        data_dir,
        files,
        engine.data_dirs(data_dir, uid, gid),
        containers,
        ids,
        loaded,
        network=network,
        network_name=names.network,
        retired=retired,
        stale_files=[(p, SECRET_TEXT if p.endswith(".key.pem") else None) for p in stale],
    )
    deployment.plan(cli)
    deployment.apply(cli, check_mode, params["wait_timeout"])
    if tls_info.get("stale_ca"):
        warnings.append(
            "%s belongs to earlier certificates and is not used with self_signed" % tls_info["stale_ca"]
        )
    effective = {
        "config_properties": dep.parse_properties(configs["cm"].data) if "cm" in configs else None,
        "security_gateway_conf": dep.parse_properties(configs["sg"].data),
        "data_dir": data_dir,
        "network_mode": params["network_mode"],
        "network": (
            dict(
                name=network["name"],
                subnet=params["docker_network_cidr"],
                subnet_v6=params["docker_network_cidr_v6"] if params["enable_ipv6"] else None,
            )
            if network
            else None
        ),
        "images": refs,
        "management_urls": values["management_urls"],
        "host_label": host_label,
        "tls": {k: v for k, v in tls_info.items() if k != "stale_ca"},
    }
    return deployment.result(effective, warnings)
