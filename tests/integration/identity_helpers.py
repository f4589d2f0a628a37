"""The identity tests' broker configuration, shared with the identity benchmark.

A broker as a host process (services.start_broker) whose ``Domain.<D>.*``, ``SecondFactor`` and
``Radius*`` keys point at the directory and RADIUS containers of identity_servers.py.
"""

from __future__ import annotations

import uuid
from pathlib import Path

from identity_servers import Directory, Radius
from pki import TestPKI
from services import ServiceProcess, broker_admin, start_broker

from gatehouse import tls

ADMIN_TOKEN = "identity-admin-" + uuid.uuid4().hex
# Many deliberate failures per test: the throttle's delays and lockouts are tested elsewhere.
NO_THROTTLE = {
    "LoginDelayAfterFailures": 1000,
    "LoginLockoutAfterFailures": 1000,
    "LoginSourceLockoutAfterFailures": 1000,
    "LoginAccountLockoutAfterFailures": 1000,
}


def ldap_domain(directory: Directory, domain: str, servers: str | None = None, **keys: object) -> dict:
    """The ``Domain.<domain>.*`` keys of a domain whose users are in the test directory."""
    values: dict[str, object] = {
        "Source": "ldap",
        "LdapServers": servers or directory.ldaps_url,
        "LdapCaCert": directory.ca,
        "LdapBindDn": directory.bind_dn,
        "LdapBindPasswordFile": directory.bind_password_file,
        "LdapBaseDn": directory.people_dn,
        "LdapGroupBaseDn": directory.groups_dn,
        "LdapGroupMode": "memberof",
        "LdapTimeout": 2,
        **keys,
    }
    return {f"Domain.{domain}.{key}": value for key, value in values.items()}


def radius_keys(radius: Radius, servers: str | None = None, **keys: object) -> dict:
    return {
        "SecondFactor": "radius",
        "RadiusServers": servers or radius.address,
        "RadiusSecretFile": radius.secret_file,
        "RadiusTimeout": 1,
        "RadiusRetries": 0,
        "RadiusNasIdentifier": "gatehouse-test-broker",
        **keys,
    }


def start_identity_broker(pki: TestPKI, workdir: Path, name: str, **config: object) -> ServiceProcess:
    return start_broker(
        pki, workdir, f"identity-{name}", ADMIN_TOKEN, Domains="CORP, LAB", **config, **NO_THROTTLE
    )


def admin(broker: ServiceProcess, pki: TestPKI, method: str, path: str, body: object | None = None) -> dict:
    url = f"https://127.0.0.1:{broker.config['ListenPort']}"
    return broker_admin(
        url, ADMIN_TOKEN, tls.client_context(pki.ca, verify=True, role="sg"), method, path, body
    )
