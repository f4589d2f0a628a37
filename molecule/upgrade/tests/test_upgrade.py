"""upgrade: playbooks/upgrade.yml replaces the CM/SG containers node by node under client load."""

from __future__ import annotations

import threading
from typing import Any

import gatehouse_verify as gv
import pytest

SCENARIO = "upgrade"
NETWORK = "gh-mol-upgrade"
VIP = gv.address(4, 100)
CMSG = ["gh-upgrade-cmsg1", "gh-upgrade-cmsg2"]
NEW = "0.1.1"


def cmsg_containers() -> dict[str, Any]:
    return {c.name: c for host in CMSG for role in ("cm", "sg") for c in gv.services(host).get(role, [])}


# A rolling upgrade of two nodes (drain, grace, replace, health) under client load: minutes, more
# on a busy machine; what it asserts is that no session is lost, not how long it takes.
@pytest.mark.timeout(900)
def test_rolling_upgrade_under_load_loses_no_session() -> None:
    secret = gv.password(SCENARIO)
    before = {name: c.id for name, c in cmsg_containers().items()}
    assert len(before) == 4
    reports: list[dict[str, Any]] = []
    crashes: list[BaseException] = []  # a thread's exception would otherwise vanish
    stop = threading.Event()

    def load() -> None:
        try:
            while not stop.is_set():
                reports.append(gv.run_client(NETWORK, f"https://{VIP}", secret))
        except BaseException as exc:  # reported by the test below
            crashes.append(exc)

    workers = [threading.Thread(target=load, name=f"load-{n}") for n in range(2)]
    for worker in workers:
        worker.start()
    try:
        run = gv.run_playbook("upgrade.yml", "-e", f"gatehouse_cmsg_image_tag={NEW}")
    finally:
        stop.set()
        for worker in workers:
            worker.join(timeout=300)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert not crashes, f"the load generator failed: {crashes!r}"
    assert not any(worker.is_alive() for worker in workers), "the load generator did not stop"

    after = cmsg_containers()
    for name, container in after.items():
        assert container.id != before[name], f"{name} was not replaced"
        assert container.status == "running"
        assert container.image.tags and f":{NEW}" in container.image.tags[0], container.image.tags
    failed = [gv.client_failure(r) for r in reports if not r["ok"]]
    assert reports, "no session ran during the upgrade"
    assert not failed, f"{len(failed)} of {len(reports)} sessions failed: {failed[:5]}"


def test_sessions_after_the_upgrade() -> None:
    gv.assert_session(gv.run_client(NETWORK, f"https://{VIP}", gv.password(SCENARIO)))
