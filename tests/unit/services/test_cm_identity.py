"""The CM relays multi-step authentication: passcode steps, AUTH_SUCCESSFUL_BUT_INCOMPLETE with the
next method, the session staying unauthenticated until the last step, and the held password."""

from __future__ import annotations

import pytest

from gatehouse import protocol as p
from gatehouse.cm.server import ConnectionManager
from gatehouse.cm.sessions import Session, State
from gatehouse.cm.settings import CmSettings

PASSWORD = "Correct-Horse-7731"


class ScriptedBroker:
    """Stands in for the upstream broker: answers each request with the next scripted reply and
    records what the CM sent."""

    def __init__(self, *replies: p.Message) -> None:
        self.replies = list(replies)
        self.sent: list[p.Message] = []

    async def broker(self, session: Session, message: p.Message) -> p.Message:
        self.sent.append(message)
        return self.replies.pop(0)


def cm_with(*replies: p.Message) -> tuple[ConnectionManager, ScriptedBroker, Session]:
    cm = ConnectionManager(CmSettings(broker_url="https://broker.test/pcoip-broker/xml", max_auth_attempts=3))
    broker = ScriptedBroker(*replies)
    cm.upstream = broker  # type: ignore[assignment]
    return cm, broker, cm.table.create("192.0.2.10")


def incomplete(method: str, prompt: str = "Enter your passcode") -> p.AuthenticateResp:
    return p.AuthenticateResp(p.AUTH_INCOMPLETE, prompt, [method])


async def test_password_then_passcode_is_relayed_and_completes() -> None:
    cm, broker, session = cm_with(incomplete(p.AUTH_PASSCODE), p.AuthenticateResp(p.AUTH_OK, "authenticated"))
    first = await cm.authenticate(p.Authenticate("alice", PASSWORD, "CORP"), session)
    assert first.message == p.AuthenticateResp(p.AUTH_INCOMPLETE, "Enter your passcode", [p.AUTH_PASSCODE])
    assert session.state is State.HELLO and first.set_cookie is None and not session.authenticated
    assert session.password is not None  # the password step passed: held for the desktop logon
    second = await cm.authenticate(p.Authenticate("alice", "", "CORP", p.METHOD_PASSCODE, "123456"), session)
    assert isinstance(second.message, p.AuthenticateResp) and second.message.result_id == p.AUTH_OK
    assert session.state is State.AUTHENTICATED and second.set_cookie == session.cookie
    assert session.take_password() == PASSWORD
    relayed = broker.sent[1]
    assert isinstance(relayed, p.Authenticate)
    assert (relayed.method, relayed.passcode, relayed.password) == (p.METHOD_PASSCODE, "123456", "")
    assert cm.table.authenticated_count == 1 and cm.table.pre_auth_count == 0


async def test_a_failed_step_forgets_the_password_and_counts() -> None:
    cm, _broker, session = cm_with(
        incomplete(p.AUTH_PASSCODE), p.AuthenticateResp(p.AUTH_FAILED, "unknown username or password")
    )
    await cm.authenticate(p.Authenticate("alice", PASSWORD, "CORP"), session)
    failed = await cm.authenticate(p.Authenticate("alice", "", "CORP", p.METHOD_PASSCODE, "000000"), session)
    assert isinstance(failed.message, p.AuthenticateResp) and failed.message.result_id == p.AUTH_FAILED
    assert session.password is None and session.auth_failures == 1 and session.state is State.HELLO


async def test_a_passcode_step_that_passes_first_holds_no_password() -> None:
    cm, _broker, session = cm_with(
        incomplete(p.AUTH_PASSWORD, "Enter your password"), p.AuthenticateResp(p.AUTH_OK)
    )
    await cm.authenticate(p.Authenticate("alice", "", "CORP", p.METHOD_PASSCODE, "123456"), session)
    assert session.password is None and session.state is State.HELLO
    await cm.authenticate(p.Authenticate("alice", PASSWORD, "CORP"), session)
    assert session.state is State.AUTHENTICATED and session.take_password() == PASSWORD


async def test_a_challenge_prompt_is_passed_on_printable() -> None:
    cm, _broker, session = cm_with(incomplete(p.AUTH_PASSCODE, "Enter the\x07 code\nsent by SMS"))
    out = await cm.authenticate(p.Authenticate("alice", "", "CORP", p.METHOD_PASSCODE, "1"), session)
    assert isinstance(out.message, p.AuthenticateResp)
    assert out.message.result_str == "Enter the codesent by SMS" and out.message.next_methods == [
        p.AUTH_PASSCODE
    ]


@pytest.mark.parametrize("next_methods", [[], ["AUTHENTICATE_VIA_SMARTCARD"]])
async def test_an_incomplete_answer_without_a_known_next_method_is_a_broker_error(
    next_methods: list[str],
) -> None:
    cm, _broker, session = cm_with(p.AuthenticateResp(p.AUTH_INCOMPLETE, "?", next_methods))
    out = await cm.authenticate(p.Authenticate("alice", PASSWORD, "CORP"), session)
    assert out.message == p.ErrorResp(p.E_INTERNAL, "Error occurred while communicating with broker")
    assert session.password is None and session.state is State.HELLO


async def test_a_broker_error_is_passed_on_and_drops_a_held_password() -> None:
    cm, _broker, session = cm_with(
        incomplete(p.AUTH_PASSCODE),
        p.ErrorResp(p.E_INTERNAL, "Error occurred while communicating with broker"),
    )
    await cm.authenticate(p.Authenticate("alice", PASSWORD, "CORP"), session)
    out = await cm.authenticate(p.Authenticate("alice", "", "CORP", p.METHOD_PASSCODE, "1"), session)
    assert out.message == p.ErrorResp(p.E_INTERNAL, "Error occurred while communicating with broker")
    assert session.password is None and session.auth_failures == 0
