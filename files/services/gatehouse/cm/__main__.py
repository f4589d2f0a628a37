"""``python -m gatehouse.cm --config config.properties [--env-file cmsg.env]``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import socket
import ssl
import sys

from gatehouse import heap, logs, tls, web, workers
from gatehouse.cm.server import ConnectionManager
from gatehouse.cm.settings import CmSettings
from gatehouse.config import Config, ConfigError
from gatehouse.shared import SharedCounters, WorkerSlots, WorkerSourceSlots
from gatehouse.tenants import ServerNames, TenantsError
from gatehouse.workers import WorkerPlace

SKF_NET_OFF = -0x100000
SHUTDOWN_GRACE = 10.0  # web.run_sites' drain of the requests in flight
# Per-worker series (label ``worker``) of these worker families, on the supervisor's /metrics.
PER_WORKER = {
    "gatehouse_cm_sessions_active": "gatehouse_cm_worker_sessions_active",
    "gatehouse_cm_pre_auth_sessions": "gatehouse_cm_worker_pre_auth_sessions",
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="gatehouse-cm", description="Gatehouse connection manager")
    parser.add_argument("--config", required=True, help="config.properties")
    parser.add_argument("--env-file", help="cmsg.env (grant secret, log level)")
    return parser.parse_args(argv)


def check_ca(key: str, path: str) -> None:
    if not path:
        return
    try:
        tls.client_context(path)
    except tls.CertificateError as exc:  # tls wraps the OSError or SSLError of loading it
        raise ConfigError(f"{key}: cannot load CA bundle {path}: {exc}") from None


def listen_hosts(settings: CmSettings) -> list[str]:
    hosts = [settings.listen_address]
    if settings.enable_ipv6 and settings.listen_address == "0.0.0.0":
        hosts.append("::")  # asyncio binds IPv6 sockets v6-only, so both families need a site
    return hosts


def listen_ports(settings: CmSettings) -> list[int]:
    return [settings.listen_port] + ([settings.redirect_port] if settings.redirect_port else [])


async def serve(settings: CmSettings, place: WorkerPlace | None = None) -> None:
    """The CM; ``place``: as worker ``place.index`` of a supervisor (None: on its own)."""
    nofile = web.raise_nofile_limit()
    ssl_context = tls.server_context(settings.ssl_cert, settings.ssl_key, "cm")
    # The tenant of a request is chosen by the name the client asked for in TLS (and in Host); a
    # tenant with its own certificate gets it presented (checked in main()).
    names = ServerNames("cm")
    names.use(names.contexts_for(settings.tenants))
    ssl_context.sni_callback = names
    cm = ConnectionManager(settings, names, place)
    if settings.tenants_file:
        # Tenants are added and removed by rewriting TenantsFile and sending SIGHUP: no restart.
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, cm.reload_tenants)
    cm.metrics.registry.register(tls.CertificateExpiry.of_files(settings.ssl_cert, settings.identity_cert))
    hosts = listen_hosts(settings)
    sites: list[tuple[str, int, ssl.SSLContext | None]] = [
        (host, settings.listen_port, ssl_context) for host in hosts
    ]
    if settings.redirect_port:
        sites += [(host, settings.redirect_port, None) for host in hosts]
    log = logging.getLogger("gatehouse.cm")
    for key, verify in (
        ("BrokerTlsVerify", settings.broker_tls_verify),
        ("AgentTlsVerify", settings.agent_tls_verify),
    ):
        if not verify:
            log.warning(
                "%s is false: upstream certificates are not verified (anyone on the path can impersonate)",
                key,
            )
    if not settings.identity_cert:
        log.warning("no IdentityCert: the CM presents no cm certificate to the broker and the agents")
    admin = web.management_app(cm.metrics.registry, cm.healthy)
    listeners = None
    if place is not None:
        cm.add_peer_routes(admin)
        listeners = {
            (h, port): [place.sockets[f"{h}:{port}"]] for h in hosts for port in listen_ports(settings)
        }
    await web.run_sites(
        cm.make_app(),
        sites,
        limits=settings.http,
        admin=admin,
        listeners=listeners,
        slots=WorkerSlots(place.shared, "connections", place.index) if place is not None else None,
        sources=WorkerSourceSlots(place.shared, "connections", place.index) if place is not None else None,
        admin_path=place.admin_path if place is not None else "",
        started=lambda: log.info(
            "connection manager listening",
            extra={
                "worker": place.index if place is not None else 0,
                "port": settings.listen_port,
                "redirect_port": settings.redirect_port,
                "admin_port": settings.http.admin_port,
                "broker": settings.broker_url,
                "tenants": ",".join(t.name for t in settings.tenants.tenants),
                "gateway": settings.enable_security_gateway,
                "nofile": nofile,
            },
        ),
    )


def supervise(settings: CmSettings) -> None:
    """Workers > 1: one socket per worker and listening address (SO_REUSEPORT, the worker picked
    by the client's source port, so a client's new connections spread over the workers), the
    counters MaxConnections, MaxClients and MaxConcurrentEstablishments of all workers, and the
    supervisor (gatehouse.workers) on AdminPort."""
    count = settings.workers
    program = source_port_program(count)
    hosts = listen_hosts(settings)

    def v6only(sock: socket.socket) -> None:
        if sock.family == socket.AF_INET6 and len(hosts) > 1:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)  # 0.0.0.0 has its own group

    groups = {
        f"{h}:{port}": workers.reuseport_sockets(h, port, socket.SOCK_STREAM, count, program, prepare=v6only)
        for h in hosts
        for port in listen_ports(settings)
    }
    service = workers.Service(
        name="cm",
        admin_address=settings.http.admin_address,
        admin_port=settings.http.admin_port,
        cert_files=(settings.ssl_cert, settings.identity_cert),
        listening=",".join(groups),
        grace=SHUTDOWN_GRACE,
        hang_timeout=settings.worker_hang_timeout,
        not_summed=frozenset({"gatehouse_tls_certificate_expiry_timestamp_seconds"}),
        # Each worker follows the SG's /health itself: the SG is up for the CM while every worker sees it.
        lowest=frozenset({"gatehouse_cm_security_gateway_up"}),
        per_worker=PER_WORKER,
    )
    # Per source: connections (MaxConnectionsPerSource) and unauthenticated sessions
    # (MaxPreAuthSessionsPerSource), each table four times the most it can hold.
    sources = (
        ("connections", 4 * settings.http.max_connections),
        ("pre_auth", 4 * settings.max_pre_auth_sessions),
    )
    shared = SharedCounters("cm", count, ("connections", "clients", "establishing"), sources=sources)
    workers.supervise(service, groups, shared, lambda place: serve(settings, place))


def worker_for_port(port: int, count: int) -> int:
    """The worker of a connection from TCP source ``port`` (what source_port_program computes).

    The port's bits are folded before the modulo: Linux hands out even ephemeral ports to
    connect() (odd ones are kept for bind()), so a HALB's, docker-proxy's or most clients'
    connections would all land on one worker of two by the port's parity alone."""
    port ^= port >> 8
    port ^= port >> 4
    port ^= port >> 1
    return port % count


def source_port_program(count: int) -> bytes:
    """Classic BPF for a TCP SO_REUSEPORT group: the worker of a connection, worker_for_port of its
    source port. The kernel runs it with the data past the TCP header, so the port is read
    relative to the network header (SKF_NET_OFF): after the IPv4 header (its length from IHL) or
    the 40 bytes of the IPv6 one."""
    net = SKF_NET_OFF
    ld_b, ld_h, ldx_msh, ld_h_ind = 0x30, 0x28, 0xB1, 0x48
    rsh_k, xor_x, mod_k, jeq_k, ja, tax, ret_a = 0x74, 0xAC, 0x94, 0x15, 0x05, 0x07, 0x16
    insn = workers.insn
    fold = [part for shift in (8, 4, 1) for part in (insn(tax), insn(rsh_k, shift), insn(xor_x))]
    return b"".join(
        [
            insn(ld_b, net),  # 0: first byte of the IP header
            insn(rsh_k, 4),  # 1: its version
            insn(jeq_k, 6, jt=3),  # 2: IPv6: to 6
            insn(ldx_msh, net),  # 3: X = the IPv4 header's length
            insn(ld_h_ind, net),  # 4: the TCP source port after it
            insn(ja, 1),  # 5: to 7
            insn(ld_h, net + 40),  # 6: the TCP source port after the IPv6 header
            *fold,  # 7-15: A ^= A >> 8, A ^= A >> 4, A ^= A >> 1 (X holds the value before each shift)
            insn(mod_k, count),
            insn(ret_a),
        ]
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = Config.load(args.config, args.env_file)
        logs.register_secret(cfg.str("GrantSecret"))
        settings = CmSettings.from_config(cfg)
        logs.setup("cm", settings.log_level)
        # Fail at start, with one clear line, on a bad certificate or key (RSA < 2048 bits and such).
        tls.server_context(settings.ssl_cert, settings.ssl_key, "cm")
        for key, path in (("BrokerCaCert", settings.broker_ca_cert), ("AgentCaCert", settings.agent_ca_cert)):
            check_ca(key, path)
        for tenant in settings.tenants.tenants:
            check_ca(f"TenantsFile: tenant {tenant.name}: broker_ca_cert", tenant.broker_ca_cert)
        try:
            ServerNames("cm").contexts_for(settings.tenants)
        except TenantsError as exc:
            raise ConfigError(f"TenantsFile: {exc}") from None
        if settings.identity_cert:
            try:
                tls.client_context(None, False, cert=settings.identity_cert, key=settings.identity_key)
            except tls.CertificateError as exc:
                raise ConfigError(f"IdentityCert: {exc}") from None
    except (ConfigError, tls.CertificateError) as exc:
        print(f"gatehouse-cm: {exc}", file=sys.stderr)
        return 2
    try:
        if settings.workers > 1:
            supervise(settings)
            return 0
        web.install_uvloop()
        heap.settle()
        asyncio.run(serve(settings))
    except OSError as exc:
        print(f"gatehouse-cm: cannot listen: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
