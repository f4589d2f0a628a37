"""JSON logs: secret fields masked, registered secrets scrubbed, the session id carried."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from gatehouse import logs

SID = "3b241101-e2bb-4255-8caf-4136c566a962"


@pytest.fixture
def capture() -> Iterator[io.StringIO]:
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    stream = io.StringIO()
    logs.setup("test", "debug", stream=stream)
    yield stream
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in saved_handlers:
        root.addHandler(handler)
    root.setLevel(saved_level)


def _lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


def test_json_line_shape(capture: io.StringIO) -> None:
    logging.getLogger("gatehouse.test").info("hello %s", "world", extra={"port": 4172})
    (entry,) = _lines(capture)
    assert entry["msg"] == "hello world"
    assert entry["service"] == "test"
    assert entry["level"] == "info"
    assert entry["port"] == 4172
    assert str(entry["ts"]).endswith("Z")


@pytest.mark.parametrize(
    "field",
    [
        "password",
        "admin_token",
        "cookie",
        "grant",
        "session_tag",
        "connect_tag",
        "Authorization",
        "JSESSIONID",
    ],
)
def test_secret_fields_are_masked(capture: io.StringIO, field: str) -> None:
    logging.getLogger("gatehouse.test").info("x", extra={field: "value-that-must-not-appear"})
    assert "value-that-must-not-appear" not in capture.getvalue()
    assert _lines(capture)[0][field] == logs.REDACTED


def test_registered_secret_is_scrubbed_everywhere(capture: io.StringIO) -> None:
    secret = "tok-2f9d1c5e8a7b"
    logs.register_secret(secret)
    try:
        log = logging.getLogger("gatehouse.test")
        log.warning("bad header Bearer %s", secret, extra={"detail": f"x{secret}y"})
        try:
            raise ValueError(f"boom {secret}")
        except ValueError:
            log.exception("failed")
    finally:
        logs.forget_secret(secret)
    text = capture.getvalue()
    assert secret not in text
    assert text.count(logs.REDACTED) >= 3


def test_short_values_are_not_registered(capture: io.StringIO) -> None:
    logs.register_secret("abc")
    logging.getLogger("gatehouse.test").info("abc stays readable")
    assert _lines(capture)[0]["msg"] == "abc stays readable"


def test_session_logger_carries_session_id(capture: io.StringIO) -> None:
    slog = logs.SessionLogger(logging.getLogger("gatehouse.test"), SID)
    slog.info("step one")
    slog.info("step two", extra={"user": "alice"})
    entries = _lines(capture)
    assert [e["session_id"] for e in entries] == [SID, SID]
    assert entries[1]["user"] == "alice"


def test_exception_logs_no_traceback(capture: io.StringIO) -> None:
    try:
        raise RuntimeError("body was <password>x</password>")
    except RuntimeError:
        logging.getLogger("gatehouse.test").exception("request failed")
    (entry,) = _lines(capture)
    assert entry["error"].startswith("RuntimeError")
    assert "Traceback" not in capture.getvalue()


def test_level_filtering() -> None:
    stream = io.StringIO()
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    try:
        logs.setup("test", "warn", stream=stream)
        logging.getLogger("gatehouse.test").info("hidden")
        logging.getLogger("gatehouse.test").warning("shown")
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in saved_handlers:
            root.addHandler(handler)
        root.setLevel(saved_level)
    assert [e["msg"] for e in _lines(stream)] == ["shown"]
    assert _lines(stream)[0]["level"] == "warn"
