"""``python -m gatehouse.cm --config config.properties [--env-file cmsg.env]``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import ssl
import sys

from gatehouse import logs, tls, web
from gatehouse.cm.server import ConnectionManager
from gatehouse.cm.settings import CmSettings
from gatehouse.config import Config, ConfigError
from gatehouse.tenants import ServerNames, TenantsError


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


async def serve(settings: CmSettings) -> None:
    nofile = web.raise_nofile_limit()
    ssl_context = tls.server_context(settings.ssl_cert, settings.ssl_key, "cm")
    # The tenant of a request is chosen by the name the client asked for in TLS (and in Host); a
    # tenant with its own certificate gets it presented (checked in main()).
    names = ServerNames("cm")
    names.use(names.contexts_for(settings.tenants))
    ssl_context.sni_callback = names
    cm = ConnectionManager(settings, names)
    if settings.tenants_file:
        # Tenants are added and removed by rewriting TenantsFile and sending SIGHUP: no restart.
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, cm.reload_tenants)
    cm.metrics.registry.register(tls.CertificateExpiry.of_files(settings.ssl_cert, settings.identity_cert))
    hosts = [settings.listen_address]
    if settings.enable_ipv6 and settings.listen_address == "0.0.0.0":
        hosts.append("::")  # asyncio binds IPv6 sockets v6-only, so both families need a site
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
    await web.run_sites(
        cm.make_app(),
        sites,
        limits=settings.http,
        admin=web.management_app(cm.metrics.registry, cm.healthy),
        started=lambda: log.info(
            "connection manager listening",
            extra={
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
    web.install_uvloop()
    try:
        asyncio.run(serve(settings))
    except OSError as exc:
        print(f"gatehouse-cm: cannot listen: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
