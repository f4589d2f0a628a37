"""A real directory (OpenLDAP) and RADIUS server (FreeRADIUS) for the identity tests.

Both run from the image gatehouse/identity-test (hack/build-debian-image.sh, files in
files/images/identity-test) on a private Docker network, with their ports published on
127.0.0.1 so that services running as host processes (the broker of
tests/integration/services.py) reach them. ``running()`` starts them once per test session
(tests/integration/conftest.py: fixtures ``identity``, ``directory``, ``radius``) and removes
containers and network afterwards, also when a test or the start fails.

The directory (suffix dc=corp,dc=example, see files/images/identity-test/directory.ldif):

- ``cn=gatehouse-svc,ou=services,dc=corp,dc=example``: the service account, the only one that
  reads the directory (anonymous reads nothing, a user only their own entry);
- users ``uid=<name>,ou=people,dc=corp,dc=example``: alice (group engineering, and through it,
  nested, desktop-users), bob (desktop-users; also found by ``userPrincipalName``
  :data:`BOB_UPN`, Active Directory's second name of a user), carol (admins), dave (posixGroup lab-users by
  memberUid, so no memberOf);
- ``memberOf`` is maintained by the memberof overlay and holds direct groups only: OpenLDAP has
  no transitive membership, so the ``ad-nested`` group mode needs Active Directory; tests
  against this server use ``memberof`` and ``search``;
- ``ldap://`` (StartTLS) and ``ldaps://`` with a certificate from the session's test CA for
  ``localhost`` and ``127.0.0.1``; unauthenticated binds (DN, empty password) succeed as
  anonymous, as Active Directory answers them.

The RADIUS server (UDP, Message-Authenticator required in requests and sent in every reply,
Status-Server answered): alice with
passcode 123456 is accepted; carol gets an Access-Challenge (:data:`CAROL_PROMPT` and a State)
for any first passcode, then is accepted with 654321 and that State; everything else is
rejected; erin is challenged at every passcode, for ever (:data:`ERIN_PROMPT`). A wrong shared
secret gets no answer.

A missing Docker engine or image fails the test with the command that fixes it: never a skip.
"""

from __future__ import annotations

import contextlib
import io
import ipaddress
import shutil
import ssl
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ldap3
import pytest
import yaml
from deploy_helpers import free_cidr
from ldap3.protocol.rfc4511 import AuthenticationChoice, BindRequest, Simple, Version
from pki import TestPKI
from pyrad import packet as radius_packet
from pyrad.client import Client as RadiusClient
from pyrad.client import Timeout as RadiusTimeout
from pyrad.dictionary import Dictionary
from services import free_port

try:
    import docker
except ImportError:  # pragma: no cover - the virtualenv has it
    docker = None

REPO_ROOT = Path(__file__).resolve().parents[2]
VERSION = str(yaml.safe_load((REPO_ROOT / "galaxy.yml").read_text())["version"])
IMAGE = f"gatehouse/identity-test:{VERSION}"
RADIUS_CONFIG = REPO_ROOT / "files/images/identity-test/radius/radiusd.conf"
RADIUS_CONFIG_IN_IMAGE = "/etc/gatehouse-identity/radius/radiusd.conf"
# The directory's configuration and seed, mounted from the tree like radiusd.conf.
DIRECTORY_FILES = {
    REPO_ROOT / "files/images/identity-test" / name: f"/usr/local/share/gatehouse-identity/{name}"
    for name in ("slapd-config.ldif", "directory.ldif")
}
DIRECTORY_MOUNTS = {str(src): {"bind": dst, "mode": "ro"} for src, dst in DIRECTORY_FILES.items()}
LABEL = "gatehouse.test"

BASE_DN = "dc=corp,dc=example"
PEOPLE_DN = f"ou=people,{BASE_DN}"
GROUPS_DN = f"ou=groups,{BASE_DN}"
BIND_DN = f"cn=gatehouse-svc,ou=services,{BASE_DN}"
USERS = ("alice", "bob", "carol", "dave")
# Direct groups (memberOf) and every group including nesting and posixGroup memberUid.
DIRECT_GROUPS = {"alice": {"engineering"}, "bob": {"desktop-users"}, "carol": {"admins"}, "dave": set()}
ALL_GROUPS = {
    "alice": {"engineering", "desktop-users"},
    "bob": {"desktop-users"},
    "carol": {"admins"},
    "dave": {"lab-users"},
}

BOB_UPN = "bob.baker@corp.example"
ALICE_PASSCODE = "123456"
CAROL_CODE = "654321"
CAROL_PROMPT = "Enter the code sent to your phone"
ERIN_PROMPT = "Enter the next token code"

# The attributes the tests send and read (RFC 2865, RFC 3579).
RADIUS_DICTIONARY = """\
ATTRIBUTE User-Name 1 string
ATTRIBUTE User-Password 2 string encrypt=1
ATTRIBUTE Reply-Message 18 string
ATTRIBUTE State 24 octets
ATTRIBUTE NAS-Identifier 32 string
ATTRIBUTE Message-Authenticator 80 octets
"""
ACCESS_ACCEPT = radius_packet.AccessAccept
ACCESS_REJECT = radius_packet.AccessReject
ACCESS_CHALLENGE = radius_packet.AccessChallenge


def group_dn(cn: str) -> str:
    return f"cn={cn},{GROUPS_DN}"


def user_dn(uid: str) -> str:
    return f"uid={uid},{PEOPLE_DN}"


def _docker_client() -> Any:
    if docker is None:
        pytest.fail("the identity tests need the docker Python SDK (make venv)", pytrace=False)
    try:
        cli = docker.from_env(timeout=60)
        cli.ping()
    except Exception as exc:
        pytest.fail(f"the identity tests need the Docker engine: {exc}", pytrace=False)
    try:
        cli.images.get(IMAGE)
    except docker.errors.ImageNotFound:
        pytest.fail(
            f"image {IMAGE} is missing: build it with `make images` "
            "(only this image: IMAGES=identity-test hack/build-images.sh)",
            pytrace=False,
        )
    return cli


def _run(cli: Any, *, ports: dict[str, int], attempts: int = 5, **kwargs: Any) -> Any:
    """``containers.run`` publishing ``ports`` on 127.0.0.1, picking new host ports if one was taken.

    Fixed host ports (not Docker's random ones) keep the URLs valid across a stop and start.
    """
    for attempt in range(attempts):
        host_ports = {spec: ("127.0.0.1", free_port()) for spec in ports}
        try:
            container = cli.containers.run(ports=host_ports, detach=True, **kwargs)
        except docker.errors.APIError as exc:
            if "already allocated" not in str(exc) and "address already in use" not in str(exc):
                raise
            with contextlib.suppress(docker.errors.NotFound):
                cli.containers.get(kwargs["name"]).remove(force=True)
            if attempt == attempts - 1:
                raise
            continue
        for spec, (_host, port) in host_ports.items():
            ports[spec] = port
        return container
    raise AssertionError("unreachable")


@dataclass
class Directory:
    """The slapd container: URLs, credentials, and stop/pause for "directory down" tests."""

    container: Any
    ldap_port: int
    ldaps_port: int
    ca: Path  # the CA that issued the server certificate
    passwords: dict[str, str]  # uid (and gatehouse-svc) -> password
    bind_password_file: Path  # the service account's password, one line
    host: str = "127.0.0.1"
    base_dn: str = BASE_DN
    people_dn: str = PEOPLE_DN
    groups_dn: str = GROUPS_DN
    bind_dn: str = BIND_DN

    @property
    def ldap_url(self) -> str:
        """``ldap://`` URL: StartTLS on the directory's plain port."""
        return f"ldap://{self.host}:{self.ldap_port}"

    @property
    def ldaps_url(self) -> str:
        return f"ldaps://{self.host}:{self.ldaps_port}"

    @property
    def bind_password(self) -> str:
        return self.passwords["gatehouse-svc"]

    def connection(
        self,
        who: str | None,
        password: str | None,
        *,
        url: str | None = None,
        ca: Path | None = None,
        timeout: float = 5.0,
    ) -> ldap3.Connection:
        """An ldap3 connection (open, not yet bound) as ``who`` (a DN, or a uid; None: anonymous);
        ``ldap://`` gets StartTLS. The certificate and host name are verified against ``ca``."""
        url = url or self.ldaps_url
        tls = ldap3.Tls(validate=ssl.CERT_REQUIRED, ca_certs_file=str(ca or self.ca))
        server = ldap3.Server(url, use_ssl=url.startswith("ldaps://"), tls=tls, connect_timeout=timeout)
        dn = who if who is None or "=" in who else user_dn(who)
        # ldap3 sets SO_RCVTIMEO from receive_timeout with struct.pack: whole seconds only.
        conn = ldap3.Connection(
            server, user=dn, password=password, receive_timeout=max(1, round(timeout)), raise_exceptions=False
        )
        conn.open()
        if url.startswith("ldap://") and not conn.start_tls():
            raise ConnectionError(f"StartTLS on {url} failed: {conn.result}")
        return conn

    def unauthenticated_bind(self, dn: str, *, url: str | None = None) -> tuple[int, str | None]:
        """A simple bind of ``dn`` with an empty password (RFC 4513 5.1.2), which ldap3's own
        ``bind()`` refuses to send; returns the bind's result code and the Who am I? answer."""
        conn = self.connection(None, None, url=url)
        try:
            request = BindRequest()
            request["version"] = Version(3)
            request["name"] = dn
            request["authentication"] = AuthenticationChoice().setComponentByName("simple", Simple(""))
            conn.strategy.post_send_single_response(conn.strategy.send("bindRequest", request))
            code = conn.result["result"]
            return code, conn.extend.standard.who_am_i() if code == 0 else None
        finally:
            conn.unbind()

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        last: object = None
        while time.monotonic() < deadline:
            self.container.reload()
            if self.container.status == "exited":
                break
            try:
                conn = self.connection(self.bind_dn, self.bind_password)
                if conn.bind():
                    conn.unbind()
                    return
                last = conn.result
            except Exception as exc:
                last = exc
            time.sleep(0.1)
        raise TimeoutError(f"slapd not ready in {timeout} s: {last}\n{self.logs()}")

    def logs(self) -> str:
        return self.container.logs().decode(errors="replace")[-4000:]

    def ensure_running(self) -> None:
        """Start it again if a test left it stopped or paused."""
        self.container.reload()
        if self.container.status == "paused":
            self.container.unpause()
        elif self.container.status != "running":
            self.container.start()
        self.wait_ready()

    @contextlib.contextmanager
    def stopped(self) -> Iterator[None]:
        """The directory is down (connections refused) inside the block; started (fresh seed) after it."""
        self.container.stop(timeout=2)
        try:
            yield
        finally:
            self.container.start()
            self.wait_ready()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """The directory hangs (connections accepted, never answered) inside the block."""
        self.container.pause()
        try:
            yield
        finally:
            self.container.unpause()


@dataclass
class Radius:
    """The FreeRADIUS container: address, shared secret and a pyrad client for direct checks."""

    container: Any
    port: int
    secret: str
    secret_file: Path  # the shared secret, one line
    host: str = "127.0.0.1"
    dictionary: Dictionary = field(default_factory=lambda: Dictionary(io.StringIO(RADIUS_DICTIONARY)))

    @property
    def address(self) -> str:
        """``host:port`` as RadiusServers takes it."""
        return f"{self.host}:{self.port}"

    def client(self, secret: str | None = None, timeout: float = 2.0, retries: int = 1) -> RadiusClient:
        return RadiusClient(
            self.host,
            authport=self.port,
            secret=(self.secret if secret is None else secret).encode(),
            dict=self.dictionary,
            retries=retries,
            timeout=timeout,
            # Replies must be signed: one without a valid Message-Authenticator counts as none.
            enforce_ma=True,
        )

    def authenticate(
        self, user: str, passcode: str, state: bytes | None = None, *, secret: str | None = None
    ) -> radius_packet.Packet:
        """One Access-Request (with Message-Authenticator); raises pyrad's Timeout without a valid answer."""
        client = self.client(secret)
        request = client.CreateAuthPacket(User_Name=user, NAS_Identifier="gatehouse-tests")
        request["User-Password"] = request.PwCrypt(passcode)
        if state is not None:
            request["State"] = state
        return client.SendPacket(request)

    def status(self, *, secret: str | None = None, timeout: float = 2.0) -> radius_packet.Packet:
        """A Status-Server (RFC 5997, with Message-Authenticator)."""
        client = self.client(secret, timeout=timeout)
        return client.SendPacket(client.CreateAuthPacket(code=radius_packet.StatusServer))

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        last: object = None
        while time.monotonic() < deadline:
            self.container.reload()
            if self.container.status == "exited":
                break
            try:
                if self.status(timeout=0.5).code == ACCESS_ACCEPT:
                    return
            except (RadiusTimeout, OSError) as exc:
                last = exc
            time.sleep(0.1)
        raise TimeoutError(f"FreeRADIUS not ready in {timeout} s: {last!r}\n{self.logs()}")

    def logs(self) -> str:
        return self.container.logs().decode(errors="replace")[-4000:]


@dataclass
class IdentityServers:
    directory: Directory
    radius: Radius
    network: str
    workdir: Path


def _write_secret(path: Path, value: str) -> Path:
    path.write_text(value + "\n", encoding="utf-8")
    path.chmod(0o600)
    return path


@contextlib.contextmanager
def running(
    pki: TestPKI, workdir: Path, name_prefix: str = "ghtest-identity", ldap_names: tuple[str, ...] = ()
) -> Iterator[IdentityServers]:
    """Start the directory and the RADIUS server; remove both and their network at the end.

    Containers and network are named ``<name_prefix>-<random>-...`` (the benchmarks pass their own).
    The directory's certificate names localhost, 127.0.0.1 and ``ldap_names`` (an address that
    a relay to it listens on, for clients that reach it there).
    """
    cli = _docker_client()
    prefix = f"{name_prefix}-{uuid.uuid4().hex[:8]}"
    secrets_dir = workdir / "secrets"
    certs_dir = workdir / "certs"
    secrets_dir.mkdir(parents=True)
    certs_dir.mkdir()
    run_id = uuid.uuid4().hex[:12]
    passwords = {"gatehouse-svc": f"Svc-{run_id}-pw!"}
    passwords.update({uid: f"{uid.title()}-{run_id}-Dir#1" for uid in USERS})
    for name, value in passwords.items():
        _write_secret(secrets_dir / f"{name}.password", value)
    radius_secret = f"radius-{run_id}"
    _write_secret(secrets_dir / "radius.secret", radius_secret)
    leaf = pki.issue(f"{prefix}-ldap", ["localhost", "127.0.0.1", *ldap_names])
    shutil.copyfile(leaf.cert, certs_dir / "cert.pem")
    shutil.copyfile(leaf.key, certs_dir / "key.pem")
    shutil.copyfile(pki.ca, certs_dir / "ca.pem")

    labels = {LABEL: "identity"}
    volumes = {
        str(secrets_dir): {"bind": "/secrets", "mode": "ro"},
        str(certs_dir): {"bind": "/certs", "mode": "ro"},
    }
    try:
        cidr = free_cidr(cli, pool="10.203.0.0/16", prefixlen=28)
        ipam = docker.types.IPAMConfig(pool_configs=[docker.types.IPAMPool(subnet=cidr)])
        cli.networks.create(prefix, driver="bridge", ipam=ipam, labels=labels)
        slapd_ports = {"389/tcp": 0, "636/tcp": 0}
        slapd = _run(
            cli,
            ports=slapd_ports,
            image=IMAGE,
            command=["slapd"],
            name=f"{prefix}-slapd",
            network=prefix,
            labels=labels,
            volumes={**volumes, **DIRECTORY_MOUNTS},
        )
        radius_ports = {"1812/udp": 0}
        # Requests reach it through the engine's port forwarding, from the network's gateway.
        radiusd = _run(
            cli,
            ports=radius_ports,
            image=IMAGE,
            command=["radius"],
            name=f"{prefix}-radius",
            network=prefix,
            labels=labels,
            # The tree's configuration, not the image's copy: a test user added there works
            # before the image is built again.
            volumes={**volumes, str(RADIUS_CONFIG): {"bind": RADIUS_CONFIG_IN_IMAGE, "mode": "ro"}},
            environment={"RADIUS_CLIENTS": str(ipaddress.ip_network(cidr))},
        )
        directory = Directory(
            container=slapd,
            ldap_port=slapd_ports["389/tcp"],
            ldaps_port=slapd_ports["636/tcp"],
            ca=pki.ca,
            passwords=passwords,
            bind_password_file=secrets_dir / "gatehouse-svc.password",
        )
        radius = Radius(
            container=radiusd,
            port=radius_ports["1812/udp"],
            secret=radius_secret,
            secret_file=secrets_dir / "radius.secret",
        )
        directory.wait_ready()
        radius.wait_ready()
        yield IdentityServers(directory=directory, radius=radius, network=prefix, workdir=workdir)
    finally:
        for container in cli.containers.list(all=True, filters={"name": prefix}):
            if container.name.startswith(prefix):
                container.remove(force=True)
        for network in cli.networks.list(names=[prefix]):
            if network.name.startswith(prefix):
                network.remove()
