"""Collaboration on the CM: its settings, the invitation book, the states that may invite or join,
and the agent's side (a collaborator is admitted to a running session only)."""

from __future__ import annotations

import asyncio

import pytest

from gatehouse import protocol as p
from gatehouse.agent.endpoint import Endpoint
from gatehouse.agent.tags import TagStore
from gatehouse.cm.invitations import (
    CODE_BYTES,
    MIN_RETAIN,
    RETAINED_PER_OUTSTANDING,
    InvitationBook,
    InvitationRefused,
    digest,
    owner_refusal,
)
from gatehouse.cm.metrics import INVITATION_REFUSALS, CmMetrics
from gatehouse.cm.sessions import SessionTable, State, check_transition
from gatehouse.cm.settings import MAX_INVITATION_TTL, CmSettings
from gatehouse.config import Config, ConfigError

AGENT = p.AgentInfo("10.0.0.5", "desk5")
BASE = {"BrokerUrl": "https://broker:8443", "SecurityGatewayEnabled": "false"}


def load(**values: str) -> CmSettings:
    return CmSettings.from_config(Config({**BASE, **values}, {}))


# ---------------------------------------------------------------- settings


def test_collaboration_defaults_follow_the_seed() -> None:
    s = load()
    assert s.enable_collaboration is True  # the seed: "(default true)"
    assert (s.invitation_ttl, s.max_invitations_per_session, s.max_invitation_attempts) == (300.0, 5, 5)


def test_collaboration_keys_are_read() -> None:
    s = load(
        EnableCollaboration="false",
        InvitationTtl="30",
        MaxInvitationsPerSession="2",
        MaxInvitationAttempts="3",
    )
    assert s.enable_collaboration is False
    assert (s.invitation_ttl, s.max_invitations_per_session, s.max_invitation_attempts) == (30.0, 2, 3)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("EnableCollaboration", "maybe"),
        ("InvitationTtl", "0"),
        ("InvitationTtl", str(MAX_INVITATION_TTL + 1)),
        ("InvitationTtl", "inf"),
        ("InvitationTtl", "nan"),
        ("InvitationTtl", "five minutes"),
        ("MaxInvitationsPerSession", "0"),
        ("MaxInvitationsPerSession", "101"),
        ("MaxInvitationAttempts", "0"),
    ],
)
def test_bad_collaboration_values_are_refused(key: str, value: str) -> None:
    with pytest.raises(ConfigError, match=key):
        load(**{key: value})


# ---------------------------------------------------------------- states


@pytest.mark.parametrize("state", [None, State.HELLO, State.AUTHENTICATED, State.LISTED, State.ALLOCATING])
def test_only_an_allocated_session_invites(state: State | None) -> None:
    with pytest.raises(p.ProtocolError) as err:
        check_transition(state, p.CreateInvitation.tag)
    expected = p.E_USER_AUTH if state in (None, State.HELLO) else p.E_OUT_OF_STATE
    assert err.value.result_id == expected
    check_transition(State.ALLOCATED, p.CreateInvitation.tag)


@pytest.mark.parametrize("state", [None, State.HELLO, State.ALLOCATING, State.ALLOCATED])
def test_only_an_authenticated_session_without_a_desktop_joins(state: State | None) -> None:
    with pytest.raises(p.ProtocolError) as err:
        check_transition(state, p.RedeemInvitation.tag)
    expected = p.E_USER_AUTH if state in (None, State.HELLO) else p.E_OUT_OF_STATE
    assert err.value.result_id == expected
    check_transition(State.AUTHENTICATED, p.RedeemInvitation.tag)
    check_transition(State.LISTED, p.RedeemInvitation.tag)


# ---------------------------------------------------------------- the invitation book


def owner(table: SessionTable, agent_session_id: str = "agent-sid-1"):
    session = table.create("192.0.2.10", now=0)
    table.authenticated(session)
    session.state = State.ALLOCATED
    session.agent = AGENT
    session.agent_session_id = agent_session_id
    return session


def test_codes_are_unguessable_and_only_their_digest_is_kept() -> None:
    book = InvitationBook(ttl=300, max_per_session=100)
    table = SessionTable(10, 900)
    who = owner(table)
    codes = [book.create(who, AGENT, who.agent_session_id, now=0) for _n in range(50)]
    assert len(set(codes)) == 50
    assert all(len(code) >= CODE_BYTES * 4 // 3 for code in codes)
    stored = repr(book.__dict__)
    assert not any(code in stored for code in codes)
    assert digest(codes[0]) in book._by_digest


def test_a_code_is_accepted_once() -> None:
    book = InvitationBook(ttl=300, max_per_session=5)
    table = SessionTable(10, 900)
    who = owner(table)
    code = book.create(who, AGENT, who.agent_session_id, now=0)
    invitation = book.redeem(code, now=1)
    assert invitation.owner is who and invitation.agent_session_id == "agent-sid-1"
    with pytest.raises(InvitationRefused) as err:
        book.redeem(code, now=2)
    assert (err.value.reason, err.value.result_id) == ("used", p.JOIN_USED)


def test_unknown_and_expired_codes_are_refused_apart() -> None:
    book = InvitationBook(ttl=300, max_per_session=5)
    table = SessionTable(10, 900)
    who = owner(table)
    code = book.create(who, AGENT, who.agent_session_id, now=0)
    with pytest.raises(InvitationRefused) as err:
        book.redeem("x" * 32, now=1)
    assert (err.value.reason, err.value.result_id) == ("unknown", p.JOIN_UNKNOWN)
    with pytest.raises(InvitationRefused) as err:
        book.redeem(code, now=301)
    assert (err.value.reason, err.value.result_id) == ("expired", p.JOIN_EXPIRED)


def test_spent_entries_are_forgotten_a_while_after_their_expiry() -> None:
    book = InvitationBook(ttl=10, max_per_session=5)
    table = SessionTable(10, 900)
    who = owner(table)
    code = book.create(who, AGENT, who.agent_session_id, now=0)
    book.prune(now=10 + MIN_RETAIN - 1)
    assert len(book) == 1  # still refused as "expired"
    with pytest.raises(InvitationRefused) as err:
        book.redeem(code, now=10 + MIN_RETAIN - 0.5)
    assert err.value.reason == "expired"
    book.prune(now=10 + MIN_RETAIN + 1)
    assert len(book) == 0
    with pytest.raises(InvitationRefused) as err:
        book.redeem(code, now=10 + MIN_RETAIN + 2)
    assert err.value.reason == "unknown"


def test_spent_entries_per_session_are_bounded_whatever_the_lifetime() -> None:
    book = InvitationBook(ttl=1, max_per_session=2)
    table = SessionTable(10, 900)
    who = owner(table)
    first = book.create(who, AGENT, who.agent_session_id, now=0)
    for step in range(1, 50):
        book.create(who, AGENT, who.agent_session_id, now=step * 2)  # each one expired before the next
    assert len(book) <= RETAINED_PER_OUTSTANDING * 2
    with pytest.raises(InvitationRefused) as err:
        book.redeem(first, now=100)
    assert err.value.reason == "unknown"  # the oldest spent entry made room


def test_outstanding_invitations_per_session_are_capped() -> None:
    book = InvitationBook(ttl=300, max_per_session=2)
    table = SessionTable(10, 900)
    who, other = owner(table), owner(table, "agent-sid-2")
    first = book.create(who, AGENT, who.agent_session_id, now=0)
    book.create(who, AGENT, who.agent_session_id, now=0)
    with pytest.raises(InvitationRefused) as err:
        book.create(who, AGENT, who.agent_session_id, now=0)
    assert (err.value.reason, err.value.result_id) == ("limit", p.INVITE_LIMIT)
    book.create(other, AGENT, other.agent_session_id, now=0)  # another owner has its own cap
    book.redeem(first, now=1)  # a used one no longer counts
    book.create(who, AGENT, who.agent_session_id, now=1)
    assert book.outstanding(now=1) == 3
    assert book.outstanding(now=400) == 0  # nor do expired ones


def test_an_invitation_dies_with_the_owners_session() -> None:
    book = InvitationBook(ttl=300, max_per_session=5)
    table = SessionTable(10, 900)
    who = owner(table)
    invitation = book.redeem(book.create(who, AGENT, who.agent_session_id, now=0), now=0)
    assert owner_refusal(invitation, table.alive(who, now=0)) is None
    table.remove(who)
    refusal = owner_refusal(invitation, table.alive(who, now=0))
    assert refusal is not None and (refusal.reason, refusal.result_id) == ("ended", p.JOIN_ENDED)


def test_an_invitation_is_for_the_agent_session_it_was_made_for() -> None:
    book = InvitationBook(ttl=300, max_per_session=5)
    table = SessionTable(10, 900)
    who = owner(table)
    invitation = book.redeem(book.create(who, AGENT, who.agent_session_id, now=0), now=0)
    who.agent_session_id = "another-agent-session"
    refusal = owner_refusal(invitation, table.alive(who, now=0))
    assert refusal is not None and refusal.reason == "ended"


def test_an_idle_owner_session_is_not_alive() -> None:
    table = SessionTable(10, idle_timeout=60)
    who = owner(table)
    assert table.alive(who, now=30)
    assert not table.alive(who, now=61)


def test_every_refusal_reason_is_a_metric_label() -> None:
    metrics = CmMetrics(lambda: 0, lambda: 0)
    text = "\n".join(
        f"{s.name}{s.labels}" for m in metrics.registry.collect() for s in m.samples if "invitation" in s.name
    )
    for reason in INVITATION_REFUSALS:
        assert f"'reason': '{reason}'" in text
    for name in ("created", "redeemed", "outstanding", "attempts_exceeded"):
        assert f"gatehouse_cm_invitation{'s' if name != 'attempts_exceeded' else ''}_{name}" in text


# ---------------------------------------------------------------- the agent


class _Transport:
    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.closed = False

    def get_extra_info(self, name: str) -> object:
        return ("192.0.2.50", 40000) if name == "peername" else None

    def set_write_buffer_limits(self, high: int) -> None:
        pass

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True


async def _channel(endpoint: Endpoint, tag: str):
    channel = endpoint.protocol()
    transport = _Transport()
    channel.connection_made(transport)  # type: ignore[arg-type]
    channel.data_received(f"CONNECT {tag}\r\n".encode())
    return channel, transport


async def test_the_agent_admits_collaborators_while_the_owner_is_connected() -> None:
    endpoint = Endpoint(TagStore(60))
    assert not endpoint.running("sid-1")
    owner_ch, owner_tr = await _channel(endpoint, endpoint.tags.issue("sid-1", "192.0.2.10"))
    assert owner_tr.written[0].startswith(b"200") and endpoint.running("sid-1")
    collab_ch, collab_tr = await _channel(
        endpoint, endpoint.tags.issue("sid-1", "192.0.2.11", collaborator=True)
    )
    assert collab_tr.written[0].startswith(b"200") and collab_ch.collaborator
    assert endpoint.active == 2
    # A collaborator leaving does not end the session.
    collab_ch.connection_lost(None)
    assert endpoint.running("sid-1") and not owner_tr.closed
    second, second_tr = await _channel(
        endpoint, endpoint.tags.issue("sid-1", "192.0.2.12", collaborator=True)
    )
    # The owner leaving ends it for the collaborators.
    owner_ch.connection_lost(None)
    assert not endpoint.running("sid-1")
    assert second_tr.closed
    second.connection_lost(None)
    assert endpoint.active == 0
    await asyncio.sleep(0)


async def test_a_collaborator_tag_for_an_ended_session_is_refused() -> None:
    endpoint = Endpoint(TagStore(60))
    tag = endpoint.tags.issue("sid-gone", "192.0.2.11", collaborator=True)
    _ch, transport = await _channel(endpoint, tag)
    assert transport.written[0].startswith(b"403") and transport.closed
    assert endpoint.active == 0 and endpoint.refused == 1
