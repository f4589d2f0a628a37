# Copyright (c) Gatehouse contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""A real HALB pair for the tests and the benchmarks: two gatehouse/halb containers deployed by the
halb module on a private Docker network that the pair creates (a free 10.199.x.0/24) and removes,
and two HTTPS backends. The host reaches the VIP through the network's bridge.
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import os
import shutil
import ssl
import subprocess
import sys
import time
import uuid
from pathlib import Path

import docker

REPO = Path(__file__).resolve().parents[2]
HALB_IMAGE = os.environ.get("GATEHOUSE_HALB_IMAGE", "gatehouse/halb:0.1.0")
BASE_IMAGE = os.environ.get("GATEHOUSE_BASE_IMAGE", "gatehouse/base:0.1.0")
# Another interval can be measured with GATEHOUSE_HALB_ADVERT_INT=1 (keepalived's default).
ADVERT_INT = float(os.environ.get("GATEHOUSE_HALB_ADVERT_INT", "0.1"))


def docker_client():
    try:
        client = docker.from_env()
        client.ping()
    except Exception:
        return None
    return client


def image_id(client, image: str) -> str | None:
    try:
        return client.images.get(image).id
    except docker.errors.ImageNotFound:
        return None


# A small HTTPS server for the backends: /health answers 200, every answer names the backend and
# echoes the X-Forwarded-For it saw; other paths set a JSESSIONID cookie like the CM does.
BACKEND_SERVER = r"""
import http.server, os, ssl, uuid
NAME = os.environ["BACKEND_NAME"]
class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        body = (NAME + "\n").encode()
        self.send_response(200)
        if self.path != "/health" and "JSESSIONID=" not in (self.headers.get("Cookie") or ""):
            self.send_header("Set-Cookie", "JSESSIONID=%s; Secure; HttpOnly; Path=/" % uuid.uuid4())
        self.send_header("X-Backend", NAME)
        self.send_header("X-Seen-Forwarded-For", ",".join(self.headers.get_all("X-Forwarded-For") or []))
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    def get_request(self):
        sock, addr = self.socket.accept()
        return CTX.wrap_socket(sock, server_side=True, do_handshake_on_connect=False), addr
CTX = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
CTX.load_cert_chain("/tls/cert.pem", "/tls/key.pem")
Server(("0.0.0.0", 8443), Handler).serve_forever()
"""


def free_subnet(client) -> ipaddress.IPv4Network:
    used = []
    for net in client.networks.list():
        for cfg in (net.attrs.get("IPAM") or {}).get("Config") or []:
            if cfg.get("Subnet"):
                used.append(ipaddress.ip_network(cfg["Subnet"], strict=False))
    routes = subprocess.run(["ip", "-4", "route"], capture_output=True, text=True, check=False).stdout
    for line in routes.splitlines():
        word = line.split()[0]
        if "/" in word:
            used.append(ipaddress.ip_network(word, strict=False))
    for third in range(10, 250):
        candidate = ipaddress.ip_network(f"10.199.{third}.0/24")
        if not any(candidate.overlaps(u) for u in used):
            return candidate
    raise RuntimeError("no free 10.199.x.0/24 network")


class Pair:
    """The test topology and helpers to drive it."""

    def __init__(self, client, tmp: Path, pki, advert_int: float = ADVERT_INT) -> None:
        self.advert_int = advert_int  # VRRP advertisement interval (s) of the next deploy
        self.client = client
        self.tmp = tmp
        self.pki = pki
        self.prefix = f"gh-halbtest-{uuid.uuid4().hex[:8]}"
        self.subnet = free_subnet(client)
        hosts = list(self.subnet.hosts())
        self.gateway = str(hosts[0])
        self.node_ip = {"halb1": str(hosts[10]), "halb2": str(hosts[11])}
        self.backend_ip = {"be1": str(hosts[20]), "be2": str(hosts[21])}
        self.vip = str(hosts[99])
        self.network_name = self.prefix + "-net"
        self.names: list[str] = []
        self.network = None
        self.collections = tmp / "collections"
        self.extra_options: list[str] = []
        self.states = {"be1": "enabled", "be2": "enabled"}
        # Pinned by id: a rebuild of the tag while the test runs must not swap the image under it.
        self.halb_image = image_id(client, HALB_IMAGE)
        # The backends need python3: gatehouse/base has it, and so has the halb image built on it.
        self.backend_image = image_id(client, BASE_IMAGE) or self.halb_image

    # --- set-up and tear-down -------------------------------------------------------------
    def start(self) -> None:
        ipam = docker.types.IPAMConfig(
            pool_configs=[docker.types.IPAMPool(subnet=str(self.subnet), gateway=self.gateway)]
        )
        self.network = self.client.networks.create(self.network_name, driver="bridge", ipam=ipam)
        link = self.collections / "ansible_collections" / "gatehouse"
        link.mkdir(parents=True)
        (link / "access").symlink_to(REPO)
        vip_tls = self.pki.issue("halb-vip", [self.vip])
        self.vip_cert, self.vip_key = str(vip_tls.cert), str(vip_tls.key)
        for name, address in self.backend_ip.items():
            tls = self.pki.issue(name, [address])
            tls_dir = self.tmp / ("tls-" + name)
            tls_dir.mkdir()
            shutil.copy(tls.cert, tls_dir / "cert.pem")
            shutil.copy(tls.key, tls_dir / "key.pem")
            (tls_dir / "key.pem").chmod(0o644)
            (tls_dir / "server.py").write_text(BACKEND_SERVER)
            cname = f"{self.prefix}-{name}"
            self.names.append(cname)
            self.client.api.create_container(
                self.backend_image,
                name=cname,
                entrypoint=["python3", "/tls/server.py"],
                environment={"BACKEND_NAME": name},
                labels={"gatehouse.test": self.prefix},
                host_config=self.client.api.create_host_config(
                    binds={str(tls_dir): {"bind": "/tls", "mode": "ro"}}, network_mode=self.network_name
                ),
                networking_config=self.client.api.create_networking_config(
                    {self.network_name: self.client.api.create_endpoint_config(ipv4_address=address)}
                ),
            )
            self.client.api.start(cname)
        for name in self.backend_ip:
            wait_for(lambda n=name: self.direct_name(n) == n, 20, f"backend {name} to answer")
        self.first_runs: dict[str, dict] = {}
        for node in ("halb1", "halb2"):
            self.names.append(self.container_name(node))
            result = self.deploy(node, check=True)
            assert result["changed"] is True and not self.config_dir(node).exists(), result
            result = self.deploy(node)
            assert result["changed"] is True, result
            self.first_runs[node] = result
        self.wait_master("halb1")

    def stop(self) -> None:
        # Validation containers (<container_name>-validate) remove themselves; an interrupted run
        # can leave one.
        for name in self.names + [n + "-validate" for n in self.names]:
            try:
                self.client.containers.get(name).remove(force=True)
            except docker.errors.NotFound:
                pass
        if self.network is not None:
            self.network.remove()

    # --- the module ------------------------------------------------------------------------
    def container_name(self, node: str) -> str:
        return f"{self.prefix}-{node}"

    def config_dir(self, node: str) -> Path:
        return self.tmp / node

    def params(self, node: str) -> dict:
        other = "halb2" if node == "halb1" else "halb1"
        backends = [
            {"name": name, "address": address, "port": 8443, "state": self.states[name]}
            for name, address in self.backend_ip.items()
        ]
        return {
            "node_name": node,
            "config_dir": str(self.config_dir(node)),
            "container_name": self.container_name(node),
            "image": self.halb_image,
            "network_mode": self.network_name,
            "ipv4_address": self.node_ip[node],
            "vrrp": {
                "router_id": 51,
                "priority": 150 if node == "halb1" else 100,
                "peers": [self.node_ip[other]],
                "unicast_src_ip": self.node_ip[node],
                "advert_int": self.advert_int,
                "vips": [f"{self.vip}/{self.subnet.prefixlen}"],
            },
            "stick_table_peers": [{"name": n, "address": a} for n, a in self.node_ip.items()],
            "virtual_servers": [
                {
                    "name": "web",
                    "vip": self.vip,
                    "port": 443,
                    "mode": "http",
                    "tls_cert": self.vip_cert,
                    "tls_key": self.vip_key,
                    "persistence": "cookie",
                    "health_check": {"interval": "500ms", "rise": 1, "fall": 2},
                    # backend_tls_verify is required by default: the backends' certificates come
                    # from the test CA.
                    "backend_ca_file": str(self.pki.ca),
                    "backends": backends,
                },
                {
                    "name": "sticky",
                    "vip": self.vip,
                    "port": 4443,
                    "mode": "tcp",
                    "persistence": "source",
                    "health_check": {"interval": "500ms", "rise": 1, "fall": 2},
                    "backend_ca_file": str(self.pki.ca),
                    "haproxy_options": list(self.extra_options),
                    "backends": backends,
                },
                {
                    "name": "spread",
                    "vip": self.vip,
                    "port": 4444,
                    "mode": "tcp",
                    "persistence": "none",
                    "health_check": {"interval": "500ms", "rise": 1, "fall": 2},
                    "backend_ca_file": str(self.pki.ca),
                    "backends": backends,
                },
            ],
        }

    def deploy(
        self, node: str, params: dict | None = None, check: bool = False, expect_failure: bool = False
    ) -> dict:
        params = params if params is not None else self.params(node)
        work = self.tmp / ("play-" + uuid.uuid4().hex[:6])
        work.mkdir()
        (work / "vars.json").write_text(json.dumps({"halb_params": params}))
        (work / "play.yml").write_text(
            "- hosts: localhost\n  gather_facts: false\n  tasks:\n"
            "    - name: HALB node\n      gatehouse.access.halb: '{{ halb_params }}'\n      register: out\n"
        )
        env = dict(
            os.environ,
            ANSIBLE_COLLECTIONS_PATH=str(self.collections),
            ANSIBLE_STDOUT_CALLBACK="json",
            ANSIBLE_LOCALHOST_WARNING="false",
            ANSIBLE_INVENTORY_UNPARSED_WARNING="false",
        )
        argv = [
            str(Path(sys.executable).parent / "ansible-playbook"),
            "-i",
            "localhost,",
            "-c",
            "local",
            "-e",
            f"ansible_python_interpreter={sys.executable}",
            "-e",
            "@%s" % (work / "vars.json"),
            str(work / "play.yml"),
        ]
        if check:
            argv += ["--check", "--diff"]
        proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=180, check=False)
        try:
            report = json.loads(proc.stdout)
            result = report["plays"][0]["tasks"][0]["hosts"]["localhost"]
        except (ValueError, KeyError, IndexError):
            raise AssertionError(f"ansible-playbook output:\n{proc.stdout}\n{proc.stderr}") from None
        if expect_failure:
            assert result.get("failed"), result
        else:
            assert not result.get("failed"), result.get("msg")
        return result

    # --- observations --------------------------------------------------------------------
    def vip_holders(self) -> list[str]:
        holders = []
        for node in ("halb1", "halb2"):
            try:
                container = self.client.containers.get(self.container_name(node))
            except docker.errors.NotFound:
                continue
            if container.status != "running":
                continue
            try:
                code, out = container.exec_run(["ip", "-o", "-4", "addr", "show", "dev", "eth0"])
            except docker.errors.APIError:
                continue  # restarting right now: holds nothing
            if code == 0 and (f" {self.vip}/") in out.decode():
                holders.append(node)
        return holders

    def logs(self) -> str:
        out = []
        for name in ("halb1", "halb2"):
            try:
                text = self.client.containers.get(self.container_name(name)).logs(tail=25).decode()
            except docker.errors.NotFound:
                text = "(no container)"
            out.append(f"--- {name}:\n{text}")
        return "\n".join(out)

    def wait_master(self, node: str, timeout: float = 30.0) -> None:
        try:
            wait_for(lambda: self.vip_holders() == [node], timeout, f"the VIP on {node} only")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; holders {self.vip_holders()}\n{self.logs()}") from None
        wait_for(lambda: self.via_vip(4444) is not None, timeout, "the VIP to serve")

    def tls_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.pki.ca))
        # The tcp virtual servers pass the backends' own certificates through.
        ctx.check_hostname = False
        return ctx

    def direct_name(self, backend: str) -> str | None:
        return get_name(self.backend_ip[backend], 8443, self.tls_context(), "/health")

    def via_vip(self, port: int, path: str = "/health", timeout: float = 1.0) -> str | None:
        return get_name(self.vip, port, self.tls_context(), path, timeout)

    def kill(self, node: str, how: str) -> str:
        """Kill the node (or HAProxy in it); returns the StartedAt of the killed instance."""
        container = self.client.containers.get(self.container_name(node))
        started = container.attrs["State"]["StartedAt"]
        if how == "haproxy":
            code, out = container.exec_run(["sh", "-c", 'kill -KILL "$(cat /run/haproxy.pid)"'])
            assert code == 0, out
        else:
            container.kill(signal=how)
        return started

    def ensure_running(self, node: str, killed_started_at: str) -> None:
        """Wait until the killed instance is gone and a new one runs (restart policy or docker start)."""
        container = self.client.containers.get(self.container_name(node))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            container.reload()
            state = container.attrs["State"]
            if state["Status"] == "running" and state["StartedAt"] != killed_started_at:
                return
            if state["Status"] in ("exited", "created"):
                # docker kill counts as a manual stop; the restart policy does not bring it back.
                try:
                    container.start()
                except docker.errors.APIError:
                    pass
            time.sleep(0.2)
        raise AssertionError(f"{node} did not come back")


def get_name(host: str, port: int, ctx: ssl.SSLContext, path: str, timeout: float = 1.0) -> str | None:
    """GET over a new TLS connection; the backend name or None on any failure."""
    conn = http.client.HTTPSConnection(host, port, context=ctx, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        body = response.read().decode().strip()
        return body if response.status == 200 else None
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()


def wait_for(predicate, timeout: float, what: str, interval: float = 0.1) -> float:
    start = time.monotonic()
    for _attempt in range(int(timeout / interval) + 1):
        if predicate():
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            break
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
