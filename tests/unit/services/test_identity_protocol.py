"""The multi-step authentication in the codec, TOTP secrets and codes, and directory filters."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pyotp
import pytest

from gatehouse import protocol as p
from gatehouse.broker import directory, factors
from gatehouse.broker.db import Database
from gatehouse.broker.settings import DirectorySettings, LdapServer
from gatehouse.broker.store import Store

# ---------------------------------------------------------------- protocol


@pytest.mark.parametrize(
    ("envelope", "message"),
    [
        ("pcoip-client", p.Authenticate("alice", "", "CORP", p.METHOD_PASSCODE, "123456")),
        ("pcoip-broker", p.Authenticate("alice", "pw", "CORP")),
        ("pcoip-client", p.AuthenticateResp(p.AUTH_INCOMPLETE, "Enter your passcode", [p.AUTH_PASSCODE])),
        ("pcoip-broker", p.AuthenticateResp(p.AUTH_OK, "ok")),
        ("pcoip-client", p.HelloResp("CM", "1", "cm1", [p.AUTH_PASSCODE, p.AUTH_PASSWORD], ["CORP"])),
    ],
)
def test_multi_step_messages_round_trip(envelope: str, message: p.Message) -> None:
    assert p.parse(p.render(envelope, message), envelope) == message


def test_a_passcode_step_renders_as_the_contract_says() -> None:
    body = p.render("pcoip-client", p.Authenticate("alice", "", "CORP", p.METHOD_PASSCODE, "987654"))
    assert b'<authenticate method="passcode"><username>alice</username><passcode>987654</passcode>' in body
    assert b"<password" not in body
    resp = p.render("pcoip-client", p.AuthenticateResp(p.AUTH_INCOMPLETE, "next", [p.AUTH_PASSCODE]))
    assert (
        b"<next-authentication><authentication-methods><method>AUTHENTICATE_VIA_PASSCODE</method>"
        b"</authentication-methods></next-authentication>"
    ) in resp
    assert "987654" not in repr(p.Authenticate("alice", "", "CORP", p.METHOD_PASSCODE, "987654"))


def _auth(method: str, inner: str) -> bytes:
    return (
        f'<pcoip-client version="2.1"><authenticate method="{method}"><username>a</username>'
        f"{inner}<domain>CORP</domain></authenticate></pcoip-client>"
    ).encode()


@pytest.mark.parametrize(
    "body",
    [
        _auth("smartcard", "<password>x</password>"),
        _auth("passcode", "<passcode>" + "1" * 65 + "</passcode>"),
        _auth("passcode", "<passcode>12 34</passcode>"),
        _auth("passcode", "<passcode>\u00e9\u00e9</passcode>"),
    ],
)
def test_unknown_methods_and_bad_passcodes_are_refused(body: bytes) -> None:
    with pytest.raises(p.ProtocolError) as err:
        p.parse(body, "pcoip-client")
    assert err.value.result_id == p.E_MALFORMED


# ---------------------------------------------------------------- TOTP

NOW = 1_700_000_015.0  # 15 s into a step


def test_secrets_are_encrypted_and_bound_to_the_user() -> None:
    key = os.urandom(32)
    secret = factors.new_secret()
    stored = factors.encrypt_secret(key, 7, secret)
    assert secret.encode() not in stored and stored != factors.encrypt_secret(key, 7, secret)
    assert factors.decrypt_secret(key, 7, stored) == secret
    assert factors.decrypt_secret(key, 8, stored) is None  # copied to another user: useless
    assert factors.decrypt_secret(os.urandom(32), 7, stored) is None
    assert factors.decrypt_secret(key, 7, stored[:-1] + bytes([stored[-1] ^ 1])) is None


def test_codes_one_step_either_side_are_accepted_two_are_not() -> None:
    secret = factors.new_secret()
    totp = pyotp.TOTP(secret)
    step = int(NOW) // 30
    for offset in (-1, 0, 1):
        assert factors.totp_step(secret, totp.at(NOW + 30 * offset), 0, NOW) == step + offset
    for offset in (-2, 2):
        assert factors.totp_step(secret, totp.at(NOW + 30 * offset), 0, NOW) is None
    assert factors.totp_step(secret, "12345", 0, NOW) is None
    assert factors.totp_step(secret, "abcdef", 0, NOW) is None


def test_provisioning_uri_names_issuer_and_account() -> None:
    uri = factors.provisioning_uri("JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP", "CORP\\alice", "Gatehouse")
    assert uri.startswith("otpauth://totp/Gatehouse:CORP%5Calice?secret=JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP")
    assert "issuer=Gatehouse" in uri


def test_a_code_works_once_and_never_an_older_one(tmp_path: Path) -> None:
    db = Database.open(tmp_path / "b.db")
    store = Store(db)
    store.sync_domains(["CORP"])
    with db.transaction():
        store.put_user("CORP", "alice", {}, None)
    user_id = store.user_record("CORP", "alice").id  # type: ignore[union-attr]
    key = os.urandom(32)
    secret = factors.new_secret()
    with db.transaction():
        store.set_totp(user_id, factors.encrypt_secret(key, user_id, secret))
    checker = factors.Totp(store, key)
    totp = pyotp.TOTP(secret)
    assert checker.check(user_id, totp.at(NOW), NOW).ok
    replay = checker.check(user_id, totp.at(NOW), NOW + 5)
    assert not replay.ok and replay.kind == factors.REJECT
    # The previous step's code is still in the window, but older than the one used: refused.
    assert not checker.check(user_id, totp.at(NOW - 30), NOW).ok
    assert checker.check(user_id, totp.at(NOW + 30), NOW + 30).ok
    # The store refuses a step not later than the last one, whoever asks.
    with db.transaction():
        assert not store.accept_totp_step(user_id, int(NOW) // 30)
    assert not checker.check(None, totp.at(NOW), NOW).ok
    assert store.get_user("CORP", "alice")["totp_enrolled"] is True  # type: ignore[index]
    db.close()


# ---------------------------------------------------------------- directory


def corp(**overrides: object) -> DirectorySettings:
    values: dict[str, object] = {
        "domain": "CORP",
        # TEST-NET-1: nothing answers there; a login that reached for it would be "unavailable".
        "servers": (LdapServer("ldaps", "192.0.2.1", 636),),
        "bind_dn": "cn=svc,dc=corp,dc=example",
        "bind_password": "bind-Secret-4471",
        "base_dn": "dc=corp,dc=example",
        "timeout": 1,
    }
    values.update(overrides)
    return DirectorySettings(**values)  # type: ignore[arg-type]


def test_user_names_are_escaped_in_the_filter() -> None:
    s = corp(user_filter="(objectClass=person)")
    assert directory.user_filter(s, "*)(uid=*") == "(&(objectClass=person)(uid=\\2a\\29\\28uid=\\2a))"
    assert directory.user_filter(s, "a\\b") == "(&(objectClass=person)(uid=a\\5cb))"
    assert directory.user_filter(s, "a\x00b") == "(&(objectClass=person)(uid=a\\00b))"
    ad = corp(user_attribute="sAMAccountName")
    assert directory.user_filter(ad, "alice@corp.example") == (
        "(&(objectClass=*)(|(sAMAccountName=alice@corp.example)(userPrincipalName=alice@corp.example)))"
    )


def test_group_filters_escape_the_user_dn() -> None:
    dn = "cn=Smith\\, J*,ou=people,dc=corp"
    escaped = "cn=Smith\\5c, J\\2a,ou=people,dc=corp"
    assert directory.group_filter(corp(group_mode="ad-nested"), dn, "js") == (
        f"(member:1.2.840.113556.1.4.1941:={escaped})"
    )
    assert directory.group_filter(corp(group_mode="search"), dn, "j*") == (
        f"(|(member={escaped})(uniqueMember={escaped})(memberUid=j\\2a))"
    )
    assert directory.group_filter(corp(), dn, "js") is None  # memberof: read from the entry


def test_group_names_hold_dns_and_cns_lower_case() -> None:
    names = directory.group_names(["CN=VDI Users,OU=Groups,DC=corp", "cn=R\\2cD,dc=corp", "ou=Other,dc=corp"])
    assert names == {
        "cn=vdi users,ou=groups,dc=corp",
        "vdi users",
        "cn=r\\2cd,dc=corp",
        "r,d",
        "ou=other,dc=corp",
    }


def test_an_empty_password_never_reaches_the_directory() -> None:
    started = time.monotonic()
    result = directory.login(corp(), "alice", "")
    # Refused as a wrong password, at once: had it been sent, the unreachable server would have
    # made it "unavailable" after the timeout.
    assert result.failure == directory.INVALID and "empty password" in result.detail
    assert time.monotonic() - started < 0.5
    unreachable = directory.login(corp(), "alice", "pw")
    assert unreachable.failure == directory.UNAVAILABLE and "192.0.2.1" in unreachable.detail
    assert "bind-Secret-4471" not in unreachable.detail
