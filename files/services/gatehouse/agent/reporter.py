"""Load reports to the broker: ``POST {BrokerUrl}/api/v1/agents/report`` every ReportInterval seconds.

The agent authenticates with its certificate (``IdentityCert``, role ``agent``): the broker
accepts a report only when the certificate names the reported address or hostname.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import aiohttp

from gatehouse import tls
from gatehouse.agent.settings import AgentSettings

log = logging.getLogger("gatehouse.agent.report")
TIMEOUT = aiohttp.ClientTimeout(total=10)


class Reporter:
    def __init__(self, settings: AgentSettings, active: Callable[[], int]) -> None:
        self.settings = settings
        self.active = active
        self.sent = 0
        self.failed = 0

    def body(self) -> dict[str, object]:
        s = self.settings
        return {
            "hostname": s.hostname,
            "address": s.advertise_address,
            "agent_port": s.control_port,
            "session_port": s.session_port,
            "active_sessions": self.active(),
            "capacity": s.capacity,
        }

    async def run(self) -> None:
        """Report now, then every interval, until cancelled; a failure waits for the next interval."""
        s = self.settings
        ctx = tls.client_context(
            s.broker_ca_cert or None,
            s.broker_tls_verify,
            role="agent",
            cert=s.identity_cert,
            key=s.identity_key,
        )
        connector = aiohttp.TCPConnector(ssl=ctx if s.report_url.startswith("https") else False)
        async with aiohttp.ClientSession(connector=connector, timeout=TIMEOUT) as http:
            while True:
                await self.report_once(http)
                await asyncio.sleep(s.report_interval)

    async def report_once(self, http: aiohttp.ClientSession) -> bool:
        url = self.settings.report_url
        try:
            async with http.post(url, json=self.body()) as resp:
                if resp.status in (200, 204):
                    self.sent += 1
                    log.debug("load report sent", extra={"active_sessions": self.active()})
                    return True
                reason = f"HTTP {resp.status}"
                if resp.status == 403:
                    reason += (
                        " (the broker refused this agent: IdentityCert must carry role agent and name "
                        "the reported address or hostname, and the desktop must be registered)"
                    )
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            reason = f"{type(exc).__name__}: {exc}"
        self.failed += 1
        log.warning(
            "load report to %s failed: %s; retrying in %gs", url, reason, self.settings.report_interval
        )
        return False
