# Copyright (c) Gatehouse contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""Pieces shared by the deployment modules cmsg and broker (private to the collection).

Validation of URLs, addresses and networks, TLS material for the data directory, image
selection (local, registry or dark-site bundle), the compose file and the option specs that
every deployment module has.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
from urllib.parse import urlsplit

from ansible.module_utils.basic import missing_required_lib

from ansible_collections.gatehouse.access.plugins.module_utils._common.files import PlannedFile, read_bytes
from ansible_collections.gatehouse.access.plugins.module_utils._common.result import Failure, fail, finish
from ansible_collections.gatehouse.access.plugins.module_utils._crypto import certificate as certs
from ansible_collections.gatehouse.access.plugins.module_utils._deploy import bundle as bundles
from ansible_collections.gatehouse.access.plugins.module_utils._docker.containers import (
    COLLECTION_VERSION,
    CONTAINER_LIMITS_OPTION,
    DOCKER_HOST_OPTION,
    DOCKER_IMPORT_ERROR,
    HAS_DOCKER,
    SERVICE_GID,
    SERVICE_HARDENING,
    SERVICE_UID,
    ContainerError,
    hardening,
    spec_hardening,
)

PRIVATE_RANGES = tuple(ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"))
ULA_RANGE = ipaddress.ip_network("fc00::/7")
LOG_LEVELS = ["debug", "info", "warn", "error"]
SELF_SIGNED_BITS = 3072
SELF_SIGNED_DAYS = 3650
_FQDN_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
_TOKEN_RE = re.compile(r"^[A-Za-z0-9._~+/=-]+$")


class ValidationError(Exception):
    """Bad input; ``errors`` lists every problem found, each with what to do."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("; ".join(errors))
        self.errors = errors


# ------------------------------------------------------------------ options shared by the modules

COMMON_ARGUMENT_SPEC: dict = {
    "state": {"type": "str", "choices": ["present", "absent"], "default": "present"},
    "ssl_cert": {"type": "path"},
    "ssl_key": {"type": "path"},
    "ca_cert": {"type": "path"},
    "self_signed": {"type": "bool", "default": False},
    "log_level": {"type": "str", "choices": LOG_LEVELS, "default": "info"},
    "image_tag": {"type": "str", "default": COLLECTION_VERSION},
    "image_source": {"type": "str", "choices": ["local", "registry"], "default": "local"},
    "registry": {"type": "str"},
    "bundle_path": {"type": "path"},
    "network_mode": {"type": "str", "default": "bridge"},
    "host_label": {"type": "str"},
    "name_prefix": {"type": "str", "default": "gatehouse"},
    "docker_host": DOCKER_HOST_OPTION,
    "wait_timeout": {"type": "int", "default": 60},
    "container_limits": CONTAINER_LIMITS_OPTION,
}
# self_signed excludes ssl_cert/ssl_key only when true; check_common() says so (mutually_exclusive
# would also refuse an explicit self_signed=false, which roles pass).
COMMON_MUTUALLY_EXCLUSIVE: list = []
COMMON_REQUIRED_TOGETHER = [("ssl_cert", "ssl_key")]
COMMON_REQUIRED_IF = [("image_source", "registry", ["registry"])]


def check_container_options(params: dict, service: str, errors: list[str]) -> None:
    """network_mode and container_limits, the options of every deployed container."""
    mode = params["network_mode"]
    if mode not in ("bridge", "host") and not (
        mode.startswith("container:") and len(mode) > len("container:")
    ):
        errors.append("network_mode must be bridge, host or container:<name>, got %r" % mode)
    if params.get("container_limits"):
        try:
            hardening(service, params["container_limits"])
        except ContainerError as exc:
            errors.append(str(exc))


def check_common(params: dict, errors: list[str], tls_required: bool = True) -> None:
    """Checks of the shared options that the argument spec cannot express (``tls_required``: False
    for a deployment that serves no TLS of its own, a forwarding security gateway)."""
    if tls_required and params["state"] == "present" and not params["self_signed"] and not params["ssl_cert"]:
        errors.append(
            "TLS material is required: set ssl_cert and ssl_key (PEM files on the target) or self_signed=true"
        )
    if params["self_signed"] and (params["ssl_cert"] or params["ssl_key"]):
        errors.append("self_signed=true and ssl_cert/ssl_key exclude each other; choose one")
    if params["ca_cert"] and not params["ssl_cert"]:
        errors.append("ca_cert is the CA chain of ssl_cert; it cannot be used without ssl_cert")
    check_container_options(params, "broker", errors)
    check_image(params, errors)
    if params["bundle_path"] and params["image_source"] == "registry":
        errors.append("bundle_path (dark-site bundle) and image_source=registry exclude each other")
    if params["bundle_path"] and params["state"] == "present" and not os.path.exists(params["bundle_path"]):
        errors.append("bundle_path %s does not exist on the target" % params["bundle_path"])
    check_place(params, "cmsg", errors)


def check_place(params: dict, example: str, errors: list[str]) -> None:
    """data_dir (absolute, two levels deep: like /opt/gatehouse/<example>) and name_prefix."""
    data_dir = os.path.normpath(params["data_dir"])
    if not os.path.isabs(data_dir) or data_dir.count("/") < 2:
        errors.append(
            "data_dir must be an absolute path at least two levels deep (like /opt/gatehouse/%s), got %s"
            % (example, params["data_dir"])
        )
    if not re.match(r"^[a-z0-9][a-z0-9_.-]{0,40}$", params["name_prefix"]):
        errors.append(
            "name_prefix must be lower-case letters, digits, '.', '_' or '-' (at most 41 characters)"
        )


def check_image(params: dict, errors: list[str]) -> None:
    """image_tag, registry (only with image_source=registry) and wait_timeout."""
    if not re.match(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$", params["image_tag"]):
        errors.append("image_tag %r is not a valid Docker tag" % params["image_tag"])
    if params["registry"] and params["image_source"] != "registry":
        errors.append("registry is only used with image_source=registry")
    if params["wait_timeout"] < 0:
        errors.append("wait_timeout must be 0 (do not wait) or a number of seconds")


def port_option(value: int, name: str, errors: list[str], allow_zero: bool = False) -> None:
    low = 0 if allow_zero else 1
    if not low <= value <= 65535:
        errors.append("%s must be between %d and 65535, got %d" % (name, low, value))


# ------------------------------------------------------------------ values


def validate_https_url(
    value: str, name: str, errors: list[str], require_port: bool, paths: tuple = ("",)
) -> None:
    """An https URL with a host (and port when required); ``paths`` lists the allowed paths."""
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError as exc:
        errors.append("%s %r is not a valid URL: %s" % (name, value, exc))
        return
    if parts.scheme != "https":
        errors.append("%s must be an https URL (https://host:port), got %r" % (name, value))
        return
    if not parts.hostname:
        errors.append("%s %r has no host; use https://host:port or https://[IPv6]:port" % (name, value))
        return
    if require_port and port is None:
        errors.append("%s %r has no port; write it as https://%s:<port>" % (name, value, parts.netloc))
    if port == 0:
        errors.append("%s %r has port 0" % (name, value))
    if parts.username or parts.password or parts.query or parts.fragment:
        errors.append("%s %r must not carry credentials, a query or a fragment" % (name, value))
    if parts.path.rstrip("/") not in paths:
        errors.append(
            "%s %r has an unexpected path %r (allowed: %s)"
            % (name, value, parts.path, ", ".join(repr(p or "/") for p in paths))
        )


def is_fqdn(value: str) -> bool:
    name = value.rstrip(".")
    if not name or len(name) > 253 or "." not in name:
        return False
    labels = name.split(".")
    return all(_FQDN_LABEL.match(label) for label in labels) and not labels[-1].isdigit()


def parse_ip(value: str):
    try:
        return ipaddress.ip_address(value)
    except ValueError:
        return None


def check_token(value: str | None, name: str, errors: list[str]) -> None:
    if not value:
        errors.append("%s is required" % name)
    elif len(value) < 16:
        errors.append("%s must be at least 16 characters long" % name)
    elif not _TOKEN_RE.match(value):
        errors.append(
            "%s may only hold letters, digits and . _ ~ + / = - (it is sent as a bearer token)" % name
        )


def check_private_cidr(value: str, name: str, errors: list[str], version: int = 4):
    """The network of ``value`` when it is a private CIDR of ``version``, else None (error added).

    IPv4: inside 10.0.0.0/8, 172.16.0.0/12 or 192.168.0.0/16, /29 or larger. IPv6: a unique local
    network (fc00::/7), /48 to /112.
    """
    example = "10.101.0.0/24" if version == 4 else "fd00:10:101::/64"
    try:
        network = ipaddress.ip_network(value, strict=True)
    except ValueError as exc:
        errors.append("%s %r is not a network in CIDR notation (like %s): %s" % (name, value, example, exc))
        return None
    if version == 4 and (network.version != 4 or not any(network.subnet_of(r) for r in PRIVATE_RANGES)):
        errors.append(
            "%s %s is not inside a private range; use a network within 10.0.0.0/8, 172.16.0.0/12 or "
            "192.168.0.0/16" % (name, value)
        )
        return None
    if version == 6 and (network.version != 6 or not network.subnet_of(ULA_RANGE)):
        errors.append("%s %s is not a unique local IPv6 network; use one within fc00::/7" % (name, value))
        return None
    smallest, largest = (29, 0) if version == 4 else (112, 48)
    if network.prefixlen > smallest:
        errors.append(
            "%s %s is too small for the containers; use /%d or larger (like %s)"
            % (name, value, smallest, example)
        )
        return None
    if network.prefixlen < largest:
        errors.append("%s %s is larger than /%d" % (name, value, largest))
        return None
    return network


def host_networks() -> list[tuple[str, str]]:
    """(interface, network) of every IPv4 address of this host, from ``ip -j addr`` or /proc/net/route."""
    try:
        out = subprocess.run(
            ["ip", "-j", "-4", "addr", "show"], capture_output=True, text=True, check=True
        ).stdout
        result = []
        for link in json.loads(out or "[]"):
            for info in link.get("addr_info", []):
                if info.get("family") == "inet":
                    net = ipaddress.ip_interface("%s/%s" % (info["local"], info["prefixlen"])).network
                    result.append((link.get("ifname", "?"), str(net)))
        return result
    except (OSError, subprocess.CalledProcessError, ValueError):
        pass
    result = []
    try:
        with open("/proc/net/route", encoding="ascii") as handle:
            next(handle, None)
            for line in handle:
                fields = line.split()
                if len(fields) < 8 or fields[1] == "00000000":
                    continue
                dest = ipaddress.IPv4Address(int(fields[1], 16).to_bytes(4, "little"))
                mask = ipaddress.IPv4Address(int(fields[7], 16).to_bytes(4, "little"))
                result.append((fields[0], str(ipaddress.ip_network("%s/%s" % (dest, mask), strict=False))))
    except OSError:
        pass
    return result


def overlaps(network, used: list[tuple[str, str]]) -> list[str]:
    """Descriptions of the entries in ``used`` (owner, CIDR) that overlap ``network``."""
    found = []
    for owner, cidr in used:
        try:
            other = ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            continue
        if other.version == network.version and other.overlaps(network):
            found.append("%s (%s)" % (cidr, owner))
    return found


def default_host_label() -> str:
    return socket.gethostname()


def certificate_name(candidate: str) -> str:
    """``candidate`` when it can be a certificate common name (DNS name or IP), else localhost."""
    try:
        certs.build_name({"common_name": candidate})
    except certs.CertificateError:
        return "localhost"
    return candidate


# ------------------------------------------------------------------ TLS material


def tls_files(
    params: dict, certs_dir: str, common_name: str, sans: list[str], errors: list[str], warnings: list[str]
):
    """PlannedFile objects for certs/cert.pem, key.pem and (optionally) ca.pem.

    Operator material is checked with the rules of the certificate module and copied. A
    self-signed pair is generated once (3072-bit RSA) and kept on later runs as long as the key
    and certificate in certs/ still belong together.
    """
    cert_path = os.path.join(certs_dir, "cert.pem")
    key_path = os.path.join(certs_dir, "key.pem")
    ca_path = os.path.join(certs_dir, "ca.pem")
    planned: list[PlannedFile] = []
    info: dict = {"source": "self_signed" if params["self_signed"] else "provided"}
    if params["self_signed"]:
        cert_data, key_data = read_bytes(cert_path), read_bytes(key_path)
        if not _pair_matches(cert_data, key_data):
            try:
                cert_data, key_data = certs.selfsigned_pem(
                    common_name, sans, SELF_SIGNED_BITS, "sha256", SELF_SIGNED_DAYS
                )
            except certs.CertificateError as exc:
                errors.append("cannot create the self-signed certificate: %s" % exc)
                return [], info
            info["generated"] = True
        if cert_data is None or key_data is None:
            raise RuntimeError("internal error: no self-signed certificate or key for %s" % certs_dir)
        planned.append(PlannedFile(cert_path, cert_data, 0o644, SERVICE_UID, SERVICE_GID))
        planned.append(PlannedFile(key_path, key_data, 0o600, SERVICE_UID, SERVICE_GID, hidden=True))
        if os.path.exists(ca_path):
            # A CA chain of earlier operator material does not belong to the self-signed pair.
            info["stale_ca"] = ca_path
        return planned, info

    planned, material = provided_files(
        params, ("ssl_cert", cert_path), ("ssl_key", key_path), ("ca_cert", ca_path), errors, warnings
    )
    if material is not None:
        info["certificate"] = certs.certificate_facts(material.leaf)
    return planned, info


def provided_files(
    params: dict,
    cert: tuple[str, str],
    key: tuple[str, str],
    ca: tuple[str, str] | None,
    errors: list[str],
    warnings: list[str],
    prefix: str = "",
):
    """Operator material copied into certs/: a certificate, its key and optionally a CA chain.

    ``cert``, ``key`` and ``ca`` are (option, target path). The material is checked with the rules
    of the certificate module (the key must match the certificate); on any problem nothing is
    planned. The key copy is 0600 and hidden in diffs. ``prefix`` starts each finding.
    Returns (planned files, the inspected material or None).
    """
    copies = [c for c in (cert, key, ca) if c is not None and params[c[0]]]
    missing = [
        "%s %s does not exist on the target (or is not a file)" % (option, params[option])
        for option, _target in copies
        if not os.path.isfile(params[option])
    ]
    if missing:
        errors.extend(missing)
        return [], None
    try:
        material = certs.inspect_material(params[cert[0]], params[key[0]], params[ca[0]] if ca else None)
    except certs.CertificateError as exc:
        errors.append(prefix + str(exc))
        return [], None
    errors.extend(prefix + e for e in material.findings.errors)
    # The copy gets mode 0600 whatever the source has.
    warnings.extend(
        prefix + w for w in material.findings.warnings if "should be readable by its owner only" not in w
    )
    if material.findings.errors:
        return [], None
    planned = [
        PlannedFile(
            target,
            read_bytes(params[option]) or b"",
            0o600 if option == key[0] else 0o644,
            SERVICE_UID,
            SERVICE_GID,
            hidden=option == key[0],
        )
        for option, target in copies
    ]
    return planned, material


def _pair_matches(cert_data: bytes | None, key_data: bytes | None) -> bool:
    if not cert_data or not key_data:
        return False
    try:
        cert, _fmt = certs.load_certificates(cert_data, "certificate")
        key, _kfmt = certs.load_private_key(key_data, "key")
    except certs.CertificateError:
        return False
    kind, bits = certs.key_kind(key.public_key())
    return (
        kind == "RSA"
        and bits >= certs.MIN_RSA_BITS
        and certs.same_public_key(key.public_key(), cert[0].public_key())
    )


def extra_file(source: str | None, target: str, option: str, errors: list[str]) -> PlannedFile | None:
    """A public file copied into certs/ (for example the CA bundle used to verify the broker)."""
    if not source:
        return None
    data = read_bytes(source)
    if data is None:
        errors.append("%s %s does not exist on the target" % (option, source))
        return None
    try:
        certs.load_certificates(data, "%s %s" % (option, source))
    except certs.CertificateError as exc:
        errors.append(str(exc))
        return None
    return PlannedFile(target, data, 0o644, SERVICE_UID, SERVICE_GID)


# ------------------------------------------------------------------ rendering


def render_properties(title: str, values: list[tuple[str, object]]) -> bytes:
    """A key=value file in the services' syntax; booleans lower-case, lists comma-separated."""
    lines = [
        "# %s" % title,
        "# Written by the gatehouse.access collection; changes here are overwritten.",
        "",
    ]
    for key, value in values:
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, (list, tuple)):
            text = ",".join(str(v) for v in value)
        else:
            text = "" if value is None else str(value)
        if "\n" in text or "\r" in text:
            raise ValueError("value of %s contains a line break" % key)
        lines.append("%s=%s" % (key, text))
    return ("\n".join(lines) + "\n").encode("utf-8")


def parse_properties(data: bytes) -> dict:
    """The keys and values of a file of render_properties(), as the module reports them."""
    result = {}
    for line in data.decode("utf-8").splitlines():
        if line and not line.startswith("#"):
            key, _sep, value = line.partition("=")
            result[key] = value
    return result


def _yaml_scalar(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    # A JSON string is a valid YAML double-quoted scalar.
    return json.dumps(str(value))


def to_yaml(value, indent: int = 0) -> str:
    """Block-style YAML of dicts, lists and scalars; deterministic and free of PyYAML on the target."""
    pad = "  " * indent
    lines: list[str] = []
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(item, (dict, list)) and item:
                lines.append("%s%s:" % (pad, key))
                lines.append(to_yaml(item, indent + 1))
            elif isinstance(item, dict):
                lines.append("%s%s: {}" % (pad, key))
            elif isinstance(item, list):
                lines.append("%s%s: []" % (pad, key))
            else:
                lines.append("%s%s: %s" % (pad, key, _yaml_scalar(item)))
    elif isinstance(value, list):
        for item in value:
            if isinstance(item, dict) and item:
                nested = to_yaml(item, indent + 1).splitlines()
                lines.append("%s- %s" % (pad, nested[0].lstrip()))
                lines.extend(nested[1:])
            else:
                lines.append("%s- %s" % (pad, _yaml_scalar(item)))
    return "\n".join(lines)


def render_compose(specs: list[dict], network: dict | None) -> bytes:
    """docker-compose.yaml (Compose specification) equivalent to the containers the module runs."""
    services: dict = {}
    for spec in specs:
        service: dict = {"image": spec["image"], "container_name": spec["name"]}
        if spec.get("command"):
            service["command"] = list(spec["command"])
        service["restart"] = spec.get("restart_policy", "unless-stopped")
        if spec.get("service") in SERVICE_HARDENING:
            hardening = spec_hardening(spec)
            service.update(
                cap_drop=hardening["cap_drop"],
                cap_add=hardening["cap_add"],
                security_opt=hardening["security_opt"],
                read_only=hardening["read_only"],
                tmpfs=["%s:%s" % item for item in sorted(hardening["tmpfs"].items())],
                mem_limit=hardening["mem_limit"],
                pids_limit=hardening["pids_limit"],
                ulimits={"nofile": {"soft": hardening["nofile"], "hard": hardening["nofile"]}},
            )
        service["labels"] = dict(spec["labels"])
        service["volumes"] = [
            "%s:%s%s" % (m["source"], m["target"], ":ro" if m["read_only"] else "") for m in spec["mounts"]
        ]
        if spec["network_mode"] == "bridge":
            if spec.get("ports"):
                service["ports"] = [
                    "%s%d:%d/%s"
                    % (
                        p["host_ip"] + ":" if p.get("host_ip") else "",
                        p["host"],
                        p["container"],
                        p["protocol"],
                    )
                    for p in spec["ports"]
                ]
            if network:
                service["networks"] = [network["key"]]
        else:
            service["network_mode"] = spec["network_mode"]
        services[spec["service"]] = service
    document: dict = {
        "name": specs[0]["labels"].get("gatehouse.project", "gatehouse") if specs else "gatehouse"
    }
    document["services"] = services
    if network:
        document["networks"] = {
            network["key"]: {
                "name": network["name"],
                "driver": "bridge",
                "labels": dict(network["labels"]),
                "ipam": {"config": [{"subnet": subnet} for subnet in network["subnets"]]},
            }
        }
        if any(":" in subnet for subnet in network["subnets"]):
            document["networks"][network["key"]]["enable_ipv6"] = True
    header = (
        "# What the gatehouse.access collection runs on this host, for reference and for docker compose\n"
        "# users. The collection converges the containers itself; changes here are overwritten.\n"
    )
    return (header + to_yaml(document) + "\n").encode("utf-8")


# ------------------------------------------------------------------ images


def load_bundle(cli, bundle_path: str, check_mode: bool) -> list[str]:
    """Verify a dark-site bundle and load its images; returns the tags loaded (or that would be).

    ``bundle_path`` is ``make bundle``'s archive or its unpacked directory. It is verified exactly
    as gatehouse.access.bundle verifies it (_bundle.verify: SHA256SUMS, manifest, images.tar)
    before anything reaches the engine; a bad bundle raises ContainerError and loads nothing.
    An archive is unpacked to a temporary directory first (removed afterwards).
    """
    workdir = tempfile.mkdtemp(prefix="gatehouse-bundle-")
    try:
        verified = bundles.verify(bundle_path, workdir)
        result = bundles.load_verified(cli, verified, check_mode)
    except bundles.BundleError as exc:
        raise ContainerError("bundle_path %s: %s" % (bundle_path, exc)) from None
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return [tag for image in result["images"] if image["loaded"] for tag in image["tags"]]


def run_and_exit(module, run) -> None:
    """The shared tail of the deployment modules (cmsg, broker): check the libraries, run, finish.

    ``run(module)`` returns the result dict (see _common.result.finish); option errors
    (ValidationError), Docker errors (ContainerError) and Failure end the module as failed.
    """
    if not HAS_DOCKER:
        fail(module, missing_required_lib("docker"), exception=DOCKER_IMPORT_ERROR)
    if not certs.HAS_CRYPTOGRAPHY:
        fail(module, missing_required_lib("cryptography >= 42.0"), exception=certs.CRYPTOGRAPHY_IMPORT_ERROR)
    try:
        result = run(module)
    except ValidationError as exc:
        result = Failure("invalid options: " + "; ".join(exc.errors), errors=exc.errors).result
    except Failure as exc:
        result = exc.result
    except ContainerError as exc:
        result = Failure(str(exc)).result
    finish(module, result)
