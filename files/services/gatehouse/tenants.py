"""Tenants sharing one CM + SG (docs/tenants.md): the tenants file, read by both services.

The file (``tenants.json``, named by the TenantsFile key of config.properties and
SecurityGateway.conf) is a JSON list; each tenant has::

    {"name": "a", "host_names": ["desktops.a.example"],
     "broker_url": "https://broker.a.internal:443",      # the CM only
     "broker_ca_cert": "/certs/tenant-a-broker-ca.pem",   # optional, the CM only
     "agent_networks": ["10.20.0.0/16"],                  # optional, CM and SG
     "ssl_cert": "/certs/tenant-a.pem",                   # optional, CM and SG: the
     "ssl_key": "/certs/tenant-a-key.pem"}                #   tenant's own certificate (SNI)

Invariants:

- A tenant name is 1-32 characters of ``a-z0-9-`` (it appears in grants and logs); names and
  host names are unique, a host name belongs to one tenant only, host names are lowercase.
- ``agent_networks`` empty means "any address" (the tenant's broker alone decides).
- ``ssl_cert`` and ``ssl_key`` go together; without them the service's own certificate (SslCert)
  is presented for the tenant's names, and it must carry them.
- Loading never half-succeeds: any problem raises :class:`TenantsError` listing the first one, and
  the caller keeps the tenants it had.
"""

from __future__ import annotations

import ipaddress
import json
import re
import ssl
from dataclasses import dataclass
from pathlib import Path

from gatehouse import tls

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,31}$")
_LABEL_RE = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
MAX_TENANTS = 1000
_KEYS = {"name", "host_names", "broker_url", "broker_ca_cert", "agent_networks", "ssl_cert", "ssl_key"}


# The attribute ServerNames leaves on a connection's SSL object (SSLObject or SSLSocket).
SNI_ATTRIBUTE = "gatehouse_sni"


class ServerNames:
    """A server context's ``sni_callback``: keep the name the client asked for, and present a
    tenant's own certificate.

    The name (None: no SNI) is read back with ``getattr(ssl_object, SNI_ATTRIBUTE, None)``. When
    it is a host name of a tenant with ``ssl_cert`` the handshake switches to that tenant's
    context; otherwise it goes on with the service's certificate whatever the name (unknown
    names are refused after it, with a readable answer). :meth:`use` replaces the contexts (a
    reload).
    """

    def __init__(self, role: str) -> None:
        self.role = role
        self._contexts: dict[str, ssl.SSLContext] = {}

    def contexts_for(self, tenants: Tenants) -> dict[str, ssl.SSLContext]:
        """Each host name of a tenant with its own certificate → its context; raises TenantsError."""
        contexts: dict[str, ssl.SSLContext] = {}
        for tenant in tenants.tenants:
            if not tenant.ssl_cert:
                continue
            try:
                ctx = tls.server_context(tenant.ssl_cert, tenant.ssl_key, self.role)
            except tls.CertificateError as exc:
                raise TenantsError(f"tenant {tenant.name}: ssl_cert: {exc}") from None
            contexts.update(dict.fromkeys(tenant.host_names, ctx))
        return contexts

    def use(self, contexts: dict[str, ssl.SSLContext]) -> None:
        self._contexts = contexts

    def __call__(
        self, ssl_object: ssl.SSLObject | ssl.SSLSocket, server_name: str | None, _ctx: object
    ) -> None:
        setattr(ssl_object, SNI_ATTRIBUTE, server_name)
        if server_name:
            ctx = self._contexts.get(normal_host(server_name))
            if ctx is not None:
                ssl_object.context = ctx


class TenantsError(ValueError):
    """The tenants file cannot be used."""


@dataclass(frozen=True)
class Tenant:
    name: str
    host_names: tuple[str, ...]
    broker_url: str = ""
    broker_ca_cert: str = ""
    agent_networks: tuple[Network, ...] = ()
    ssl_cert: str = ""
    ssl_key: str = ""

    def owns_agent(self, address: str) -> bool:
        """Whether a desktop at ``address`` may belong to this tenant (always, without networks)."""
        if not self.agent_networks:
            return True
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
            ip = ip.ipv4_mapped
        return any(ip in net for net in self.agent_networks)


@dataclass(frozen=True)
class Tenants:
    """The tenants of one CM/SG, looked up by host name (SNI, Host) or by name."""

    tenants: tuple[Tenant, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.tenants)

    def by_host(self, host: str | None) -> Tenant | None:
        name = normal_host(host or "")
        for tenant in self.tenants:
            if name in tenant.host_names:
                return tenant
        return None

    def by_name(self, name: str) -> Tenant | None:
        for tenant in self.tenants:
            if tenant.name == name:
                return tenant
        return None

    @property
    def host_names(self) -> tuple[str, ...]:
        return tuple(h for t in self.tenants for h in t.host_names)


def normal_host(host: str) -> str:
    """A host name as compared: lowercase, without a trailing dot."""
    return host.strip().rstrip(".").lower()


def is_host_name(name: str) -> bool:
    labels = name.split(".")
    return 2 <= len(labels) and len(name) <= 253 and all(_LABEL_RE.match(label) for label in labels)


def parse(data: object, *, need_broker: bool) -> Tenants:
    """Tenants from the decoded JSON; ``need_broker``: every tenant needs its broker_url (the CM)."""
    if not isinstance(data, list):
        raise TenantsError("the tenants file must hold a JSON list of tenants")
    if len(data) > MAX_TENANTS:
        raise TenantsError(f"more than {MAX_TENANTS} tenants")
    tenants: list[Tenant] = []
    owner: dict[str, str] = {}
    for index, item in enumerate(data):
        where = f"tenant #{index + 1}"
        if not isinstance(item, dict):
            raise TenantsError(f"{where} is not an object")
        unknown = sorted(set(item) - _KEYS)
        if unknown:
            raise TenantsError(f"{where}: unknown key(s) {', '.join(unknown)}")
        name = item.get("name")
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise TenantsError(f"{where}: name must be 1-32 characters of a-z, 0-9 and '-', got {name!r}")
        where = f"tenant {name}"
        if any(t.name == name for t in tenants):
            raise TenantsError(f"{where} is listed twice")
        hosts = item.get("host_names")
        if not isinstance(hosts, list) or not hosts or not all(isinstance(h, str) for h in hosts):
            raise TenantsError(f"{where}: host_names must be a non-empty list of host names")
        names: list[str] = []
        for host in hosts:
            host_name = normal_host(host)
            if not is_host_name(host_name):
                raise TenantsError(f"{where}: {host!r} is not a fully qualified host name")
            if host_name in owner:
                raise TenantsError(f"{where}: host name {host_name} is already tenant {owner[host_name]}'s")
            owner[host_name] = name
            names.append(host_name)
        broker_url = item.get("broker_url", "")
        if not isinstance(broker_url, str) or (need_broker and not broker_url):
            raise TenantsError(f"{where}: broker_url (the tenant's own broker) is required")
        broker_ca = item.get("broker_ca_cert", "")
        if not isinstance(broker_ca, str):
            raise TenantsError(f"{where}: broker_ca_cert must be a path")
        nets_raw = item.get("agent_networks", [])
        if not isinstance(nets_raw, list):
            raise TenantsError(f"{where}: agent_networks must be a list of CIDRs")
        nets: list[Network] = []
        for cidr in nets_raw:
            try:
                nets.append(ipaddress.ip_network(str(cidr).strip(), strict=False))
            except ValueError:
                raise TenantsError(f"{where}: agent_networks entry {cidr!r} is not a CIDR") from None
        cert, key = item.get("ssl_cert", ""), item.get("ssl_key", "")
        if not isinstance(cert, str) or not isinstance(key, str) or bool(cert) != bool(key):
            raise TenantsError(f"{where}: ssl_cert and ssl_key go together: give both paths or neither")
        tenants.append(Tenant(name, tuple(names), broker_url, broker_ca, tuple(nets), cert, key))
    return Tenants(tuple(tenants))


def load_tenants(path: str | Path, *, need_broker: bool) -> Tenants:
    """The tenants of the file at ``path``; raises TenantsError."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise TenantsError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise TenantsError(f"{path} is not JSON: {exc}") from None
    return parse(data, need_broker=need_broker)
