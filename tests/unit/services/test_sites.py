"""Multi-site: site names and gateways, the CM and SG settings, per-site grant keys, the CM's
target for another site's desktop, sites that are down, the desktops' site column and the client's
list of CMs (docs/multisite.md)."""

from __future__ import annotations

import sqlite3
from dataclasses import replace
from pathlib import Path

import pytest

from gatehouse import protocol as p
from gatehouse.broker.db import MIGRATIONS, Database
from gatehouse.broker.placement import Member, choose_desktop, choose_from_pool, down_sites
from gatehouse.broker.store import Store
from gatehouse.client.__main__ import parse_args
from gatehouse.cm.settings import CmSettings
from gatehouse.cm.target import NoSiteGateway, build_target, site_gateway
from gatehouse.config import Config, ConfigError
from gatehouse.grant import GrantError, GrantSealer, decode_secret, generate_secret
from gatehouse.sg.settings import SgSettings
from gatehouse.sites import Gateway, check_site, parse_gateway, parse_site_gateways

SECRET_TEXT = generate_secret()
SECRET = decode_secret(SECRET_TEXT)
SID = "5b0e6c1a-9d7f-4e2b-8a31-6c5d4e3f2a10"
INFO = p.SessionInfo("10.2.0.5", 4172, SID, "agent-tag-0123456789abcdef", sni="desk-b.corp")
NOW = 10_000.0
STALE = 30.0

# ---------------------------------------------------------------- names and gateways


@pytest.mark.parametrize("name", ["", "site1", "paris-dc_2", "0", "a" * 63])
def test_valid_site_names(name: str) -> None:
    assert check_site(name) == name


@pytest.mark.parametrize("name", ["Site1", "-a", "_a", "a b", "a.b", "a" * 64, "sité"])
def test_invalid_site_names_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match="not a site name"):
        check_site(name)


@pytest.mark.parametrize(
    ("text", "gateway"),
    [
        ("203.0.113.20:4172", Gateway("203.0.113.20", 4172)),
        ("203.0.113.20", Gateway("203.0.113.20", 4172)),
        ("[2001:db8::20]:14172", Gateway("2001:db8::20", 14172)),
        ("2001:db8::20", Gateway("2001:db8::20", 4172)),
        ("sg.site2.example.com:4172", Gateway("sg.site2.example.com", 4172)),
    ],
)
def test_gateways_parse(text: str, gateway: Gateway) -> None:
    assert parse_gateway(text) == gateway
    assert parse_gateway(str(gateway)) == gateway


@pytest.mark.parametrize(
    "text", ["203.0.113.20:0", "203.0.113.20:70000", "[2001:db8::1", "bad_name:4172", ":4172"]
)
def test_bad_gateways_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_gateway(text)


def test_site_gateways_map_and_its_errors() -> None:
    assert parse_site_gateways(["site1=203.0.113.10:4172", "site2=[2001:db8::2]:4172"]) == {
        "site1": Gateway("203.0.113.10", 4172),
        "site2": Gateway("2001:db8::2", 4172),
    }
    for items, message in (
        (["site1"], "not site=host:port"),
        (["=1.2.3.4"], "not site=host:port"),
        (["Site1=1.2.3.4"], "not a site name"),
        (["s=1.2.3.4", "s=1.2.3.5"], "named twice"),
        (["s=1.2.3.4:99999"], "site 's'"),
    ):
        with pytest.raises(ValueError, match=message):
            parse_site_gateways(items)


# ---------------------------------------------------------------- settings


def cm(values: dict[str, str], secret: bool = True) -> CmSettings:
    base = {"BrokerUrl": "https://broker:8443", "ExternalPcoipIp": "203.0.113.10", **values}
    return CmSettings.from_config(Config(base, {"GATEHOUSE_GRANTSECRET": SECRET_TEXT} if secret else {}))


def test_cm_site_and_site_gateways_are_read() -> None:
    s = cm({"Site": "site1", "SiteGateways": "site2=203.0.113.20:4172, site1=203.0.113.10"})
    assert s.site == "site1"
    assert s.site_gateways == (
        ("site1", Gateway("203.0.113.10", 4172)),
        ("site2", Gateway("203.0.113.20", 4172)),
    )
    assert s.site_gateway("site2") == Gateway("203.0.113.20", 4172) and s.site_gateway("site3") is None
    default = cm({})
    assert (default.site, default.site_gateways) == ("", ())


def test_cm_site_settings_are_validated() -> None:
    with pytest.raises(ConfigError, match=r"^Site: 'Paris' is not a site name"):
        cm({"Site": "Paris"})
    with pytest.raises(ConfigError, match=r"^SiteGateways: 'site2' is not site=host:port"):
        cm({"SiteGateways": "site2"})
    with pytest.raises(ConfigError, match="GrantSecret is required with SiteGateways"):
        cm({"SecurityGatewayEnabled": "false", "SiteGateways": "site2=203.0.113.20"}, secret=False)
    # Direct mode with a secret: desktops of other sites go through their gateways.
    lan = cm({"SecurityGatewayEnabled": "false", "Site": "site1", "SiteGateways": "site2=203.0.113.20"})
    assert lan.site_gateway("site2") is not None


def test_sg_site_is_read_and_validated() -> None:
    env = {"GATEHOUSE_GRANTSECRET": SECRET_TEXT}
    assert SgSettings.from_config(Config({"AgentTlsVerify": "false", "Site": "site2"}, env)).site == "site2"
    assert SgSettings.from_config(Config({"AgentTlsVerify": "false"}, env)).site == ""
    with pytest.raises(ConfigError, match=r"^Site: "):
        SgSettings.from_config(Config({"AgentTlsVerify": "false", "Site": "Site 2"}, env))


# ---------------------------------------------------------------- grants per site


def mint(sealer: GrantSealer) -> str:
    return sealer.mint(SID, "10.2.0.5", 4172, "tag", "198.51.100.7")


def test_a_grant_opens_only_with_the_key_of_its_site() -> None:
    site1, site2, none = GrantSealer(SECRET, "site1"), GrantSealer(SECRET, "site2"), GrantSealer(SECRET)
    assert site2.open(mint(GrantSealer(SECRET, "site2")), "198.51.100.7").session_id == SID
    for minted_by, opened_by in ((site2, site1), (site1, site2), (none, site1), (site1, none)):
        with pytest.raises(GrantError) as err:
            opened_by.open(mint(minted_by), "198.51.100.7")
        assert err.value.reason == "forged"


def test_a_sealer_without_a_site_keeps_the_key_it_always_had() -> None:
    # The single-site key: what a CM of an earlier release mints, an SG without Site accepts.
    assert GrantSealer(SECRET, "").open(mint(GrantSealer(SECRET)), "198.51.100.7").session_id == SID


# ---------------------------------------------------------------- the CM's target


def cm_settings(**kw: object) -> CmSettings:
    base = CmSettings(
        broker_url="https://broker/pcoip-broker/xml",
        external_pcoip_ip=("203.0.113.10",),
        grant_secret=SECRET,
        site="site1",
        site_gateways=(
            ("site2", Gateway("203.0.113.20", 14172)),
            ("site3", Gateway("sg.site3.example", 4172)),
        ),
    )
    return replace(base, **kw)  # type: ignore[arg-type]


def test_site_gateway_chooses_the_route() -> None:
    s = cm_settings()
    assert site_gateway(s, "") is None and site_gateway(s, "site1") is None
    assert site_gateway(s, "site2") == Gateway("203.0.113.20", 14172)
    with pytest.raises(NoSiteGateway, match="site 'site9'"):
        site_gateway(s, "site9")


def test_another_sites_desktop_gets_that_sites_gateway_and_a_grant_for_its_key() -> None:
    s = cm_settings()
    agent = p.AgentInfo("10.2.0.5", "desk-b", site="site2")
    remote = (Gateway("203.0.113.20", 14172), GrantSealer(SECRET, "site2"))
    own = GrantSealer(SECRET, "site1")
    target = build_target(s, own, SID, "198.51.100.7", agent, INFO, "cm1.example.com", remote)
    assert (target.ip_address, target.port, target.sni, target.hostname) == ("203.0.113.20", 14172, "", "")
    grant = GrantSealer(SECRET, "site2").open(target.connect_tag, "198.51.100.7")
    assert (grant.agent_host, grant.session_tag) == ("10.2.0.5", "agent-tag-0123456789abcdef")
    with pytest.raises(GrantError):
        own.open(target.connect_tag, "198.51.100.7")
    named = build_target(
        s,
        own,
        SID,
        "198.51.100.7",
        agent,
        INFO,
        "",
        (Gateway("sg.site3.example", 4172), GrantSealer(SECRET, "site3")),
    )
    assert (named.ip_address, named.sni, named.hostname) == ("sg.site3.example",) * 3
    # In direct mode too: the other site's desktop is reached through its gateway.
    direct = build_target(
        replace(s, enable_security_gateway=False), None, SID, "198.51.100.7", agent, INFO, "", remote
    )
    assert direct.port == 14172 and direct.connect_tag != INFO.session_tag


def test_the_own_sites_desktop_keeps_the_own_gateway_with_the_own_sites_key() -> None:
    s = cm_settings()
    own = GrantSealer(SECRET, "site1")
    target = build_target(s, own, SID, "198.51.100.7", p.AgentInfo("10.1.0.5", site="site1"), INFO, "cm1")
    assert (target.ip_address, target.port) == ("203.0.113.10", 4172)
    assert own.open(target.connect_tag, "198.51.100.7").session_id == SID


def test_agent_info_carries_the_site_only_when_there_is_one() -> None:
    with_site = p.AllocateResourceResp(p.ALLOC_OK, "", "d-1", agent=p.AgentInfo("10.0.0.1", site="site2"))
    body = p.render("pcoip-broker", with_site)
    assert b"<site>site2</site>" in body
    parsed = p.parse(body, "pcoip-broker")
    assert isinstance(parsed, p.AllocateResourceResp) and parsed.agent is not None
    assert parsed.agent.site == "site2"
    without = p.render("pcoip-broker", replace(with_site, agent=p.AgentInfo("10.0.0.1")))
    assert b"<site>" not in without


# ---------------------------------------------------------------- sites that are down


def test_a_site_is_down_when_its_latest_report_is_stale() -> None:
    last = {"site1": NOW - STALE - 1, "site2": NOW - 1, "site3": NOW - STALE}
    assert down_sites(last, NOW, STALE) == frozenset({"site1"})
    assert down_sites({}, NOW, STALE) == frozenset()


def test_desktops_of_a_down_site_are_not_placed_even_those_that_never_report() -> None:
    down = frozenset({"site1"})
    silent = Member(1, "a2", site="site1")  # never reported: placed while its site is up
    assert choose_desktop(silent, NOW, STALE) is silent
    assert choose_desktop(silent, NOW, STALE, down=down) is None
    assert choose_desktop(Member(2, "x"), NOW, STALE, down=down) is not None  # no site: never excluded
    fresh_a = Member(3, "a", active_sessions=0, capacity=10, reported_at=NOW - 1, site="site1")
    busy_b = Member(4, "b", active_sessions=9, capacity=10, reported_at=NOW - 1, site="site2")
    assert choose_from_pool([fresh_a, busy_b], NOW, STALE).name == "a"  # type: ignore[union-attr]
    assert choose_from_pool([fresh_a, busy_b], NOW, STALE, down=down).name == "b"  # type: ignore[union-attr]
    # A persistent assignment on a down site moves.
    assert choose_from_pool([fresh_a, busy_b], NOW, STALE, assigned_id=3, down=down).name == "b"  # type: ignore[union-attr]
    assert choose_from_pool([fresh_a], NOW, STALE, down=down) is None


# ---------------------------------------------------------------- the desktops' site column


def test_migration_6_adds_the_site_column_and_keeps_desktops(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    old = Database.open(path, upto=5)
    with old.transaction() as conn:
        conn.execute("INSERT INTO desktops (name, address) VALUES ('d1', '10.0.0.1')")
    old.close()
    db = Database.open(path)
    try:
        assert db.schema_version() == len(MIGRATIONS) >= 6
        store = Store(db)
        assert store.get_desktop("d1")["site"] == ""  # type: ignore[index]
        assert db.one("SELECT name FROM sqlite_master WHERE name = 'desktops_site'") is not None
    finally:
        db.close()


def test_released_migrations_are_not_edited() -> None:
    # Migration 6 is the site column; any change goes into a new step.
    assert MIGRATIONS[5] == [
        "ALTER TABLE desktops ADD COLUMN site TEXT NOT NULL DEFAULT ''",
        "CREATE INDEX desktops_site ON desktops (site)",
    ]


def test_store_keeps_a_desktops_site_and_the_sites_latest_report(tmp_path: Path) -> None:
    db = Database.open(tmp_path / "b.db")
    try:
        store = Store(db)
        with db.transaction():
            store.put_desktop("a1", {"address": "10.1.0.1", "site": "site1"})
            store.put_desktop("a2", {"address": "10.1.0.2", "site": "site1"})
            store.put_desktop("b1", {"address": "10.2.0.1", "site": "site2"})
            store.put_desktop("x", {"address": "10.9.0.1"})
        a1 = store.desktop_record("a1")
        assert a1 is not None and a1.site == "site1"
        report = {"address": "10.1.0.1", "agent_port": 60443, "hostname": "", "session_port": 4172}
        with db.transaction():
            store.record_report([a1.id], {**report, "active_sessions": 0, "capacity": 4}, 123.0)
        assert store.site_last_reports() == {"site1": 123.0}
        assert store.list_sites() == [
            {"name": "site1", "desktops": 2, "last_report": 123.0},
            {"name": "site2", "desktops": 1, "last_report": None},
        ]
        assert {m.site for m in store.members(desktop_id=a1.id)} == {"site1"}
        with db.transaction():
            store.put_desktop("a2", {"site": ""})
        assert store.get_desktop("a2")["site"] == ""  # type: ignore[index]
    finally:
        db.close()


def test_the_site_column_is_not_null(tmp_path: Path) -> None:
    db = Database.open(tmp_path / "b.db")
    try:
        with pytest.raises(sqlite3.IntegrityError), db.transaction() as conn:
            conn.execute("INSERT INTO desktops (name, address, site) VALUES ('d', '10.0.0.1', NULL)")
    finally:
        db.close()


# ---------------------------------------------------------------- the client's list of CMs


def test_client_takes_repeated_and_comma_separated_urls_in_order() -> None:
    args = parse_args(
        ["--url", "https://cm1:443, https://cm2", "--url", "https://cm3", "--attempt-timeout", "2"]
    )
    assert args.url == ["https://cm1:443", "https://cm2", "https://cm3"]
    assert args.attempt_timeout == 2.0
    assert parse_args(["--url", "https://cm1"]).attempt_timeout == 10.0


@pytest.mark.parametrize("argv", [["--url", " , "], ["--url", "https://cm1", "--attempt-timeout", "0"]])
def test_client_refuses_an_empty_list_or_deadline(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        parse_args(argv)
