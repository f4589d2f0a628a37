"""What the CM tells a real PCoIP agent, and what it accepts back.

The request is the real agent's ``launch-session`` (:data:`gatehouse.protocol.LAUNCH_ELEMENTS`):
``session-log-id`` carries the CM's 36-character session id so one id follows the session through
CM, SG and agent logs; ``client-ip`` is the address the CM saw, ``client-name`` and ``client-mac``
what the client reported in hello (cleaned: they come from an unauthenticated client).

The answer becomes a grant the SG acts on, so it is checked first (:func:`check_session_info`): an
agent that is hostile or broken must not steer the SG to a broadcast address or hand it a tag that
cannot be a session-tag.
"""

from __future__ import annotations

import ipaddress
import re

from gatehouse import protocol as p
from gatehouse.cm.sessions import Session

MAX_CLIENT_NAME = 64
# With the longest host name it still makes a grant within the SG's MAX_TOKEN_LENGTH (tested).
MAX_SESSION_TAG = 256
MAX_AGENT_SESSION_ID = 128
_MAC = re.compile(r"^[0-9A-Fa-f]{2}([:-])[0-9A-Fa-f]{2}(\1[0-9A-Fa-f]{2}){4}$")
_PRINTABLE = re.compile(r"[^\x20-\x7e]")
_TAG = re.compile(r"^[A-Za-z0-9+/=_.~-]+$")
_SNI = re.compile(r"^[A-Za-z0-9._-]{1,253}$")


class InvalidAnswer(ValueError):
    """The agent's launch-session-resp cannot be turned into a grant."""


def printable(text: str, limit: int = MAX_CLIENT_NAME) -> str:
    """``text`` with anything but printable ASCII removed, capped: safe for logs and XML."""
    return _PRINTABLE.sub("", text)[:limit]


def client_name(reported: str) -> str:
    """The client's self-reported host name, printable ASCII only and capped."""
    return printable(reported)


def client_mac(reported: str) -> str:
    """A reported MAC address in ``aa:bb:cc:dd:ee:ff`` form, or empty when it is not one."""
    return reported.lower().replace("-", ":") if _MAC.match(reported) else ""


def launch_request(session: Session, agent: p.AgentInfo, password: str, license_path: str) -> p.LaunchSession:
    return p.LaunchSession(
        session_log_id=session.session_id,
        client_ip=session.client_ip,
        username=session.username,
        domain=session.domain,
        password=password,
        ip_address=agent.ip_address,
        hostname=agent.hostname or agent.ip_address,
        client_name=session.client_name,
        client_mac=session.client_mac,
        license_path=license_path,
    )


def is_hostname(value: str) -> bool:
    """A DNS name (a trailing dot allowed) whose last label is not all digits, so never a bad IP."""
    name = value.rstrip(".")
    return bool(p.DNS_NAME.match(name)) and not name.rsplit(".", 1)[-1].isdigit()


def check_session_info(info: p.SessionInfo) -> None:
    """Raise InvalidAnswer unless the agent's session-info can safely become a grant.

    The address is an IP literal (not unspecified, multicast or broadcast) or a DNS name; the port
    1-65535; the session-tag 1-256 characters of the base64/URL-safe alphabet (it travels in the
    SG's one-line ``CONNECT <tag>``); session-id and sni printable and bounded.
    """
    try:
        address = ipaddress.ip_address(info.ip_address)
    except ValueError:
        if not is_hostname(info.ip_address):
            raise InvalidAnswer("ip-address is neither an IP address nor a DNS name") from None
    else:
        if (
            address.is_unspecified
            or address.is_multicast
            or address == ipaddress.IPv4Address("255.255.255.255")
        ):
            raise InvalidAnswer(f"ip-address {address} cannot be a desktop")
    if not 1 <= info.port <= 65535:
        raise InvalidAnswer(f"port {info.port} is out of range")
    if not 1 <= len(info.session_tag) <= MAX_SESSION_TAG or not _TAG.match(info.session_tag):
        raise InvalidAnswer("session-tag has a length or characters a session-tag cannot have")
    if len(info.session_id) > MAX_AGENT_SESSION_ID or _PRINTABLE.search(info.session_id):
        raise InvalidAnswer("session-id is too long or not printable")
    if info.sni and not _SNI.match(info.sni):
        raise InvalidAnswer("sni is not a host name")
