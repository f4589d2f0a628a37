"""The shared XML codec: round trips of every message and the refusals of hostile or broken input."""

from __future__ import annotations

import pytest

from gatehouse import protocol as p

SID = "0f8fad5b-d9cb-469f-a165-70867728950e"

MESSAGES: list[tuple[str, p.Message]] = [
    ("pcoip-client", p.Hello(p.ClientInfo("Client", "1.2", "linux", "de_DE", "host1"), ["cap-a", "cap-b"])),
    ("pcoip-broker", p.Hello(caps=[], pcm_info=p.PcmInfo(SID, "192.0.2.7", "CM", "9.9"))),
    ("pcoip-client", p.HelloResp("CM", "1.0", "cm1", [p.AUTH_PASSWORD], ["CORP", "LAB"])),
    ("pcoip-client", p.Authenticate("alice", "p<a&s>s \"w'd", "CORP")),
    ("pcoip-client", p.AuthenticateResp(p.AUTH_FAILED, "no")),
    ("pcoip-client", p.GetResourceList("DESKTOP", "PCOIP")),
    (
        "pcoip-client",
        p.GetResourceListResp(
            p.LIST_OK,
            "ok",
            [
                p.Resource("d-1", "Desk 1", state="ONLINE"),
                p.Resource("p-2", "Pool", session_type="VDI", protocols=["PCOIP", "RDP"]),
            ],
        ),
    ),
    ("pcoip-client", p.AllocateResource("d-1", client_info=p.ClientInfo(hostname="laptop"))),
    ("pcoip-broker", p.AllocateResource("p-2")),
    (
        "pcoip-client",
        p.AllocateResourceResp(
            p.ALLOC_OK,
            "ok",
            "d-1",
            target=p.Target("203.0.113.5", 4172, SID, "tag-xyz", "sg1", "sg.example", "2001:db8::5"),
        ),
    ),
    (
        "pcoip-broker",
        p.AllocateResourceResp(p.ALLOC_OK, "ok", "p-2", agent=p.AgentInfo("10.0.0.5", "desk5", 60443, 4172)),
    ),
    ("pcoip-broker", p.AllocateResourceResp(p.ALLOC_NOT_ENTITLED, "no", "d-9")),
    ("pcoip-client", p.Bye()),
    ("pcoip-client", p.ByeResp()),
    ("pcoip-client", p.ErrorResp(p.E_OUT_OF_STATE, "send hello first")),
    (
        "pcoip-agent",
        p.LaunchSession(
            SID, "192.0.2.7", "alice", "CORP", "pw", "10.0.0.5", "desk5", "laptop", "", "https://lic:7070"
        ),
    ),
    (
        "pcoip-agent",
        p.LaunchSessionResp(p.LAUNCH_OK, "ok", p.SessionInfo("10.0.0.5", 4172, SID, "stag", "desk5")),
    ),
    ("pcoip-agent", p.LaunchSessionResp(p.LAUNCH_FAILED, "busy")),
    ("pcoip-client", p.CreateInvitation()),
    ("pcoip-client", p.CreateInvitationResp(p.INVITE_OK, "", "Zx-_9aB3" * 4, 300, "cm1.example")),
    ("pcoip-client", p.CreateInvitationResp(p.COLLAB_DISABLED, "off")),
    ("pcoip-client", p.RedeemInvitation("Zx-_9aB3" * 4)),
    (
        "pcoip-client",
        p.RedeemInvitationResp(p.JOIN_OK, "", p.Target("203.0.113.5", 4172, SID, "tag-xyz", "sg1", "sg1")),
    ),
    ("pcoip-client", p.RedeemInvitationResp(p.JOIN_USED, "the invitation has been used")),
    ("pcoip-agent", p.JoinSession(SID, SID, "192.0.2.8", "laptop2", "bob", "CORP")),
    (
        "pcoip-agent",
        p.JoinSessionResp(p.LAUNCH_OK, "", p.SessionInfo("10.0.0.5", 4172, SID, "stag2", "desk5")),
    ),
]


@pytest.mark.parametrize("code", ["", "a" * (p.MAX_INVITATION_CODE + 1), "abc def", "abc+/=", "<x>"])
def test_an_invitation_code_that_cannot_be_one_is_malformed(code: str) -> None:
    body = (
        b'<pcoip-client version="2.1"><redeem-invitation><invitation-code>'
        + code.replace("<", "&lt;").replace(">", "&gt;").encode()
        + b"</invitation-code></redeem-invitation></pcoip-client>"
    )
    with pytest.raises(p.ProtocolError) as caught:
        p.parse(body, "pcoip-client")
    assert caught.value.result_id == p.E_MALFORMED


def test_collaboration_messages_are_the_clients_only() -> None:
    """A broker never sees invitations, and the agent's join-session is not a client's message."""
    for message in (p.CreateInvitation(), p.RedeemInvitation("abc")):
        with pytest.raises(p.ProtocolError) as caught:
            p.parse(p.render("pcoip-broker", message), "pcoip-broker")
        assert caught.value.result_id == p.E_UNKNOWN
    with pytest.raises(p.ProtocolError):
        p.parse(p.render("pcoip-agent", p.JoinSession("s")), "pcoip-client")


def test_no_invitation_code_in_a_repr() -> None:
    code = "Zx-_9aB3" * 4
    assert code not in repr(p.RedeemInvitation(code))
    assert code not in repr(p.CreateInvitationResp(p.INVITE_OK, "", code, 300))


@pytest.mark.parametrize(("envelope", "message"), MESSAGES, ids=lambda v: getattr(v, "tag", v))
def test_round_trip(envelope: str, message: p.Message) -> None:
    body = p.render(envelope, message)
    assert body.startswith(b"<?xml")
    assert f'<{envelope} version="{p.ENVELOPES[envelope]}">'.encode() in body
    assert p.parse(body, envelope) == message


def test_every_message_class_is_covered() -> None:
    assert {type(m).tag for _envelope, m in MESSAGES} == set(p.MESSAGES)


def test_query_hello_is_recognised() -> None:
    hello = p.parse(
        p.render("pcoip-client", p.Hello(p.ClientInfo(product_name=p.QUERY_PRODUCT))), "pcoip-client"
    )
    assert isinstance(hello, p.Hello) and hello.is_query
    assert not p.Hello().is_query


def _refused(body: bytes, envelope: str = "pcoip-client") -> p.ProtocolError:
    with pytest.raises(p.ProtocolError) as info:
        p.parse(body, envelope)
    return info.value


def test_seed_health_probe_body_is_malformed() -> None:
    assert _refused(b'<?xml version="1.0" encoding="UTF-8"?>').result_id == p.E_MALFORMED


@pytest.mark.parametrize("body", [b"", b"   \n", b"<pcoip-client", b"not xml at all", b"\xff\xfe<x/>"])
def test_garbage_is_malformed(body: bytes) -> None:
    assert _refused(body).result_id == p.E_MALFORMED


def test_billion_laughs_is_refused() -> None:
    body = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">]>
<pcoip-client version="2.1"><authenticate><username>&lol3;</username></authenticate></pcoip-client>"""
    error = _refused(body)
    assert error.result_id == p.E_MALFORMED
    assert "DTD" in error.message


def test_external_entity_is_refused() -> None:
    body = b"""<?xml version="1.0"?>
<!DOCTYPE x [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>
<pcoip-client version="2.1"><authenticate><username>&xxe;</username></authenticate></pcoip-client>"""
    error = _refused(body)
    assert error.result_id == p.E_MALFORMED
    assert "root:" not in error.message


def test_bare_doctype_is_refused() -> None:
    body = b'<!DOCTYPE pcoip-client><pcoip-client version="2.1"><bye/></pcoip-client>'
    assert _refused(body).result_id == p.E_MALFORMED


def test_body_over_64_kib_is_refused_before_parsing() -> None:
    padding = b" " * (p.MAX_BODY + 1 - len(b'<pcoip-client version="2.1"><bye/></pcoip-client>'))
    body = b'<pcoip-client version="2.1"><bye/></pcoip-client>' + padding
    assert len(body) == p.MAX_BODY + 1
    assert _refused(body).result_id == p.E_TOO_LARGE
    # exactly at the cap is still accepted
    assert isinstance(p.parse(body[:-1], "pcoip-client"), p.Bye)


def test_depth_cap() -> None:
    depth = p.MAX_DEPTH + 1
    inner = b"<x>" * (depth - 2) + b"</x>" * (depth - 2)
    body = b'<pcoip-client version="2.1"><bye>' + inner + b"</bye></pcoip-client>"
    error = _refused(body)
    assert error.result_id == p.E_MALFORMED and "deeper" in error.message
    shallow = b"<x>" * (depth - 3) + b"</x>" * (depth - 3)
    assert isinstance(
        p.parse(b'<pcoip-client version="2.1"><bye>' + shallow + b"</bye></pcoip-client>", "pcoip-client"),
        p.Bye,
    )


def test_element_count_cap() -> None:
    body = b'<pcoip-client version="2.1"><bye>' + b"<a/>" * p.MAX_ELEMENTS + b"</bye></pcoip-client>"
    assert len(body) < p.MAX_BODY
    assert _refused(body).result_id == p.E_MALFORMED


def test_wrong_envelope() -> None:
    body = p.render("pcoip-broker", p.Bye())
    error = _refused(body, "pcoip-client")
    assert error.result_id == p.E_ENVELOPE


def test_missing_version() -> None:
    assert _refused(b"<pcoip-client><bye/></pcoip-client>").result_id == p.E_VERSION


@pytest.mark.parametrize("version", ["3.0", "1.0", "x"])
def test_unsupported_version(version: str) -> None:
    body = f'<pcoip-client version="{version}"><bye/></pcoip-client>'.encode()
    assert _refused(body).result_id == p.E_VERSION


def test_same_major_version_is_accepted() -> None:
    assert isinstance(p.parse(b'<pcoip-client version="2.0"><bye/></pcoip-client>', "pcoip-client"), p.Bye)


@pytest.mark.parametrize(
    "inner", [b"<bye/><bye/>", b"", b"<hello/><authenticate><username>a</username></authenticate>"]
)
def test_envelope_needs_exactly_one_message(inner: bytes) -> None:
    body = b'<pcoip-client version="2.1">' + inner + b"</pcoip-client>"
    assert _refused(body).result_id == p.E_ENVELOPE


def test_unknown_message() -> None:
    assert _refused(b'<pcoip-client version="2.1"><launch-rockets/></pcoip-client>').result_id == p.E_UNKNOWN


def test_missing_required_field() -> None:
    body = b'<pcoip-client version="2.1"><authenticate><password>x</password></authenticate></pcoip-client>'
    error = _refused(body)
    assert error.result_id == p.E_MALFORMED and "username" in error.message


def test_only_password_authentication() -> None:
    body = b'<pcoip-client version="2.1"><authenticate method="smartcard"><username>a</username></authenticate></pcoip-client>'
    assert _refused(body).result_id == p.E_MALFORMED


def test_non_numeric_port() -> None:
    body = (
        b'<pcoip-broker version="2.1"><allocate-resource-resp><result><result-id>ALLOC_SUCCESSFUL</result-id>'
        b"</result><agent-info><ip-address>10.0.0.1</ip-address><agent-port>many</agent-port></agent-info>"
        b"</allocate-resource-resp></pcoip-broker>"
    )
    assert _refused(body, "pcoip-broker").result_id == p.E_MALFORMED


def test_error_resp_helper() -> None:
    message = p.parse(p.error_resp("pcoip-broker", p.E_BUSY, "later"), "pcoip-broker")
    assert message == p.ErrorResp(p.E_BUSY, "later")


def test_secrets_stay_out_of_repr() -> None:
    assert "hunter2" not in repr(p.Authenticate("alice", "hunter2"))
    assert "tag-secret" not in repr(p.Target("1.2.3.4", 4172, SID, "tag-secret"))
    assert "stag-secret" not in repr(p.SessionInfo("1.2.3.4", 4172, SID, "stag-secret"))
