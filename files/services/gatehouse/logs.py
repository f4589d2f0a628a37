"""Structured JSON-lines logging with redaction of secrets.

Every record about a session carries ``session_id`` (36 characters). Passwords, cookies, tokens,
grants and session-tags must never be logged: fields whose names look secret are masked, and any
value registered with :func:`register_secret` is scrubbed from every message as a last line of defence.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections.abc import MutableMapping
from typing import Any

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
REDACTED = "***"
_SECRET_FIELD = re.compile(
    r"pass|secret|token|cookie|grant|session_tag|connect_tag|authorization|jsessionid|private_key", re.I
)
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}
_secrets: set[str] = set()


def register_secret(value: str | bytes | None) -> None:
    """Scrub this exact value from every later log line (shared keys, admin tokens, grants)."""
    if not value:
        return
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
    if len(text) >= 6:
        _secrets.add(text)


def forget_secret(value: str | None) -> None:
    if value:
        _secrets.discard(value)


def scrub(text: str) -> str:
    for secret in _secrets:
        if secret in text:
            text = text.replace(secret, REDACTED)
    return text


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": logging.getLevelName(record.levelno).lower().replace("warning", "warn"),
            "service": self.service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for name, value in record.__dict__.items():
            if name in _STANDARD or name.startswith("_"):
                continue
            entry[name] = REDACTED if _SECRET_FIELD.search(name) and name != "session_id" else value
        if record.exc_info and record.levelno >= logging.ERROR:
            # Exception type and message only: tracebacks can carry request bodies.
            exc = record.exc_info[1]
            entry["error"] = f"{type(exc).__name__}: {exc}"
        return scrub(json.dumps(entry, default=str, ensure_ascii=False))


def setup(service: str, level: str = "info", stream: Any = None) -> logging.Logger:
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.setFormatter(JsonFormatter(service))
    root.addHandler(handler)
    root.setLevel(LEVELS.get(level.lower(), logging.INFO))
    # aiohttp's access log would print cookies and query strings; ours logs what is needed.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    return logging.getLogger(f"gatehouse.{service}")


class SessionLogger(logging.LoggerAdapter):
    """A logger whose every line carries the session id."""

    def __init__(self, logger: logging.Logger, session_id: str) -> None:
        super().__init__(logger, {"session_id": session_id})

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, MutableMapping[str, Any]]:
        extra = dict(kwargs.get("extra") or {})
        extra["session_id"] = self.extra["session_id"] if self.extra else None
        kwargs["extra"] = extra
        return msg, kwargs
