"""The CM's client session state machine, session table, limits and the Client-Log-Id fallback."""

from __future__ import annotations

import pytest

from gatehouse import protocol as p
from gatehouse.cm.sessions import (
    REQUESTS,
    EstablishmentLimiter,
    Session,
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


def login(
    table: SessionTable, ip: str, now: float = 0, log_id: str = "", connection: object = None
) -> Session:
    session = table.create(ip, log_id=log_id, now=now)
    table.authenticated(session, connection)
    return session


def test_max_clients_counts_authenticated_sessions_only() -> None:
    table = SessionTable(max_clients=2, idle_timeout=60)
    login(table, "192.0.2.1")
    second = login(table, "192.0.2.2")
    with pytest.raises(SessionsFull) as err:
        table.create("192.0.2.3", now=1)
    assert err.value.limit == "max_clients"
    table.remove(second)
    pending = table.create("192.0.2.3", now=1)
    # Anonymous sessions do not count: many more hellos fit, and the user can still log in.
    for i in range(20):
        table.create(f"198.51.100.{i}", now=1)
    table.authenticated(pending)
    assert table.authenticated_count == 2 and table.pre_auth_count == 20


def test_the_counts_follow_the_sessions_through_login_removal_and_expiry() -> None:
    table = SessionTable(max_clients=5, idle_timeout=60, pre_auth_timeout=10)
    user = table.create("192.0.2.1", now=0)
    assert not user.authenticated and user.state is State.HELLO
    table.authenticated(user)
    # The table moves the session on: its state is what says it is authenticated.
    assert user.authenticated and user.state is State.AUTHENTICATED
    anonymous = table.create("192.0.2.2", now=0)
    assert (table.authenticated_count, table.pre_auth_count, len(table)) == (1, 1, 2)
    assert table.remove(user) and not table.remove(user)  # a second removal changes nothing
    assert (table.authenticated_count, table.pre_auth_count, len(table)) == (0, 1, 1)
    assert table.expire(now=11) == [anonymous]
    assert (table.authenticated_count, table.pre_auth_count, len(table)) == (0, 0, 0)


def test_authentication_rotates_the_cookie() -> None:
    table = SessionTable(max_clients=5, idle_timeout=60)
    session = table.create("192.0.2.1", now=0)
    before = session.cookie
    after = table.authenticated(session)
    assert after == session.cookie and after != before and len(after) >= 32
    assert table.find(before, None, "192.0.2.1", now=1) is None
    assert table.find(after, None, "192.0.2.1", now=1) is session


def test_pre_auth_sessions_live_pre_auth_timeout_from_creation() -> None:
    table = SessionTable(max_clients=5, idle_timeout=900, pre_auth_timeout=60)
    pending = table.create("192.0.2.1", now=0)
    pending.touch(50)
    assert table.find(pending.cookie, None, "192.0.2.1", now=59) is pending
    assert table.find(pending.cookie, None, "192.0.2.1", now=61) is None  # touching does not extend it
    assert table.take_evicted() == [pending]
    user = login(table, "192.0.2.2", now=0)
    user.touch(500)
    assert table.find(user.cookie, None, "192.0.2.2", now=900) is user


def test_per_source_cap_refuses_and_trusted_proxies_are_exempt() -> None:
    import ipaddress

    table = SessionTable(
        max_clients=5,
        idle_timeout=900,
        max_pre_auth_per_source=3,
        exempt=[ipaddress.ip_network("10.0.0.0/8")],
    )
    for _n in range(3):
        table.create("192.0.2.1", now=0)
    with pytest.raises(SessionsFull) as err:
        table.create("192.0.2.1", now=0)
    assert err.value.limit == "max_pre_auth_sessions_per_source"
    table.create("192.0.2.2", now=0)  # another address is not affected
    for _n in range(10):
        table.create("10.1.2.3", now=0)
    # Expired ones make room for their own source again.
    table.create("192.0.2.1", now=61)


def test_a_full_pre_auth_pool_evicts_the_oldest_of_the_busiest_source() -> None:
    table = SessionTable(max_clients=5, idle_timeout=900, max_pre_auth=6, max_pre_auth_per_source=16)
    user = table.create("192.0.2.1", now=0)  # the oldest of all, alone on its address
    flood = [table.create("198.51.100.1", now=1) for _n in range(5)]
    newcomer = table.create("198.51.100.1", now=2)
    assert table.take_evicted() == [flood[0]] and table.evictions == 1
    assert table.find(user.cookie, None, "192.0.2.1", now=3) is user
    assert table.find(flood[0].cookie, None, "198.51.100.1", now=3) is None
    assert table.pre_auth_count == 6 and newcomer in table.sessions()
    # An expired session is the first to go, whoever holds it.
    late = table.create("203.0.113.9", now=70)
    assert table.take_evicted() == [user] and late in table.sessions()


def test_authenticated_sessions_are_never_evicted_by_hellos() -> None:
    table = SessionTable(max_clients=5, idle_timeout=900, max_pre_auth=2, max_pre_auth_per_source=16)
    user = login(table, "192.0.2.1", now=0)
    for i in range(50):
        table.create(f"198.51.100.{i % 7}", now=1)
    assert table.find(user.cookie, None, "192.0.2.1", now=2) is user
    assert table.pre_auth_count == 2 and table.authenticated_count == 1


def test_idle_timeout_and_max_lifetime_end_authenticated_sessions() -> None:
    table = SessionTable(max_clients=1, idle_timeout=10, max_lifetime=100)
    idle = login(table, "192.0.2.1", now=0, log_id="a")
    idle.touch(5)
    assert table.find(idle.cookie, None, "192.0.2.1", now=14) is idle
    # 11 s after the last touch it is gone, and MaxClients has room again.
    fresh = login(table, "192.0.2.2", now=16.5)
    assert table.find(idle.cookie, None, "192.0.2.1", now=16.5) is None
    assert table.sessions() == [fresh]
    for t in range(20, 116, 5):
        fresh.touch(t)
    assert table.find(fresh.cookie, None, "192.0.2.2", now=115) is fresh
    assert table.find(fresh.cookie, None, "192.0.2.2", now=117) is None  # 100.5 s after creation


def test_expire_returns_the_forgotten_sessions() -> None:
    table = SessionTable(max_clients=5, idle_timeout=10, pre_auth_timeout=5)
    a = login(table, "192.0.2.1", now=0)
    b = login(table, "192.0.2.2", now=8)
    pending = table.create("192.0.2.3", now=9)
    assert table.expire(now=15) == [a, pending]
    assert table.sessions() == [b]
    assert table.find(b.cookie, None, "192.0.2.2", now=15) is b


def test_client_log_id_after_authentication_only_on_the_authenticating_connection() -> None:
    table = SessionTable(max_clients=5, idle_timeout=60)
    conn, other_conn = object(), object()
    session = table.create("192.0.2.7", log_id="L", now=0)
    assert table.find(None, "L", "192.0.2.7", now=1) is session  # pre-auth: address + log id
    table.authenticated(session, conn)
    assert table.find(None, "L", "192.0.2.7", now=1, connection=conn) is session
    # A neighbour behind the same NAT who knows the log id gets nothing on its own connection.
    assert table.find(None, "L", "192.0.2.7", now=1, connection=other_conn) is None
    assert table.find(None, "L", "192.0.2.7", now=1) is None


def test_client_log_id_is_off_once_the_client_showed_its_cookie() -> None:
    table = SessionTable(max_clients=5, idle_timeout=60)
    session = table.create("192.0.2.7", log_id="L", now=0)
    assert table.find(session.cookie, "L", "192.0.2.7", now=1) is session
    assert table.find(None, "L", "192.0.2.7", now=1) is None


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


async def test_a_login_in_progress_is_passed_over_and_a_vanished_one_is_refused() -> None:
    table = SessionTable(max_clients=5, idle_timeout=900, max_pre_auth=3, max_pre_auth_per_source=16)
    first, second, third = (table.create("198.51.100.1", now=0) for _n in range(3))
    async with first.lock:  # first's authenticate is with the broker
        table.create("198.51.100.1", now=1)
        assert table.take_evicted() == [second]
        table.create("198.51.100.1", now=1)
        assert table.take_evicted() == [third]
    assert table.authenticated(first) is not None
    table.remove(second)
    assert table.authenticated(second) is None
