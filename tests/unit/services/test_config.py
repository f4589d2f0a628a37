"""Key=value configuration: parsing, env-file and environment overrides, typed getters and their errors."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from gatehouse.config import Config, ConfigError, env_name, parse_kv, read_kv_file


def test_parse_kv_syntax() -> None:
    text = """
# comment
! also a comment
ListenPort = 8443
BrokerUrl: https://broker:8443
Quoted="with spaces "
Single='x'
Empty=
  Indented=yes
"""
    assert parse_kv(text) == {
        "ListenPort": "8443",
        "BrokerUrl": "https://broker:8443",
        "Quoted": "with spaces ",
        "Single": "x",
        "Empty": "",
        "Indented": "yes",
    }


def test_parse_kv_error_names_source_and_line() -> None:
    with pytest.raises(ConfigError, match=r"cfg\.properties:3: expected key=value"):
        parse_kv("A=1\n\njust words\n", "cfg.properties")


def test_read_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        read_kv_file(tmp_path / "absent.properties")


def test_env_name() -> None:
    assert env_name("MaxConnections") == "GATEHOUSE_MAXCONNECTIONS"
    assert env_name("Broker.Url-x") == "GATEHOUSE_BROKER_URL_X"


def test_precedence_file_env_file_environment(tmp_path: Path) -> None:
    cfg_file = tmp_path / "svc.properties"
    cfg_file.write_text("A=file\nB=file\nC=file\n")
    env_file = tmp_path / "svc.env"
    env_file.write_text("GATEHOUSE_B=envfile\nGATEHOUSE_C=envfile\n")
    cfg = Config.load(cfg_file, env_file, environ={"GATEHOUSE_C": "environ"})
    assert (cfg.str("A"), cfg.str("B"), cfg.str("C")) == ("file", "envfile", "environ")


def test_environment_read_when_not_given(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    cfg_file = tmp_path / "svc.properties"
    cfg_file.write_text("LogLevel=info\n")
    monkeypatch.setenv("GATEHOUSE_LOGLEVEL", "debug")
    assert Config.load(cfg_file).log_level() == "debug"


def test_str_default_and_required() -> None:
    cfg = Config({"Empty": ""}, environ={})
    assert cfg.str("Missing", "dflt") == "dflt"
    assert cfg.str("Empty", "dflt") == "dflt"
    with pytest.raises(ConfigError, match=r"AdminToken is required .*GATEHOUSE_ADMINTOKEN"):
        cfg.str("AdminToken", required=True)


def test_int() -> None:
    cfg = Config({"Port": "4172", "Bad": "12x", "Low": "0"}, environ={})
    assert cfg.int("Port", 1) == 4172
    assert cfg.int("Missing", 7) == 7
    with pytest.raises(ConfigError, match="Bad must be an integer, got '12x'"):
        cfg.int("Bad", 1)
    with pytest.raises(ConfigError, match="Low must be at least 1"):
        cfg.int("Low", 1, minimum=1)
    with pytest.raises(ConfigError, match="Port must be at most 1024"):
        cfg.int("Port", 1, maximum=1024)


def test_float() -> None:
    cfg = Config({"T": "2.5", "Bad": "soon", "Neg": "-1"}, environ={})
    assert cfg.float("T", 1.0) == 2.5
    with pytest.raises(ConfigError, match="Bad must be a number"):
        cfg.float("Bad", 1.0)
    with pytest.raises(ConfigError, match="Neg must be at least 0"):
        cfg.float("Neg", 1.0)


@pytest.mark.parametrize(("raw", "expected"), [("true", True), ("FALSE", False), ("yes", True), ("0", False)])
def test_bool(raw: str, expected: bool) -> None:
    assert Config({"B": raw}, environ={}).bool("B", not expected) is expected


def test_bool_invalid() -> None:
    with pytest.raises(ConfigError, match="B must be true or false, got 'maybe'"):
        Config({"B": "maybe"}, environ={}).bool("B", True)


def test_list_and_networks() -> None:
    cfg = Config({"L": " a, b ,,c ", "N": "10.0.0.0/8, 2001:db8::/32", "BadN": "10.0.0.0/8,nope"}, environ={})
    assert cfg.list("L") == ["a", "b", "c"]
    assert cfg.list("Missing") == []
    assert cfg.networks("N") == [ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("2001:db8::/32")]
    with pytest.raises(ConfigError, match="BadN: 'nope' is not an IP network"):
        cfg.networks("BadN")


def test_log_level() -> None:
    assert Config({}, environ={}).log_level() == "info"
    assert Config({"LogLevel": "WARN"}, environ={}).log_level() == "warn"
    with pytest.raises(ConfigError, match="LogLevel must be"):
        Config({"LogLevel": "chatty"}, environ={}).log_level()


def test_environment_override_is_typed_too() -> None:
    cfg = Config({"MaxConnections": "10"}, environ={"GATEHOUSE_MAXCONNECTIONS": "lots"})
    with pytest.raises(ConfigError, match="MaxConnections must be an integer"):
        cfg.int("MaxConnections", 5000)
