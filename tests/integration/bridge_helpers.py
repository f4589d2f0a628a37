"""CM/SG deployments in ``network_mode: bridge`` on this host's own Docker engine: the pieces the
bridge-mode tests share (tests/integration/collection/test_bridge_mode.py, test_bridge_upgrade.py).

The broker and one agent run as processes on the host, bound to the gateway address of a Docker
network (the host side of its bridge), which the containers reach and the certificates name. The
broker knows one desktop (desk-a, the agent) and one user (USER) entitled to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from collection_helpers import PlaybookRun
from pki import TestPKI
from services import ServiceProcess, broker_admin, free_port

from gatehouse import linechan, tls
from gatehouse import protocol as p
from gatehouse.client.flow import CmConnection

ADMIN_TOKEN = "bridge-admin-" + "7c1d2e3f4a5b6c7d8e9f"
USER, USER_PW = "alice", "Bridge-Mode-pw!1"


@dataclass(frozen=True)
class HostServices:
    broker: ServiceProcess
    agent: ServiceProcess
    broker_url: str  # https://<address>:<port>, as the containers reach it


@contextlib.contextmanager
def host_services(
    pki: TestPKI, root: Path, address: str, name: str, broker_port: int | None = None
) -> Iterator[HostServices]:
    """A broker (on ``broker_port``, default a free one) and an agent on ``address`` with
    certificates from ``pki`` (file names start with ``name``); both are stopped on the way out,
    even on failure."""
    broker_id = pki.issue(f"{name}-broker", [address], role="broker")
    agent_id = pki.issue(f"{name}-agent", ["desk-a.test", address], role="agent")
    broker_port = broker_port or free_port()
    broker_url = f"https://{address}:{broker_port}"
    started: list[ServiceProcess] = []
    try:
        broker = ServiceProcess(
            "broker",
            root / "broker",
            {
                "ListenAddress": address,
                "ListenPort": broker_port,
                "AdminAddress": "127.0.0.1",
                "AdminPort": free_port(),
                "SslCert": broker_id.cert,
                "SslKey": broker_id.key,
                "ClientCaCert": pki.ca,
                "Database": root / "broker.db",
                "AdminToken": ADMIN_TOKEN,
                "Domains": "CORP",
            },
            health_url=f"{broker_url}/health",
        )
        started.append(broker.start())
        control, session_port = free_port(), free_port()
        agent = ServiceProcess(
            "agent",
            root / "agent",
            {
                "ListenAddress": address,
                "ControlPort": control,
                "SessionPort": session_port,
                "AdminAddress": "127.0.0.1",
                "AdminPort": free_port(),
                "SslCert": agent_id.cert,
                "SslKey": agent_id.key,
                "ClientCaCert": pki.ca,
                "Hostname": "desk-a.test",
                "AdvertiseAddress": address,
                "BrokerUrl": broker_url,
                "BrokerCaCert": pki.ca,
                "ReportInterval": 2,
            },
            config_name="agent.properties",
            health_url=f"https://{address}:{control}/health",
        )
        started.append(agent.start())
        ctx = tls.client_context(pki.ca)
        desktop = {
            "address": address,
            "hostname": "desk-a.test",
            "agent_port": control,
            "session_port": session_port,
        }
        broker_admin(broker_url, ADMIN_TOKEN, ctx, "PUT", "/desktops/desk-a", desktop)
        broker_admin(broker_url, ADMIN_TOKEN, ctx, "PUT", f"/users/CORP/{USER}", {"password": USER_PW})
        broker_admin(broker_url, ADMIN_TOKEN, ctx, "PUT", f"/entitlements/user/CORP/{USER}/desktop/desk-a")
        yield HostServices(broker, agent, broker_url)
    finally:
        for proc in reversed(started):
            proc.stop()


async def relayed_session(cm_url: str, ctx: Any) -> asyncio.StreamWriter:
    """A session relayed by the SG and kept open until the writer is closed (the SG's
    gatehouse_sg_sessions_active counts it); the session channel is dialled on 127.0.0.1."""
    cm = CmConnection(cm_url, ctx, timeout=10)
    try:
        await cm.send(p.Hello(client_info=p.ClientInfo(hostname="bridge-test")))
        await cm.send(p.Authenticate(USER, USER_PW, "CORP"))
        listing = await cm.send(p.GetResourceList())
        assert isinstance(listing, p.GetResourceListResp), listing
        chosen = listing.resources[0]
        alloc = await cm.send(p.AllocateResource(chosen.resource_id, chosen.resource_type))
        assert isinstance(alloc, p.AllocateResourceResp) and alloc.target is not None, alloc
        target = alloc.target
    finally:
        await cm.close()
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", target.port, ssl=ctx, server_hostname=target.sni or target.hostname
    )
    writer.write(linechan.connect_line(target.connect_tag))
    await writer.drain()
    assert await asyncio.wait_for(reader.readline(), 10) == linechan.OK
    return writer


def tasks(run: PlaybookRun, prefix: str) -> list[dict[str, Any]]:
    """The json callback's entries (``task``: name, duration; ``hosts``: results) of the tasks
    whose name, without the ``<role> : `` of a role's task, starts with ``prefix``, in order."""
    return [
        task
        for play in run.report["plays"]
        for task in play["tasks"]
        if task["task"]["name"].split(" : ", 1)[-1].startswith(prefix)
    ]


def task_result(run: PlaybookRun, prefix: str, host: str = "localhost") -> dict[str, Any]:
    """The result on ``host`` of the first task whose name starts with ``prefix``."""
    for task in tasks(run, prefix):
        if host in task["hosts"]:
            return task["hosts"][host]
    raise AssertionError(f"no task {prefix!r} ran on {host}: {run.stdout[-2000:]}")


def management(port: int, path: str) -> tuple[int, str]:
    """GET ``path`` from a management listener published on the host's 127.0.0.1:``port``."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
        return resp.status, resp.read().decode("utf-8", "replace")


def metric(text: str, name: str) -> float:
    (value,) = [line.split()[1] for line in text.splitlines() if line.startswith(name + " ")]
    return float(value)
