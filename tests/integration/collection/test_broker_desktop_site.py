"""broker_desktop's site option against a real broker: stored, idempotent in check and real runs,
cleared with an empty string, a bad name refused before anything changes; the admin API lists the
sites."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from broker_helpers import Broker, module_connection, running_broker
from collection_helpers import run_module
from pki import TestPKI as CertAuthority


@pytest.fixture(scope="module")
def broker(pki: CertAuthority, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    with running_broker(pki, tmp_path_factory.mktemp("broker-site")) as b:
        yield b


def get(broker: Broker, path: str) -> dict:
    status, body = broker.admin.call("GET", path)
    assert status == 200, body
    return body


def test_a_desktops_site_is_set_kept_and_cleared(broker: Broker) -> None:
    args = module_connection(broker, name="site-desk1", address="127.0.0.51", site="site2")
    check = run_module("broker_desktop", args, check=True, diff=True)
    assert check.changed and check.result["diff"]["after"]["site"] == "site2"
    assert broker.admin.call("GET", "/desktops/site-desk1")[0] == 404  # check mode stored nothing
    real = run_module("broker_desktop", args, diff=True)
    assert real.changed and real.result["desktop"]["site"] == "site2"
    assert get(broker, "/desktops/site-desk1")["site"] == "site2"
    assert not run_module("broker_desktop", args).changed
    # Options left out keep the site.
    assert not run_module(
        "broker_desktop", module_connection(broker, name="site-desk1", enabled=True)
    ).changed
    assert get(broker, "/sites")["sites"] == [
        {"name": "site2", "desktops": 1, "state": "unknown", "last_report_age_seconds": None}
    ]
    cleared = run_module("broker_desktop", module_connection(broker, name="site-desk1", site=""), diff=True)
    assert cleared.changed and cleared.result["diff"]["before"]["site"] == "site2"
    assert get(broker, "/desktops/site-desk1")["site"] == ""
    assert get(broker, "/sites")["sites"] == []


@pytest.mark.parametrize("bad", ["Site2", "site 2", "-site", "s" * 64])
def test_a_bad_site_name_is_refused_and_changes_nothing(broker: Broker, bad: str) -> None:
    args = module_connection(broker, name="site-desk2", address="127.0.0.52", site="site1")
    assert not run_module("broker_desktop", args).failed
    before = get(broker, "/desktops/site-desk2")
    result = run_module("broker_desktop", {**args, "site": bad})
    assert result.failed and "is not a site name" in result.result["msg"], result.result
    assert get(broker, "/desktops/site-desk2") == before
