"""``python -m gatehouse.sg --config SecurityGateway.conf --env-file cmsg.env``."""

from __future__ import annotations

import argparse
import asyncio
import sys
from functools import partial

from gatehouse import heap, logs, tls
from gatehouse.config import Config, ConfigError
from gatehouse.sg.server import agent_context, serve, serve_forwarder
from gatehouse.sg.settings import SgSettings
from gatehouse.sg.workers import supervise
from gatehouse.tenants import ServerNames, TenantsError
from gatehouse.web import install_uvloop, raise_nofile_limit


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gatehouse-sg", description="Gatehouse security gateway")
    parser.add_argument("--config", required=True, help="SecurityGateway.conf")
    parser.add_argument("--env-file", help="cmsg.env (GATEHOUSE_GRANTSECRET)")
    args = parser.parse_args(argv)
    try:
        cfg = Config.load(args.config, args.env_file)
        logs.register_secret(cfg.str("GrantSecret"))
        settings = SgSettings.from_config(cfg)
        supervised = None
        log = logs.setup("sg", settings.log_level)
        if settings.forwarding:  # passes the client's TLS through: no key, no agents
            run = serve_forwarder(settings)
        else:
            server_ctx = tls.server_context(settings.ssl_cert, settings.ssl_key, role="sg")
            # With tenants the TLS server name picks the tenant whose grants are accepted (and the
            # certificate of a tenant that has its own).
            names = ServerNames("sg")
            try:
                names.use(names.contexts_for(settings.tenants))
            except TenantsError as exc:
                raise ConfigError(f"TenantsFile: {exc}") from None
            server_ctx.sni_callback = names
            agent_ctx = agent_context(settings)
            if settings.workers > 1:
                supervised = partial(serve, settings, server_ctx, agent_ctx, names)
            else:
                run = serve(settings, server_ctx, agent_ctx, names)
    except (ConfigError, tls.CertificateError) as exc:
        print(f"gatehouse-sg: {exc}", file=sys.stderr)
        return 2
    # Each relayed session holds two TCP sockets and one UDP socket.
    raise_nofile_limit()
    try:
        if supervised is not None:  # Workers > 1: each worker runs serve(..., place)
            supervise(settings, lambda place: supervised(place=place))
            return 0
        install_uvloop()
        heap.settle()
        asyncio.run(run)
    except OSError as exc:
        log.error("cannot start: %s", exc)
        print(f"gatehouse-sg: cannot start: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
