"""``python -m gatehouse.agent --config agent.properties``."""

from __future__ import annotations

import argparse
import asyncio
import sys

from gatehouse import heap, logs, tls
from gatehouse.agent.server import serve
from gatehouse.agent.settings import AgentSettings
from gatehouse.config import Config, ConfigError
from gatehouse.web import install_uvloop


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gatehouse-agent", description="Gatehouse desktop agent stand-in")
    parser.add_argument("--config", required=True, help="agent.properties")
    parser.add_argument("--env-file", help="optional env file of GATEHOUSE_<KEY>=value overrides")
    args = parser.parse_args(argv)
    try:
        cfg = Config.load(args.config, args.env_file)
        settings = AgentSettings.from_config(cfg)
        log = logs.setup("agent", settings.log_level)
        # Control port: asks for client certificates (launch-session needs role cm). Session port:
        # clients and the SG connect without one.
        client_ca = settings.client_ca_cert if settings.client_tls_verify else None
        control_ctx = tls.server_context(
            settings.ssl_cert, settings.ssl_key, role="agent", client_ca=client_ca
        )
        session_ctx = tls.server_context(settings.ssl_cert, settings.ssl_key, role="agent")
        if settings.report_url:
            # Fail now, not at the first report, when the identity cannot be loaded.
            tls.client_context(
                settings.broker_ca_cert or None,
                settings.broker_tls_verify,
                role="agent",
                cert=settings.identity_cert,
                key=settings.identity_key,
            )
    except (ConfigError, tls.CertificateError) as exc:
        print(f"gatehouse-agent: {exc}", file=sys.stderr)
        return 2
    if not settings.client_tls_verify:
        log.warning("ClientTlsVerify is false: launch-session is accepted from any caller, not only a CM")
    install_uvloop()
    heap.settle()
    try:
        asyncio.run(serve(settings, control_ctx, session_ctx))
    except OSError as exc:
        log.error("cannot start: %s", exc)
        print(f"gatehouse-agent: cannot start: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
