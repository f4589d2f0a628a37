"""``python -m gatehouse.broker --config broker.properties [--env-file FILE] [--check-identity]``.

``--check-identity`` serves nothing: it binds to every directory server with its service account
and sends a RADIUS Status-Server to every RADIUS server, prints one line per check and exits 0
when all passed, 1 when one failed (2: the configuration itself is wrong). No secret is printed.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from gatehouse import heap, logs, tls, web
from gatehouse.broker import directory, factors
from gatehouse.broker.app import serve, server_context
from gatehouse.broker.db import Database
from gatehouse.broker.settings import FACTOR_RADIUS, BrokerSettings
from gatehouse.config import Config, ConfigError


def check_identity(settings: BrokerSettings) -> int:
    """The deploy-time check of the identity sources; 0 when every check passed, else 1."""
    lines: list[directory.CheckLine] = []
    for directory_settings in settings.directories.values():
        lines += directory.check(directory_settings)
    if settings.factor.kind == FACTOR_RADIUS:
        lines += factors.radius_check(settings.factor)
    if not lines:
        print("ok   no directory or RADIUS server is configured")
        return 0
    for line in lines:
        # scrub: a server's error text must not carry a configured secret back out.
        print(("ok   " if line.ok else "FAIL ") + logs.scrub(line.text))
    return 0 if all(line.ok for line in lines) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gatehouse-broker", description="Gatehouse connection broker")
    parser.add_argument("--config", required=True, help="broker.properties")
    parser.add_argument("--env-file", help="file of GATEHOUSE_<KEY>=value overrides (tokens)")
    parser.add_argument(
        "--check-identity",
        action="store_true",
        help="bind to every directory and ask every RADIUS server for its status, then exit",
    )
    args = parser.parse_args(argv)
    db: Database | None = None
    try:
        settings = BrokerSettings.from_config(Config.load(args.config, args.env_file))
        for secret in settings.secrets():
            logs.register_secret(secret)
        if args.check_identity:
            return check_identity(settings)
        log = logs.setup("broker", settings.log_level)
        # Fail on a bad certificate or client CA before touching the database.
        server_context(settings)
        db = Database.open(settings.database, password=settings.database_password)
    except (ConfigError, tls.CertificateError) as exc:
        print(f"gatehouse-broker: {exc}", file=sys.stderr)
        return 2
    if not settings.client_tls_verify:
        log.warning(
            "ClientTlsVerify is false: any caller is accepted as a connection manager and as an agent "
            "reporting load, and client addresses in <pcm-info> are not trusted for login throttling"
        )
    for directory_settings in settings.directories.values():
        for server in directory_settings.plain_servers:
            log.warning(
                "directory server without TLS: passwords cross the network in clear (LdapAllowPlain)",
                extra={"domain": directory_settings.domain, "server": server.url},
            )
    web.install_uvloop()
    heap.settle()
    try:
        asyncio.run(serve(settings, db))
    except OSError as exc:
        print(
            f"gatehouse-broker: cannot listen on {settings.listen_address}:{settings.listen_port}: "
            f"{exc.strerror}",
            file=sys.stderr,
        )
        return 1
    finally:
        db.close()
    log.info("broker stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
