"""The client's passcode sources: environment, file, and a TOTP code computed from a secret file."""

from __future__ import annotations

from pathlib import Path

import pyotp
import pytest

from gatehouse.client.__main__ import parse_args, passcode_source

URL = "https://cm.example"


def test_totp_secret_file_gives_the_current_code(tmp_path: Path) -> None:
    secret = pyotp.random_base32()
    path = tmp_path / "totp.secret"
    path.write_text(secret + "\n")
    source = passcode_source(parse_args(["--url", URL, "--totp-secret-file", str(path)]))
    assert source is not None and source() == pyotp.TOTP(secret).now()


def test_passcode_from_env_and_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GH_PASSCODE", "424242")
    source = passcode_source(parse_args(["--url", URL, "--passcode-env", "GH_PASSCODE"]))
    assert source is not None and source() == "424242"
    path = tmp_path / "code"
    path.write_text("135790\n")
    source = passcode_source(parse_args(["--url", URL, "--passcode-file", str(path)]))
    assert source is not None and source() == "135790"
    assert passcode_source(parse_args(["--url", URL])) is None


def test_passcode_sources_exclude_each_other_and_a_bad_secret_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        parse_args(["--url", URL, "--passcode-env", "A", "--passcode-file", "B"])
    path = tmp_path / "bad"
    path.write_text("not base32 !!\n")
    with pytest.raises(SystemExit, match="does not hold a base32 secret"):
        passcode_source(parse_args(["--url", URL, "--totp-secret-file", str(path)]))
