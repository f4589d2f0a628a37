"""The CM's client session state machine, session table, limits and the Client-Log-Id fallback."""

from __future__ import annotations

import pytest

from gatehouse import protocol as p
from gatehouse.cm.sessions import (
    REQUESTS,
    EstablishmentLimiter,
    SessionsFull,
    SessionTable,
    State,
    check_transition,
)

AUTH = p.Authenticate.tag
LIST = p.GetResourceList.tag
ALLOC = p.AllocateResource.tag


@pytest.mark.parametrize("state", [None, *State])
@pytest.mark.parametrize("tag", [p.Hello.tag, p.Bye.tag])
def test_hello_and_bye_are_accepted_in_every_state(state: State | None, tag: str) -> None:
    check_transition(state, tag)


@pytest.mark.parametrize(
    ("state", "tag"),
    [
        (State.HELLO, AUTH),
        (State.AUTHENTICATED, LIST),
        (State.LISTED, LIST),
        (State.AUTHENTICATED, ALLOC),
        (State.LISTED, ALLOC),
    ],
)
def test_the_flow_moves_forward(state: State, tag: str) -> None:
    check_transition(state, tag)


@pytest.mark.parametrize(
    ("state", "tag", "result_id"),
    [
        (None, AUTH, p.E_OUT_OF_STATE),
        (None, LIST, p.E_USER_AUTH),
        (None, ALLOC, p.E_USER_AUTH),
        (State.HELLO, LIST, p.E_USER_AUTH),
        (State.HELLO, ALLOC, p.E_USER_AUTH),
        (State.AUTHENTICATED, AUTH, p.E_OUT_OF_STATE),
        (State.LISTED, AUTH, p.E_OUT_OF_STATE),
        (State.ALLOCATING, ALLOC, p.E_OUT_OF_STATE),
        (State.ALLOCATED, ALLOC, p.E_OUT_OF_STATE),
        (State.ALLOCATED, LIST, p.E_OUT_OF_STATE),
        (State.ALLOCATED, AUTH, p.E_OUT_OF_STATE),
    ],
)
def test_out_of_state_messages_are_refused(state: State | None, tag: str, result_id: str) -> None:
    with pytest.raises(p.ProtocolError) as err:
        check_transition(state, tag)
    assert err.value.result_id == result_id


@pytest.mark.parametrize(
    "tag", [p.HelloResp.tag, p.LaunchSession.tag, p.ErrorResp.tag, p.AuthenticateResp.tag]
)
def test_responses_and_agent_messages_are_not_client_requests(tag: str) -> None:
    assert tag not in REQUESTS
    with pytest.raises(p.ProtocolError) as err:
        check_transition(State.LISTED, tag)
    assert err.value.result_id == p.E_UNKNOWN


def test_sessions_get_a_uuid_and_a_separate_random_cookie() -> None:
    table = SessionTable(max_clients=10, idle_timeout=60)
    a = table.create("192.0.2.1")
    b = table.create("192.0.2.1")
    assert len(a.session_id) == 36 and a.session_id.count("-") == 4
    assert a.cookie != a.session_id and a.session_id not in a.cookie
    assert len(a.cookie) >= 32
    assert a.cookie != b.cookie and a.session_id != b.session_id
    assert table.find(a.cookie, None, "192.0.2.1") is a
    assert table.find(b.cookie, None, "192.0.2.99") is b  # the cookie is the credential
    assert table.find("not-a-cookie", None, "192.0.2.1") is None
    assert len(table) == 2


def test_client_log_id_finds_the_session_when_there_is_no_cookie() -> None:
    table = SessionTable(max_clients=10, idle_timeout=60)
    session = table.create("192.0.2.7", log_id="log-123")
    assert table.find(None, "log-123", "192.0.2.7") is session
    assert table.find("", "log-123", "192.0.2.7") is session
    # An unknown cookie still falls back to the header.
    assert table.find("stale-cookie", "log-123", "192.0.2.7") is session


def test_client_log_id_only_counts_from_the_address_that_opened_the_session() -> None:
    table = SessionTable(max_clients=10, idle_timeout=60)
    table.create("192.0.2.7", log_id="log-123")
    assert table.find(None, "log-123", "198.51.100.1") is None
    assert table.find(None, "other-log", "192.0.2.7") is None


def test_a_newer_session_takes_over_the_client_log_id_and_removal_cleans_up() -> None:
    table = SessionTable(max_clients=10, idle_timeout=60)
    old = table.create("192.0.2.7", log_id="L")
    new = table.create("192.0.2.7", log_id="L")
    assert table.find(None, "L", "192.0.2.7") is new
    assert table.remove(old)
    assert table.find(None, "L", "192.0.2.7") is new  # removing the old one keeps the new mapping
    assert table.remove(new)
    assert table.find(None, "L", "192.0.2.7") is None
    assert not table.remove(new)
    assert len(table) == 0


def test_max_clients_refuses_a_new_session() -> None:
    table = SessionTable(max_clients=2, idle_timeout=60)
    table.create("192.0.2.1", now=0)
    second = table.create("192.0.2.2", now=0)
    with pytest.raises(SessionsFull):
        table.create("192.0.2.3", now=1)
    table.remove(second)
    table.create("192.0.2.3", now=1)
    assert len(table) == 2


def test_idle_sessions_make_room_and_are_not_found() -> None:
    table = SessionTable(max_clients=1, idle_timeout=10)
    idle = table.create("192.0.2.1", log_id="a", now=0)
    assert table.find(idle.cookie, None, "192.0.2.1", now=5) is idle
    idle.touch(5)
    assert table.find(idle.cookie, None, "192.0.2.1", now=14) is idle
    # 11 s after the last touch it is gone, and MaxClients has room again.
    fresh = table.create("192.0.2.2", now=16.5)
    assert table.find(idle.cookie, None, "192.0.2.1", now=16.5) is None
    assert table.find(None, "a", "192.0.2.1", now=16.5) is None
    assert table.sessions() == [fresh]


def test_expire_returns_the_forgotten_sessions() -> None:
    table = SessionTable(max_clients=5, idle_timeout=10)
    a = table.create("192.0.2.1", now=0)
    b = table.create("192.0.2.2", now=8)
    assert table.expire(now=15) == [a]
    assert table.sessions() == [b]
    assert table.find(b.cookie, None, "192.0.2.2", now=15) is b


def test_establishment_limiter_refuses_at_once_beyond_the_limit() -> None:
    limiter = EstablishmentLimiter(2)
    assert limiter.try_acquire()
    assert limiter.try_acquire()
    assert not limiter.try_acquire()
    assert limiter.in_flight == 2
    limiter.release()
    assert limiter.try_acquire()
    limiter.release()
    limiter.release()
    limiter.release()
    limiter.release()  # never below zero
    assert limiter.in_flight == 0
