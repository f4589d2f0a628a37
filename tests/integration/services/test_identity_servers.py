"""The test directory and RADIUS server behave as the identity tests rely on (identity_servers.py).

Checked from the host, through the published ports, with ldap3 and pyrad: TLS (LDAPS and
StartTLS, verified against the test CA), the seeded accounts and groups, the access control,
the unauthenticated-bind behaviour, and the RADIUS users, challenge, Status-Server and the
Message-Authenticator and shared-secret checks. Stopping and pausing the directory (the
"directory down" tests' tools) and the image's health command are checked too.
"""

from __future__ import annotations

import socket
import ssl
import time

import ldap3
import pytest
from identity_servers import (
    ACCESS_ACCEPT,
    ACCESS_CHALLENGE,
    ACCESS_REJECT,
    ALICE_PASSCODE,
    ALL_GROUPS,
    BIND_DN,
    CAROL_CODE,
    CAROL_PROMPT,
    DIRECT_GROUPS,
    USERS,
    Directory,
    IdentityServers,
    Radius,
    group_dn,
    user_dn,
)
from pyrad.client import Timeout as RadiusTimeout

pytestmark = [pytest.mark.docker, pytest.mark.images]

INVALID_CREDENTIALS = 49


def whoami(directory: Directory, who: str, password: str, url: str) -> str:
    conn = directory.connection(who, password, url=url)
    try:
        assert conn.bind(), conn.result
        return conn.extend.standard.who_am_i()
    finally:
        conn.unbind()


def test_service_account_binds_over_ldaps_and_starttls(directory: Directory) -> None:
    for url in (directory.ldaps_url, directory.ldap_url):
        assert whoami(directory, BIND_DN, directory.bind_password, url) == f"dn:{BIND_DN}"
    # The password file holds what the container was given.
    assert directory.bind_password_file.read_text().splitlines()[0] == directory.bind_password


def test_starttls_is_real_tls(directory: Directory) -> None:
    conn = directory.connection(BIND_DN, directory.bind_password, url=directory.ldap_url)
    try:
        assert conn.bind()
        assert isinstance(conn.socket, ssl.SSLSocket)
        assert conn.socket.version() in {"TLSv1.2", "TLSv1.3"}
    finally:
        conn.unbind()


def test_user_binds_and_wrong_passwords_fail(directory: Directory) -> None:
    for uid in USERS:
        assert whoami(directory, uid, directory.passwords[uid], directory.ldaps_url) == f"dn:{user_dn(uid)}"
    for who, password in [
        ("alice", directory.passwords["bob"]),
        ("alice", directory.passwords["alice"] + "x"),
        ("nobody", directory.passwords["alice"]),
        (BIND_DN, directory.passwords["alice"]),
    ]:
        conn = directory.connection(who, password)
        assert not conn.bind()
        assert conn.result["result"] == INVALID_CREDENTIALS, conn.result
        conn.unbind()


def test_unauthenticated_bind_succeeds_as_anonymous(directory: Directory) -> None:
    """A DN with an empty password "succeeds" (as with Active Directory) and is nobody: a client
    must never take a successful bind with an empty password for a verified one."""
    for url in (directory.ldaps_url, directory.ldap_url):
        code, identity = directory.unauthenticated_bind(user_dn("alice"), url=url)
        assert code == 0
        assert identity in ("", None)


def test_anonymous_and_users_cannot_read_the_directory(directory: Directory) -> None:
    anonymous = directory.connection(None, None)
    assert anonymous.bind()
    anonymous.search(directory.base_dn, "(uid=*)", attributes=["uid", "memberOf"])
    assert anonymous.entries == []
    anonymous.unbind()
    bob = directory.connection("bob", directory.passwords["bob"])
    assert bob.bind()
    bob.search(directory.people_dn, "(uid=alice)", attributes=["uid"])
    assert bob.entries == []
    # ... but their own entry, which the broker does not need.
    bob.search(user_dn("bob"), "(objectClass=*)", search_scope=ldap3.BASE, attributes=["uid"])
    assert [e.entry_dn for e in bob.entries] == [user_dn("bob")]
    bob.unbind()


def test_service_account_reads_users_groups_and_memberof(directory: Directory) -> None:
    conn = directory.connection(BIND_DN, directory.bind_password)
    assert conn.bind()
    try:
        conn.search(directory.people_dn, "(uid=*)", attributes=["uid", "memberOf", "userPassword"])
        found = {e.uid.value: {str(dn) for dn in e.memberOf.values} for e in conn.entries}
        assert found == {uid: {group_dn(g) for g in groups} for uid, groups in DIRECT_GROUPS.items()}
        # Password hashes stay unreadable, even for the service account.
        assert all(not e.userPassword.values for e in conn.entries)
        # memberOf is direct only: the nesting engineering -> desktop-users is on the group's entry.
        conn.search(
            group_dn("engineering"), "(objectClass=*)", search_scope=ldap3.BASE, attributes=["memberOf"]
        )
        assert conn.entries[0].memberOf.values == [group_dn("desktop-users")]
        # Every group of each user, as the "search" group mode sees them (plus the nesting).
        for uid, groups in ALL_GROUPS.items():
            dn = user_dn(uid)
            conn.search(
                directory.groups_dn,
                f"(|(member={dn})(uniqueMember={dn})(memberUid={uid}))",
                attributes=["cn"],
            )
            direct = {e.cn.value for e in conn.entries}
            nested = set()
            for group in direct:
                conn.search(directory.groups_dn, f"(member={group_dn(group)})", attributes=["cn"])
                nested |= {e.cn.value for e in conn.entries}
            assert direct | nested == groups, uid
    finally:
        conn.unbind()


def test_wrong_ca_fails_the_handshake(directory: Directory, identity: IdentityServers, tmp_path) -> None:
    from pki import TestPKI

    other = TestPKI(tmp_path / "other-ca")
    for url in (directory.ldaps_url, directory.ldap_url):
        with pytest.raises(ldap3.core.exceptions.LDAPException):
            conn = directory.connection(BIND_DN, directory.bind_password, url=url, ca=other.ca)
            conn.bind()


def test_directory_stops_and_pauses(directory: Directory) -> None:
    with directory.stopped():
        with socket.socket() as sock:
            sock.settimeout(2)
            assert sock.connect_ex(("127.0.0.1", directory.ldaps_port)) != 0
    # Started again on the same ports, seeded again with the same passwords.
    assert whoami(directory, "alice", directory.passwords["alice"], directory.ldaps_url)
    with directory.paused():
        start = time.monotonic()
        with pytest.raises(ldap3.core.exceptions.LDAPException):
            conn = directory.connection(BIND_DN, directory.bind_password, timeout=1)
            conn.bind()
        assert time.monotonic() - start < 5
    assert whoami(directory, BIND_DN, directory.bind_password, directory.ldap_url)


def test_health_command(identity: IdentityServers) -> None:
    for container in (identity.directory.container, identity.radius.container):
        result = container.exec_run(["/usr/local/bin/gatehouse-identity", "health"])
        assert result.exit_code == 0, (container.name, result.output)


# ---------------------------------------------------------------- RADIUS


def test_radius_accepts_alice_and_rejects_everything_else(radius: Radius) -> None:
    assert radius.authenticate("alice", ALICE_PASSCODE).code == ACCESS_ACCEPT
    assert radius.authenticate("alice", "000000").code == ACCESS_REJECT
    assert radius.authenticate("bob", ALICE_PASSCODE).code == ACCESS_REJECT
    assert radius.authenticate("alice", "").code == ACCESS_REJECT
    assert radius.authenticate("alice", ALICE_PASSCODE).code == ACCESS_ACCEPT


def test_radius_challenge_for_carol(radius: Radius) -> None:
    challenge = radius.authenticate("carol", "first")
    assert challenge.code == ACCESS_CHALLENGE
    assert challenge["Reply-Message"] == [CAROL_PROMPT]
    (state,) = challenge["State"]
    assert radius.authenticate("carol", CAROL_CODE, state).code == ACCESS_ACCEPT
    # The State is good for one answer only.
    assert radius.authenticate("carol", CAROL_CODE, state).code == ACCESS_CHALLENGE
    # The code without a State, or with a State the server never issued, starts over.
    assert radius.authenticate("carol", CAROL_CODE).code == ACCESS_CHALLENGE
    assert radius.authenticate("carol", CAROL_CODE, b"\x00" * 16).code == ACCESS_CHALLENGE
    # A wrong code is rejected.
    (state,) = radius.authenticate("carol", "first")["State"]
    assert radius.authenticate("carol", "000000", state).code == ACCESS_REJECT


def test_radius_status_server(radius: Radius) -> None:
    assert radius.status().code == ACCESS_ACCEPT


def test_radius_wrong_secret_and_unsigned_requests_get_no_answer(radius: Radius) -> None:
    with pytest.raises(RadiusTimeout):
        radius.authenticate("alice", ALICE_PASSCODE, secret=radius.secret + "x")
    with pytest.raises(RadiusTimeout):
        radius.status(secret="not-" + radius.secret, timeout=1)
    # Without Message-Authenticator (require_message_authenticator = yes).
    client = radius.client(timeout=1)
    request = client.CreateAuthPacket(User_Name="alice", message_authenticator=False)
    request["User-Password"] = request.PwCrypt(ALICE_PASSCODE)
    with pytest.raises(RadiusTimeout):
        client.SendPacket(request)
    assert radius.authenticate("alice", ALICE_PASSCODE).code == ACCESS_ACCEPT


def test_no_secret_in_the_server_logs(identity: IdentityServers, radius: Radius) -> None:
    radius.authenticate("alice", ALICE_PASSCODE)
    logs = identity.directory.logs() + identity.radius.logs()
    for secret in [*identity.directory.passwords.values(), radius.secret, ALICE_PASSCODE, CAROL_CODE]:
        assert secret not in logs
