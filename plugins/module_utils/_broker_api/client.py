# Copyright (c) Gatehouse contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""HTTP client of the broker's admin REST API (``/api/v1``), private to the collection.

Uses ``ansible.module_utils.urls.open_url`` so the modules need nothing beyond ansible-core on the
host that runs them. Every failure becomes a ``BrokerApiError`` whose message says what to fix:
the broker's own message for 4xx answers, the URL for connection failures. The admin token is
sent in a header only and never appears in a message.
"""

from __future__ import annotations

import json
import socket
import ssl
from urllib.error import HTTPError, URLError
from urllib.parse import quote, urlencode, urlsplit

from ansible.module_utils.basic import env_fallback
from ansible.module_utils.urls import ConnectionError as UrlsConnectionError
from ansible.module_utils.urls import open_url

API_PREFIX = "/api/v1"
TOKEN_ENV = "GATEHOUSE_ADMIN_TOKEN"  # noqa: S105 - a variable name, not a secret
PASSWORD_MARKER = "(changed)"  # noqa: S105 - shown instead of a password

# Connection options shared by every broker object module (doc fragment: broker_api).
CONNECTION_ARGSPEC = {
    "broker_url": {"type": "str", "required": True},
    "admin_token": {
        "type": "str",
        "required": True,
        "no_log": True,
        "fallback": (env_fallback, [TOKEN_ENV]),
    },
    "ca_cert": {"type": "path", "aliases": ["ca_path"]},
    "validate_certs": {"type": "bool", "default": True},
    "timeout": {"type": "int", "default": 30},
}


class BrokerApiError(Exception):
    """A request failed; ``status`` is the HTTP status (None when no answer came)."""

    def __init__(self, message, status=None, field=None, object_missing=False):
        super().__init__(message)
        self.message = message
        self.status = status
        self.field = field
        # True for the broker's own "<object> does not exist" answer (not a 404 of some other server).
        self.object_missing = object_missing


def segment(value) -> str:
    """One path segment, percent-encoded (names may hold spaces, ``%``, ``?``, ``#`` ...)."""
    return quote(str(value), safe="")


def api_path(*segments) -> str:
    """``api_path("users", "CORP", "a b")`` -> ``/api/v1/users/CORP/a%20b``."""
    return API_PREFIX + "".join("/" + segment(s) for s in segments)


def check_broker_url(url) -> str:
    """Normalised base URL (no trailing slash); raises BrokerApiError for anything but https://host[:port]."""
    value = (url or "").strip()
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError as exc:
        raise BrokerApiError("broker_url %r is not a valid URL: %s" % (value, exc)) from None
    if parts.scheme != "https" or not parts.hostname:
        raise BrokerApiError(
            "broker_url must look like https://broker.example.com:443 (the broker serves its admin API over "
            "TLS only), got %r" % value
        )
    if parts.query or parts.fragment or parts.username or parts.password:
        raise BrokerApiError("broker_url must not contain credentials, a query or a fragment: %r" % value)
    path = parts.path.rstrip("/")
    if path.endswith(API_PREFIX):
        # Accept the API root as well as the server root.
        path = path[: -len(API_PREFIX)]
    return "%s://%s%s" % (parts.scheme, parts.netloc, path)


def _error_text(raw) -> tuple:
    """(message, field, from_broker) of an error body; the broker's is ``{"error": ..., "field": ...}``."""
    try:
        body = json.loads(raw.decode("utf-8", "replace")) if raw else None
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        return body["error"], body.get("field"), True
    text = raw.decode("utf-8", "replace").strip() if raw else ""
    return (text[:300] or "no details"), None, False


class BrokerApi:
    """The admin API of one broker. ``opener`` is replaceable for tests (same signature as open_url)."""

    def __init__(self, broker_url, admin_token, validate_certs=True, ca_cert=None, timeout=30, opener=None):
        self.base_url = check_broker_url(broker_url)
        if not admin_token:
            raise BrokerApiError("admin_token is empty: set it or the %s environment variable" % TOKEN_ENV)
        if timeout is None or timeout < 1:
            raise BrokerApiError("timeout must be at least 1 second, got %r" % (timeout,))
        self._token = admin_token
        self.validate_certs = validate_certs
        self.ca_cert = ca_cert
        self.timeout = timeout
        self._open = opener or open_url

    @classmethod
    def from_params(cls, params, opener=None):
        return cls(
            params["broker_url"],
            params["admin_token"],
            validate_certs=params["validate_certs"],
            ca_cert=params.get("ca_cert"),
            timeout=params["timeout"],
            opener=opener,
        )

    def url(self, path, query=None) -> str:
        url = self.base_url + path
        if query:
            url += "?" + urlencode(query)
        return url

    def request(self, method, path, body=None, query=None):
        """Send one request; returns (status, decoded JSON or None). Raises BrokerApiError."""
        url = self.url(path, query)
        headers = {"Accept": "application/json", "Authorization": "Bearer " + self._token}
        data = None
        if body is not None:
            data = json.dumps(body).encode("utf-8")
            headers["Content-Type"] = "application/json"
        try:
            resp = self._open(
                url,
                data=data,
                headers=headers,
                method=method,
                timeout=self.timeout,
                validate_certs=self.validate_certs,
                ca_path=self.ca_cert,
                follow_redirects="none",
                use_proxy=True,
                http_agent="gatehouse.access",
                use_netrc=False,
            )
            status = resp.getcode()
            raw = resp.read()
        except HTTPError as exc:
            raw = exc.read() if hasattr(exc, "read") else b""
            raise self._http_error(method, url, exc.code, raw) from None
        except (URLError, UrlsConnectionError, ssl.SSLError, socket.timeout, OSError) as exc:
            raise self._connection_error(url, exc) from None
        if status >= 400:  # open_url raises for these; kept for openers that do not
            raise self._http_error(method, url, status, raw)
        if not raw:
            return status, None
        try:
            return status, json.loads(raw.decode("utf-8"))
        except ValueError:
            raise BrokerApiError(
                "%s %s answered %d with a body that is not JSON; is broker_url the broker's HTTPS port?"
                % (method, url, status),
                status,
            ) from None

    def _http_error(self, method, url, status, raw) -> BrokerApiError:
        message, field, from_broker = _error_text(raw)
        if status == 401:
            return BrokerApiError(
                "the broker refused the admin token (HTTP 401 from %s): check admin_token (or %s) against the "
                "broker's AdminToken" % (self.base_url, TOKEN_ENV),
                status,
            )
        if status in (301, 302, 303, 307, 308):
            return BrokerApiError(
                "%s %s was redirected (HTTP %d); point broker_url at the broker itself"
                % (method, url, status),
                status,
            )
        if status == 400:
            return BrokerApiError("the broker rejected the request: %s" % message, status, field)
        if status == 404:
            missing = from_broker and message.endswith("does not exist")
            return BrokerApiError(
                "%s (HTTP 404 from %s %s)" % (message, method, url), status, field, object_missing=missing
            )
        if status == 409:
            return BrokerApiError("%s (HTTP 409 from %s %s)" % (message, method, url), status, field)
        return BrokerApiError("%s %s failed with HTTP %d: %s" % (method, url, status, message), status, field)

    def _connection_error(self, url, exc) -> BrokerApiError:
        reason = getattr(exc, "reason", exc)
        if isinstance(reason, ssl.SSLCertVerificationError) or isinstance(exc, ssl.SSLCertVerificationError):
            return BrokerApiError(
                "TLS verification of %s failed (%s); set ca_cert to the CA that signed the broker's "
                "certificate" % (self.base_url, getattr(reason, "verify_message", None) or reason)
            )
        if isinstance(reason, ConnectionRefusedError):
            return BrokerApiError("cannot connect to the broker at %s: connection refused" % self.base_url)
        if isinstance(reason, (socket.timeout, TimeoutError)):
            return BrokerApiError(
                "no answer from the broker at %s within %s seconds (timeout)" % (self.base_url, self.timeout)
            )
        return BrokerApiError("cannot connect to the broker at %s: %s" % (self.base_url, reason))

    # ------------------------------------------------------------ object helpers

    def get(self, path):
        """The object at ``path``, or None when the broker answers that it does not exist.

        Any other 404 (an unknown endpoint, a server that is not the broker) is an error, so that
        ``state=absent`` against a wrong URL cannot report success.
        """
        try:
            return self.request("GET", path)[1]
        except BrokerApiError as exc:
            if exc.object_missing:
                return None
            raise

    def put(self, path, body, check_mode=False):
        return self.request("PUT", path, body=body, query={"check_mode": "true"} if check_mode else None)[1]

    def delete(self, path, check_mode=False):
        return self.request("DELETE", path, query={"check_mode": "true"} if check_mode else None)[1]

    def default_domain(self) -> str:
        answer = self.request("GET", api_path("domains"))[1] or {}
        domain = answer.get("default")
        if not domain:
            raise BrokerApiError("the broker did not name a default domain in GET %s" % api_path("domains"))
        return domain

    def password_matches(self, domain, name, password) -> bool:
        """Whether ``password`` is the user's password, asked of the broker (a password is never read back)."""
        answer = self.request(
            "POST", api_path("users", domain, name, "check-password"), {"password": password}
        )
        return bool((answer[1] or {}).get("match"))


def render_diff(before, after, password_changed=False) -> dict:
    """Ansible ``diff`` of an object write: ``{}`` for an absent object, a marker for a password change."""
    before = dict(before) if before else {}
    after = dict(after) if after else {}
    for side in (before, after):
        side.pop("password", None)  # the API never returns one; make sure a diff cannot carry one
    if password_changed:
        after["password"] = PASSWORD_MARKER
    return {"before": before, "after": after}
