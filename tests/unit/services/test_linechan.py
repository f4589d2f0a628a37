"""The CONNECT line in front of relayed session channels."""

from __future__ import annotations

import pytest

from gatehouse.linechan import (
    BAD_GATEWAY,
    FORBIDDEN,
    MAX_LINE,
    OK,
    LineError,
    connect_line,
    parse_connect_line,
)


def test_round_trip() -> None:
    line = connect_line("g1.abc-DEF_123")
    assert line == b"CONNECT g1.abc-DEF_123\r\n"
    assert parse_connect_line(line) == "g1.abc-DEF_123"


@pytest.mark.parametrize("line", [b"CONNECT tag\r\n", b"CONNECT tag\n", b"CONNECT tag", b"CONNECT  tag \r\n"])
def test_line_endings_and_spacing(line: bytes) -> None:
    assert parse_connect_line(line) == "tag"


@pytest.mark.parametrize(
    "line",
    [
        b"",
        b"\r\n",
        b"CONNECT\r\n",
        b"CONNECT \r\n",
        b"connect tag\r\n",
        b"GET / HTTP/1.1\r\n",
        b"CONNECT two tags\r\n",
        "CONNECT t\u00e4g\r\n".encode(),
        b"CONNECT \xff\xfe\r\n",
    ],
)
def test_refused(line: bytes) -> None:
    with pytest.raises(LineError):
        parse_connect_line(line)


def test_line_cap() -> None:
    assert parse_connect_line(b"CONNECT " + b"a" * (MAX_LINE - 10))
    with pytest.raises(LineError, match="too long"):
        parse_connect_line(b"CONNECT " + b"a" * MAX_LINE)


def test_answers_are_single_crlf_lines() -> None:
    for answer in (OK, FORBIDDEN, BAD_GATEWAY):
        assert answer.endswith(b"\r\n") and answer.count(b"\n") == 1
    assert OK == b"200 OK\r\n"
    assert FORBIDDEN == b"403 Forbidden\r\n"
    assert BAD_GATEWAY == b"502 Bad Gateway\r\n"
