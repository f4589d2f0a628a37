"""identity: directory users with TOTP, then RADIUS, and a local break-glass domain.

The directory (slapd) holds alice in ``engineering``, which is nested in ``desktop-users``; bob is
in ``desktop-users`` directly. ``engineering`` is entitled to pool-eng (by CN), ``desktop-users``
to pool-all (by DN); LAB\\demo is a local user entitled to pool-all. The tests run in file order:
the last one switches the broker's second factor from TOTP to RADIUS with the collection.
"""

from __future__ import annotations

import json
import time
from typing import Any

import gatehouse_verify as gv
import pyotp

SCENARIO = "identity"
NETWORK = "gh-mol-identity"
URL = f"https://{gv.address(5, 21)}:8443"
IDSRV = gv.STATE_ROOT / SCENARIO / "idsrv"
BROKER_ERROR = "Error occurred while communicating with broker"
DESKTOP_USERS = "cn=desktop-users,ou=groups,dc=corp,dc=example"
# Steps already used per user: a TOTP code works once, so each login takes a later step.
_used_steps: dict[str, int] = {}


def ldap_password(user: str) -> str:
    return (IDSRV / "secrets" / f"{user}.password").read_text(encoding="utf-8").strip()


def totp(user: str) -> pyotp.TOTP:
    uri = (gv.STATE_ROOT / SCENARIO / "secrets" / f"totp-corp-{user}.uri").read_text(encoding="utf-8")
    return pyotp.parse_uri(uri.strip())


def fresh_code(user: str) -> str:
    """A code of a step later than any used for ``user`` and within the broker's ±1 window."""
    while True:
        now = time.time()
        step = int(now) // 30
        # The step before stays valid until the next one starts; keep a margin for the request.
        earliest = step - 1 if now % 30 < 25 else step
        candidate = max(earliest, _used_steps.get(user, -1) + 1)
        if candidate <= step + 1:
            _used_steps[user] = candidate
            return totp(user).at(candidate * 30)
        time.sleep(1)


def login(user: str, *args: str, password: str | None = None, **env: str) -> dict[str, Any]:
    secret = ldap_password(user) if password is None else password
    return gv.run_client(NETWORK, URL, secret, "--domain", "CORP", *args, user=user, environment=env or None)


def totp_login(user: str, code: str | None = None, *args: str) -> dict[str, Any]:
    return login(user, "--passcode-env", "GH_PASSCODE", *args, GH_PASSCODE=code or fresh_code(user))


def failed_step(report: dict[str, Any]) -> dict[str, Any]:
    return next(s for s in report["steps"] if not s["ok"])


def slapd_modify(ldif: str) -> None:
    """Change the directory as its administrator (root over ldapi://, inside the container)."""
    container = gv.engine().containers.get("gh-id-slapd")
    result = container.exec_run(
        ["sh", "-c", 'printf "%s" "$LDIF" | ldapmodify -Q -Y EXTERNAL -H ldapi:///'],
        environment={"LDIF": ldif},
    )
    assert result.exit_code == 0, result.output.decode("utf-8", "replace")


def test_directory_users_get_exactly_their_groups_pools() -> None:
    alice = totp_login("alice")
    assert alice["ok"], gv.client_failure(alice)
    gv.assert_session(alice)
    # engineering by CN, desktop-users through the nesting of engineering, by DN.
    assert sorted(alice["resources"]) == ["pool-all", "pool-eng"]
    bob = totp_login("bob", None, "--no-connect")
    assert bob["ok"], gv.client_failure(bob)
    assert bob["resources"] == ["pool-all"]


def test_wrong_and_replayed_totp_codes_are_refused() -> None:
    code = fresh_code("alice")
    assert totp_login("alice", code, "--no-connect")["ok"]
    replayed = totp_login("alice", code, "--no-connect")
    assert not replayed["ok"] and failed_step(replayed)["name"] == "passcode", replayed["steps"]
    wrong = f"{(int(fresh_code('alice')) + 1) % 1000000:06d}"
    refused = totp_login("alice", wrong, "--no-connect")
    assert not refused["ok"] and failed_step(refused)["name"] == "passcode", refused["steps"]
    assert totp_login("alice", None, "--no-connect")["ok"]


def test_a_user_removed_from_the_group_loses_its_pools_at_the_next_login() -> None:
    removal = f"dn: {DESKTOP_USERS}\nchangetype: modify\ndelete: member\nmember: uid=bob,ou=people,dc=corp,dc=example\n"
    slapd_modify(removal)
    try:
        report = totp_login("bob", None, "--no-connect")
        assert not report["ok"]
        assert report["resources"] == []
        assert failed_step(report)["result"] == "NO_RESOURCES", report["steps"]
    finally:
        slapd_modify(removal.replace("delete: member", "add: member"))
    report = totp_login("bob", None, "--no-connect")
    assert report["ok"] and report["resources"] == ["pool-all"], report


def test_directory_down_leaves_local_users_working() -> None:
    slapd = gv.engine().containers.get("gh-id-slapd")
    slapd.stop(timeout=5)
    try:
        refused = totp_login("alice", None, "--no-connect")
        step = failed_step(refused)
        assert (step["name"], step["detail"]) == ("authenticate", BROKER_ERROR), refused["steps"]
        local = gv.run_client(NETWORK, URL, gv.password(SCENARIO, "demo", "lab"), "--domain", "LAB")
        assert local["ok"], gv.client_failure(local)
        gv.assert_session(local)
    finally:
        slapd.start()
        assert gv.wait_for(
            lambda: slapd.exec_run(["/usr/local/bin/gatehouse-identity", "health"]).exit_code == 0
        )
    # The broker tried the dead server last for a while; it is the only one, so it is used again.
    assert gv.wait_for(lambda: totp_login("alice", None, "--no-connect")["ok"], attempts=10, interval=3)


def test_radius_second_factor_after_a_reconfiguration() -> None:
    """The collection switches the factor to RADIUS (the deploy-time check reaches FreeRADIUS)."""
    factor = {
        "method": "radius",
        "domains": ["CORP"],
        "radius_servers": [gv.address(5, 41)],
        "radius_secret": (IDSRV / "secrets" / "radius.secret").read_text(encoding="utf-8").strip(),
    }
    users = [{"name": "demo", "domain": "LAB", "display_name": "Break-glass"}]
    extra = json.dumps({"broker_second_factor": factor, "gatehouse_users": users})
    run = gv.run_playbook("site.yml", "--limit", "gh-id-broker", "-e", extra)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert factor["radius_secret"] not in run.stdout + run.stderr

    ok = login("alice", "--no-connect", "--passcode-env", "GH_PASSCODE", GH_PASSCODE="123456")
    assert ok["ok"], gv.client_failure(ok)
    wrong = login("alice", "--no-connect", "--passcode-env", "GH_PASSCODE", GH_PASSCODE="123457")
    assert not wrong["ok"] and failed_step(wrong)["name"] == "passcode", wrong["steps"]
    # carol: an Access-Challenge, answered with the second passcode; she has no pool.
    challenged = login(
        "carol",
        "--no-connect",
        "--passcode-env",
        "GH_PASSCODE",
        "--challenge-passcode-env",
        "GH_CHALLENGE",
        GH_PASSCODE="push",
        GH_CHALLENGE="654321",
    )
    names = [(s["name"], s["ok"]) for s in challenged["steps"]]
    assert ("challenge", True) in names and failed_step(challenged)["result"] == "NO_RESOURCES", names
