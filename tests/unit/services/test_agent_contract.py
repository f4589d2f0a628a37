"""The CM <-> agent contract, checked against fixtures of the real PCoIP agent's format.

``tests/fixtures/pcoip-agent/`` holds the launch-session and its answers as real agents take and
give them (docs/protocol.md names the public source). Each direction is held to the fixture:

- what the CM sends has exactly the fixture's elements and attributes, no more, no fewer;
- the agent stand-in accepts the fixture and refuses it with any element dropped, renamed or added;
- what the stand-in answers has exactly the fixture answer's elements;
- the CM reads the fixture answers and refuses an answer missing or renaming a required element.
"""

from __future__ import annotations

import copy
import sys
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from agent_format import ANSWER, REFUSAL, REQUEST, shape

from gatehouse import protocol as p
from gatehouse.cm import agent as agent_call
from gatehouse.cm.sessions import Session
from gatehouse.grant import MAX_TOKEN_LENGTH, GrantSealer, decode_secret, generate_secret

SID = "0b3c1d9e-8f1a-4d4e-9a51-2b6a3f0c7d11"


def paths(body: bytes) -> list[str]:
    """Paths (below the message element) of every element of the fixture message."""

    def walk(el: ET.Element, prefix: str) -> Iterator[str]:
        for child in el:
            yield prefix + child.tag
            yield from walk(child, f"{prefix}{child.tag}/")

    return list(walk(ET.fromstring(body)[0], ""))


def mutate(body: bytes, path: str, how: str) -> bytes:
    root = ET.fromstring(body)
    message = root[0]
    parent_path, _sep, name = path.rpartition("/")
    parent = message.find(parent_path) if parent_path else message
    assert parent is not None
    el = parent.find(name)
    assert el is not None
    if how == "drop":
        parent.remove(el)
    elif how == "rename":
        el.tag = f"{el.tag}-x"
    else:  # "duplicate"
        parent.append(copy.deepcopy(el))
    return ET.tostring(root, encoding="UTF-8", xml_declaration=True)


def cm_request() -> bytes:
    session = Session(session_id=SID, cookie="c", client_ip="198.51.100.7", username="alice", domain="CORP")
    session.client_name = agent_call.client_name("alice-laptop")
    session.client_mac = agent_call.client_mac("00-16-3E-12-34-56")
    agent = p.AgentInfo("10.0.1.21", "desk1.corp.example")
    request = agent_call.launch_request(
        session, agent, "correct horse", "https://licence.corp.example:7070/request"
    )
    return p.render("pcoip-agent", request)


# ------------------------------------------------------------------ CM -> agent


def test_the_cm_sends_exactly_the_real_launch_session() -> None:
    sent, fixture = shape(cm_request()), shape(REQUEST)
    assert sent - fixture == set(), "the CM sends elements a real agent does not take"
    assert fixture - sent == set(), "the CM leaves out elements a real agent expects"


def test_the_cm_fills_the_request_as_the_seed_says() -> None:
    sent = p.parse(cm_request(), "pcoip-agent")
    assert isinstance(sent, p.LaunchSession)
    # One id through CM, SG and agent logs; the address the CM saw; what the client reported.
    assert sent.session_log_id == SID and len(sent.session_log_id) == 36
    assert (sent.client_ip, sent.client_name, sent.client_mac) == (
        "198.51.100.7",
        "alice-laptop",
        "00:16:3e:12:34:56",
    )
    assert (sent.ip_address, sent.hostname) == ("10.0.1.21", "desk1.corp.example")
    assert (sent.username, sent.password, sent.domain) == ("alice", "correct horse", "CORP")
    assert sent.license_path == "https://licence.corp.example:7070/request"


def test_the_stand_in_reads_the_real_request() -> None:
    message = p.parse(REQUEST, "pcoip-agent")
    assert isinstance(message, p.LaunchSession)
    assert (message.session_log_id, message.username, message.password) == (SID, "alice", "correct horse")


@pytest.mark.parametrize("how", ["drop", "rename", "duplicate"])
@pytest.mark.parametrize("path", paths(REQUEST))
def test_the_stand_in_refuses_any_change_to_the_request(path: str, how: str) -> None:
    with pytest.raises(p.ProtocolError) as info:
        p.parse(mutate(REQUEST, path, how), "pcoip-agent")
    assert info.value.result_id == p.E_MALFORMED


def test_the_stand_in_refuses_an_extra_element_and_another_logon_method() -> None:
    extra = REQUEST.replace(b"<client-name>", b"<license-server-url>x</license-server-url><client-name>")
    bypass = REQUEST.replace(b'method="windows-password"', b'method="windows-password" bypass="false"')
    for body in (extra, bypass, REQUEST.replace(b"windows-password", b"smartcard")):
        with pytest.raises(p.ProtocolError):
            p.parse(body, "pcoip-agent")


# ------------------------------------------------------------------ agent -> CM


def test_the_stand_in_answers_exactly_the_real_shape() -> None:
    info = p.SessionInfo(
        "10.0.1.21", 4172, SID, "UGgT2fB5l0w2dC4P2q9Lr8s3X0nYc1tZkE7mQ4aVb6M=", "desk1.corp.example"
    )
    assert shape(p.render("pcoip-agent", p.LaunchSessionResp(p.LAUNCH_OK, "", info))) == shape(ANSWER)
    refusal = p.LaunchSessionResp(p.E_USER_AUTH, "The user could not be logged on to the desktop.")
    assert shape(p.render("pcoip-agent", refusal)) == shape(REFUSAL)


def test_the_cm_reads_the_real_answers() -> None:
    answer = p.parse(ANSWER, "pcoip-agent")
    assert isinstance(answer, p.LaunchSessionResp) and answer.result_id == p.LAUNCH_OK
    assert answer.session_info is not None
    agent_call.check_session_info(answer.session_info)
    assert (answer.session_info.ip_address, answer.session_info.port) == ("10.0.1.21", 4172)
    refusal = p.parse(REFUSAL, "pcoip-agent")
    assert isinstance(refusal, p.LaunchSessionResp) and refusal.session_info is None
    assert refusal.result_id == p.E_USER_AUTH and refusal.fail_reason


@pytest.mark.parametrize("how", ["drop", "rename"])
@pytest.mark.parametrize(
    "path", ["result-id", *(f"session-info/{name}" for name in p.SESSION_INFO_ELEMENTS if name != "sni")]
)
def test_the_cm_refuses_an_answer_missing_a_required_element(path: str, how: str) -> None:
    with pytest.raises(p.ProtocolError):
        p.parse(mutate(ANSWER, path, how), "pcoip-agent")


@pytest.mark.parametrize("how", ["drop", "rename"])
def test_an_answer_without_sni_element_is_refused_but_an_empty_one_is_read(how: str) -> None:
    with pytest.raises(p.ProtocolError):
        p.parse(mutate(ANSWER, "session-info/sni", how), "pcoip-agent")
    empty = p.parse(ANSWER.replace(b"<sni>desk1.corp.example</sni>", b"<sni/>"), "pcoip-agent")
    assert isinstance(empty, p.LaunchSessionResp) and empty.session_info is not None
    assert empty.session_info.sni == ""


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("ip_address", "0.0.0.0"),
        ("ip_address", "::"),
        ("ip_address", "224.0.0.1"),
        ("ip_address", "255.255.255.255"),
        ("ip_address", "not an address"),
        ("ip_address", "1.2.3"),
        ("port", 0),
        ("port", 65536),
        ("session_tag", ""),
        ("session_tag", "x" * 257),
        ("session_tag", "tag with spaces"),
        ("session_tag", "tag\r\nCONNECT other"),
        ("session_id", "x" * 129),
        ("session_id", "id\x00"),
        ("sni", "sni with space"),
    ],
)
def test_a_hostile_answer_is_not_turned_into_a_grant(field: str, value: object) -> None:
    good = dict(ip_address="10.0.1.21", port=4172, session_id=SID, session_tag="abc-DEF_123=", sni="desk1")
    agent_call.check_session_info(p.SessionInfo(**good))  # type: ignore[arg-type]
    with pytest.raises(agent_call.InvalidAnswer):
        agent_call.check_session_info(p.SessionInfo(**{**good, field: value}))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("reported", "kept"),
    [
        ("00:16:3E:12:34:56", "00:16:3e:12:34:56"),
        ("00-16-3e-12-34-56", "00:16:3e:12:34:56"),
        ("00:16-3e:12:34:56", ""),
        ("0016.3e12.3456", ""),
        ("<script>", ""),
        ("", ""),
    ],
)
def test_only_a_mac_address_reaches_client_mac(reported: str, kept: str) -> None:
    assert agent_call.client_mac(reported) == kept


def test_client_name_is_printable_and_capped() -> None:
    assert agent_call.client_name("laptop\r\n\x00<b>") == "laptop<b>"
    assert len(agent_call.client_name("x" * 500)) == agent_call.MAX_CLIENT_NAME


def test_the_largest_valid_answer_still_makes_a_grant_the_sg_opens() -> None:
    info = p.SessionInfo(
        ".".join(["a" * 63] * 3) + "." + "b" * 61,  # a 253-character DNS name
        65535,
        "i" * agent_call.MAX_AGENT_SESSION_ID,
        "t" * agent_call.MAX_SESSION_TAG,
        "s" * 253,
    )
    agent_call.check_session_info(info)
    sealer = GrantSealer(decode_secret(generate_secret()))
    token = sealer.mint(
        SID, info.ip_address, info.port, info.session_tag, "2001:db8:ffff:ffff:ffff:ffff:ffff:ffff"
    )
    assert len(token) <= MAX_TOKEN_LENGTH
    grant = sealer.open(token, "2001:db8:ffff:ffff:ffff:ffff:ffff:ffff")
    assert (grant.agent_host, grant.session_tag) == (info.ip_address, info.session_tag)
