"""Start Gatehouse services as real processes on loopback for integration tests.

`ServiceProcess` writes a config file, runs `python -m gatehouse.<svc>`, waits for `/health`,
keeps the log lines (for the no-secrets-in-logs checks) and stops with SIGTERM.

`start_broker`, `start_agent`, `start_sg` and `cm_config` + `start_cm` hold each service's test
configuration as the collection deploys it (role certificates from the test CA, internal callers
verified); keyword arguments override or add keys. tests/integration/services/test_session.py and the attack
stack tests/security/stack.py build their stacks from them.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pki import CertFiles, TestPKI


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A port free for both TCP and UDP on 127.0.0.1 (the SG and agent use the same number for both).

    Picked below the kernel's ephemeral range (net.ipv4.ip_local_port_range, 32768 and up by
    default): a port the kernel handed out with bind(0) can be handed out again to another
    process's outgoing connection before the service under test binds it. A port is not handed
    out twice in one process: a caller may take several before it binds any.
    """
    rng = random.SystemRandom()
    if len(_HANDED_OUT) > 6000:  # half the range: start over rather than search a crowded range
        _HANDED_OUT.clear()
    while True:
        port = rng.randrange(20000, 32000)
        if port in _HANDED_OUT:  # free now, but a caller may not have bound it yet
            continue
        try:
            with (
                socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp,
                socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp,
            ):
                tcp.bind(("127.0.0.1", port))
                udp.bind(("127.0.0.1", port))
        except OSError:
            continue
        _HANDED_OUT.add(port)
        return port


def write_kv(path: Path, values: dict[str, object]) -> Path:
    lines = []
    for key, value in values.items():
        if isinstance(value, bool):
            value = "true" if value else "false"
        lines.append(f"{key}={value}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


class ServiceProcess:
    def __init__(
        self,
        service: str,
        workdir: Path,
        config: dict[str, object],
        *,
        config_name: str | None = None,
        env_file: dict[str, object] | None = None,
        environ: dict[str, str] | None = None,
        health_url: str | None = None,
        health_ssl: ssl.SSLContext | None = None,
        identity: CertFiles | None = None,
    ) -> None:
        self.service = service
        self.config = dict(config)  # as written to config_path
        self.identity = identity  # the certificate the service presents (the starters below set it)
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = write_kv(workdir / (config_name or f"{service}.properties"), config)
        self.env_path = write_kv(workdir / "cmsg.env", env_file) if env_file is not None else None
        self.log_path = workdir / f"{service}.log"
        self.environ = environ or {}
        self.health_url = health_url
        self.health_ssl = health_ssl
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 20.0) -> ServiceProcess:
        cmd = [sys.executable, "-m", f"gatehouse.{self.service}", "--config", str(self.config_path)]
        if self.env_path:
            cmd += ["--env-file", str(self.env_path)]
        env = {k: v for k, v in os.environ.items() if not k.startswith("GATEHOUSE_")}
        env.update(self.environ)
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        if self.health_url:
            self.wait_healthy(timeout)
        return self

    def wait_healthy(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        ctx = self.health_ssl
        if ctx is None and self.health_url and self.health_url.startswith("https"):
            ctx = ssl._create_unverified_context()
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc and self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.service} exited with {self.proc.returncode}:\n{self.logs()[-4000:]}"
                )
            try:
                with urllib.request.urlopen(self.health_url, timeout=2, context=ctx) as resp:
                    if resp.status == 200:
                        return
            except Exception as exc:
                last = exc
            time.sleep(0.1)
        raise TimeoutError(f"{self.service} not healthy at {self.health_url}: {last}\n{self.logs()[-4000:]}")

    def logs(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self, timeout: float = 15.0) -> int | None:
        if not self.proc:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def worker_pids(self) -> dict[int, int]:
        """Workers > 1: worker index -> pid of the worker running now (from the supervisor's log)."""
        pids: dict[int, int] = {}
        for line in self.logs().splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if entry.get("msg") == "worker started":
                pids[int(entry["worker"])] = int(entry["pid"])
        return pids


def alive(pid: int) -> bool:
    """Process ``pid`` runs (exists and is no zombie)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat").read_text() if Path(f"/proc/{pid}/stat").exists() else ""
    return " Z " not in stat


# ---------------------------------------------------------------- the services as deployed

LOOPBACK = ["localhost", "127.0.0.1"]


def start_broker(
    pki: TestPKI, workdir: Path, cert_name: str, admin_token: str, **config: object
) -> ServiceProcess:
    """The broker on 127.0.0.1: the broker protocol only for `cm`, load reports only for `agent` certificates."""
    identity = pki.issue(cert_name, LOOPBACK, role="broker")
    port = free_port()
    values: dict[str, object] = {
        "ListenAddress": "127.0.0.1",
        "ListenPort": port,
        "AdminAddress": "127.0.0.1",
        "AdminPort": free_port(),
        "SslCert": identity.cert,
        "SslKey": identity.key,
        "ClientCaCert": pki.ca,
        "Database": workdir / "broker.db",
        "AdminToken": admin_token,
        "Domains": "CORP",
        "LogLevel": "debug",
        **config,
    }
    health = f"https://127.0.0.1:{port}/health"
    return ServiceProcess("broker", workdir, values, health_url=health, identity=identity).start()


def start_agent(
    pki: TestPKI, workdir: Path, cert_name: str, name: str, address: str, broker_url: str, **config: object
) -> ServiceProcess:
    """Desktop ``name`` (hostname ``<name>.test``) on ``address``, reporting to ``broker_url``
    with its `agent` certificate; launch-session only from a `cm` certificate."""
    identity = pki.issue(cert_name, [f"{name}.test", address], role="agent")
    control = free_port()
    values: dict[str, object] = {
        "ListenAddress": address,
        "ControlPort": control,
        "SessionPort": free_port(),
        "AdminAddress": address,
        "AdminPort": free_port(),
        "SslCert": identity.cert,
        "SslKey": identity.key,
        "ClientCaCert": pki.ca,
        "Hostname": f"{name}.test",
        "AdvertiseAddress": address,
        "BrokerUrl": broker_url,
        "BrokerCaCert": pki.ca,
        "ReportInterval": 2,
        "Capacity": 50,
        "LogLevel": "debug",
        **config,
    }
    health = f"https://{address}:{control}/health"
    return ServiceProcess(
        "agent", workdir, values, config_name="agent.properties", health_url=health, identity=identity
    ).start()


def start_sg(
    pki: TestPKI, workdir: Path, cert_name: str, grant_secret: str, **config: object
) -> ServiceProcess:
    """The SG on 127.0.0.1, verifying the agents' certificates; /health on its management port."""
    identity = pki.issue(cert_name, LOOPBACK, role="sg")
    admin = free_port()
    values: dict[str, object] = {
        "ListenAddress": "127.0.0.1",
        "Port": free_port(),
        "AgentUdpSourcePort": free_port(),
        "SslCert": identity.cert,
        "SslKey": identity.key,
        "AgentCaCert": pki.ca,
        "AdminAddress": "127.0.0.1",
        "AdminPort": admin,
        "LogLevel": "debug",
        **config,
    }
    return ServiceProcess(
        "sg",
        workdir,
        values,
        config_name="SecurityGateway.conf",
        env_file={"GATEHOUSE_GRANTSECRET": grant_secret},
        health_url=f"http://127.0.0.1:{admin}/health",
        identity=identity,
    ).start()


def start_forwarder(workdir: Path, forward_to: list[tuple[str, int]], **config: object) -> ServiceProcess:
    """A forwarding SG (double-hop DMZ outer gateway) on 127.0.0.1 passing clients on to the inner
    SGs ``forward_to``: no grant secret (no cmsg.env), no certificate or key, no agent CA."""
    admin = free_port()
    values: dict[str, object] = {
        "ListenAddress": "127.0.0.1",
        "Port": free_port(),
        "ForwardTo": ",".join(f"{host}:{port}" for host, port in forward_to),
        "AdminAddress": "127.0.0.1",
        "AdminPort": admin,
        "LogLevel": "debug",
        **config,
    }
    return ServiceProcess(
        "sg",
        workdir,
        values,
        config_name="SecurityGateway.conf",
        health_url=f"http://127.0.0.1:{admin}/health",
    ).start()


def broker_admin(
    broker_url: str, token: str, ctx: ssl.SSLContext, method: str, path: str, body: object | None = None
) -> dict:
    """One call of the broker's admin API (``/api/v1`` + ``path``) with the bearer ``token``."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(
        f"{broker_url}/api/v1{path}",
        data=data,
        method=method,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, context=ctx, timeout=10) as resp:
        raw = resp.read()
    return json.loads(raw) if raw else {}


_CM_IDENTITIES: dict[int, CertFiles] = {}


def cm_identity(pki: TestPKI) -> CertFiles:
    """The CMs' `cm` role certificate (the broker and the agents accept only it), one per test CA."""
    if id(pki) not in _CM_IDENTITIES:
        _CM_IDENTITIES[id(pki)] = pki.issue("cm-identity", ["localhost"], role="cm")
    return _CM_IDENTITIES[id(pki)]


def cm_config(pki: TestPKI, certs: CertFiles, broker_url: str, **overrides: object) -> dict[str, object]:
    """A direct-mode CM serving ``certs`` on 127.0.0.1, presenting :func:`cm_identity` upstream."""
    identity = cm_identity(pki)
    return {
        "ListenAddress": "127.0.0.1",
        "ListenPort": free_port(),
        "RedirectPort": free_port(),
        "AdminAddress": "127.0.0.1",
        "AdminPort": free_port(),
        "SslCert": certs.cert,
        "SslKey": certs.key,
        "IdentityCert": identity.cert,
        "IdentityKey": identity.key,
        "BrokerUrl": broker_url,
        "BrokerCaCert": pki.ca,
        "AgentCaCert": pki.ca,
        "AgentTlsVerify": True,
        "SecurityGatewayEnabled": False,
        # Each login costs the broker one scrypt (about 0.25 s of a core, docs/security.md): 16
        # logins at once on 2 shared cores take several seconds.
        "BrokerTimeout": 15,
        "AgentTimeout": 5,
        "HostAddress": "localhost",
        "LogLevel": "debug",
        **overrides,
    }


def start_cm(workdir: Path, config: dict[str, object], grant_secret: str) -> ServiceProcess:
    return ServiceProcess(
        "cm",
        workdir,
        config,
        config_name="config.properties",
        env_file={"GATEHOUSE_GRANTSECRET": grant_secret},
        health_url=f"https://127.0.0.1:{config['ListenPort']}/health",
    ).start()
