"""The PCoIP-style broker and agent protocol codec: XML messages in a versioned envelope.

One envelope element (``pcoip-client``, ``pcoip-broker`` or ``pcoip-agent``) with a ``version``
attribute and exactly one child, the message; a response to ``<x>`` is ``<x-resp>``. Parsing goes
through defusedxml (no DTDs, no entities, no external references) after a size cap, and the tree
is refused past a depth and element-count cap. Anything wrong becomes a :class:`ProtocolError`
whose ``result_id`` goes into an ``<error-resp>``.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import ClassVar

import defusedxml.ElementTree as SafeET
from defusedxml import DefusedXmlException

from gatehouse import __version__

CONTENT_TYPE = "application/xml; charset=UTF-8"
PATH_BROKER = "/pcoip-broker/xml"
PATH_AGENT = "/pcoip-agent/xml"
ENVELOPES = {"pcoip-client": "2.1", "pcoip-broker": "2.1", "pcoip-agent": "1.0"}
MAX_BODY = 64 * 1024
# A DNS name as an address element may carry it (no trailing dot): LDH labels, 253 characters at most.
DNS_NAME = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
)
MAX_DEPTH = 16
MAX_ELEMENTS = 4096
QUERY_PRODUCT = "QueryBrokerClient"
AUTH_PASSWORD = "AUTHENTICATE_VIA_PASSWORD"  # noqa: S105 - a method name, not a password
AUTH_PASSCODE = "AUTHENTICATE_VIA_PASSCODE"  # a second-level code (TOTP, RADIUS), see docs/protocol.md
# The method attribute of <authenticate> for each method name of hello-resp / authenticate-resp.
METHOD_PASSWORD = "password"  # noqa: S105 - a method name, not a password
METHOD_PASSCODE = "passcode"
METHOD_ATTRIBUTES = {AUTH_PASSWORD: METHOD_PASSWORD, AUTH_PASSCODE: METHOD_PASSCODE}
AUTH_METHODS = tuple(METHOD_ATTRIBUTES)
MAX_PASSCODE = 64
# A passcode is what a token or an authenticator app shows: printable ASCII without spaces.
_PASSCODE = re.compile(r"^[!-~]*$")

# result-id values of <error-resp>
E_MALFORMED = "FAILED_MALFORMED_REQUEST"
E_TOO_LARGE = "FAILED_REQUEST_TOO_LARGE"
E_VERSION = "FAILED_UNSUPPORTED_VERSION"
E_ENVELOPE = "FAILED_BAD_ENVELOPE"
E_UNKNOWN = "FAILED_UNKNOWN_MESSAGE"
E_OUT_OF_STATE = "FAILED_OUT_OF_STATE"
E_USER_AUTH = "FAILED_USER_AUTH"
E_ANOTHER_SESSION = "FAILED_ANOTHER_SESSION_STARTED"
E_BUSY = "FAILED_SERVER_BUSY"
E_INTERNAL = "FAILED_INTERNAL_ERROR"

# result-id values of the message responses
AUTH_OK = "AUTH_SUCCESSFUL_AND_COMPLETE"
AUTH_FAILED = "AUTH_FAILED_UNKNOWN_USERNAME_OR_PASSWORD"
AUTH_INCOMPLETE = "AUTH_SUCCESSFUL_BUT_INCOMPLETE"  # this step passed; next-authentication names the next
LIST_OK = "LIST_SUCCESSFUL"
ALLOC_OK = "ALLOC_SUCCESSFUL"
ALLOC_NOT_ENTITLED = "ALLOC_FAILED_UNAUTHORIZED"
ALLOC_UNAVAILABLE = "ALLOC_FAILED_NO_RESOURCE_AVAILABLE"
ALLOC_FAILED = "ALLOC_FAILED_OTHER"
LAUNCH_OK = "SUCCESSFUL"
LAUNCH_FAILED = "FAILED"
NO_SUCH_SESSION = "FAILED_NO_SUCH_SESSION"  # join-session: the owner's session is not running there
# Collaboration (docs/protocol.md, "Collaboration"): the owner's create-invitation, the
# collaborator's redeem-invitation, and the refusals a client can tell apart.
INVITE_OK = "INVITATION_CREATED"
INVITE_LIMIT = "INVITATION_FAILED_TOO_MANY"
COLLAB_DISABLED = "FAILED_COLLABORATION_DISABLED"
JOIN_OK = "JOIN_SUCCESSFUL"
JOIN_UNKNOWN = "JOIN_FAILED_UNKNOWN_INVITATION"
JOIN_USED = "JOIN_FAILED_INVITATION_USED"
JOIN_EXPIRED = "JOIN_FAILED_INVITATION_EXPIRED"
JOIN_ENDED = "JOIN_FAILED_SESSION_ENDED"
JOIN_FAILED = "JOIN_FAILED_OTHER"
# An invitation code on the wire: secrets.token_urlsafe output, bounded before anything looks it up.
MAX_INVITATION_CODE = 64
_INVITATION_CODE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


# The CM -> agent launch-session, element for element as real PCoIP agents take it (docs/protocol.md
# names the public source). The agent stand-in accepts exactly these elements and nothing else.
LAUNCH_ELEMENTS = (
    "session-type",
    "ip-address",
    "hostname",
    "logon",
    "client-mac",
    "client-ip",
    "client-name",
    "license-path",
    "session-log-id",
)
LOGON_ELEMENTS = ("username", "password", "domain")
LOGON_WINDOWS_PASSWORD = "windows-password"  # noqa: S105 - a logon method name, not a password
LOGON_NONE = "none"  # a desktop that needs no credentials (pre-logged-on, kiosk): none are sent
LOGONS = (LOGON_WINDOWS_PASSWORD, LOGON_NONE)
SESSION_INFO_ELEMENTS = ("ip-address", "sni", "port", "session-id", "session-tag")


class ProtocolError(Exception):
    """A request the codec or the state machine refuses; rendered as ``<error-resp>``."""

    def __init__(self, result_id: str, message: str) -> None:
        super().__init__(message)
        self.result_id = result_id
        self.message = message


# ---------------------------------------------------------------- element helpers


def sub(parent: ET.Element, tag: str, text: str | int | None = None, **attrib: str) -> ET.Element:
    child = ET.SubElement(parent, tag, {k.replace("_", "-"): v for k, v in attrib.items()})
    if text is not None:
        child.text = str(text)
    return child


def text(parent: ET.Element, path: str, default: str = "") -> str:
    node = parent.find(path)
    if node is None or node.text is None:
        return default
    return node.text.strip()


def required(parent: ET.Element, path: str) -> str:
    value = text(parent, path)
    if not value:
        raise ProtocolError(E_MALFORMED, f"<{parent.tag}> needs <{path}>")
    return value


def _int(value: str, what: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ProtocolError(E_MALFORMED, f"<{what}> must be a number") from None


def _result(parent: ET.Element, result_id: str, result_str: str) -> None:
    result = sub(parent, "result")
    sub(result, "result-id", result_id)
    sub(result, "result-str", result_str)


def _read_result(el: ET.Element) -> tuple[str, str]:
    return required(el, "result/result-id"), text(el, "result/result-str")


def _methods(el: ET.Element) -> list[str]:
    return [m.text.strip() for m in el.findall("next-authentication/authentication-methods/method") if m.text]


# ---------------------------------------------------------------- messages


@dataclass
class ClientInfo:
    product_name: str = "Gatehouse Client"
    product_version: str = __version__
    platform: str = "linux"
    locale: str = "en_US"
    hostname: str = ""
    # A Gatehouse extension (real clients are not known to send it): becomes the agent's client-mac.
    mac_address: str = ""

    def to_xml(self, parent: ET.Element, tag: str = "client-info") -> ET.Element:
        el = sub(parent, tag)
        sub(el, "product-name", self.product_name)
        sub(el, "product-version", self.product_version)
        sub(el, "platform", self.platform)
        sub(el, "locale", self.locale)
        sub(el, "hostname", self.hostname)
        if self.mac_address:
            sub(el, "mac-address", self.mac_address)
        return el

    @classmethod
    def from_xml(cls, el: ET.Element | None) -> ClientInfo:
        if el is None:
            return cls(product_name="", product_version="", platform="", locale="")
        return cls(
            text(el, "product-name"),
            text(el, "product-version"),
            text(el, "platform"),
            text(el, "locale"),
            text(el, "hostname"),
            text(el, "mac-address"),
        )


@dataclass
class PcmInfo:
    """What a CM tells the broker about itself and the client session it is speaking for."""

    session_id: str
    client_ip: str = ""
    product_name: str = "Gatehouse Connection Manager"
    product_version: str = __version__

    def to_xml(self, parent: ET.Element) -> None:
        el = sub(parent, "pcm-info")
        sub(el, "product-name", self.product_name)
        sub(el, "product-version", self.product_version)
        sub(el, "session-id", self.session_id)
        sub(el, "client-ip", self.client_ip)

    @classmethod
    def from_xml(cls, el: ET.Element | None) -> PcmInfo | None:
        if el is None:
            return None
        return cls(
            text(el, "session-id"),
            text(el, "client-ip"),
            text(el, "product-name"),
            text(el, "product-version"),
        )


class Message:
    tag: ClassVar[str]

    def to_xml(self) -> ET.Element:
        raise NotImplementedError

    @classmethod
    def from_xml(cls, el: ET.Element) -> Message:
        raise NotImplementedError


@dataclass
class Hello(Message):
    tag: ClassVar[str] = "hello"
    client_info: ClientInfo = field(default_factory=ClientInfo)
    caps: list[str] = field(default_factory=list)
    pcm_info: PcmInfo | None = None

    @property
    def is_query(self) -> bool:
        return self.client_info.product_name == QUERY_PRODUCT

    def to_xml(self) -> ET.Element:
        el = ET.Element(self.tag)
        self.client_info.to_xml(el)
        caps = sub(el, "caps")
        for cap in self.caps:
            sub(caps, "cap", cap)
        if self.pcm_info:
            self.pcm_info.to_xml(el)
        return el

    @classmethod
    def from_xml(cls, el: ET.Element) -> Hello:
        caps = [c.text.strip() for c in el.findall("caps/cap") if c.text]
        return cls(ClientInfo.from_xml(el.find("client-info")), caps, PcmInfo.from_xml(el.find("pcm-info")))


@dataclass
class HelloResp(Message):
    tag: ClassVar[str] = "hello-resp"
    product_name: str = "Gatehouse Connection Manager"
    product_version: str = __version__
    hostname: str = ""
    methods: list[str] = field(default_factory=lambda: [AUTH_PASSWORD])
    domains: list[str] = field(default_factory=list)

    def to_xml(self) -> ET.Element:
        el = ET.Element(self.tag)
        info = sub(sub(el, "brokers-info"), "broker-info")
        sub(info, "product-name", self.product_name)
        sub(info, "product-version", self.product_version)
        sub(info, "platform", "linux")
        sub(info, "locale", "en_US")
        sub(info, "hostname", self.hostname)
        nxt = sub(el, "next-authentication")
        methods = sub(nxt, "authentication-methods")
        for method in self.methods:
            sub(methods, "method", method)
        domains = sub(nxt, "domains")
        for domain in self.domains:
            sub(domains, "domain", domain)
        return el

    @classmethod
    def from_xml(cls, el: ET.Element) -> HelloResp:
        return cls(
            product_name=text(el, "brokers-info/broker-info/product-name"),
            product_version=text(el, "brokers-info/broker-info/product-version"),
            hostname=text(el, "brokers-info/broker-info/hostname"),
            methods=_methods(el),
            domains=[d.text.strip() for d in el.findall("next-authentication/domains/domain") if d.text],
        )


@dataclass
class Authenticate(Message):
    """One authentication step: ``method="password"`` (username, password, domain) or
    ``method="passcode"`` (username, passcode, domain). Neither secret appears in a repr."""

    tag: ClassVar[str] = "authenticate"
    username: str = ""
    password: str = field(default="", repr=False)
    domain: str = ""
    method: str = METHOD_PASSWORD
    passcode: str = field(default="", repr=False)

    @property
    def method_name(self) -> str:
        """The method as hello-resp names it (AUTHENTICATE_VIA_PASSWORD or AUTHENTICATE_VIA_PASSCODE)."""
        return AUTH_PASSCODE if self.method == METHOD_PASSCODE else AUTH_PASSWORD

    def to_xml(self) -> ET.Element:
        el = ET.Element(self.tag, {"method": self.method})
        sub(el, "username", self.username)
        if self.method == METHOD_PASSCODE:
            sub(el, "passcode", self.passcode)
        else:
            sub(el, "password", self.password)
        sub(el, "domain", self.domain)
        return el

    @classmethod
    def from_xml(cls, el: ET.Element) -> Authenticate:
        method = el.get("method", METHOD_PASSWORD)
        if method == METHOD_PASSCODE:
            passcode = text(el, "passcode")
            if len(passcode) > MAX_PASSCODE or not _PASSCODE.match(passcode):
                raise ProtocolError(
                    E_MALFORMED, f"<passcode> must be at most {MAX_PASSCODE} printable ASCII characters"
                )
            return cls(required(el, "username"), "", text(el, "domain"), METHOD_PASSCODE, passcode)
        if method != METHOD_PASSWORD:
            raise ProtocolError(
                E_MALFORMED, "only the password and passcode authentication methods are supported"
            )
        node = el.find("password")
        password = node.text if node is not None and node.text else ""
        return cls(required(el, "username"), password, text(el, "domain"))


@dataclass
class AuthenticateResp(Message):
    """``AUTH_SUCCESSFUL_BUT_INCOMPLETE`` names the next step's method in ``next_methods``."""

    tag: ClassVar[str] = "authenticate-resp"
    result_id: str = AUTH_OK
    result_str: str = ""
    next_methods: list[str] = field(default_factory=list)

    def to_xml(self) -> ET.Element:
        el = ET.Element(self.tag, {"method": "password"})
        _result(el, self.result_id, self.result_str)
        if self.next_methods:
            methods = sub(sub(el, "next-authentication"), "authentication-methods")
            for method in self.next_methods:
                sub(methods, "method", method)
        return el

    @classmethod
    def from_xml(cls, el: ET.Element) -> AuthenticateResp:
        return cls(*_read_result(el), _methods(el))


@dataclass
class GetResourceList(Message):
    tag: ClassVar[str] = "get-resource-list"
    resource_type: str = "DESKTOP"
    protocol: str = "PCOIP"

    def to_xml(self) -> ET.Element:
        el = ET.Element(self.tag)
        sub(el, "resource-type", self.resource_type)
        sub(el, "protocol", self.protocol)
        return el

    @classmethod
    def from_xml(cls, el: ET.Element) -> GetResourceList:
        return cls(text(el, "resource-type", "DESKTOP"), text(el, "protocol", "PCOIP"))


@dataclass
class Resource:
    resource_id: str
    name: str
    resource_type: str = "DESKTOP"
    session_type: str = "VDI"
    state: str = "UNKNOWN"
    protocols: list[str] = field(default_factory=lambda: ["PCOIP"])

    def to_xml(self, parent: ET.Element) -> None:
        el = sub(parent, "resource")
        sub(el, "resource-name", self.name)
        sub(el, "resource-id", self.resource_id)
        sub(el, "resource-type", self.resource_type, session_type=self.session_type)
        sub(el, "resource-state", self.state)
        protocols = sub(el, "protocols")
        for i, proto in enumerate(self.protocols):
            if i == 0:
                sub(protocols, "protocol", proto, is_default="true")
            else:
                sub(protocols, "protocol", proto)

    @classmethod
    def from_xml(cls, el: ET.Element) -> Resource:
        rtype = el.find("resource-type")
        return cls(
            resource_id=required(el, "resource-id"),
            name=text(el, "resource-name"),
            resource_type=text(el, "resource-type", "DESKTOP"),
            session_type=rtype.get("session-type", "VDI") if rtype is not None else "VDI",
            state=text(el, "resource-state", "UNKNOWN"),
            protocols=[p.text.strip() for p in el.findall("protocols/protocol") if p.text],
        )


@dataclass
class GetResourceListResp(Message):
    tag: ClassVar[str] = "get-resource-list-resp"
    result_id: str = LIST_OK
    result_str: str = ""
    resources: list[Resource] = field(default_factory=list)

    def to_xml(self) -> ET.Element:
        el = ET.Element(self.tag)
        _result(el, self.result_id, self.result_str)
        for resource in self.resources:
            resource.to_xml(el)
        return el

    @classmethod
    def from_xml(cls, el: ET.Element) -> GetResourceListResp:
        result_id, result_str = _read_result(el)
        return cls(result_id, result_str, [Resource.from_xml(r) for r in el.findall("resource")])


@dataclass
class AllocateResource(Message):
    tag: ClassVar[str] = "allocate-resource"
    resource_id: str = ""
    resource_type: str = "DESKTOP"
    protocol: str = "PCOIP"
    client_info: ClientInfo | None = None

    def to_xml(self) -> ET.Element:
        el = ET.Element(self.tag)
        sub(el, "resource-type", self.resource_type)
        sub(el, "resource-id", self.resource_id)
        sub(el, "protocol", self.protocol)
        if self.client_info:
            self.client_info.to_xml(el)
        return el

    @classmethod
    def from_xml(cls, el: ET.Element) -> AllocateResource:
        info = el.find("client-info")
        return cls(
            required(el, "resource-id"),
            text(el, "resource-type", "DESKTOP"),
            text(el, "protocol", "PCOIP"),
            ClientInfo.from_xml(info) if info is not None else None,
        )


@dataclass
class AgentInfo:
    """Where the broker placed a session (pcoip-broker envelope only, broker -> CM).

    ``logon`` says whether the desktop needs the user's password (``windows-password``) or none
    (pre-logged-on, kiosk). ``agent_ca_pem`` / ``agent_cert_sha256`` let the CM verify this one
    agent's certificate when the deployment CA did not sign it. ``site`` is the desktop's site
    (empty: none); the CM sends the client to that site's gateway (docs/multisite.md).
    """

    ip_address: str
    hostname: str = ""
    agent_port: int = 60443
    session_port: int = 4172
    logon: str = LOGON_WINDOWS_PASSWORD
    agent_ca_pem: str = field(default="", repr=False)
    agent_cert_sha256: str = ""
    site: str = ""

    def to_xml(self, parent: ET.Element) -> None:
        el = sub(parent, "agent-info")
        sub(el, "ip-address", self.ip_address)
        sub(el, "hostname", self.hostname)
        sub(el, "agent-port", self.agent_port)
        sub(el, "session-port", self.session_port)
        sub(el, "logon", self.logon)
        if self.agent_ca_pem:
            sub(el, "agent-ca-pem", self.agent_ca_pem)
        if self.agent_cert_sha256:
            sub(el, "agent-cert-sha256", self.agent_cert_sha256)
        if self.site:
            sub(el, "site", self.site)

    @classmethod
    def from_xml(cls, el: ET.Element) -> AgentInfo:
        logon = text(el, "logon", LOGON_WINDOWS_PASSWORD)
        if logon not in LOGONS:
            raise ProtocolError(E_MALFORMED, f"<logon> must be one of {', '.join(LOGONS)}")
        return cls(
            required(el, "ip-address"),
            text(el, "hostname"),
            _int(text(el, "agent-port", "60443"), "agent-port"),
            _int(text(el, "session-port", "4172"), "session-port"),
            logon,
            text(el, "agent-ca-pem"),
            text(el, "agent-cert-sha256"),
            text(el, "site"),
        )


@dataclass
class Target:
    ip_address: str
    port: int
    session_id: str
    connect_tag: str = field(repr=False)
    hostname: str = ""
    sni: str = ""
    ipv6_address: str = ""

    def to_xml(self, parent: ET.Element) -> None:
        el = sub(parent, "target")
        sub(el, "ip-address", self.ip_address)
        if self.ipv6_address:
            sub(el, "ipv6-address", self.ipv6_address)
        sub(el, "hostname", self.hostname)
        sub(el, "sni", self.sni)
        sub(el, "port", self.port)
        sub(el, "session-id", self.session_id)
        sub(el, "connect-tag", self.connect_tag)

    @classmethod
    def from_xml(cls, el: ET.Element) -> Target:
        return cls(
            ip_address=required(el, "ip-address"),
            port=_int(required(el, "port"), "port"),
            session_id=required(el, "session-id"),
            connect_tag=required(el, "connect-tag"),
            hostname=text(el, "hostname"),
            sni=text(el, "sni"),
            ipv6_address=text(el, "ipv6-address"),
        )


@dataclass
class AllocateResourceResp(Message):
    tag: ClassVar[str] = "allocate-resource-resp"
    result_id: str = ALLOC_OK
    result_str: str = ""
    resource_id: str = ""
    protocol: str = "PCOIP"
    target: Target | None = None
    agent: AgentInfo | None = None

    def to_xml(self) -> ET.Element:
        el = ET.Element(self.tag)
        _result(el, self.result_id, self.result_str)
        if self.target:
            self.target.to_xml(el)
        if self.agent:
            self.agent.to_xml(el)
        sub(el, "resource-id", self.resource_id)
        sub(el, "protocol", self.protocol)
        return el

    @classmethod
    def from_xml(cls, el: ET.Element) -> AllocateResourceResp:
        result_id, result_str = _read_result(el)
        target = el.find("target")
        agent = el.find("agent-info")
        return cls(
            result_id,
            result_str,
            text(el, "resource-id"),
            text(el, "protocol", "PCOIP"),
            Target.from_xml(target) if target is not None else None,
            AgentInfo.from_xml(agent) if agent is not None else None,
        )


@dataclass
class Bye(Message):
    tag: ClassVar[str] = "bye"

    def to_xml(self) -> ET.Element:
        return ET.Element(self.tag)

    @classmethod
    def from_xml(cls, el: ET.Element) -> Bye:
        return cls()


@dataclass
class ByeResp(Message):
    tag: ClassVar[str] = "bye-resp"

    def to_xml(self) -> ET.Element:
        return ET.Element(self.tag)

    @classmethod
    def from_xml(cls, el: ET.Element) -> ByeResp:
        return cls()


@dataclass
class ErrorResp(Message):
    tag: ClassVar[str] = "error-resp"
    result_id: str = E_MALFORMED
    result_str: str = ""

    def to_xml(self) -> ET.Element:
        el = ET.Element(self.tag)
        sub(el, "result-id", self.result_id)
        sub(el, "result-str", self.result_str)
        return el

    @classmethod
    def from_xml(cls, el: ET.Element) -> ErrorResp:
        return cls(text(el, "result-id", E_INTERNAL), text(el, "result-str"))


@dataclass
class CreateInvitation(Message):
    """Client -> CM: the owner of an allocated session asks for a collaboration invitation."""

    tag: ClassVar[str] = "create-invitation"

    def to_xml(self) -> ET.Element:
        return ET.Element(self.tag)

    @classmethod
    def from_xml(cls, el: ET.Element) -> CreateInvitation:
        return cls()


@dataclass
class CreateInvitationResp(Message):
    """CM -> owner: the single-use code, its lifetime in seconds and the CM that holds it."""

    tag: ClassVar[str] = "create-invitation-resp"
    result_id: str = INVITE_OK
    result_str: str = ""
    invitation_code: str = field(default="", repr=False)
    expires_in: int = 0
    hostname: str = ""

    def to_xml(self) -> ET.Element:
        el = ET.Element(self.tag)
        _result(el, self.result_id, self.result_str)
        if self.invitation_code:
            sub(el, "invitation-code", self.invitation_code)
            sub(el, "expires-in", self.expires_in)
            sub(el, "hostname", self.hostname)
        return el

    @classmethod
    def from_xml(cls, el: ET.Element) -> CreateInvitationResp:
        result_id, result_str = _read_result(el)
        return cls(
            result_id,
            result_str,
            text(el, "invitation-code"),
            _int(text(el, "expires-in", "0"), "expires-in"),
            text(el, "hostname"),
        )


@dataclass
class RedeemInvitation(Message):
    """Client -> CM: an authenticated collaborator joins the owner's session with the code."""

    tag: ClassVar[str] = "redeem-invitation"
    invitation_code: str = field(default="", repr=False)

    def to_xml(self) -> ET.Element:
        el = ET.Element(self.tag)
        sub(el, "invitation-code", self.invitation_code)
        return el

    @classmethod
    def from_xml(cls, el: ET.Element) -> RedeemInvitation:
        code = required(el, "invitation-code")
        if not _INVITATION_CODE.match(code):
            raise ProtocolError(
                E_MALFORMED, f"<invitation-code> must be 1-{MAX_INVITATION_CODE} URL-safe base64 characters"
            )
        return cls(code)


@dataclass
class RedeemInvitationResp(Message):
    """CM -> collaborator: JOIN_SUCCESSFUL with the target (as allocate-resource-resp), or a refusal."""

    tag: ClassVar[str] = "redeem-invitation-resp"
    result_id: str = JOIN_OK
    result_str: str = ""
    target: Target | None = None

    def to_xml(self) -> ET.Element:
        el = ET.Element(self.tag)
        _result(el, self.result_id, self.result_str)
        if self.target:
            self.target.to_xml(el)
        return el

    @classmethod
    def from_xml(cls, el: ET.Element) -> RedeemInvitationResp:
        result_id, result_str = _read_result(el)
        target = el.find("target")
        return cls(result_id, result_str, Target.from_xml(target) if target is not None else None)


def exact_children(el: ET.Element, names: tuple[str, ...]) -> None:
    """Refuse a missing, renamed, repeated or extra child element (order is not checked)."""
    seen = [child.tag for child in el]
    missing = [n for n in names if n not in seen]
    extra = sorted({t for t in seen if t not in names or seen.count(t) > 1})
    if missing or extra:
        parts = []
        if missing:
            parts.append("missing " + ", ".join(f"<{n}>" for n in missing))
        if extra:
            parts.append("unexpected or repeated " + ", ".join(f"<{n}>" for n in extra))
        raise ProtocolError(E_MALFORMED, f"<{el.tag}>: " + "; ".join(parts))


@dataclass
class LaunchSession(Message):
    """CM -> agent (pcoip-agent envelope): where the agent is, who logs on, and who the client is.

    ``password`` is the user's own password for the Windows logon: empty unless the CM verified
    the agent's certificate and the desktop needs credentials. It never appears in a repr.
    """

    tag: ClassVar[str] = "launch-session"
    session_log_id: str = ""
    client_ip: str = ""
    username: str = ""
    domain: str = ""
    password: str = field(default="", repr=False)
    ip_address: str = ""
    hostname: str = ""
    client_name: str = ""
    client_mac: str = ""
    license_path: str = ""
    session_type: str = "UNSPECIFIED"

    def to_xml(self) -> ET.Element:
        el = ET.Element(self.tag)
        sub(el, "session-type", self.session_type)
        sub(el, "ip-address", self.ip_address)
        sub(el, "hostname", self.hostname)
        logon = sub(el, "logon", method=LOGON_WINDOWS_PASSWORD)
        sub(logon, "username", self.username)
        sub(logon, "password", self.password)
        sub(logon, "domain", self.domain)
        sub(el, "client-mac", self.client_mac)
        sub(el, "client-ip", self.client_ip)
        sub(el, "client-name", self.client_name)
        sub(el, "license-path", self.license_path)
        sub(el, "session-log-id", self.session_log_id)
        return el

    @classmethod
    def from_xml(cls, el: ET.Element) -> LaunchSession:
        exact_children(el, LAUNCH_ELEMENTS)
        logon = el.find("logon")
        assert logon is not None  # exact_children
        exact_children(logon, LOGON_ELEMENTS)
        if logon.get("method") != LOGON_WINDOWS_PASSWORD or set(logon.attrib) != {"method"}:
            raise ProtocolError(
                E_MALFORMED, f'<logon> needs method="{LOGON_WINDOWS_PASSWORD}" and nothing else'
            )
        password = logon.find("password")
        return cls(
            session_log_id=text(el, "session-log-id"),
            client_ip=text(el, "client-ip"),
            username=text(logon, "username"),
            domain=text(logon, "domain"),
            # Passwords are taken as sent: leading or trailing spaces are part of them.
            password=password.text if password is not None and password.text else "",
            ip_address=text(el, "ip-address"),
            hostname=text(el, "hostname"),
            client_name=text(el, "client-name"),
            client_mac=text(el, "client-mac"),
            license_path=text(el, "license-path"),
            session_type=required(el, "session-type"),
        )


@dataclass
class SessionInfo:
    ip_address: str
    port: int
    session_id: str
    session_tag: str = field(repr=False)
    sni: str = ""

    def to_xml(self, parent: ET.Element) -> None:
        el = sub(parent, "session-info")
        sub(el, "ip-address", self.ip_address)
        sub(el, "sni", self.sni)
        sub(el, "port", self.port)
        sub(el, "session-id", self.session_id)
        sub(el, "session-tag", self.session_tag)

    @classmethod
    def from_xml(cls, el: ET.Element) -> SessionInfo:
        for name in SESSION_INFO_ELEMENTS:
            if el.find(name) is None:
                raise ProtocolError(E_MALFORMED, f"<session-info> needs <{name}>")
        return cls(
            required(el, "ip-address"),
            _int(required(el, "port"), "port"),
            required(el, "session-id"),
            required(el, "session-tag"),
            text(el, "sni"),
        )


@dataclass
class LaunchSessionResp(Message):
    """Agent -> CM. A refusal carries ``result-id`` and a ``fail-reason`` and no session-info."""

    tag: ClassVar[str] = "launch-session-resp"
    result_id: str = LAUNCH_OK
    fail_reason: str = ""
    session_info: SessionInfo | None = None

    def to_xml(self) -> ET.Element:
        el = ET.Element(self.tag)
        sub(el, "result-id", self.result_id)
        if self.fail_reason:
            sub(el, "fail-reason", self.fail_reason)
        if self.session_info:
            self.session_info.to_xml(el)
        return el

    @classmethod
    def from_xml(cls, el: ET.Element) -> LaunchSessionResp:
        info = el.find("session-info")
        return cls(
            required(el, "result-id"),
            text(el, "fail-reason"),
            SessionInfo.from_xml(info) if info is not None else None,
        )


@dataclass
class JoinSession(Message):
    """CM -> agent (pcoip-agent envelope): admit a collaborator to the running session ``session_id``.

    ``session_id`` is the agent's own session-id from the owner's launch-session-resp;
    ``session_log_id`` the collaborator's CM session id. No credentials: the collaborator joins the
    owner's logged-on desktop session and never logs on to Windows.
    """

    tag: ClassVar[str] = "join-session"
    session_id: str = ""
    session_log_id: str = ""
    client_ip: str = ""
    client_name: str = ""
    username: str = ""
    domain: str = ""

    def to_xml(self) -> ET.Element:
        el = ET.Element(self.tag)
        sub(el, "session-id", self.session_id)
        sub(el, "client-ip", self.client_ip)
        sub(el, "client-name", self.client_name)
        sub(el, "username", self.username)
        sub(el, "domain", self.domain)
        sub(el, "session-log-id", self.session_log_id)
        return el

    @classmethod
    def from_xml(cls, el: ET.Element) -> JoinSession:
        return cls(
            session_id=required(el, "session-id"),
            session_log_id=text(el, "session-log-id"),
            client_ip=text(el, "client-ip"),
            client_name=text(el, "client-name"),
            username=text(el, "username"),
            domain=text(el, "domain"),
        )


@dataclass
class JoinSessionResp(LaunchSessionResp):
    """Agent -> CM: as launch-session-resp; the session-info names the owner's session-id."""

    tag: ClassVar[str] = "join-session-resp"


_AGENT_MESSAGES = (LaunchSession, LaunchSessionResp, JoinSession, JoinSessionResp, ErrorResp)
_BROKER_MESSAGES = (
    Hello,
    HelloResp,
    Authenticate,
    AuthenticateResp,
    GetResourceList,
    GetResourceListResp,
    AllocateResource,
    AllocateResourceResp,
    Bye,
    ByeResp,
    ErrorResp,
)
# Collaboration is between a client and its CM only: a broker never sees these.
_CLIENT_MESSAGES = (
    *_BROKER_MESSAGES,
    CreateInvitation,
    CreateInvitationResp,
    RedeemInvitation,
    RedeemInvitationResp,
)
MESSAGES: dict[str, type[Message]] = {cls.tag: cls for cls in (*_CLIENT_MESSAGES, *_AGENT_MESSAGES)}
# Which messages each envelope carries: a launch-session sent to a broker is an unknown message there.
ENVELOPE_MESSAGES: dict[str, dict[str, type[Message]]] = {
    "pcoip-client": {cls.tag: cls for cls in _CLIENT_MESSAGES},
    "pcoip-broker": {cls.tag: cls for cls in _BROKER_MESSAGES},
    "pcoip-agent": {cls.tag: cls for cls in _AGENT_MESSAGES},
}


# ---------------------------------------------------------------- envelope


def _check_shape(root: ET.Element) -> None:
    count = 0
    stack = [(root, 1)]
    while stack:
        node, depth = stack.pop()
        count += 1
        if depth > MAX_DEPTH:
            raise ProtocolError(E_MALFORMED, f"XML nested deeper than {MAX_DEPTH} levels")
        if count > MAX_ELEMENTS:
            raise ProtocolError(E_MALFORMED, f"more than {MAX_ELEMENTS} XML elements")
        stack.extend((child, depth + 1) for child in node)


def parse(body: bytes, envelope: str) -> Message:
    """Decode one request or response body in ``envelope``; raises ProtocolError."""
    if len(body) > MAX_BODY:
        raise ProtocolError(E_TOO_LARGE, f"request body over {MAX_BODY} bytes")
    if not body.strip():
        raise ProtocolError(E_MALFORMED, "empty request body")
    try:
        root = SafeET.fromstring(body, forbid_dtd=True, forbid_entities=True, forbid_external=True)
    except DefusedXmlException:
        raise ProtocolError(E_MALFORMED, "DTDs, entities and external references are not allowed") from None
    except ET.ParseError as exc:
        raise ProtocolError(
            E_MALFORMED, f"malformed XML ({exc.msg if hasattr(exc, 'msg') else exc})"
        ) from None
    _check_shape(root)
    if root.tag != envelope:
        raise ProtocolError(E_ENVELOPE, f"expected a <{envelope}> envelope, got <{root.tag}>")
    version = root.get("version")
    if version is None:
        raise ProtocolError(E_VERSION, f"<{envelope}> needs a version attribute")
    if version.split(".")[0] != ENVELOPES[envelope].split(".")[0]:
        raise ProtocolError(
            E_VERSION, f"unsupported {envelope} version {version!r}; this server speaks {ENVELOPES[envelope]}"
        )
    children = list(root)
    if len(children) != 1:
        raise ProtocolError(E_ENVELOPE, f"<{envelope}> must hold exactly one message, found {len(children)}")
    child = children[0]
    cls = ENVELOPE_MESSAGES[envelope].get(child.tag)
    if cls is None:
        raise ProtocolError(E_UNKNOWN, f"unknown message <{child.tag}>")
    return cls.from_xml(child)


def render(envelope: str, message: Message) -> bytes:
    root = ET.Element(envelope, {"version": ENVELOPES[envelope]})
    root.append(message.to_xml())
    return ET.tostring(root, encoding="UTF-8", xml_declaration=True)


def error_resp(envelope: str, result_id: str, result_str: str) -> bytes:
    return render(envelope, ErrorResp(result_id, result_str))
