"""``python -m gatehouse.broker --config broker.properties [--env-file FILE]``."""

from __future__ import annotations

import argparse
import asyncio
import sys

from gatehouse import logs, tls, web
from gatehouse.broker.app import serve, server_context
from gatehouse.broker.db import Database
from gatehouse.broker.settings import BrokerSettings
from gatehouse.config import Config, ConfigError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gatehouse-broker", description="Gatehouse connection broker")
    parser.add_argument("--config", required=True, help="broker.properties")
    parser.add_argument("--env-file", help="file of GATEHOUSE_<KEY>=value overrides (tokens)")
    args = parser.parse_args(argv)
    db: Database | None = None
    try:
        settings = BrokerSettings.from_config(Config.load(args.config, args.env_file))
        logs.register_secret(settings.admin_token)
        log = logs.setup("broker", settings.log_level)
        # Fail on a bad certificate or client CA before touching the database.
        server_context(settings)
        db = Database.open(settings.database)
    except (ConfigError, tls.CertificateError) as exc:
        print(f"gatehouse-broker: {exc}", file=sys.stderr)
        return 2
    if not settings.client_tls_verify:
        log.warning(
            "ClientTlsVerify is false: any caller is accepted as a connection manager and as an agent "
            "reporting load, and client addresses in <pcm-info> are not trusted for login throttling"
        )
    web.install_uvloop()
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
