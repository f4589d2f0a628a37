"""Broker and agent stand-ins for the CM benchmarks: answer at once, so the CM is what is measured.

One process, aiohttp on uvloop, two TLS ports: the broker protocol (``/pcoip-broker/xml``; every
user authenticates, one desktop, every allocation succeeds) and the agent's launch-session
(``/pcoip-agent/xml``). The broker port also answers the client envelope (``pcoip-client``) the
same way: that is the "bare server" reference, the same requests answered by a server that does
no work beyond parsing and rendering.

    python -m bench.standin --broker-port B --agent-port A --cert C --key K   (prints "ready")
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import sys
import uuid

from aiohttp import web

from gatehouse import protocol as p
from gatehouse import tls
from gatehouse.web import install_uvloop

DESKTOP = p.Resource("desk-1", "desk-1", state="READY")


def broker_answer(message: p.Message, agent_port: int) -> p.Message:
    if isinstance(message, p.Hello):
        return p.HelloResp(hostname="standin", domains=["CORP"])
    if isinstance(message, p.Authenticate):
        return p.AuthenticateResp()
    if isinstance(message, p.GetResourceList):
        return p.GetResourceListResp(resources=[DESKTOP])
    if isinstance(message, p.AllocateResource):
        return p.AllocateResourceResp(
            resource_id=message.resource_id,
            # logon none: the bench CM does not verify the stand-in agent, so it would withhold a password.
            agent=p.AgentInfo(
                "127.0.0.1", "desk-1", agent_port=agent_port, session_port=4172, logon=p.LOGON_NONE
            ),
            target=p.Target("127.0.0.1", 4172, str(uuid.uuid4()), secrets.token_urlsafe(16)),
        )
    if isinstance(message, p.Bye):
        return p.ByeResp()
    return p.ErrorResp(p.E_UNKNOWN, message.tag)


def make_apps(agent_port: int) -> tuple[web.Application, web.Application]:
    async def broker(request: web.Request) -> web.Response:
        body = await request.read()
        envelope = "pcoip-client" if b"<pcoip-client" in body[:200] else "pcoip-broker"
        reply = broker_answer(p.parse(body, envelope), agent_port)
        resp = web.Response(body=p.render(envelope, reply), content_type="application/xml")
        if "JSESSIONID" not in request.cookies:
            resp.set_cookie("JSESSIONID", uuid.uuid4().hex, secure=True, httponly=True)
        return resp

    async def agent(request: web.Request) -> web.Response:
        msg = p.parse(await request.read(), "pcoip-agent")
        assert isinstance(msg, p.LaunchSession)
        info = p.SessionInfo(
            "127.0.0.1", 4172, msg.session_log_id or str(uuid.uuid4()), secrets.token_urlsafe(24)
        )
        body = p.render("pcoip-agent", p.LaunchSessionResp(session_info=info))
        return web.Response(body=body, content_type="application/xml")

    broker_app, agent_app = web.Application(), web.Application()
    broker_app.router.add_post(p.PATH_BROKER, broker)
    agent_app.router.add_post(p.PATH_AGENT, agent)
    return broker_app, agent_app


async def serve(args: argparse.Namespace) -> None:
    ctx = tls.server_context(args.cert, args.key, role="broker")
    runners = []
    for app, port in zip(make_apps(args.agent_port), (args.broker_port, args.agent_port), strict=True):
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port, ssl_context=ctx, backlog=4096).start()
        runners.append(runner)
    print("ready", flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)  # runs until the parent closes stdin or exits
    for runner in runners:
        await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser()
    for name in ("--broker-port", "--agent-port"):
        parser.add_argument(name, type=int, required=True)
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    args = parser.parse_args()
    install_uvloop()
    asyncio.run(serve(args))


if __name__ == "__main__":
    main()
