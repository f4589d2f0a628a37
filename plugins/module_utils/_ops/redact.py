# Copyright (c) Gatehouse contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""Secret redaction for support bundles (private to the collection).

The rule is ``RULE`` below; the support_bundle documentation states it too and every bundle's
manifest carries it, so whoever reads a bundle knows what was removed.
"""

from __future__ import annotations

import re

RULE = """\
1. PEM private key blocks are replaced as a whole; private key files are never copied.
2. Values of keys whose name - lower-cased, with punctuation removed - contains secret, password,
   passwd, passphrase, token, credential, grant, cookie, jsessionid, apikey, privatekey, connecttag,
   sessiontag or authorization are replaced. Keys are recognised in key=value, key: value,
   "key": "value", KEY=value environment entries, <key>value</key> XML elements and JSON data; a
   YAML key with an indented block takes the whole block with it.
3. Values of keys whose name contains "key" (LicenseKey, AccessKey, ...) are replaced too, unless the
   value is an absolute path to a certificate or key file (SslKey=/certs/key.pem stays readable).
4. Authorization, Proxy-Authorization, Cookie, Set-Cookie, X-Api-Key and X-Auth-Token header values,
   Bearer/Basic/Digest credentials, the argument of CONNECT lines (grants, session tags) and
   passwords in URLs (scheme://user:password@host) are replaced.
5. Every secret value of 8 characters or more found by rules 2-4 is then replaced wherever else it
   occurs in the bundle, for instance where a service echoed it into a log.
"""
REDACTED = "[REDACTED]"
REDACTED_KEY_BLOCK = "[REDACTED PRIVATE KEY]"
SENSITIVE_WORDS = (
    "secret",
    "password",
    "passwd",
    "passphrase",
    "token",
    "credential",
    "grant",
    "cookie",
    "jsessionid",
    "apikey",
    "privatekey",
    "connecttag",
    "sessiontag",
    "authorization",
)
MIN_LITERAL_LENGTH = 8
_FILE_PATH_RE = re.compile(r"^/[^\s:;,]*\.(?:pem|crt|cer|der|key|p12|pfx|jks|csr|keystore)$", re.IGNORECASE)
_PEM_KEY_RE = re.compile(
    r"-----BEGIN ([A-Z0-9 ]*)PRIVATE KEY-----.*?(?:-----END \1PRIVATE KEY-----|\Z)", re.DOTALL
)
# A header line, also behind a log prefix ("2026-01-01T00:00:00Z > Authorization: ..."); quoted JSON keys
# are left to the inline rule so the rest of a JSON line survives.
_HEADER_RE = re.compile(
    r"(?P<lead>(?<![\w\"'-])(?:proxy-authorization|authorization|set-cookie|cookie|x-api-key|x-auth-token)"
    r"[ \t]*:[ \t]*)(?P<val>[^\s\"'].*?)[ \t]*$",
    re.IGNORECASE | re.MULTILINE,
)
_SCHEME_RE = re.compile(r"\b(?P<scheme>Bearer|Basic|Digest)[ \t]+(?P<val>[A-Za-z0-9._~+/=\-]{6,})")
_CONNECT_RE = re.compile(r"\bCONNECT[ \t]+(?P<val>(?!\[REDACTED)\S+)")
_URL_CRED_RE = re.compile(r"\b(?P<lead>[A-Za-z][A-Za-z0-9+.\-]*://[^/\s:@]+:)(?P<val>[^@\s/]+)@")
_XML_RE = re.compile(r"<(?P<name>[A-Za-z][\w.:\-]*)(?P<attrs>[^<>]*)>(?P<val>[^<]*)</(?P=name)\s*>")
# A whole line "key = value" / "key: value" / "- KEY=value" / "export KEY=value" (configuration files).
_LINE_RE = re.compile(
    r"^(?P<lead>[ \t]*(?:-[ \t]+)?(?:export[ \t]+)?)(?P<q>[\"']?)(?P<key>[A-Za-z_][A-Za-z0-9_.\-]*)(?P=q)"
    r"(?P<sep>[ \t]*[:=](?:[ \t]+|(?=\S)|$))(?P<val>.*?)(?P<trail>[ \t]*)$",
    re.MULTILINE,
)
# "key=value" anywhere in a line (logs, query strings, JSON text).
_INLINE_RE = re.compile(
    r"(?<![A-Za-z0-9_.])(?P<q>[\"']?)(?P<key>[A-Za-z_][A-Za-z0-9_.\-]*)(?P=q)(?P<sep>[ \t]*[:=][ \t]*)"
    r"(?P<val>\"(?:[^\"\\\n]|\\.)*\"|'[^'\n]*'|[^\s,;&}\])\"']+)"
)
_ENV_RE = re.compile(r"^(?P<key>[A-Za-z_][A-Za-z0-9_.\-]*)=(?P<val>.*)$", re.DOTALL)
_BLOCK_SCALAR_RE = re.compile(r"^[|>][+-]?\d*$")


def _squash(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def _unquote(value: str) -> str:
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        return value[1:-1]
    return value


class Redactor:
    """Applies the redaction rule and remembers the secret values it removed."""

    def __init__(
        self, extra_secret_keys: list[str] | None = None, extra_secrets: list[str] | None = None
    ) -> None:
        self.extra_words = tuple(_squash(k) for k in (extra_secret_keys or []) if _squash(k))
        self.secrets: set[str] = set()
        self.count = 0
        for secret in extra_secrets or []:
            if secret:
                self.secrets.add(secret)

    # -------------------------------------------------------------- rules

    def is_sensitive(self, key: str, value: str | None = None) -> bool:
        squashed = _squash(key)
        if not squashed:
            return False
        if any(word in squashed for word in SENSITIVE_WORDS + self.extra_words):
            return True
        if "key" in squashed:
            return not (value is not None and _FILE_PATH_RE.match(_unquote(value)))
        return False

    def _remember(self, value: str) -> None:
        plain = _unquote(value)
        if len(plain) >= MIN_LITERAL_LENGTH and not plain.startswith("[REDACTED") and not plain.isdigit():
            self.secrets.add(plain)

    def _hide(self, value: str, remember: bool = True) -> str:
        """Replacement for a secret value; quoted values stay quoted so JSON and YAML stay valid."""
        self.count += 1
        if remember:
            self._remember(value)
        stripped = value.strip()
        if len(stripped) >= 2 and stripped[0] == stripped[-1] and stripped[0] in "\"'":
            return stripped[0] + REDACTED + stripped[0]
        return REDACTED

    # -------------------------------------------------------------- text

    def text(self, content: str) -> str:
        """Redact free text (configuration files, logs)."""
        content, blocks = _PEM_KEY_RE.subn(REDACTED_KEY_BLOCK, content)
        self.count += blocks
        content = self._lines(content)
        content = _HEADER_RE.sub(self._header, content)
        content = _SCHEME_RE.sub(lambda m: m.group("scheme") + " " + self._hide(m.group("val")), content)
        content = _CONNECT_RE.sub(lambda m: "CONNECT " + self._hide(m.group("val")), content)
        content = _URL_CRED_RE.sub(lambda m: m.group("lead") + self._hide(m.group("val")) + "@", content)
        content = _XML_RE.sub(self._xml, content)
        content = _INLINE_RE.sub(self._inline, content)
        return content

    def _header(self, match) -> str:
        value = match.group("val")
        if value.startswith("[REDACTED"):
            return match.group(0)
        if "cookie" in match.group("lead").lower():
            # Remember the cookie values, not the cookie names or attributes.
            for cookie_value in re.findall(r"=([^;,\s]+)", value):
                self._remember(cookie_value)
        else:
            self._remember(value.split()[-1])
        return match.group("lead") + self._hide(value, remember=False)

    def _xml(self, match) -> str:
        value = match.group("val")
        if (
            value.strip()
            and self.is_sensitive(match.group("name"), value)
            and not value.startswith("[REDACTED")
        ):
            value = self._hide(value)
        return "<%s%s>%s</%s>" % (match.group("name"), match.group("attrs"), value, match.group("name"))

    def _inline(self, match) -> str:
        value = match.group("val")
        if _unquote(value).startswith("[REDACTED") or not self.is_sensitive(match.group("key"), value):
            return match.group(0)
        return (
            match.group("q") + match.group("key") + match.group("q") + match.group("sep") + self._hide(value)
        )

    def _lines(self, content: str) -> str:
        """Whole-line assignments; a sensitive key opening a YAML block takes its indented lines with it."""
        out = []
        block_indent = None
        for line in content.split("\n"):
            if block_indent is not None:
                indent = len(line) - len(line.lstrip(" \t"))
                if line.strip() and indent > block_indent:
                    body = line[indent:]
                    dash = "- " if body.startswith("- ") else ""
                    self._remember(body[len(dash) :])
                    out.append(line[:indent] + dash + REDACTED)
                    self.count += 1
                    continue
                block_indent = None
            match = _LINE_RE.match(line)
            if match and self.is_sensitive(match.group("key"), match.group("val")):
                value = match.group("val")
                indent = len(line) - len(line.lstrip(" \t"))
                if not value.strip() or _BLOCK_SCALAR_RE.match(value.strip()):
                    # "grants:" / "password: |" - the value is on the following, more indented lines.
                    block_indent = indent
                    out.append(line)
                    continue
                if value.startswith("[REDACTED") or value.startswith("#"):
                    out.append(line)
                    continue
                line = (
                    match.group("lead")
                    + match.group("q")
                    + match.group("key")
                    + match.group("q")
                    + match.group("sep")
                    + self._hide(value)
                    + match.group("trail")
                )
            out.append(line)
        return "\n".join(out)

    def literals(self, content: str) -> str:
        """Rule 5: secrets found anywhere are removed everywhere (longest first)."""
        for secret in sorted(self.secrets, key=len, reverse=True):
            if secret in content:
                self.count += content.count(secret)
                content = content.replace(secret, REDACTED)
        return content

    # -------------------------------------------------------------- structures

    def structure(self, data):
        """Redact JSON-like data (docker inspect): sensitive keys, ``KEY=value`` strings, free text."""
        if isinstance(data, dict):
            result = {}
            for key, value in data.items():
                if isinstance(value, str) and value and self.is_sensitive(str(key), value):
                    result[key] = self._hide(value)
                elif isinstance(value, (dict, list)) and self.is_sensitive(str(key)) and _has_scalars(value):
                    result[key] = self._hide_all(value)
                else:
                    result[key] = self.structure(value)
            return result
        if isinstance(data, list):
            result_list = []
            hide_next = False
            for item in data:
                if hide_next and isinstance(item, str) and item:
                    # ["--admin-token", "value"]: the value follows its flag.
                    result_list.append(self._hide(item))
                else:
                    result_list.append(self.structure(item))
                hide_next = (
                    isinstance(item, str)
                    and item.startswith("-")
                    and "=" not in item
                    and self.is_sensitive(item)
                )
            return result_list
        if isinstance(data, str):
            env = _ENV_RE.match(data)
            if env and self.is_sensitive(env.group("key"), env.group("val")):
                return "%s=%s" % (env.group("key"), self._hide(env.group("val")) if env.group("val") else "")
            return self.text(data)
        return data

    def _hide_all(self, data):
        if isinstance(data, dict):
            return {k: self._hide_all(v) for k, v in data.items()}
        if isinstance(data, list):
            return [self._hide_all(v) for v in data]
        if isinstance(data, str) and data:
            return self._hide(data)
        return data

    def leaked(self, content: str) -> list[str]:
        """Known secrets still present in ``content`` (must be empty before a bundle is written)."""
        return [s for s in self.secrets if s in content]


def _has_scalars(value) -> bool:
    if isinstance(value, dict):
        return any(_has_scalars(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_scalars(v) for v in value)
    return isinstance(value, str) and bool(value)
