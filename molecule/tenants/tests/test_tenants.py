"""tenants: two tenants behind one shared CM/SG and a HALB VIP (docs/tenants.md).

Each tenant's broker has a user ``alice`` and a desktop ``desk``; both tenant host names lead to
the VIP (the client's --server-name: TLS SNI and Host). Each alice completes a session on her
own tenant's desk; alice@A's password fails at B; a grant of tenant A is refused under B's name.
"""

from __future__ import annotations

import json
from typing import Any

import gatehouse_verify as gv
import pytest

SCENARIO = "tenants"
NETWORK = "gh-mol-tenants"
VIP = gv.address(21, 100)
SG = gv.address(21, 21)
TENANTS = {
    "tenant-a": {"name": "desktops.tenant-a.test", "desk": gv.address(21, 31), "host": "gh-ten-desk-a"},
    "tenant-b": {"name": "desktops.tenant-b.test", "desk": gv.address(21, 32), "host": "gh-ten-desk-b"},
}


def password(tenant: str) -> str:
    """alice's generated password at her tenant's broker (one file per tenant)."""
    path = gv.STATE_ROOT / SCENARIO / "secrets" / f"user-{tenant}-corp-alice"
    return path.read_text(encoding="utf-8").strip()


def session(tenant: str, secret: str) -> dict[str, Any]:
    return gv.run_client(
        NETWORK, f"https://{VIP}:443", secret, "--server-name", TENANTS[tenant]["name"], user="alice"
    )


def agent_logs(tenant: str) -> str:
    return "".join(c.logs().decode("utf-8", "replace") for c in gv.services(TENANTS[tenant]["host"])["agent"])


def test_services_run(host: Any, groups: list[str]) -> None:
    found = gv.services(host.backend.get_hostname())
    assert set(found) == gv.expected_roles(groups)
    for containers in found.values():
        assert all(c.status == "running" for c in containers)


def test_the_cm_serves_both_tenants(host: Any, groups: list[str]) -> None:
    if "cmsg" not in groups:
        pytest.skip("CM/SG host only")
    data_dir = gv.STATE_ROOT / SCENARIO / host.backend.get_hostname() / "cmsg" / "data"
    tenants = json.loads(host.file(str(data_dir / "tenants.json")).content_string)
    assert [(t["name"], t["host_names"]) for t in tenants] == [
        (name, [t["name"]]) for name, t in TENANTS.items()
    ]
    assert [t["broker_url"] for t in tenants] == [f"https://{gv.address(21, n)}:8443" for n in (10, 11)]


@pytest.mark.parametrize("tenant", sorted(TENANTS))
def test_each_alice_gets_her_own_tenants_desk(tenant: str) -> None:
    """Full session (TCP and UDP echo through the SG) on her own tenant's desk, through the VIP."""
    report = session(tenant, password(tenant))
    gv.assert_session(report, target_ip=SG)
    assert report["resources"] == ["pool1"], report
    other = "tenant-b" if tenant == "tenant-a" else "tenant-a"
    assert report["session_id"] in agent_logs(tenant)
    assert report["session_id"] not in agent_logs(other)


def test_alice_of_a_is_not_alice_of_b() -> None:
    """The same user name at two tenants is two people: alice@A's password fails at B's broker."""
    assert password("tenant-a") != password("tenant-b")
    report = session("tenant-b", password("tenant-a"))
    assert not report["ok"]
    steps = {s["name"]: s for s in report["steps"]}
    assert not steps["authenticate"]["ok"], steps


# Logs in as alice at tenant A (through the VIP), allocates, and presents the grant to the SG first
# under tenant B's name, then under A's; prints both answer lines.
GRANT_ACROSS_TENANTS = r"""
import asyncio, json, os, sys
from gatehouse import linechan, tls
from gatehouse import protocol as p
from gatehouse.client.flow import CmConnection
url, own, other = sys.argv[1:4]
ENVELOPE = "pcoip-client"

async def send(cm, message):
    _status, body = await cm.post_raw(p.render(ENVELOPE, message))
    return p.parse(body, ENVELOPE)

async def present(target, name):
    ctx = tls.client_context(verify=False, role="sg")
    reader, writer = await asyncio.open_connection(target.ip_address, target.port, ssl=ctx, server_hostname=name)
    try:
        writer.write(linechan.connect_line(target.connect_tag))
        await writer.drain()
        return (await asyncio.wait_for(reader.readline(), 10)).decode().strip()
    finally:
        writer.close()

async def main():
    cm = CmConnection(url, tls.client_context(verify=False), server_name=own, timeout=30)
    try:
        await send(cm, p.Hello(client_info=p.ClientInfo(product_name="Gatehouse Verify")))
        auth = await send(cm, p.Authenticate("alice", os.environ["GH_PASSWORD"], "CORP"))
        assert auth.result_id == p.AUTH_OK, auth
        listed = await send(cm, p.GetResourceList())
        item = listed.resources[0]
        reply = await send(cm, p.AllocateResource(item.resource_id, item.resource_type))
        target = reply.target
        print(json.dumps({"tag": target.connect_tag.split(".")[0:2], "sni": target.sni,
                          "other": await present(target, other), "own": await present(target, own)}))
    finally:
        await send(cm, p.Bye())
        await cm.close()

asyncio.run(main())
"""


def test_a_grant_of_a_is_refused_for_b() -> None:
    """The SG opens tenant A's grant under A's name only: under B's it answers 403 (wrong-tenant),
    and the refusal does not spend the grant."""
    a, b = TENANTS["tenant-a"]["name"], TENANTS["tenant-b"]["name"]
    container = gv.start_client_script(
        NETWORK, GRANT_ACROSS_TENANTS, f"https://{VIP}:443", a, b, secret=password("tenant-a")
    )
    result = gv.client_script_result(container)
    assert result["tag"] == ["g1t", "tenant-a"] and result["sni"] == a, result
    assert result["other"] == "403 Forbidden", result
    assert result["own"] == "200 OK", result
    sg_logs = "".join(c.logs().decode("utf-8", "replace") for c in gv.services("gh-ten-cmsg1")["sg"])
    assert "refused: wrong-tenant" in sg_logs


# alice@A's session, held open after its echoes until /tmp/go exists (the test writes it once the
# tenant list changed), then echoed again on the same channel; prints the report.
HELD_SESSION = r"""
import asyncio, json, os, sys
from gatehouse import tls
from gatehouse.client.flow import run_session
url, name = sys.argv[1:3]

async def hold(holding):
    print("holding", file=sys.stderr, flush=True)
    for _ in range(1200):
        if os.path.exists("/tmp/go"):
            break
        await asyncio.sleep(0.1)
    await holding.echo(65536, 3, 10.0, "-after")

report = asyncio.run(run_session(url, "alice", os.environ["GH_PASSWORD"], ssl_context=tls.client_context(verify=False),
                                 server_name=name, hold=hold))
print(json.dumps(report.to_dict()))
"""


def rerun_cmsg(*extra: str) -> None:
    """site.yml on the CM/SG host only (the tenant list's change is the only one)."""
    run = gv.run_playbook("site.yml", "--limit", "gh-ten-cmsg1", *extra, timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]


def test_removing_and_adding_a_tenant_keeps_the_other_tenants_session() -> None:
    """Tenant B removed (cmsg_tenants without it), then added back (the inventory's list): the
    services reload (no container recreated) and alice@A's running session echoes on; meanwhile
    B's name is refused, and afterwards alice@B gets a session again."""
    cmsg = gv.services("gh-ten-cmsg1")
    ids = {role: cmsg[role][0].id for role in ("cm", "sg")}
    a = TENANTS["tenant-a"]["name"]
    held = gv.start_client_script(NETWORK, HELD_SESSION, f"https://{VIP}:443", a, secret=password("tenant-a"))
    try:
        assert gv.wait_for(lambda: b"holding" in held.logs(stdout=False, stderr=True), attempts=120)
        only_a = [
            {
                "name": "tenant-a",
                "host_names": [a],
                "broker_url": f"https://{gv.address(21, 10)}:8443",
                "agent_networks": [f"{gv.address(21, 31)}/32"],
            }
        ]
        rerun_cmsg("-e", json.dumps({"cmsg_tenants": only_a}))
        refused = session("tenant-b", password("tenant-b"))
        assert not refused["ok"], refused
        rerun_cmsg()
        held.exec_run(["touch", "/tmp/go"])  # noqa: S108 - inside the client container
        report = gv.client_script_result(held)
    finally:
        gv.remove_quietly(held)
    assert report["ok"], gv.client_failure(report)
    steps = {s["name"]: s["ok"] for s in report["steps"]}
    assert steps["tcp-echo-after"] and steps["udp-echo-after"] and steps["bye"], steps
    assert {role: gv.services("gh-ten-cmsg1")[role][0].id for role in ids} == ids
    gv.assert_session(session("tenant-b", password("tenant-b")), target_ip=SG)
