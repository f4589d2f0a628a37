"""Start Gatehouse services as real processes on loopback for integration tests.

`ServiceProcess` writes a config file, runs `python -m gatehouse.<svc>`, waits for `/health`,
keeps the log lines (for the no-secrets-in-logs checks) and stops with SIGTERM.
"""

from __future__ import annotations

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


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """A port free for both TCP and UDP on 127.0.0.1 (the SG and agent use the same number for both).

    Picked below the kernel's ephemeral range (net.ipv4.ip_local_port_range, 32768 and up by
    default): a port the kernel handed out with bind(0) can be handed out again to another
    process's outgoing connection before the service under test binds it.
    """
    rng = random.SystemRandom()
    while True:
        port = rng.randrange(20000, 32000)
        try:
            with (
                socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp,
                socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp,
            ):
                tcp.bind(("127.0.0.1", port))
                udp.bind(("127.0.0.1", port))
        except OSError:
            continue
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
    ) -> None:
        self.service = service
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
