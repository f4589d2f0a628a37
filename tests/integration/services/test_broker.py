"""The broker as a real process on loopback with real TLS: admin API, broker protocol, placement, restart."""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from broker_helpers import (
    ADMIN_TOKEN,
    ALICE_PW,
    BOB_PW,
    ENVELOPE,
    OTHER_TOKEN,
    WRONG_PW,
    Admin,
    Broker,
    BrokerClient,
)
from pki import TestPKI as CertAuthority
from services import ServiceProcess

from gatehouse import protocol as p


@pytest.fixture
def broker(pki: CertAuthority, tmp_path: Path, processes: list[ServiceProcess]) -> Iterator[Broker]:
    b = Broker(pki, tmp_path, processes).start()
    yield b
    b.stop()
    logs = b.logs()
    assert "broker listening" in logs
    # No password, token or cookie the test used may reach the log.
    for secret in (ADMIN_TOKEN, OTHER_TOKEN, ALICE_PW, BOB_PW, WRONG_PW):
        assert secret not in logs
    assert "Traceback" not in logs


def seed(admin: Admin) -> None:
    admin.put("/groups/CORP/staff", {"description": "all staff"})
    admin.put("/users/CORP/alice", {"password": ALICE_PW, "display_name": "Alice", "groups": ["staff"]})
    admin.put("/users/CORP/bob", {"password": BOB_PW})
    for i, addr in enumerate(["127.0.0.11", "127.0.0.12", "127.0.0.13"], 1):
        admin.put(f"/desktops/pd{i}", {"address": addr, "hostname": f"pd{i}.example"})
    admin.put("/desktops/solo", {"address": "127.0.0.20", "agent_port": 60444, "session_port": 4173})
    admin.put("/pools/shared", {"persistent": False, "members": ["pd1", "pd2", "pd3"]})
    admin.put("/entitlements/group/CORP/staff/pool/shared")
    admin.put("/entitlements/user/CORP/alice/desktop/solo")


# ---------------------------------------------------------------- admin API


def test_admin_api_requires_the_admin_token(broker: Broker) -> None:
    for token in ("-", "wrong-token-value-123", OTHER_TOKEN):
        status, body = broker.admin.call("GET", "/users", token=token)
        assert status == 401 and "bearer token" in body["error"]
        status, body = broker.admin.call("PUT", "/users/CORP/mallory", {"password": "x" * 8}, token=token)
        assert status == 401
    assert broker.admin.call("GET", "/users/CORP/mallory")[0] == 404
    # Load reports take no token at all: the admin token does not make a report, nor a CM certificate.
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}", "Content-Type": "application/json"}
    for peer in (broker.http, broker.cm_http):
        status, _headers, _raw = peer.request("POST", "/api/v1/agents/report", b"{}", headers)
        assert status == 403


def test_broker_protocol_only_for_connection_managers(broker: Broker) -> None:
    seed(broker.admin)
    hello = p.render(ENVELOPE, p.Hello(pcm_info=p.PcmInfo(str(uuid.uuid4()), "192.0.2.10")))
    for peer in (broker.http, broker.agent_http("127.0.0.11"), broker.agent_http("127.0.0.11", role=None)):
        status, headers, data = BrokerClient(peer).raw(hello)
        assert status == 403 and "Set-Cookie" not in headers
        reply = p.parse(data, ENVELOPE)
        assert isinstance(reply, p.ErrorResp) and reply.result_id == p.E_USER_AUTH
    assert broker.client().login("alice", ALICE_PW) == p.AUTH_OK
    assert 'gatehouse_broker_peers_refused_total{endpoint="broker"} 3.0' in broker.metrics()


def test_admin_crud_idempotence_and_check_mode(broker: Broker) -> None:
    admin = broker.admin
    first = admin.put("/groups/CORP/staff", {"description": "all staff"})
    assert first["changed"] is True and first["diff"]["before"] is None
    assert admin.put("/groups/CORP/staff", {"description": "all staff"})["changed"] is False

    body = {"password": ALICE_PW, "display_name": "Alice", "groups": ["staff"], "enabled": True}
    created = admin.put("/users/corp/alice", body)
    assert created["changed"] is True and created["password_changed"] is True
    assert created["user"] == {
        "domain": "CORP",
        "name": "alice",
        "display_name": "Alice",
        "enabled": True,
        "groups": ["staff"],
        "password_set": True,
        "source": "local",
        "totp_enrolled": False,
    }
    again = admin.put("/users/CORP/alice", body)
    assert again["changed"] is False and again["password_changed"] is False
    assert ALICE_PW not in json.dumps(again)

    status, got = admin.call("GET", "/users/CORP/alice")
    assert status == 200 and got == created["user"]
    assert "password" not in got and "password_hash" not in got
    assert admin.call("POST", "/users/CORP/alice/check-password", {"password": ALICE_PW}) == (
        200,
        {"match": True, "password_set": True},
    )
    assert admin.call("POST", "/users/CORP/alice/check-password", {"password": WRONG_PW})[1]["match"] is False

    # check mode: reports the change, writes nothing
    status, checked = admin.call("PUT", "/users/CORP/alice?check_mode=true", {"display_name": "Alice L."})
    assert status == 200 and checked["changed"] is True and checked["check_mode"] is True
    assert checked["diff"]["after"]["display_name"] == "Alice L."
    assert admin.call("GET", "/users/CORP/alice")[1]["display_name"] == "Alice"
    status, checked = admin.call("PUT", "/users/CORP/carol?check_mode=true", {"password": BOB_PW})
    assert checked["changed"] is True
    assert admin.call("GET", "/users/CORP/carol")[0] == 404

    # a password change is a change, and the new one is the one that matches
    changed = admin.put("/users/CORP/alice", {"password": BOB_PW})
    assert changed["changed"] is True and changed["password_changed"] is True
    assert admin.call("POST", "/users/CORP/alice/check-password", {"password": BOB_PW})[1]["match"] is True

    admin.put("/pools/p1", {"persistent": True})
    admin.put("/desktops/d1", {"address": "127.0.0.5", "pool": "p1"})
    assert admin.put("/desktops/d1", {"address": "127.0.0.5", "pool": "p1"})["changed"] is False
    admin.put("/desktops/d2", {"address": "desk2.example.com"})
    moved = admin.put("/pools/p1", {"members": ["d2"]})
    assert moved["changed"] is True
    assert moved["diff"]["before"]["members"] == ["d1"] and moved["pool"]["members"] == ["d2"]
    assert admin.call("GET", "/desktops/d1")[1]["pool"] is None

    ent = "/entitlements/group/CORP/staff/pool/p1"
    assert admin.put(ent)["changed"] is True
    assert admin.put(ent)["changed"] is False
    status, listing = admin.call("GET", "/entitlements?principal=staff")
    assert listing["entitlements"] == [
        {
            "principal_type": "group",
            "domain": "CORP",
            "principal": "staff",
            "resource_type": "pool",
            "resource": "p1",
        }
    ]

    # listings
    assert [u["name"] for u in admin.call("GET", "/users")[1]["users"]] == ["alice"]
    assert [d["name"] for d in admin.call("GET", "/desktops")[1]["desktops"]] == ["d1", "d2"]
    assert admin.call("GET", "/groups/CORP/staff")[1]["members"] == ["alice"]
    assert admin.call("GET", "/domains")[1] == {"domains": ["CORP", "LAB"], "default": "CORP"}

    # deletes are idempotent and cascade
    status, deleted = admin.call("DELETE", "/pools/p1")
    assert status == 200 and deleted["changed"] is True and deleted["pool"] is None
    assert admin.call("DELETE", "/pools/p1")[1]["changed"] is False
    assert admin.call("GET", "/entitlements")[1]["entitlements"] == []


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "field"),
    [
        ("PUT", "/desktops/dx", {"address": "127.0.0.1", "agent_port": 70000}, 400, "agent_port"),
        ("PUT", "/desktops/dx", {"address": "127.0.0.1", "agent_port": "60443"}, 400, "agent_port"),
        ("PUT", "/desktops/dx", {"hostname": "x"}, 400, "address"),
        ("PUT", "/desktops/dx", {"address": "not a host!"}, 400, "address"),
        ("PUT", "/desktops/dx", {"address": "127.0.0.1", "pool": "nope"}, 400, "pool"),
        ("PUT", "/desktops/dx", {"address": "127.0.0.1", "colour": "red"}, 400, "colour"),
        ("PUT", "/users/CORP/u1", {"enabled": "yes"}, 400, "enabled"),
        ("PUT", "/users/CORP/u1", {"groups": ["ghosts"]}, 400, "groups"),
        ("PUT", "/users/CORP/u1", {"password": ""}, 400, "password"),
        ("PUT", "/users/NOWHERE/u1", {}, 400, "domain"),
        ("PUT", "/pools/p9", {"members": ["ghost"]}, 400, "members"),
        ("PUT", "/pools/p9", {"persistent": 1}, 400, "persistent"),
        ("PUT", "/pools/p9", [1, 2], 400, "body"),
        ("GET", "/users/CORP/nobody", None, 404, None),
        ("GET", "/desktops/nothing", None, 404, None),
        ("PUT", "/entitlements/user/CORP/nobody/desktop/none", None, 404, None),
        ("PUT", "/entitlements/robot/CORP/x/desktop/none", None, 400, "principal_type"),
        ("GET", "/no/such/endpoint", None, 404, None),
    ],
)
def test_admin_validation(
    broker: Broker, method: str, path: str, body: Any, status: int, field: str | None
) -> None:
    got_status, answer = broker.admin.call(method, path, body)
    assert got_status == status, answer
    assert answer["error"]
    if field:
        assert answer["field"] == field and field in answer["error"]


def test_admin_invalid_json_and_large_body(broker: Broker) -> None:
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}", "Content-Type": "application/json"}
    status, _headers, raw = broker.http.request("PUT", "/api/v1/pools/p", b"{not json", headers)
    assert status == 400 and json.loads(raw)["field"] == "body"
    big = json.dumps({"description": "x" * (70 * 1024)}).encode()
    status, _headers, raw = broker.http.request("PUT", "/api/v1/pools/p", big, headers)
    assert status == 413
    assert broker.admin.call("GET", "/pools/p")[0] == 404


# ---------------------------------------------------------------- broker protocol


def test_full_flow_hello_authenticate_list_allocate(broker: Broker) -> None:
    seed(broker.admin)
    client = broker.client()
    sid = str(uuid.uuid4())
    hello = client.hello(sid)
    assert hello.domains == ["CORP", "LAB"] and hello.methods == [p.AUTH_PASSWORD]
    assert client.cookie and client.cookie != sid
    assert "Secure" in client.last_set_cookie and "HttpOnly" in client.last_set_cookie
    cookies = {client.cookie}
    reply = client.send(p.Authenticate("alice", ALICE_PW, "corp"))
    assert isinstance(reply, p.AuthenticateResp) and reply.result_id == p.AUTH_OK
    cookies.add(client.cookie)  # rotated at login
    resources = client.resources()
    assert set(resources) == {"shared", "solo"}
    assert resources["solo"].startswith("d-") and resources["shared"].startswith("p-")
    alloc = client.allocate(resources["solo"])
    assert alloc.result_id == p.ALLOC_OK
    assert alloc.agent == p.AgentInfo("127.0.0.20", "", 60444, 4173)
    alloc = client.allocate(resources["shared"])
    assert alloc.result_id == p.ALLOC_OK and alloc.agent is not None
    assert alloc.agent.ip_address in {"127.0.0.11", "127.0.0.12", "127.0.0.13"}
    assert isinstance(client.send(p.Bye()), p.ByeResp)
    # after bye the session is gone
    reply = client.send(p.GetResourceList())
    assert isinstance(reply, p.ErrorResp) and reply.result_id == p.E_OUT_OF_STATE

    session_lines = [json.loads(line) for line in broker.logs().splitlines() if sid in line]
    assert {line["msg"] for line in session_lines} >= {
        "hello: broker session started",
        "authentication succeeded",
        "resource list sent",
        "resource allocated",
    }
    assert all(line["session_id"] == sid for line in session_lines)
    # The cookies of the session (before and after login; bye clears the client's) stay out of the log.
    assert None not in cookies
    logs = broker.logs()
    assert not [cookie for cookie in cookies if cookie in logs]

    # /metrics is on the management listener only, /health on both.
    assert broker.http.request("GET", "/metrics")[0] == 404
    assert broker.http.request("GET", "/health")[0] == 200
    text = broker.metrics()
    assert 'gatehouse_broker_authentications_total{result="success"} 1.0' in text
    assert 'gatehouse_broker_allocations_total{result="ALLOC_SUCCESSFUL"} 2.0' in text


def test_wrong_password_unknown_and_disabled_users_get_the_same_answer(broker: Broker) -> None:
    seed(broker.admin)
    broker.admin.put("/users/CORP/dave", {"password": BOB_PW, "enabled": False})
    broker.admin.put("/users/CORP/nopass", {})
    answers = []
    for user, password, domain in [
        ("alice", WRONG_PW, "CORP"),
        ("nosuchuser", WRONG_PW, "CORP"),
        ("dave", BOB_PW, "CORP"),
        ("nopass", "", "CORP"),
        ("alice", ALICE_PW, "NOSUCHDOMAIN"),
    ]:
        client = broker.client()
        client.hello()
        _status, _headers, body = client.raw(p.render(ENVELOPE, p.Authenticate(user, password, domain)))
        answers.append(body)
    assert len(set(answers)) == 1
    assert p.parse(answers[0], ENVELOPE) == p.AuthenticateResp(p.AUTH_FAILED, "unknown username or password")

    # retry on the same session is allowed, and DOMAIN\user works
    client = broker.client()
    client.hello()
    assert client.send(p.Authenticate("alice", WRONG_PW, "CORP")).result_id == p.AUTH_FAILED  # type: ignore[attr-defined]
    assert client.send(p.Authenticate("CORP\\alice", ALICE_PW, "")).result_id == p.AUTH_OK  # type: ignore[attr-defined]
    assert 'gatehouse_broker_authentications_total{result="failure"} 6.0' in broker.metrics()


def test_not_entitled_and_out_of_state(broker: Broker) -> None:
    seed(broker.admin)
    bob = broker.client()
    # nothing before hello
    reply = bob.send(p.Authenticate("bob", BOB_PW))
    assert isinstance(reply, p.ErrorResp) and reply.result_id == p.E_OUT_OF_STATE
    bob.hello()
    for early in (p.GetResourceList(), p.AllocateResource("d-1")):
        reply = bob.send(early)
        assert isinstance(reply, p.ErrorResp) and reply.result_id == p.E_OUT_OF_STATE
    assert bob.send(p.Authenticate("bob", BOB_PW)).result_id == p.AUTH_OK  # type: ignore[attr-defined]
    assert bob.resources() == {}
    alice = broker.client()
    assert alice.login("alice", ALICE_PW) == p.AUTH_OK
    solo = alice.resources()["solo"]
    for resource_id in (solo, "p-1", "d-99999", "garbage", "d-"):
        assert bob.allocate(resource_id).result_id == p.ALLOC_NOT_ENTITLED
    # authenticated twice is out of state; a forged cookie is no session
    reply = bob.send(p.Authenticate("bob", BOB_PW))
    assert isinstance(reply, p.ErrorResp) and reply.result_id == p.E_OUT_OF_STATE
    forged = broker.client()
    forged.cookie = "forged-cookie-value"
    reply = forged.send(p.GetResourceList())
    assert isinstance(reply, p.ErrorResp) and reply.result_id == p.E_OUT_OF_STATE
    # disabling the account ends what the session may do
    broker.admin.put("/users/CORP/alice", {"enabled": False})
    reply = alice.send(p.AllocateResource(solo))
    assert isinstance(reply, p.ErrorResp) and reply.result_id == p.E_USER_AUTH
    # a pool with no usable member is unavailable, not an error
    broker.admin.put("/users/CORP/alice", {"enabled": True})
    for i in (1, 2, 3):
        broker.admin.put(f"/desktops/pd{i}", {"enabled": False})
    assert alice.login("alice", ALICE_PW) == p.AUTH_OK
    assert alice.allocate(alice.resources()["shared"]).result_id == p.ALLOC_UNAVAILABLE


@pytest.mark.parametrize(
    ("body", "result_id"),
    [
        (b'<?xml version="1.0" encoding="UTF-8"?>', p.E_MALFORMED),
        (b"", p.E_MALFORMED),
        (b"<pcoip-broker version='2.1'><hello>", p.E_MALFORMED),
        (
            b'<?xml version="1.0"?><!DOCTYPE l [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;">]>'
            b'<pcoip-broker version="2.1"><bye>&b;</bye></pcoip-broker>',
            p.E_MALFORMED,
        ),
        (b'<pcoip-client version="2.1"><hello/></pcoip-client>', p.E_ENVELOPE),
        (b"<pcoip-broker><hello/></pcoip-broker>", p.E_VERSION),
        (b'<pcoip-broker version="9.0"><hello/></pcoip-broker>', p.E_VERSION),
        (b'<pcoip-broker version="2.1"><hello/><bye/></pcoip-broker>', p.E_ENVELOPE),
        (
            b'<pcoip-broker version="2.1"><launch-session><session-id>x</session-id></launch-session></pcoip-broker>',
            p.E_UNKNOWN,
        ),
        (b'<pcoip-broker version="2.1"><allocate-resource/></pcoip-broker>', p.E_MALFORMED),
    ],
)
def test_malformed_input_gets_error_resp_and_the_next_request_works(
    broker: Broker, body: bytes, result_id: str
) -> None:
    client = broker.client()
    status, headers, data = client.raw(body)
    assert status == 200 and headers["Content-Type"] == "application/xml; charset=UTF-8"
    reply = p.parse(data, ENVELOPE)
    assert isinstance(reply, p.ErrorResp) and reply.result_id == result_id
    assert b"Traceback" not in data
    client.hello()


def test_oversized_bodies_are_refused(broker: Broker) -> None:
    big = b'<pcoip-broker version="2.1"><bye/></pcoip-broker>' + b" " * (p.MAX_BODY + 10)
    client = broker.client()
    _status, _headers, data = client.raw(big)
    assert p.parse(data, ENVELOPE) == p.ErrorResp(p.E_TOO_LARGE, f"request body over {p.MAX_BODY} bytes")

    # chunked upload without Content-Length is cut off at the cap too
    conn = http.client.HTTPSConnection("localhost", broker.port, context=broker.cm_http.ctx, timeout=20)
    try:
        chunks = (big[i : i + 8192] for i in range(0, len(big), 8192))
        conn.request("POST", p.PATH_BROKER, body=chunks, encode_chunked=True)
        reply = p.parse(conn.getresponse().read(), ENVELOPE)
    finally:
        conn.close()
    assert isinstance(reply, p.ErrorResp) and reply.result_id == p.E_TOO_LARGE
    client.hello()


def test_query_hello_creates_no_session(broker: Broker) -> None:
    client = broker.client()
    reply = client.send(p.Hello(p.ClientInfo(product_name=p.QUERY_PRODUCT)))
    assert isinstance(reply, p.HelloResp) and client.cookie is None


# ---------------------------------------------------------------- placement


def test_agent_reports_steer_least_loaded_placement(broker: Broker) -> None:
    seed(broker.admin)
    assert broker.report("127.0.0.11", 3, 4) == 204
    assert broker.report("127.0.0.12", 1, 4) == 204
    assert broker.report("127.0.0.13", 2, 4, hostname="pd3.example") == 204
    # Another desktop's certificate, a certificate without the agent role, no certificate: refused.
    assert broker.report("127.0.0.13", 0, 4, http_=broker.agent_http("127.0.0.11")) == 403
    assert broker.report("127.0.0.13", 0, 4, http_=broker.agent_http("127.0.0.13", role=None)) == 403
    assert broker.report("127.0.0.13", 0, 4, http_=broker.http) == 403
    # A report for an address that is no registered desktop (or not on that agent port) stores nothing.
    status, body = broker.report_call("127.0.0.99", 0, 4)
    assert status == 403 and "registered desktop" in body["error"]
    assert broker.report("127.0.0.13", 0, 4, agent_port=60999) == 403
    pd3 = broker.agent_http("127.0.0.13")
    status, _headers, raw = pd3.request(
        "POST", "/api/v1/agents/report", json.dumps({"address": "127.0.0.13"}).encode(), {}
    )
    assert status == 400 and json.loads(raw)["field"] == "agent_port"
    status, body = broker.report_call("127.0.0.13", -1, 4, http_=pd3)
    assert status == 400 and body["field"] == "active_sessions"

    client = broker.client()
    assert client.login("alice", ALICE_PW) == p.AUTH_OK
    pool = client.resources()["shared"]
    placed = [client.allocate(pool).agent.ip_address for _i in range(3)]  # type: ignore[union-attr]
    # pd2 1/4 → pd2 (2/4 ties pd3 2/4, lower name) → pd2 3/4 vs pd3 2/4 → pd3
    assert placed == ["127.0.0.12", "127.0.0.12", "127.0.0.13"]
    # a fresh report restarts the count of placements since the report
    assert broker.report("127.0.0.11", 0, 4) == 204
    assert client.allocate(pool).agent.ip_address == "127.0.0.11"  # type: ignore[union-attr]
    # full everywhere → unavailable
    for addr in ("127.0.0.11", "127.0.0.12", "127.0.0.13"):
        assert broker.report(addr, 4, 4) == 204
    assert client.allocate(pool).result_id == p.ALLOC_UNAVAILABLE

    agents = broker.admin.call("GET", "/agents")[1]["agents"]
    assert len(agents) == 3  # one row per registered desktop, none for the refused reports
    assert {a["address"]: a["desktop"] for a in agents} == {
        "127.0.0.11": "pd1",
        "127.0.0.12": "pd2",
        "127.0.0.13": "pd3",
    }
    assert all(a["stale"] is False for a in agents)


def test_client_verification_off_is_explicit_and_warned(
    pki: CertAuthority, tmp_path: Path, processes: list[ServiceProcess]
) -> None:
    broker = Broker(pki, tmp_path, processes, ClientTlsVerify=False)
    del broker.config["ClientCaCert"]
    broker.start()
    seed(broker.admin)
    # Any caller is taken for a CM, and may report for a registered desktop (not for others).
    assert broker.client(broker.http).login("alice", ALICE_PW) == p.AUTH_OK
    assert broker.report("127.0.0.11", 1, 4, http_=broker.http) == 204
    assert broker.report("127.0.0.99", 1, 4, http_=broker.http) == 403
    broker.stop()
    warnings = [json.loads(line) for line in broker.logs().splitlines() if '"warn' in line]
    assert any("ClientTlsVerify is false" in w["msg"] for w in warnings)


def test_persistent_assignment_and_state_survive_restart(
    pki: CertAuthority, tmp_path: Path, processes: list[ServiceProcess]
) -> None:
    broker = Broker(pki, tmp_path, processes).start()
    admin = broker.admin
    seed(admin)
    admin.put("/pools/desk", {"persistent": True, "members": ["pd1", "pd2"]})
    admin.put("/entitlements/user/CORP/alice/pool/desk")
    admin.put("/entitlements/user/CORP/bob/pool/desk")

    alice, bob = broker.client(), broker.client()
    assert alice.login("alice", ALICE_PW) == p.AUTH_OK
    assert bob.login("bob", BOB_PW) == p.AUTH_OK
    alice_desk = alice.allocate(alice.resources()["desk"]).agent.ip_address  # type: ignore[union-attr]
    bob_desk = bob.allocate(bob.resources()["desk"]).agent.ip_address  # type: ignore[union-attr]
    assert alice_desk != bob_desk  # fewest placements spreads the two users
    # alice keeps hers even though it now has more placements than the other
    for _repeat in range(2):
        assert alice.allocate(alice.resources()["desk"]).agent.ip_address == alice_desk  # type: ignore[union-attr]
    assignments = admin.call("GET", "/assignments?pool=desk")[1]["assignments"]
    assert {(a["user"], a["domain"]) for a in assignments} == {("alice", "CORP"), ("bob", "CORP")}
    assert broker.stop() == 0
    first_logs = broker.logs()

    broker.start()
    assert admin.call("GET", "/users/CORP/alice")[1]["groups"] == ["staff"]
    assert len(admin.call("GET", "/entitlements")[1]["entitlements"]) == 4
    assert admin.call("GET", "/assignments?pool=desk")[1]["assignments"] == assignments
    again = broker.client()
    assert again.login("alice", ALICE_PW) == p.AUTH_OK
    assert again.allocate(again.resources()["desk"]).agent.ip_address == alice_desk  # type: ignore[union-attr]
    # unassigning lets placement choose again
    status, removed = admin.call("DELETE", "/assignments/desk/CORP/alice")
    assert status == 200 and removed["changed"] is True
    broker.stop()
    logs = first_logs + broker.logs()
    for secret in (ADMIN_TOKEN, ALICE_PW, BOB_PW):
        assert secret not in logs


# ---------------------------------------------------------------- start-up errors


def _run_broker(
    tmp_path: Path, config: dict[str, object], env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    cfg = tmp_path / "bad.properties"
    cfg.write_text("".join(f"{k}={v}\n" for k, v in config.items()))
    return subprocess.run(
        [sys.executable, "-m", "gatehouse.broker", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={
            **{k: v for k, v in os.environ.items() if not k.startswith("GATEHOUSE_")},
            **(env or {}),
        },
    )


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"ClientTlsVerify": "false"}, "AdminToken is required"),
        ({"AdminToken": "short", "ClientTlsVerify": "false"}, "AdminToken must be at least 16 characters"),
        ({"AdminToken": ADMIN_TOKEN}, "ClientCaCert is required while ClientTlsVerify is true"),
        (
            {"AdminToken": ADMIN_TOKEN, "ClientCaCert": "/nonexistent/ca.pem"},
            "cannot load CA certificates from /nonexistent/ca.pem",
        ),
        (
            {
                "AdminToken": ADMIN_TOKEN,
                "ClientTlsVerify": "false",
                "Database": "postgresql://u:pw@db/broker",
            },
            "the URL holds a password; give it in DatabasePasswordFile",
        ),
        (
            {"AdminToken": ADMIN_TOKEN, "ClientTlsVerify": "false", "AgentStaleAfter": "soon"},
            "AgentStaleAfter",
        ),
    ],
)
def test_bad_configuration_fails_with_one_line(
    tmp_path: Path, pki: CertAuthority, config: dict[str, object], message: str
) -> None:
    certs = pki.issue("bad-broker")
    full = {"SslCert": certs.cert, "SslKey": certs.key, "Database": tmp_path / "b.db", **config}
    result = _run_broker(tmp_path, full)
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert ADMIN_TOKEN not in result.stderr + result.stdout and "pw@db" not in result.stderr


def test_weak_certificate_is_refused(tmp_path: Path, pki: CertAuthority) -> None:
    certs = pki.issue("weak-broker", key_size=1024)
    result = _run_broker(
        tmp_path,
        {
            "SslCert": certs.cert,
            "SslKey": certs.key,
            "Database": tmp_path / "b.db",
            "AdminToken": ADMIN_TOKEN,
            "ClientCaCert": pki.ca,
        },
    )
    assert result.returncode != 0 and "at least 2048 bits" in result.stderr
