"""The broker's multi-step authentication (a local user with TOTP), directory-group entitlements
and the TOTP admin endpoints, in process (no network)."""

from __future__ import annotations

import base64
import os
import time
from pathlib import Path

import pyotp
import pytest
from aiohttp.test_utils import TestClient, TestServer

from gatehouse import protocol as p
from gatehouse.broker import directory, factors, passwords
from gatehouse.broker.app import build_app
from gatehouse.broker.db import Database
from gatehouse.broker.metrics import BrokerMetrics
from gatehouse.broker.settings import BrokerSettings
from gatehouse.broker.store import Store
from gatehouse.broker.xmlapi import BROKER_ERROR_TEXT, BrokerEndpoint, BrokerSession
from gatehouse.config import Config

PASSWORD = "Correct-Horse-7731"
WEAK = {"n": 2**10, "r": 8, "p": 1}
TOKEN = "admin-token-0123456789"


def make_settings(tmp_path: Path, **values: str) -> BrokerSettings:
    key = tmp_path / "totp.key"
    key.write_text(base64.b64encode(os.urandom(32)).decode())
    bind = tmp_path / "bind.pw"
    bind.write_text("bind-Secret-4471\n")
    base = {
        "AdminToken": TOKEN,
        "ClientCaCert": "/unused/ca.pem",
        "Domains": "CORP, LAB",
        "SecondFactor": "totp",
        "TotpKeyFile": str(key),
        "LoginDelayAfterFailures": "5",
        "LoginLockoutAfterFailures": "6",
        "Domain.LAB.Source": "ldap",
        "Domain.LAB.LdapServers": "ldaps://192.0.2.1",
        "Domain.LAB.LdapBindDn": "cn=svc,dc=lab",
        "Domain.LAB.LdapBindPasswordFile": str(bind),
        "Domain.LAB.LdapBaseDn": "dc=lab",
    }
    return BrokerSettings.from_config(Config({**base, **values}, {}))


@pytest.fixture
def broker(tmp_path: Path):
    settings = make_settings(tmp_path)
    db = Database.open(tmp_path / "b.db")
    store = Store(db)
    store.sync_domains(list(settings.domains))
    with db.transaction():
        store.put_user("CORP", "alice", {}, passwords.hash_password(PASSWORD, **WEAK))
    hasher = passwords.Hasher(workers=1, queue=0)
    ep = BrokerEndpoint(store, settings, BrokerMetrics(), hasher)
    yield ep
    ep.close()
    hasher.close()
    db.close()


def enroll(ep: BrokerEndpoint, name: str = "alice", domain: str = "CORP") -> pyotp.TOTP:
    record = ep.store.user_record(domain, name)
    assert record is not None
    secret = factors.new_secret()
    with ep.store.db.transaction():
        ep.store.set_totp(record.id, factors.encrypt_secret(ep.settings.factor.totp_key, record.id, secret))
    return pyotp.TOTP(secret)


def session(source: str = "192.0.2.10") -> BrokerSession:
    return BrokerSession("cookie", "sid", source, time.monotonic(), source=source, source_trusted=True)


def password(pw: str = PASSWORD, user: str = "alice", domain: str = "CORP") -> p.Authenticate:
    return p.Authenticate(user, pw, domain)


def passcode(code: str, user: str = "alice", domain: str = "CORP") -> p.Authenticate:
    return p.Authenticate(user, "", domain, p.METHOD_PASSCODE, code)


def result(reply: p.Message) -> str:
    assert isinstance(reply, p.AuthenticateResp)
    return reply.result_id


async def test_password_then_totp(broker: BrokerEndpoint) -> None:
    totp = enroll(broker)
    assert broker.methods() == [p.AUTH_PASSWORD, p.AUTH_PASSCODE]
    s = session()
    first = await broker._authenticate(s, password())
    assert isinstance(first, p.AuthenticateResp)
    assert (first.result_id, first.next_methods) == (p.AUTH_INCOMPLETE, [p.AUTH_PASSCODE])
    assert s.user is None and s.progress is not None
    code = totp.now()
    assert result(await broker._authenticate(s, passcode(code))) == p.AUTH_OK
    assert s.user is not None and s.user.name == "alice" and s.progress is None
    # The same code again, in a new session: refused (codes work once).
    again = session()
    assert result(await broker._authenticate(again, password())) == p.AUTH_INCOMPLETE
    assert result(await broker._authenticate(again, passcode(code))) == p.AUTH_FAILED
    assert again.progress is None  # a failed step starts over


async def test_a_wrong_password_or_code_fails_and_counts(broker: BrokerEndpoint) -> None:
    enroll(broker)
    s = session()
    assert result(await broker._authenticate(s, password("wrong"))) == p.AUTH_FAILED
    assert result(await broker._authenticate(s, password())) == p.AUTH_INCOMPLETE
    assert result(await broker._authenticate(s, passcode("000000"))) == p.AUTH_FAILED
    pair = broker.throttle.pairs.get(("corp\\alice", "192.0.2.10"), time.monotonic())
    assert pair is not None and pair.failures == 2
    # The password step passing does not reset the failures of the factor (no success yet).
    assert result(await broker._authenticate(s, password())) == p.AUTH_INCOMPLETE
    assert broker.throttle.pairs.get(("corp\\alice", "192.0.2.10"), time.monotonic()).failures == 2  # type: ignore[union-attr]
    assert not broker.throttle.in_flight


async def test_steps_must_come_in_order_and_for_one_user(broker: BrokerEndpoint) -> None:
    totp = enroll(broker)
    with broker.store.db.transaction():
        broker.store.put_user("CORP", "bob", {}, passwords.hash_password("Bob-Password-1", **WEAK))
    enroll(broker, "bob")
    s = session()
    # A passcode first, when the password is due: a failed step.
    assert result(await broker._authenticate(s, passcode(totp.now()))) == p.AUTH_FAILED
    assert result(await broker._authenticate(s, password())) == p.AUTH_INCOMPLETE
    # Bob's code on Alice's login: refused, and the steps start over.
    assert result(await broker._authenticate(s, passcode(totp.now(), user="bob"))) == p.AUTH_FAILED
    assert s.progress is None and s.user is None


async def test_factor_first_and_domains_without_a_factor(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, SecondFactorFirst="true", SecondFactorDomains="LAB")
    db = Database.open(tmp_path / "b.db")
    store = Store(db)
    store.sync_domains(list(settings.domains))
    with db.transaction():
        store.put_user("CORP", "alice", {}, passwords.hash_password(PASSWORD, **WEAK))
    hasher = passwords.Hasher(workers=1, queue=0)
    ep = BrokerEndpoint(store, settings, BrokerMetrics(), hasher)
    try:
        assert ep.methods() == [p.AUTH_PASSCODE, p.AUTH_PASSWORD]
        assert ep.methods("CORP") == [p.AUTH_PASSWORD]
        s = session()
        # CORP has no factor: a passcode first is answered by asking for the password.
        reply = await ep._authenticate(s, passcode("123456"))
        assert isinstance(reply, p.AuthenticateResp) and reply.next_methods == [p.AUTH_PASSWORD]
        assert result(await ep._authenticate(s, password())) == p.AUTH_OK
    finally:
        ep.close()
        hasher.close()
        db.close()


async def test_an_unreachable_directory_answers_the_broker_error(broker: BrokerEndpoint) -> None:
    s = session()
    with pytest.raises(p.ProtocolError) as err:
        await broker._authenticate(s, password(domain="LAB"))
    assert (err.value.result_id, err.value.message) == (p.E_INTERNAL, BROKER_ERROR_TEXT)
    assert not broker.throttle.in_flight and not broker.throttle.pairs.items  # not the user's fault
    # An empty password is a failed step, counted, without asking the directory.
    assert result(await broker._authenticate(s, password("", domain="LAB"))) == p.AUTH_FAILED
    assert broker.throttle.pairs.items
    # Local users of the other domain keep working.
    assert result(await broker._authenticate(session(), password())) == p.AUTH_INCOMPLETE


async def test_directory_users_get_a_row_and_group_entitlements(broker: BrokerEndpoint) -> None:
    store = broker.store
    with store.db.transaction():
        store.put_desktop("d1", {"address": "10.0.0.1"})
        store.put_desktop("d2", {"address": "10.0.0.2"})
        store.put_pool("p1", {})
        store.put_entitlement(("directory-group", "LAB", "VDI Users", "desktop", "d1"))
        store.put_entitlement(("directory-group", "LAB", "cn=Ops,ou=groups,dc=lab", "pool", "p1"))
        store.put_entitlement(("directory-group", "CORP", "vdi users", "desktop", "d2"))
        record = store.directory_user("LAB", "carol", "Carol C")
    assert record.source == "ldap" and record.password_hash is None
    assert store.get_user("LAB", "carol")["display_name"] == "Carol C"  # type: ignore[index]
    groups = directory.group_names(["CN=VDI USERS,ou=groups,dc=lab", "cn=ops,OU=Groups,dc=lab"])
    desktops, pools = store.entitled(record.id, "LAB", groups)
    assert [d.name for d in desktops] == ["d1"] and [x["name"] for x in pools] == ["p1"]
    assert store.entitled(record.id, "LAB", ()) == ([], [])
    listed = store.list_entitlements({"principal_type": "directory-group"})
    assert {e["principal"] for e in listed} == {"VDI Users", "cn=Ops,ou=groups,dc=lab", "vdi users"}


async def test_admin_totp_enrollment_and_directory_group_entitlements(
    broker: BrokerEndpoint, tmp_path: Path
) -> None:
    db = Database.open(tmp_path / "admin.db")
    app = build_app(broker.settings, db)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with TestClient(TestServer(app)) as client:
        r = await client.put("/api/v1/users/CORP/alice", json={"password": PASSWORD}, headers=headers)
        assert r.status == 200
        r = await client.post("/api/v1/users/CORP/alice/totp", headers=headers)
        body = await r.json()
        assert r.status == 201 and body["otpauth_uri"].startswith("otpauth://totp/Gatehouse:CORP%5Calice?")
        user = await (await client.get("/api/v1/users/CORP/alice", headers=headers)).json()
        assert user["totp_enrolled"] is True and user["source"] == "local"
        assert "secret" not in user and body["otpauth_uri"] not in str(user)
        r = await client.post("/api/v1/users/CORP/nobody/totp", headers=headers)
        assert r.status == 404
        assert (await (await client.delete("/api/v1/users/CORP/alice/totp", headers=headers)).json())[
            "changed"
        ]
        assert not (await (await client.delete("/api/v1/users/CORP/alice/totp", headers=headers)).json())[
            "changed"
        ]
        # Users of an ldap domain have no broker password.
        r = await client.put("/api/v1/users/LAB/carol", json={"password": "x"}, headers=headers)
        assert r.status == 400 and (await r.json())["field"] == "password"
        r = await client.put("/api/v1/users/LAB/carol", json={}, headers=headers)
        assert (await r.json())["user"]["source"] == "ldap"
        await client.put("/api/v1/desktops/d1", json={"address": "10.0.0.1"}, headers=headers)
        ent = "/api/v1/entitlements/directory-group/LAB/cn=VDI%20Users,dc=lab/desktop/d1"
        r = await client.put(ent, headers=headers)
        assert r.status == 200 and (await r.json())["changed"] is True
        assert (await (await client.put(ent, headers=headers)).json())["changed"] is False
        r = await client.put("/api/v1/entitlements/directory-group/CORP/staff/desktop/d1", headers=headers)
        assert r.status == 400 and "source is ldap" in (await r.json())["error"]
        r = await client.put(
            f"/api/v1/entitlements/directory-group/LAB/{'x' * 513}/desktop/d1", headers=headers
        )
        assert r.status == 400 and (await r.json())["field"] == "principal"
        listed = await (await client.get("/api/v1/entitlements", headers=headers)).json()
        assert listed["entitlements"] == [
            {
                "principal_type": "directory-group",
                "domain": "LAB",
                "principal": "cn=VDI Users,dc=lab",
                "resource_type": "desktop",
                "resource": "d1",
            }
        ]
        assert (await (await client.delete(ent, headers=headers)).json())["changed"] is True
    db.close()


async def test_totp_enrollment_needs_second_factor_totp(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, SecondFactor="none")
    db = Database.open(tmp_path / "b.db")
    app = build_app(settings, db)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with TestClient(TestServer(app)) as client:
        await client.put("/api/v1/users/CORP/alice", json={}, headers=headers)
        r = await client.post("/api/v1/users/CORP/alice/totp", headers=headers)
        body = await r.json()
        assert r.status == 409 and "SecondFactor = totp" in body["error"]
    db.close()
