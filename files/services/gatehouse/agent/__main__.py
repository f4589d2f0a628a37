"""``python -m gatehouse.agent --config agent.properties``."""

from __future__ import annotations

import argparse
import asyncio
import sys

from gatehouse import logs, tls
from gatehouse.agent.server import serve
from gatehouse.agent.settings import AgentSettings
from gatehouse.config import Config, ConfigError
from gatehouse.web import install_uvloop


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gatehouse-agent", description="Gatehouse desktop agent stand-in")
    parser.add_argument("--config", required=True, help="agent.properties")
    parser.add_argument("--env-file", help="optional env file (GATEHOUSE_AGENTTOKEN=...)")
    args = parser.parse_args(argv)
    try:
        cfg = Config.load(args.config, args.env_file)
        settings = AgentSettings.from_config(cfg)
        logs.register_secret(settings.agent_token)
        log = logs.setup("agent", settings.log_level)
        server_ctx = tls.server_context(settings.ssl_cert, settings.ssl_key, role="agent")
    except (ConfigError, tls.CertificateError) as exc:
        print(f"gatehouse-agent: {exc}", file=sys.stderr)
        return 2
    install_uvloop()
    try:
        asyncio.run(serve(settings, server_ctx))
    except OSError as exc:
        log.error("cannot start: %s", exc)
        print(f"gatehouse-agent: cannot start: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
