"""The broker admin API client (module_utils._broker_api.client) and the object planning (_broker_objects).

Request building and diff rendering are pure; error mapping runs against a real aiohttp server with
real TLS on loopback, so what is tested is what ``open_url`` really raises.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import socket
import ssl
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "integration"))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
importlib.import_module("collection_helpers").ensure_importable()
api_mod = importlib.import_module(
    "ansible_collections.gatehouse.access.plugins.module_utils._broker_api.client"
)
obj_mod = importlib.import_module(
    "ansible_collections.gatehouse.access.plugins.module_utils._broker_api.objects"
)
CertAuthority = importlib.import_module("pki").TestPKI

TOKEN = "unit-admin-token-0123456789"
BrokerApi = api_mod.BrokerApi
BrokerApiError = api_mod.BrokerApiError


# ---------------------------------------------------------------- URLs and request building


def test_path_segments_are_percent_encoded() -> None:
    assert api_mod.api_path("users", "CORP", "alice") == "/api/v1/users/CORP/alice"
    assert api_mod.api_path("desktops", "a b?c#d%e") == "/api/v1/desktops/a%20b%3Fc%23d%25e"
    assert api_mod.api_path("users", "CORP", "jürgen") == "/api/v1/users/CORP/j%C3%BCrgen"
    # A slash cannot smuggle in another path.
    assert api_mod.api_path("pools", "../users") == "/api/v1/pools/..%2Fusers"


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("https://broker.example:8443", "https://broker.example:8443"),
        ("https://broker.example:8443/", "https://broker.example:8443"),
        ("https://broker.example/api/v1/", "https://broker.example"),
        ("https://[::1]:8443", "https://[::1]:8443"),
        (" https://10.0.0.5 ", "https://10.0.0.5"),
    ],
)
def test_broker_url_is_normalised(given: str, expected: str) -> None:
    assert api_mod.check_broker_url(given) == expected


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ("http://broker.example:8443", "https://"),
        ("broker.example:8443", "https://"),
        ("", "https://"),
        ("https://broker.example:99999", "not a valid URL"),
        ("https://user:pw@broker.example", "credentials"),
        ("https://broker.example/?x=1", "query"),
    ],
)
def test_bad_broker_urls_are_refused(given: str, message: str) -> None:
    with pytest.raises(BrokerApiError) as err:
        api_mod.check_broker_url(given)
    assert message in err.value.message


def test_an_empty_token_is_refused_before_any_request() -> None:
    with pytest.raises(BrokerApiError) as err:
        BrokerApi("https://broker.example", "", opener=lambda *a, **k: pytest.fail("no request expected"))
    assert "GATEHOUSE_ADMIN_TOKEN" in err.value.message


def test_a_timeout_below_one_second_is_refused() -> None:
    with pytest.raises(BrokerApiError, match="timeout must be at least 1 second"):
        BrokerApi("https://broker.example", TOKEN, timeout=0)


class FakeResponse:
    def __init__(self, status: int, body: Any) -> None:
        self.status = status
        self.body = b"" if body is None else json.dumps(body).encode()

    def getcode(self) -> int:
        return self.status

    def read(self) -> bytes:
        return self.body


class Recorder:
    """An opener with open_url's signature that records the call (request building only)."""

    def __init__(self, answer: Any = None, status: int = 200) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.answer = answer
        self.status = status

    def __call__(self, url: str, **kwargs: Any) -> FakeResponse:
        self.calls.append((url, kwargs))
        return FakeResponse(self.status, self.answer)


def test_put_in_check_mode_builds_the_request() -> None:
    rec = Recorder({"changed": True})
    api = BrokerApi(
        "https://b.example:8443/", TOKEN, validate_certs=True, ca_cert="/ca.pem", timeout=7, opener=rec
    )
    assert api.put("/api/v1/users/CORP/alice", {"enabled": False}, check_mode=True) == {"changed": True}
    url, kw = rec.calls[0]
    assert url == "https://b.example:8443/api/v1/users/CORP/alice?check_mode=true"
    assert kw["method"] == "PUT"
    assert json.loads(kw["data"]) == {"enabled": False}
    assert kw["headers"]["Authorization"] == "Bearer " + TOKEN
    assert kw["headers"]["Content-Type"] == "application/json"
    assert (kw["timeout"], kw["validate_certs"], kw["ca_path"]) == (7, True, "/ca.pem")
    assert kw["follow_redirects"] == "none"


def test_real_writes_and_gets_have_no_query_and_no_body() -> None:
    rec = Recorder({"changed": False})
    api = BrokerApi("https://b.example", TOKEN, opener=rec)
    api.delete("/api/v1/pools/p1")
    api.get("/api/v1/pools/p1")
    assert [(u, kw["method"], kw["data"]) for u, kw in rec.calls] == [
        ("https://b.example/api/v1/pools/p1", "DELETE", None),
        ("https://b.example/api/v1/pools/p1", "GET", None),
    ]
    assert "Content-Type" not in rec.calls[1][1]["headers"]


# ---------------------------------------------------------------- diff rendering


def test_diff_of_a_created_object_has_an_empty_before() -> None:
    after = {"name": "p1", "members": []}
    assert api_mod.render_diff(None, after) == {"before": {}, "after": after}
    assert api_mod.render_diff(after, None) == {"before": after, "after": {}}


def test_password_change_is_a_marker_never_a_value() -> None:
    before = {"name": "alice", "password_set": True}
    diff = api_mod.render_diff(before, {**before, "password": "s3cret-value"}, password_changed=True)
    assert diff["after"]["password"] == "(changed)"
    assert "s3cret-value" not in json.dumps(diff)
    assert "password" not in diff["before"]
    assert "password" not in api_mod.render_diff(before, before)["after"]
    # The input objects are not modified.
    assert before == {"name": "alice", "password_set": True}


# ---------------------------------------------------------------- object planning


def test_merge_names_exact_and_append() -> None:
    assert obj_mod.merge_names(["a", "B"], ["c"], append=False) == ["c"]
    assert obj_mod.merge_names(["a", "B"], ["b", "c", "C"], append=True) == ["a", "B", "c"]
    assert obj_mod.merge_names(None, ["x"], append=True) == ["x"]


class StubApi:
    """Answers GET and check-password for the planning functions (no HTTP involved)."""

    def __init__(self, current: dict[str, Any] | None, match: bool) -> None:
        self.current = current
        self.match = match
        self.password_checks = 0

    def get(self, path: str) -> dict[str, Any] | None:
        return self.current

    def password_matches(self, domain: str, name: str, password: str) -> bool:
        self.password_checks += 1
        return self.match


def user_params(**over: Any) -> dict[str, Any]:
    base = {
        "name": "alice",
        "domain": "CORP",
        "display_name": None,
        "enabled": None,
        "groups": None,
        "append": False,
        "password": "pw-1234567890",
        "update_password": "always",
        "state": "present",
    }
    return {**base, **over}


EXISTING = {"domain": "CORP", "name": "alice", "display_name": "", "enabled": True, "groups": ["a"]}


@pytest.mark.parametrize(
    ("current", "match", "update", "sends", "checks"),
    [
        (None, False, "always", True, 0),  # new user: no check-password call (it would 404)
        (None, False, "on_create", True, 0),
        (EXISTING, True, "always", False, 1),
        (EXISTING, False, "always", True, 1),
        (EXISTING, False, "on_create", False, 0),
    ],
)
def test_user_password_is_sent_only_when_needed(current, match, update, sends, checks) -> None:
    stub = StubApi(current, match)
    plan = obj_mod.plan_user(stub, user_params(update_password=update), "CORP")
    assert ("password" in plan.body) is sends
    assert plan.password_changed is sends
    assert stub.password_checks == checks


def test_unset_options_are_not_sent() -> None:
    plan = obj_mod.plan_user(StubApi(EXISTING, True), user_params(enabled=False), "CORP")
    assert plan.body == {"enabled": False}
    plan = obj_mod.plan_user(StubApi(EXISTING, True), user_params(groups=["b"], append=True), "CORP")
    assert plan.body == {"groups": ["a", "b"]}


def test_check_mode_prediction_for_missing_references() -> None:
    plan = obj_mod.plan_user(StubApi(None, False), user_params(groups=["new"]), "CORP")
    after = obj_mod.predict(plan, user_params(groups=["new"]), "CORP")
    assert after == {"name": "alice", "domain": "CORP", "groups": ["new"], "password_set": True}
    assert "password" not in after
    params = {"name": "d1", "pool": "", "state": "present", "address": None, "hostname": None}
    params.update({"agent_port": None, "session_port": None, "enabled": None})
    plan = obj_mod.plan_desktop(StubApi({"name": "d1", "pool": "p"}, False), params)
    assert obj_mod.predict(plan, params, None) == {"name": "d1", "pool": None}


def test_ports_and_names_are_checked_before_any_request() -> None:
    params = {"name": "d1", "agent_port": 0, "session_port": None, "state": "present"}
    with pytest.raises(BrokerApiError, match="agent_port must be between 1 and 65535"):
        obj_mod.plan_desktop(None, params)
    with pytest.raises(BrokerApiError, match="name must be a non-empty name"):
        obj_mod.converge(None, "group", {"name": " x", "state": "present", "domain": "CORP"})


# ---------------------------------------------------------------- error mapping against a real TLS server


class TlsServer:
    """aiohttp on 127.0.0.1 with a test CA's certificate, run in a thread (open_url blocks)."""

    def __init__(self, app: web.Application, ctx: ssl.SSLContext) -> None:
        self.app = app
        self.ctx = ctx
        self.loop = asyncio.new_event_loop()
        self.port = 0
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.runner = web.AppRunner(self.app)
        self.loop.run_until_complete(self.runner.setup())
        site = web.TCPSite(self.runner, "127.0.0.1", 0, ssl_context=self.ctx)
        self.loop.run_until_complete(site.start())
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.ready.set()
        self.loop.run_forever()

    def start(self) -> TlsServer:
        self.thread.start()
        assert self.ready.wait(10)
        return self

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def build_app(seen: list[dict[str, Any]]) -> web.Application:
    async def handler(request: web.Request) -> web.Response:
        body = await request.read()
        seen.append(
            {
                "method": request.method,
                "path": request.path,
                "query": dict(request.query),
                "auth": request.headers.get("Authorization"),
                "body": json.loads(body) if body else None,
            }
        )
        if request.headers.get("Authorization") != "Bearer " + TOKEN:
            return web.json_response({"error": "missing or wrong bearer token"}, status=401)
        name = request.path.rsplit("/", 1)[-1]
        if name == "bad":
            return web.json_response(
                {"error": "groups: no such group in CORP: x", "field": "groups"}, status=400
            )
        if name == "missing":
            return web.json_response({"error": "user CORP\\missing does not exist"}, status=404)
        if name == "nowhere":
            return web.Response(status=404, text="<html>Not Found</html>")
        if name == "conflict":
            return web.json_response({"error": "conflicts with existing data: UNIQUE"}, status=409)
        if name == "boom":
            return web.Response(status=500, text="<html>oops</html>")
        if name == "html":
            return web.Response(status=200, text="<html>not the broker</html>")
        return web.json_response({"changed": False, "path": request.path})

    app = web.Application()
    app.router.add_route("*", "/api/v1/{tail:.*}", handler)
    return app


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory):
    return CertAuthority(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def server(ca) -> Iterator[tuple[TlsServer, list[dict[str, Any]]]]:
    certs = ca.issue("api")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(certs.cert), str(certs.key))
    seen: list[dict[str, Any]] = []
    srv = TlsServer(build_app(seen), ctx).start()
    yield srv, seen
    srv.stop()


def client(server, ca, token: str = TOKEN, **kwargs: Any):
    srv = server[0]
    return BrokerApi(f"https://localhost:{srv.port}", token, ca_cert=str(ca.ca), timeout=10, **kwargs)


def test_real_request_reaches_the_server(server, ca) -> None:
    seen = server[1]
    seen.clear()
    answer = client(server, ca).put("/api/v1/users/CORP/a%20b", {"enabled": True}, check_mode=True)
    assert answer == {"changed": False, "path": "/api/v1/users/CORP/a b"}
    assert seen == [
        {
            "method": "PUT",
            "path": "/api/v1/users/CORP/a b",
            "query": {"check_mode": "true"},
            "auth": "Bearer " + TOKEN,
            "body": {"enabled": True},
        }
    ]


def test_401_says_the_token_was_refused_without_showing_it(server, ca) -> None:
    wrong = "wrong-token-abcdefghijklmnop"
    with pytest.raises(BrokerApiError) as err:
        client(server, ca, token=wrong).get("/api/v1/users")
    assert err.value.status == 401
    assert err.value.message.startswith("the broker refused the admin token")
    assert wrong not in err.value.message and TOKEN not in err.value.message


def test_400_carries_the_brokers_message_and_field(server, ca) -> None:
    with pytest.raises(BrokerApiError) as err:
        client(server, ca).put("/api/v1/users/CORP/bad", {"groups": ["x"]})
    assert err.value.message == "the broker rejected the request: groups: no such group in CORP: x"
    assert (err.value.status, err.value.field) == (400, "groups")


def test_404_is_none_for_get_and_an_error_for_writes(server, ca) -> None:
    api = client(server, ca)
    assert api.get("/api/v1/users/CORP/missing") is None
    with pytest.raises(BrokerApiError) as err:
        api.put("/api/v1/entitlements/missing", {})
    assert err.value.status == 404 and err.value.message.startswith("user CORP\\missing does not exist")
    # A 404 that is not the broker's "does not exist" (a wrong URL) is an error, not an absent object.
    with pytest.raises(BrokerApiError) as err:
        api.get("/api/v1/users/CORP/nowhere")
    assert err.value.status == 404 and "Not Found" in err.value.message


def test_other_failures_name_status_and_url(server, ca) -> None:
    api = client(server, ca)
    with pytest.raises(BrokerApiError) as err:
        api.put("/api/v1/pools/conflict", {})
    assert err.value.status == 409 and "conflicts with existing data" in err.value.message
    with pytest.raises(BrokerApiError) as err:
        api.get("/api/v1/boom")
    assert err.value.status == 500 and "HTTP 500" in err.value.message and "/api/v1/boom" in err.value.message
    with pytest.raises(BrokerApiError) as err:
        api.get("/api/v1/html")
    assert "not JSON" in err.value.message


def test_tls_verification_failure_points_at_ca_cert(server, ca) -> None:
    srv = server[0]
    api = BrokerApi(f"https://localhost:{srv.port}", TOKEN, timeout=10)  # system trust store only
    with pytest.raises(BrokerApiError) as err:
        api.get("/api/v1/users")
    assert "TLS verification" in err.value.message and "ca_cert" in err.value.message
    # Without verification the same server answers (test setups with self-signed certificates).
    assert (
        BrokerApi(f"https://localhost:{srv.port}", TOKEN, validate_certs=False).get("/api/v1/x") is not None
    )


def test_connection_refused_names_the_url() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: connections are refused
        with pytest.raises(BrokerApiError) as err:
            BrokerApi(f"https://127.0.0.1:{port}", TOKEN, timeout=5).get("/api/v1/users")
    assert (
        err.value.message == f"cannot connect to the broker at https://127.0.0.1:{port}: connection refused"
    )
    assert err.value.status is None
