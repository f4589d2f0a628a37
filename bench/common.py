"""What every benchmark shares: results, limits, test PKI, service processes, the HAProxy reference."""

from __future__ import annotations

import json
import os
import resource
import secrets
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [
    str(ROOT / "tests"),
    str(ROOT / "tests" / "integration"),  # the helpers beside the tests, never a test module
]

from pki import CertFiles, TestPKI  # noqa: E402
from services import ServiceProcess, cm_config, free_port, start_broker, start_cm, write_kv  # noqa: E402

from gatehouse import tls  # noqa: E402
from gatehouse.grant import generate_secret  # noqa: E402

__all__ = ["CertFiles", "ServiceProcess", "TestPKI", "free_port"]

HALB_IMAGE = os.environ.get("GATEHOUSE_HALB_IMAGE", "gatehouse/halb:0.1.0")
SG_IMAGE = os.environ.get("GATEHOUSE_SG_IMAGE", "gatehouse/sg:0.1.0")
# Every Docker object a benchmark creates starts with this.
PREFIX = os.environ.get("GATEHOUSE_BENCH_PREFIX", "gh-bench-")


@dataclass
class Figure:
    """One line of the table: ``value`` compared with ``reference`` and a goal on one of them."""

    name: str
    unit: str
    value: float | None
    reference: float | None = None
    reference_name: str = ""
    goal: str = ""  # e.g. "ratio >= 0.8", "value <= 100", "" (reported only)
    met: bool | None = None
    note: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        if self.value is None or not self.reference:
            return None
        return self.value / self.reference

    def judge(self) -> Figure:
        """Set ``met`` from ``goal`` ("ratio|value <op> number")."""
        if not self.goal or self.value is None:
            return self
        what, op, number = self.goal.split()
        got = self.ratio if what == "ratio" else self.value
        if got is None:
            return self
        limit = float(number)
        self.met = {">=": got >= limit, "<=": got <= limit, "==": got == limit}[op]
        return self

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["ratio"] = self.ratio
        return data


def not_measured(name: str, reason: str) -> Figure:
    # One line: the reason goes into a Markdown table row.
    return Figure(name, "", None, note="not measured: " + " ".join(reason.split()))


def raise_nofile() -> int:
    """Soft RLIMIT_NOFILE = hard, inherited by every process started from here."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages (recorded with every figure: other load skews ratios)."""
    return [round(x, 2) for x in os.getloadavg()]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (and its waited-for children) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = sum(int(x) for x in fields[11:15])
    return ticks / os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(pid: int) -> float:
    """:func:`cpu_seconds` of a process and of its live children (an SG's supervisor and workers)."""
    children = Path(f"/proc/{pid}/task/{pid}/children")
    kids = children.read_text().split() if children.exists() else []
    return cpu_seconds(pid) + sum(cpu_seconds(int(kid)) for kid in kids)


def sg_config(
    port: int, admin: int, cert: str, key: str, ca: str, overrides: dict[str, object]
) -> dict[str, object]:
    """The bench SG's configuration, whether it runs as a process or in its image."""
    config: dict[str, object] = {
        "ListenAddress": "127.0.0.1",
        "Port": port,
        "AgentUdpSourcePort": free_port(),
        "SslCert": cert,
        "SslKey": key,
        "AdminAddress": "127.0.0.1",
        "AdminPort": admin,
        "MaxConnections": 20000,
        "MaxConnectionsPerSource": 20000,  # every benchmark client comes from 127.0.0.1
        # One process (the SG's default is a worker per CPU): the relay figures compare it with a
        # one-thread HAProxy. bench.sg_workers measures Workers above 1.
        "Workers": 1,
        "AgentCaCert": ca,
        "LogLevel": "warn",
    }
    config.update(overrides)
    return config


@dataclass
class BrokerBehindCm:
    """A broker process with local users behind a direct-mode CM (Bench.start_broker_behind_cm)."""

    broker: ServiceProcess
    cm: ServiceProcess
    url: str  # the CM's broker protocol, where bench.cmload's clients log in (envelope pcoip-client)
    users: list[list[str]]  # [user, password, domain] of each user, as bench.cmload takes them


class Bench:
    """A scratch directory, a PKI and the processes and containers of one benchmark."""

    def __init__(self, work: Path, quick: bool) -> None:
        self.work = work
        self.quick = quick
        self.pki = TestPKI(work / "pki")
        self.cert = self.pki.issue("srv", ["localhost", "127.0.0.1"])
        # What a CM presents to agents (launch-session accepts only the cm role).
        self.cm_identity = self.pki.issue("cm-identity", ["localhost"], role="cm")
        self.secret = generate_secret()
        self.procs: list[ServiceProcess] = []
        self.containers: list[str] = []

    def client_ctx(self, role: str = "sg"):
        return tls.client_context(self.pki.ca, verify=False, role=role)

    def start_agent(self, name: str = "agent", **overrides: object) -> tuple[ServiceProcess, int, int]:
        ctl, session = free_port(), free_port()
        config: dict[str, object] = {
            "ListenAddress": "127.0.0.1",
            "ControlPort": ctl,
            "SessionPort": session,
            "SslCert": self.cert.cert,
            "SslKey": self.cert.key,
            "AdvertiseAddress": "127.0.0.1",
            "Hostname": name,
            "ClientCaCert": self.pki.ca,
            "Capacity": 10000,
            "SessionTagTtl": 600,
            "AdminPort": 0,
            "LogLevel": "warn",
        }
        config.update(overrides)
        proc = ServiceProcess(
            "agent", self.work / name, config, health_url=f"https://127.0.0.1:{ctl}/health"
        ).start()
        self.procs.append(proc)
        return proc, ctl, session

    def start_broker_behind_cm(
        self,
        name: str,
        users: Sequence[str],
        domain: str = "LAB",
        database_url: str = "",
        database_password: str = "",
    ) -> BrokerBehindCm:
        """A broker process (bench-<name>; on SQLite, or on ``database_url`` with ``database_password``;
        no login throttle) with ``users`` of ``domain`` made through its admin API, each with a new
        password, behind a direct-mode CM that takes every client from 127.0.0.1."""
        import identity_helpers  # the identity tests' broker settings (its module needs the Docker SDK)

        database: dict[str, object] = {}
        if database_url:
            password_file = self.work / f"database-{name}.password"
            password_file.write_text(database_password + "\n")
            password_file.chmod(0o600)
            database = {"Database": database_url, "DatabasePasswordFile": password_file}
        broker = start_broker(
            self.pki,
            self.work / f"broker-{name}",
            f"bench-{name}",
            identity_helpers.ADMIN_TOKEN,
            Domains=domain,
            LogLevel="warn",
            **identity_helpers.NO_THROTTLE,
            **database,
        )
        self.procs.append(broker)
        made = []
        for user in users:
            password = f"{user}-{secrets.token_urlsafe(12)}"
            identity_helpers.admin(broker, self.pki, "PUT", f"/users/{domain}/{user}", {"password": password})
            made.append([user, password, domain])
        config = cm_config(
            self.pki,
            self.cert,
            f"https://127.0.0.1:{broker.config['ListenPort']}",
            MaxPreAuthSessionsPerSource=1000,  # every client comes from 127.0.0.1
            MaxConnectionsPerSource=1000,
            BrokerTimeout=30,
            LogLevel="warn",
        )
        cm = start_cm(self.work / f"cm-{name}", config, self.secret)
        self.procs.append(cm)
        return BrokerBehindCm(broker, cm, f"https://127.0.0.1:{config['ListenPort']}/pcoip-broker/xml", made)

    def start_sg(self, **overrides: object) -> tuple[ServiceProcess, int]:
        port, admin = free_port(), free_port()
        config = sg_config(port, admin, str(self.cert.cert), str(self.cert.key), str(self.pki.ca), overrides)
        proc = ServiceProcess(
            "sg",
            self.work / "sg",
            config,
            config_name="SecurityGateway.conf",
            env_file={"GATEHOUSE_GRANTSECRET": self.secret},
            health_url=f"http://127.0.0.1:{admin}/health",
        ).start()
        self.procs.append(proc)
        return proc, port

    @contextmanager
    def sg_container(self, **overrides: object) -> Iterator[tuple[int, int]]:
        """The SG of the gatehouse/sg image on the host network, as HAProxy runs (yields port, pid).

        Subject and reference then share a process model: each a container of its own (its own
        cgroup) on the host network, started the same way; only the program differs.
        """
        port, admin = free_port(), free_port()
        data = self.work / f"sg-ctr-{uuid.uuid4().hex[:6]}"
        data.mkdir(mode=0o755)
        for name, source in (
            ("cert.pem", self.cert.cert),
            ("key.pem", self.cert.key),
            ("ca.pem", self.pki.ca),
        ):
            (data / name).write_bytes(Path(source).read_bytes())
            (data / name).chmod(0o644)  # the image's service user reads them (a throwaway bench key)
        config = sg_config(port, admin, "/data/cert.pem", "/data/key.pem", "/data/ca.pem", overrides)
        write_kv(data / "SecurityGateway.conf", config)
        write_kv(data / "cmsg.env", {"GATEHOUSE_GRANTSECRET": self.secret})
        for name in ("SecurityGateway.conf", "cmsg.env"):
            (data / name).chmod(0o644)
        with self._container("sg", SG_IMAGE, ["-v", f"{data}:/data:ro"], []) as name:
            wait_port(port, name)
            yield port, service_pid(name)

    @contextmanager
    def haproxy(self, config: str, files: dict[str, bytes] | None = None) -> Iterator[str]:
        """HAProxy of the halb image on the host network with ``config`` (container name yielded)."""
        cfg = self.work / f"haproxy-{uuid.uuid4().hex[:6]}"
        cfg.mkdir()
        (cfg / "haproxy.cfg").write_text(config)
        for name, data in (files or {}).items():
            (cfg / name).write_bytes(data)
        with self._container(
            "haproxy",
            HALB_IMAGE,
            ["-v", f"{cfg}:/cfg:ro", "--entrypoint", "haproxy"],
            ["-db", "-f", "/cfg/haproxy.cfg"],
        ) as name:
            yield name

    @contextmanager
    def _container(self, what: str, image: str, options: list[str], args: list[str]) -> Iterator[str]:
        """``docker run`` of a relay on the host network with the bench's open-files limit (name yielded)."""
        name = f"{PREFIX}{what}-{uuid.uuid4().hex[:8]}"
        started = subprocess.run(
            [
                "docker",
                "run",
                "-d",
                "--name",
                name,
                "--network",
                "host",
                "--ulimit",
                "nofile=16384:16384",
                "--label",
                f"gatehouse.bench={what}",
                *options,
                image,
                *args,
            ],
            check=False,
            capture_output=True,
            text=True,
            timeout=60,
        )
        if started.returncode != 0:
            raise RuntimeError(f"{what} ({image}) did not start: {started.stderr.strip()[-500:]}")
        self.containers.append(name)
        try:
            yield name
        finally:
            remove_container(name)
            self.containers.remove(name)

    def close(self) -> None:
        for proc in reversed(self.procs):
            try:
                proc.stop(timeout=10)
            except Exception as exc:  # one stuck process must not leave the others running
                print(f"  stopping {proc.service}: {exc}", file=sys.stderr)
                proc.kill()
        for name in list(self.containers):
            remove_container(name)


def remove_container(name: str) -> None:
    subprocess.run(["docker", "rm", "-f", name], capture_output=True, timeout=60, check=False)


def container_pid(name: str) -> int:
    out = subprocess.run(
        ["docker", "inspect", "-f", "{{.State.Pid}}", name], capture_output=True, text=True, check=True
    )
    return int(out.stdout.strip())


def service_pid(name: str) -> int:
    """The program's pid in a container: the child of its init (tini) where there is one."""
    pid = container_pid(name)
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return int(children[0]) if children else pid


def wait_port(port: int, container: str | None = None, timeout: float = 20.0) -> None:
    """Wait until something listens on 127.0.0.1:port (failing early, with its log, if ``container`` exits)."""
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        if container:
            state = subprocess.run(
                ["docker", "inspect", "-f", "{{.State.Running}}", container], capture_output=True, text=True
            )
            if state.stdout.strip() != "true":
                logs = subprocess.run(["docker", "logs", container], capture_output=True, text=True)
                raise RuntimeError(f"{container} exited: {(logs.stdout + logs.stderr)[-800:]}")
        time.sleep(0.1)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")


def run_json(cmd: list[str], stdin: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run a load generator (``python -m bench.x``) that reads JSON on stdin and prints JSON."""
    proc = subprocess.run(
        cmd, input=json.dumps(stdin), capture_output=True, text=True, timeout=timeout, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def haproxy_pem(cert: CertFiles) -> bytes:
    return cert.cert.read_bytes() + cert.key.read_bytes()


HAPROXY_GLOBAL = f"""global
    maxconn 8000
    ssl-default-bind-ciphers {tls.SG_CIPHERS}
    ssl-default-bind-options ssl-min-ver TLSv1.2
    ssl-default-server-options ssl-min-ver TLSv1.2
defaults
    mode tcp
    timeout connect 5s
    timeout client 120s
    timeout server 120s
"""
