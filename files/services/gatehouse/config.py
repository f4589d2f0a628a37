"""Key=value configuration files (config.properties, SecurityGateway.conf, cmsg.env) with env overrides.

A service reads its file, then an optional env file, then the process environment. The key ``K``
is overridden by ``GATEHOUSE_<K>`` where ``<K>`` is upper-cased with every non-alphanumeric
character replaced by ``_``.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from pathlib import Path

ENV_PREFIX = "GATEHOUSE_"
_TRUE = {"true", "yes", "1", "on"}
_FALSE = {"false", "no", "0", "off"}


MAX_WORKERS = 64  # Workers: at most this many processes per service
# WorkerHangTimeout: below this a busy worker (a burst of TLS handshakes) could be taken for a hung one.
MIN_HANG_TIMEOUT = 3.0


class ConfigError(ValueError):
    """A configuration value is missing or invalid; the message names the key."""


def env_name(key: str) -> str:
    return ENV_PREFIX + re.sub(r"[^A-Za-z0-9]", "_", key).upper()


def parse_kv(text: str, source: str = "<string>") -> dict[str, str]:
    values: dict[str, str] = {}
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line[0] in "#!":
            continue
        match = re.match(r"^([^=:\s]+)\s*[=:]\s*(.*)$", line)
        if not match:
            raise ConfigError(f"{source}:{lineno}: expected key=value, got {raw!r}")
        value = match.group(2).strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[match.group(1)] = value
    return values


def read_kv_file(path: str | os.PathLike[str]) -> dict[str, str]:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"configuration file {p} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"cannot read configuration file {p}: {exc.strerror}") from None
    return parse_kv(text, str(p))


class Config:
    """Typed access to merged configuration values; every getter names the key in its error."""

    def __init__(self, values: Mapping[str, str], environ: Mapping[str, str] | None = None) -> None:
        self._values = dict(values)
        self._environ = dict(os.environ if environ is None else environ)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str] | None,
        env_file: str | os.PathLike[str] | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> Config:
        values: dict[str, str] = {}
        if path:
            values.update(read_kv_file(path))
        environ = dict(os.environ if environ is None else environ)
        if env_file:
            # Entries of an env file are GATEHOUSE_* names; the process environment wins over them.
            for name, value in read_kv_file(env_file).items():
                environ.setdefault(name, value)
        return cls(values, environ)

    def raw(self, key: str) -> str | None:
        name = env_name(key)
        if name in self._environ:
            return self._environ[name]
        return self._values.get(key)

    def str(self, key: str, default: str | None = None, *, required: bool = False) -> str:
        value = self.raw(key)
        if value is None or value == "":
            if required:
                raise ConfigError(f"{key} is required (set it in the configuration file or {env_name(key)})")
            return "" if default is None else default
        return value

    def int(self, key: str, default: int, *, minimum: int | None = None, maximum: int | None = None) -> int:
        value = self.raw(key)
        if value is None or value == "":
            return default
        try:
            number = int(value)
        except ValueError:
            raise ConfigError(f"{key} must be an integer, got {value!r}") from None
        if minimum is not None and number < minimum:
            raise ConfigError(f"{key} must be at least {minimum}, got {number}")
        if maximum is not None and number > maximum:
            raise ConfigError(f"{key} must be at most {maximum}, got {number}")
        return number

    def float(self, key: str, default: float, *, minimum: float = 0.0, maximum: float | None = None) -> float:
        value = self.raw(key)
        if value is None or value == "":
            return default
        try:
            number = float(value)
        except ValueError:
            raise ConfigError(f"{key} must be a number, got {value!r}") from None
        if number < minimum:
            raise ConfigError(f"{key} must be at least {minimum}, got {number}")
        # "not <=" also refuses nan and inf, which compare false with anything.
        if maximum is not None and not number <= maximum:
            raise ConfigError(f"{key} must be at most {maximum}, got {number}")
        return number

    def bool(self, key: str, default: bool) -> bool:
        value = self.raw(key)
        if value is None or value == "":
            return default
        lowered = value.strip().lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        raise ConfigError(f"{key} must be true or false, got {value!r}")

    def list(self, key: str) -> list[str]:
        value = self.raw(key) or ""
        return [item.strip() for item in value.split(",") if item.strip()]

    def networks(self, key: str) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        nets = []
        for item in self.list(key):
            try:
                nets.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                raise ConfigError(f"{key}: {item!r} is not an IP network") from None
        return nets

    def client_ca(self, signs: str) -> tuple[str, bool]:
        """``ClientCaCert`` and ``ClientTlsVerify`` (default true) of a server that checks its callers'
        certificates: verifying needs the CA; ``signs`` names the certificates it signs, for the error."""
        ca = self.str("ClientCaCert")
        verify = self.bool("ClientTlsVerify", True)
        if verify and not ca:
            raise ConfigError(
                f"ClientCaCert is required while ClientTlsVerify is true (the deployment CA that signs {signs})"
            )
        return ca, verify

    def log_level(self) -> str:
        level = self.str("LogLevel", "info").lower()
        if level not in {"debug", "info", "warn", "warning", "error"}:
            raise ConfigError(f"LogLevel must be debug, info, warn or error, got {level!r}")
        return level

    def workers(self) -> int:
        """``Workers``: the service's worker processes (gatehouse/workers.py); 0, the default, is
        one per CPU this process may run on (its affinity, which a container's cpuset limits)."""
        workers = self.int("Workers", 0, minimum=0, maximum=MAX_WORKERS)
        return workers or available_cpus()

    def worker_hang_timeout(self) -> float:
        """``WorkerHangTimeout``: seconds a worker may leave the supervisor's probes unanswered
        before it is killed and started again (gatehouse/workers.py); 0 turns the watchdog off."""
        timeout = self.float("WorkerHangTimeout", 30.0, maximum=3600.0)
        if 0 < timeout < MIN_HANG_TIMEOUT:
            raise ConfigError(
                f"WorkerHangTimeout must be 0 (off) or at least {MIN_HANG_TIMEOUT:g}, got {timeout:g}"
            )
        return timeout


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity), at most MAX_WORKERS."""
    return max(1, min(len(os.sched_getaffinity(0)), MAX_WORKERS))
