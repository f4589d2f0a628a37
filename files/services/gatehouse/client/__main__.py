"""``python -m gatehouse.client --url https://CM[:PORT] --user U --password-env VAR ...``.

The password is read from an environment variable, a file or the terminal, never from the
command line (which every user of the host can read in ``ps``). So is a passcode the broker asks
for (``--passcode-env``, ``--passcode-file``), or it is computed from a TOTP secret
(``--totp-secret-file``, RFC 6238, at the moment the step is sent). A RADIUS server that answers
a passcode with a challenge wants a second passcode: ``--challenge-passcode-env VAR`` (read when
the challenge comes, so a wrapper may set it from another token); without it, the challenge's
prompt is reported and the session fails.

Collaboration: ``--invite`` (the owner) creates an invitation once the session channel is up,
prints its code on a line of its own (``invitation-code: CODE``, on standard error with
``--json``) and holds the session ``--hold`` seconds (default 300) for the collaborator.
``--invitation-code-env VAR`` or ``--invitation-code-file FILE`` (the collaborator) logs in as
``--user`` and joins the owner's session with that code instead of allocating a resource.

Primary and secondary connections: ``--url`` may be given several times, or hold a comma-separated
list; the CMs are tried in that order and the first that answers hello within
``--attempt-timeout`` seconds serves the session (the report says which one).
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import os
import ssl
import sys
from pathlib import Path
from typing import Any

import pyotp

from gatehouse import tls
from gatehouse.client.flow import (
    Holding,
    PasscodeSource,
    SessionReport,
    endpoint,
    join_session,
    run_failover,
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="gatehouse-client", description="Run one Gatehouse session end to end and report each step."
    )
    parser.add_argument(
        "--url",
        required=True,
        action="append",
        help="the CM, https://HOST[:PORT]; repeat it or give a comma-separated list for secondary "
        "connections, tried in order",
    )
    parser.add_argument(
        "--attempt-timeout",
        type=float,
        default=10.0,
        help="seconds for each CM to answer hello before the next one is tried (default 10)",
    )
    parser.add_argument("--user", default="", help="user name")
    parser.add_argument("--domain", default="", help="domain (default: the broker's)")
    secret = parser.add_mutually_exclusive_group()
    secret.add_argument(
        "--password-env", metavar="VAR", help="read the password from this environment variable"
    )
    secret.add_argument(
        "--password-file", metavar="FILE", help="read the password from this file (first line)"
    )
    code = parser.add_mutually_exclusive_group()
    code.add_argument(
        "--passcode-env", metavar="VAR", help="read the passcode from this environment variable"
    )
    code.add_argument("--passcode-file", metavar="FILE", help="read the passcode from this file (first line)")
    code.add_argument(
        "--totp-secret-file",
        metavar="FILE",
        help="compute the passcode from this base32 TOTP secret (first line; 30 s steps, 6 digits)",
    )
    parser.add_argument(
        "--challenge-passcode-env",
        metavar="VAR",
        help="answer a RADIUS challenge with the passcode in this environment variable",
    )
    parser.add_argument("--resource", help="resource name or id (default: the first one listed)")
    collab = parser.add_mutually_exclusive_group()
    collab.add_argument(
        "--invite",
        action="store_true",
        help="owner: create a collaboration invitation once connected, print its code, hold the session",
    )
    collab.add_argument(
        "--invitation-code-env", metavar="VAR", help="collaborator: join with the code in this variable"
    )
    collab.add_argument(
        "--invitation-code-file", metavar="FILE", help="collaborator: join with the code in this file"
    )
    parser.add_argument(
        "--hold",
        type=float,
        default=300.0,
        help="with --invite: seconds to keep the session up for the collaborator (default 300)",
    )
    trust = parser.add_mutually_exclusive_group()
    trust.add_argument("--ca-cert", metavar="FILE", help="CA bundle for the CM and the gateway/agent")
    trust.add_argument("--insecure", action="store_true", help="do not verify certificates")
    parser.add_argument("--bytes", type=int, default=65536, help="bytes to echo over TCP (default 65536)")
    parser.add_argument("--udp", type=int, default=3, help="datagrams to echo over UDP (default 3, 0 skips)")
    parser.add_argument(
        "--no-connect", action="store_true", help="stop after allocate-resource (no session channel)"
    )
    parser.add_argument("--ipv6", action="store_true", help="use the target's IPv6 address when it has one")
    parser.add_argument("--source-address", metavar="IP", help="local address to connect from")
    parser.add_argument(
        "--server-name",
        metavar="HOST",
        help="host name to ask the CM for (TLS SNI and Host) while connecting to the --url address: "
        "a tenant's name",
    )
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per step (default 30)")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    args = parser.parse_args(argv)
    if args.bytes < 0 or args.udp < 0:
        parser.error("--bytes and --udp must not be negative")
    if args.hold < 0:
        parser.error("--hold must not be negative")
    if args.invite and args.no_connect:
        parser.error("--invite needs the session channel: drop --no-connect")
    if args.attempt_timeout <= 0:
        parser.error("--attempt-timeout must be positive")
    args.url = [url.strip() for item in args.url for url in item.split(",") if url.strip()]
    if not args.url:
        parser.error("--url names no connection manager")
    return args


def read_password(args: argparse.Namespace) -> str:
    if args.password_env:
        value = os.environ.get(args.password_env)
        if value is None:
            raise SystemExit(f"gatehouse-client: environment variable {args.password_env} is not set")
        return value
    if args.password_file:
        try:
            return Path(args.password_file).read_text(encoding="utf-8").splitlines()[0]
        except (OSError, IndexError) as exc:
            raise SystemExit(f"gatehouse-client: cannot read the password file: {exc}") from None
    if sys.stdin.isatty():
        return getpass.getpass("Password: ")
    raise SystemExit("gatehouse-client: give --password-env VAR or --password-file FILE")


def _first_line(path: str, what: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8").splitlines()[0].strip()
    except (OSError, IndexError) as exc:
        raise SystemExit(f"gatehouse-client: cannot read the {what} file: {exc}") from None


def _env(name: str, what: str) -> PasscodeSource:
    def read() -> str:
        value = os.environ.get(name)
        if value is None:
            raise SystemExit(f"gatehouse-client: environment variable {name} ({what}) is not set")
        return value.strip()

    return read


def passcode_source(args: argparse.Namespace) -> PasscodeSource | None:
    """Where a passcode step's code comes from, or None (the broker asks for none)."""
    if args.passcode_env:
        return _env(args.passcode_env, "the passcode")
    if args.passcode_file:
        value = _first_line(args.passcode_file, "passcode")
        return lambda: value
    if args.totp_secret_file:
        secret = _first_line(args.totp_secret_file, "TOTP secret").replace(" ", "").upper()
        try:
            totp = pyotp.TOTP(secret)
            totp.now()
        except (ValueError, TypeError):
            raise SystemExit("gatehouse-client: the TOTP secret file does not hold a base32 secret") from None
        return totp.now
    return None


def invitation_code(args: argparse.Namespace) -> str | None:
    """The collaborator's code, or None for an owner's session."""
    if args.invitation_code_env:
        return _env(args.invitation_code_env, "the invitation code")()
    if args.invitation_code_file:
        return _first_line(args.invitation_code_file, "invitation code")
    return None


def ssl_context(args: argparse.Namespace) -> ssl.SSLContext:
    if args.insecure:
        return tls.client_context(verify=False, role="sg")
    try:
        return tls.client_context(args.ca_cert, verify=True, role="sg")
    except (OSError, ssl.SSLError) as exc:
        raise SystemExit(f"gatehouse-client: cannot load --ca-cert: {exc}") from None


def print_human(report: SessionReport) -> None:
    for attempt in report.attempts:
        if not attempt.ok:
            detail = f"  {attempt.detail}" if attempt.detail else ""
            print(f"unreachable {attempt.url}: {attempt.result} after {attempt.ms:.1f} ms{detail}")
    print(f"session to {report.url}")
    for step in report.steps:
        mark = "ok  " if step.ok else "FAIL"
        detail = f"  {step.detail}" if step.detail else ""
        print(f"  {mark} {step.name:<18} {step.result:<40} {step.ms:>9.1f} ms{detail}")
    if report.session_id:
        print(f"  session id {report.session_id}, target {report.target}")
    print("result: " + ("success" if report.ok else "FAILED"))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for url in args.url:
        try:
            endpoint(url)
        except ValueError as exc:
            raise SystemExit(f"gatehouse-client: --url: {exc}") from None
    password = read_password(args)
    code = invitation_code(args)
    common: dict[str, Any] = {
        "attempt_timeout": args.attempt_timeout,
        "domain": args.domain,
        "ssl_context": ssl_context(args),
        "tcp_bytes": args.bytes,
        "udp_datagrams": args.udp,
        "source_address": args.source_address,
        "server_name": args.server_name,
        "prefer_ipv6": args.ipv6,
        "step_timeout": args.timeout,
        "connect": not args.no_connect,
        "passcode": passcode_source(args),
        "challenge_passcode": _env(args.challenge_passcode_env, "the challenge passcode")
        if args.challenge_passcode_env
        else None,
    }

    async def invite(holding: Holding) -> None:
        got = await holding.invite()
        if got is not None:
            print(f"invitation-code: {got}", file=sys.stderr if args.json else sys.stdout, flush=True)
            await asyncio.sleep(args.hold)

    if code is not None:
        report = asyncio.run(
            run_failover(args.url, args.user, password, code, session=join_session, **common)
        )
    else:
        report = asyncio.run(
            run_failover(
                args.url,
                args.user,
                password,
                resource=args.resource,
                hold=invite if args.invite else None,
                **common,
            )
        )
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print_human(report)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
