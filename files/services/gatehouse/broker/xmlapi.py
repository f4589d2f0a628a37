"""The broker protocol endpoint: ``POST /pcoip-broker/xml`` in the ``pcoip-broker`` 2.1 envelope.

Each CM client session holds one broker session, keyed by a random ``JSESSIONID`` cookie the
broker sets on ``hello`` (never the session id itself). States: after ``hello`` the session can
``authenticate`` (retries allowed); once authenticated it can ``get-resource-list`` and
``allocate-resource``; ``bye`` forgets the session from any state.

Authentication takes one step per method hello-resp lists: the password alone, or with
``SecondFactor`` the password and a passcode (the passcode first with ``SecondFactorFirst``) for
the domains of ``SecondFactorDomains``. A step that passes while another is due answers
``AUTH_SUCCESSFUL_BUT_INCOMPLETE`` naming the next method (a RADIUS Access-Challenge asks for
another passcode the same way, at most :data:`MAX_CHALLENGES` times in one login: the next one
fails the step); the last answers ``AUTH_SUCCESSFUL_AND_COMPLETE``. Every step is
for the same user; a failed step answers like a wrong password, counts in the login throttle like
one, and starts the steps over. Only the last step's success counts as a login for the throttle
(an attacker who knows the password cannot reset the failures of guessing the second factor).
A password step checks the domain's source: local users with scrypt, an ``ldap`` domain's users
in the directory (:mod:`directory`); a directory or RADIUS server that cannot be reached answers
the error a client sees when the broker itself cannot be reached.

Callers: with ``ClientTlsVerify`` (the default) only a peer whose certificate, verified against
``ClientCaCert``, carries role ``cm``; anyone else gets HTTP 403. Only then is the client address
the CM passes in ``<pcm-info>`` trusted as the login source for throttling (:mod:`throttle`).
"""

from __future__ import annotations

import logging
import secrets
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from aiohttp import web

from gatehouse import protocol as p
from gatehouse import tls
from gatehouse.broker import directory, factors, passwords, placement, throttle
from gatehouse.broker.db import POSTGRESQL
from gatehouse.broker.metrics import BrokerMetrics
from gatehouse.broker.settings import FACTOR_RADIUS, FACTOR_TOTP, SOURCE_LDAP, BrokerSettings
from gatehouse.broker.store import DesktopRecord, Store, UserRecord
from gatehouse.logs import SessionLogger
from gatehouse.web import peer_ssl_object, source_key

ENVELOPE = "pcoip-broker"
COOKIE = "JSESSIONID"
PRODUCT = "Gatehouse Connection Broker"
log = logging.getLogger("gatehouse.broker.protocol")
REQUESTS = (p.Hello, p.Authenticate, p.GetResourceList, p.AllocateResource, p.Bye)
# What the CM shows when the broker cannot be reached (UpstreamError.text): a directory or RADIUS
# outage looks the same to the client, and is in the broker's log.
BROKER_ERROR_TEXT = "Error occurred while communicating with broker"
MAX_CHALLENGES = 3  # RADIUS Access-Challenges answered in one login; one more fails it
PROMPTS = {
    p.AUTH_PASSWORD: "Enter your password",
    p.AUTH_PASSCODE: "Enter your passcode",
}
TOTP_PROMPT = "Enter the code from your authenticator app"


@dataclass
class AuthProgress:
    """The steps of one login passed so far. Invariant: every step is for ``account``."""

    account: str  # the throttle's account key: domain and user name as the client sent them
    resolved: str = ""  # the throttle's key of the directory account the name resolved to
    done: list[str] = field(default_factory=list)
    user: UserRecord | None = None
    groups: frozenset[str] = frozenset()
    radius_state: bytes = field(default=b"", repr=False)
    challenges: int = 0


@dataclass
class StepOutcome:
    """What one step found: OK, FAILED, UNAVAILABLE or CHALLENGE (``message``, ``state``)."""

    kind: str
    user: UserRecord | None = None
    groups: frozenset[str] = frozenset()
    message: str = ""
    state: bytes = field(default=b"", repr=False)
    detail: str = ""


OK, FAILED, UNAVAILABLE, CHALLENGE, THROTTLED = "ok", "failed", "unavailable", "challenge", "throttled"


@dataclass
class Resolution:
    """The directory account one attempt's name resolved to (its throttle key), and why the
    throttle refused it (a :mod:`throttle` reason), if it did. Invariant: ``key`` is in flight in
    the throttle for the attempt's source exactly when it is set and not the typed account."""

    key: str = ""
    refusal: str = ""


@dataclass
class BrokerSession:
    cookie: str = field(repr=False)
    session_id: str
    client_ip: str
    last_seen: float
    # The login source for throttling: the client address from <pcm-info> when a verified CM sent
    # it (source_trusted), else the connecting peer's address.
    source: str = ""
    source_trusted: bool = False
    user: UserRecord | None = None
    # The login in progress (multi-step), and the directory groups of the authenticated user.
    progress: AuthProgress | None = None
    directory_groups: frozenset[str] = frozenset()
    log: SessionLogger = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.log = SessionLogger(log, self.session_id)


class BodyTooLarge(p.ProtocolError):
    def __init__(self) -> None:
        super().__init__(p.E_TOO_LARGE, f"request body over {p.MAX_BODY} bytes")


async def read_body(request: web.Request) -> bytes:
    """The request body, refused past 64 KiB before it is read in full."""
    if request.content_length is not None and request.content_length > p.MAX_BODY:
        raise BodyTooLarge
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = await request.content.read(16384)
        if not chunk:
            break
        size += len(chunk)
        if size > p.MAX_BODY:
            raise BodyTooLarge
        chunks.append(chunk)
    return b"".join(chunks)


def parse_resource_id(resource_id: str) -> tuple[str, int] | None:
    kind, _sep, number = resource_id.partition("-")
    if kind not in ("d", "p") or not (number.isascii() and number.isdigit()) or len(number) > 18:
        return None
    return kind, int(number)


class BrokerEndpoint:
    def __init__(
        self,
        store: Store,
        settings: BrokerSettings,
        metrics: BrokerMetrics,
        hasher: passwords.Hasher,
    ) -> None:
        self.store = store
        self.settings = settings
        self.metrics = metrics
        self.hasher = hasher
        # Several broker nodes share a PostgreSQL database: their login counters live there too.
        shared = store.db if store.db.engine == POSTGRESQL else None
        self.throttle = throttle.LoginThrottle(settings.login, shared)
        metrics.login_throttle_entries.set_function(lambda: len(self.throttle))
        metrics.password_hash_pending.set_function(lambda: hasher.pending)
        self.sessions: dict[str, BrokerSession] = {}
        self._dummy_hash = passwords.dummy_hash()
        self._last_prune = 0.0
        self.hostname = settings.hostname or socket.gethostname()
        self.directories = {d: directory.Directory(ds) for d, ds in settings.directories.items()}
        factor = settings.factor
        self.totp = factors.Totp(store, factor.totp_key) if factor.kind == FACTOR_TOTP else None
        self.radius = factors.Radius(factor) if factor.kind == FACTOR_RADIUS else None
        for pool in [*self.directories.values(), *([self.radius] if self.radius else [])]:
            metrics.identity_busy.labels(pool.name)

    def close(self) -> None:
        """Stop the directory and RADIUS threads (checks running finish on their own)."""
        for pool in self.directories.values():
            pool.close()
        if self.radius is not None:
            self.radius.close()

    def methods(self, domain: str | None = None) -> list[str]:
        """The authentication steps, in order: of ``domain``, or (None) those hello-resp lists.

        hello-resp cannot know the domain: it lists the factor whenever one is configured. An
        unknown domain gets the full list too, so its answers look like a real domain's.
        """
        factor = self.settings.factor
        if not factor.enabled or (domain is not None and not factor.applies(domain)):
            return [p.AUTH_PASSWORD]
        if factor.first:
            return [p.AUTH_PASSCODE, p.AUTH_PASSWORD]
        return [p.AUTH_PASSWORD, p.AUTH_PASSCODE]

    # ------------------------------------------------------------ HTTP

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if self.settings.client_tls_verify and "cm" not in tls.peer_roles(peer_ssl_object(request)):
            self.metrics.peers_refused.labels("broker").inc()
            log.warning(
                "broker request refused: the peer presented no connection manager certificate",
                extra={"peer": request.remote},
            )
            reply = p.ErrorResp(p.E_USER_AUTH, "a Gatehouse connection manager certificate is required")
            return web.Response(
                status=403,
                body=p.render(ENVELOPE, reply),
                headers={"Content-Type": p.CONTENT_TYPE, "Cache-Control": "no-store"},
            )
        cookie_set: str | None = None
        cookie_clear = False
        close = False
        try:
            body = await read_body(request)
            message = p.parse(body, ENVELOPE)
            reply, cookie_set, cookie_clear = await self.dispatch(request, message)
        except BodyTooLarge as exc:
            # The rest of the body is never read: close the connection after answering.
            close = True
            reply = p.ErrorResp(exc.result_id, exc.message)
        except p.ProtocolError as exc:
            reply = p.ErrorResp(exc.result_id, exc.message)
        except Exception:
            log.exception("broker request failed")
            reply = p.ErrorResp(p.E_INTERNAL, "internal error")
        if isinstance(reply, p.ErrorResp):
            self.metrics.protocol_errors.labels(reply.result_id).inc()
            session = self.sessions.get(request.cookies.get(COOKIE, ""))
            (session.log if session else log).info(
                "request refused", extra={"result": reply.result_id, "peer": request.remote}
            )
        response = web.StreamResponse(
            status=200, headers={"Content-Type": p.CONTENT_TYPE, "Cache-Control": "no-store"}
        )
        response.enable_chunked_encoding()
        if cookie_set:
            response.set_cookie(COOKIE, cookie_set, secure=True, httponly=True, path="/", samesite="Strict")
        elif cookie_clear:
            response.del_cookie(COOKIE, path="/")
        if close:
            response.force_close()
        await response.prepare(request)
        await response.write(p.render(ENVELOPE, reply))
        await response.write_eof()
        return response

    # ------------------------------------------------------------ state machine

    def _prune(self, now: float) -> None:
        if now - self._last_prune < 5:
            return
        self._last_prune = now
        idle = self.settings.session_idle_timeout
        for cookie in [c for c, s in self.sessions.items() if now - s.last_seen > idle]:
            del self.sessions[cookie]
        self.metrics.sessions.set(len(self.sessions))

    async def dispatch(self, request: web.Request, message: p.Message) -> tuple[p.Message, str | None, bool]:
        now = time.monotonic()
        self._prune(now)
        if not isinstance(message, REQUESTS):
            raise p.ProtocolError(p.E_UNKNOWN, f"<{message.tag}> is not a broker request")
        cookie = request.cookies.get(COOKIE, "")
        if isinstance(message, p.Hello):
            return self._hello(request, message, cookie, now)
        session = self.sessions.get(cookie) if cookie else None
        if isinstance(message, p.Bye):
            if session is not None:
                session.log.info("bye: broker session closed")
                del self.sessions[cookie]
                self.metrics.sessions.set(len(self.sessions))
            return p.ByeResp(), None, True
        if session is None:
            raise p.ProtocolError(p.E_OUT_OF_STATE, f"<{message.tag}> needs a session: send <hello> first")
        session.last_seen = now
        if isinstance(message, p.Authenticate):
            return await self._authenticate(session, message), None, False
        if isinstance(message, p.GetResourceList):
            return self._list(session), None, False
        assert isinstance(message, p.AllocateResource)
        return self._allocate(session, message), None, False

    def _hello(
        self, request: web.Request, hello: p.Hello, old_cookie: str, now: float
    ) -> tuple[p.Message, str | None, bool]:
        reply = p.HelloResp(
            product_name=PRODUCT,
            hostname=self.hostname,
            methods=self.methods(),
            domains=list(self.settings.domains),
        )
        if hello.is_query:
            return reply, None, False  # a probe creates no session
        if old_cookie in self.sessions:
            del self.sessions[old_cookie]  # a new hello starts over
        if len(self.sessions) >= self.settings.max_sessions:
            raise p.ProtocolError(p.E_BUSY, "too many broker sessions; try again later")
        pcm = hello.pcm_info
        session_id = pcm.session_id if pcm and pcm.session_id else str(uuid.uuid4())
        peer = request.remote or ""
        client_ip = pcm.client_ip if pcm and pcm.client_ip else peer
        # Only a verified CM vouches for the client address; anyone else is their own source.
        trusted = bool(self.settings.client_tls_verify and pcm and pcm.client_ip)
        cookie = secrets.token_urlsafe(32)
        session = BrokerSession(
            cookie,
            session_id[:64],
            client_ip[:64],
            now,
            source=source_key(client_ip if trusted else peer),
            source_trusted=trusted,
        )
        self.sessions[cookie] = session
        self.metrics.sessions.set(len(self.sessions))
        session.log.info("hello: broker session started", extra={"client_ip": session.client_ip})
        return reply, cookie, False

    def _domain(self, requested: str) -> str | None:
        if not requested:
            return self.settings.domains[0]
        for domain in self.settings.domains:
            if domain.lower() == requested.lower():
                return domain
        return None

    async def _authenticate(self, session: BrokerSession, auth: p.Authenticate) -> p.Message:
        if session.user is not None:
            raise p.ProtocolError(p.E_OUT_OF_STATE, "already authenticated; send <bye> to start over")
        username, domain_name = auth.username, auth.domain
        if "\\" in username and not domain_name:
            domain_name, _sep, username = username.partition("\\")
        domain = self._domain(domain_name)
        method = auth.method_name
        extra = {
            "user": username[:128],
            "domain": domain_name[:64],
            "client_ip": session.client_ip,
            "method": auth.method,
        }
        failed = p.AuthenticateResp(p.AUTH_FAILED, "unknown username or password")
        account = throttle.account_key(domain or domain_name, username)
        methods = self.methods(domain)
        progress = session.progress
        expected = methods[len(progress.done)] if progress else methods[0]
        if progress is not None and method != expected and method == methods[0]:
            progress = session.progress = None  # the client starts the steps over
            expected = methods[0]
        if (
            progress is None
            and method == p.AUTH_PASSCODE
            and method not in methods
            and self.settings.factor.enabled
        ):
            # SecondFactorFirst offered the passcode first, but this domain has no second factor:
            # nothing is checked, the password is asked for.
            return p.AuthenticateResp(p.AUTH_INCOMPLETE, PROMPTS[p.AUTH_PASSWORD], [p.AUTH_PASSWORD])
        source, per_source = session.source, session.source_trusted
        # An earlier step of this login found the directory account: it counts as well.
        resolution = Resolution(
            progress.resolved if progress is not None and progress.account == account else ""
        )
        now = self.throttle.clock()
        reason = self.throttle.check(account, source, now, per_source=per_source, resolved=resolution.key)
        if reason is not None:
            # The same answer as a wrong password, and no check: nothing to learn, little to spend.
            # One line per attempt, like "authentication failed"; the lockout itself is a warning.
            session.progress = None
            self.metrics.auth.labels("throttled").inc()
            self.metrics.login_throttled.labels(reason).inc()
            session.log.info("authentication throttled", extra={**extra, "reason": reason})
            return failed
        try:
            if method != expected or (progress is not None and progress.account != account):
                outcome = StepOutcome(FAILED, detail="not the step or the user this login expects")
            elif method == p.AUTH_PASSWORD:
                admit = self._admit(account, source, domain or "", resolution)
                outcome = await self._password_step(session, domain, username, auth.password, progress, admit)
            else:
                outcome = await self._passcode_step(domain, username, auth.passcode, progress)
        except (passwords.HasherBusy, directory.DirectoryBusy, factors.FactorBusy) as exc:
            session.progress = None  # every answer but a passed step starts the steps over
            self.throttle.release(account, source, resolution.key)
            self.metrics.auth.labels("busy").inc()
            if isinstance(exc, passwords.HasherBusy):
                self.metrics.password_hash_busy.inc()
            else:
                self.metrics.identity_busy.labels(exc.pool).inc()
            session.log.warning("authentication refused: busy", extra={**extra, "reason": str(exc)})
            raise p.ProtocolError(p.E_BUSY, "the broker is busy; try again later") from None
        except BaseException:
            self.throttle.release(account, source, resolution.key)
            raise
        now = self.throttle.clock()
        if outcome.kind == CHALLENGE and progress is not None and progress.challenges >= MAX_CHALLENGES:
            # A server that keeps challenging ends the login like a wrong passcode, counted: else
            # a client could start the steps over and over without the throttle ever seeing one.
            outcome = StepOutcome(FAILED, detail="too many challenges")
        if outcome.kind == THROTTLED:
            # Refused for the account the name resolved to, before the bind: as at the check above.
            session.progress = None
            self.throttle.release(account, source, resolution.key)
            self.metrics.auth.labels("throttled").inc()
            self.metrics.login_throttled.labels(resolution.refusal).inc()
            session.log.info("authentication throttled", extra={**extra, "reason": resolution.refusal})
            return failed
        if outcome.kind == FAILED:
            session.progress = None
            for scope in self.throttle.failure(
                account, source, now, per_source=per_source, resolved=resolution.key
            ):
                self.metrics.login_lockouts.labels(scope).inc()
                session.log.warning(
                    "login lockout started",
                    extra={**extra, "scope": scope, "seconds": self.settings.login.lockout_seconds},
                )
            self.metrics.auth.labels("failure").inc()
            session.log.info("authentication failed", extra={**extra, "reason": outcome.detail})
            return failed
        if outcome.kind == UNAVAILABLE:
            # Not the user's fault: not counted, and the steps start over.
            session.progress = None
            self.throttle.release(account, source, resolution.key)
            self.metrics.auth.labels("unavailable").inc()
            session.log.warning(
                "authentication impossible: the identity source is unavailable",
                extra={**extra, "reason": outcome.detail},
            )
            raise p.ProtocolError(p.E_INTERNAL, BROKER_ERROR_TEXT)
        progress = progress or AuthProgress(account)
        progress.resolved = resolution.key
        session.progress = progress
        if outcome.kind == CHALLENGE:
            self.throttle.release(account, source, resolution.key)
            progress.challenges += 1
            progress.radius_state = outcome.state
            self.metrics.auth.labels("incomplete").inc()
            session.log.info("authentication step challenged", extra=extra)
            return p.AuthenticateResp(p.AUTH_INCOMPLETE, outcome.message, [p.AUTH_PASSCODE])
        progress.done.append(method)
        progress.radius_state = b""
        if outcome.user is not None:
            progress.user = outcome.user
            progress.groups = outcome.groups
        if len(progress.done) < len(methods):
            self.throttle.release(account, source, resolution.key)
            following = methods[len(progress.done)]
            prompt = TOTP_PROMPT if following == p.AUTH_PASSCODE and self.totp else PROMPTS[following]
            self.metrics.auth.labels("incomplete").inc()
            session.log.info("authentication step passed", extra=extra)
            return p.AuthenticateResp(p.AUTH_INCOMPLETE, outcome.message or prompt, [following])
        record = progress.user
        session.progress = None
        if record is None:  # every method list ends with or holds a password step: unreachable
            self.throttle.release(account, source, resolution.key)
            raise p.ProtocolError(p.E_INTERNAL, "internal error")
        self.throttle.success(account, source, now, resolution.key)
        session.user = record
        session.directory_groups = progress.groups
        self.metrics.auth.labels("success").inc()
        session.log.info("authentication succeeded", extra=extra)
        return p.AuthenticateResp(p.AUTH_OK, "authenticated")

    def _admit(self, account: str, source: str, domain: str, resolution: Resolution) -> Callable[[str], bool]:
        """Whether the check of ``account`` from ``source`` may go on to the directory bind, now
        that the lookup found the account ``name``; records it in ``resolution``. Runs on the
        event loop (:meth:`directory.Directory.authenticate`)."""

        def admit(name: str) -> bool:
            key = throttle.account_key(domain, name)
            if resolution.key:  # a retry on another server: the account found before, no other
                resolution.refusal = throttle.DELAY  # servers that disagree: try again later
                return key == resolution.key
            reason = self.throttle.check_resolved(account, key, source, self.throttle.clock())
            if reason is not None:
                resolution.refusal = reason
                return False
            resolution.key = key
            return True

        return admit

    async def _password_step(
        self,
        session: BrokerSession,
        domain: str | None,
        username: str,
        password: str,
        progress: AuthProgress | None,
        admit: Callable[[str], bool],
    ) -> StepOutcome:
        """The password step, in the domain's source; the same user as an earlier step."""
        if domain is not None and self.settings.source(domain) == SOURCE_LDAP:
            result = await self.directories[domain].authenticate(username, password, admit)
            if result.failure == directory.UNAVAILABLE:
                return StepOutcome(UNAVAILABLE, detail=result.detail)
            if result.failure == directory.REFUSED:
                return StepOutcome(THROTTLED, detail=result.detail)
            if result.user is None:
                return StepOutcome(FAILED, detail=result.detail)
            with self.store.db.transaction():
                record = self.store.directory_user(domain, result.user.name, result.user.display_name)
            groups = result.user.groups
        else:
            found = self.store.user_record(domain, username) if domain else None
            stored = found.password_hash if found and found.password_hash else self._dummy_hash
            # Unknown, disabled and password-less users cost one scrypt like everyone else.
            match = await self.hasher.verify(password, stored)
            if found is None or not found.password_hash or not match:
                return StepOutcome(FAILED, detail="unknown user or wrong password")
            record, groups = found, frozenset()
            if passwords.needs_rehash(record.password_hash):
                await self._rehash(session, record, password)
        if not record.enabled:
            return StepOutcome(FAILED, detail="account disabled")
        if progress is not None and progress.user is not None and progress.user.id != record.id:
            return StepOutcome(FAILED, detail="not the user of the earlier step")
        return StepOutcome(OK, record, groups)

    async def _passcode_step(
        self, domain: str | None, username: str, passcode: str, progress: AuthProgress | None
    ) -> StepOutcome:
        """The second factor: the user's TOTP code, or a RADIUS passcode (maybe a challenge)."""
        if self.totp is not None:
            record = progress.user if progress and progress.user else None
            if record is None and domain is not None:
                record = self.store.user_record(domain, username)
            if record is None or not record.enabled:
                return StepOutcome(FAILED, detail="unknown or disabled user")
            result = self.totp.check(record.id, passcode)
            if not result.ok:
                return StepOutcome(FAILED, detail=result.detail)
            return StepOutcome(OK, record, progress.groups if progress else frozenset())
        if self.radius is None:
            return StepOutcome(FAILED, detail="no second factor configured")
        state = progress.radius_state if progress else b""
        result = await self.radius.check(username, passcode, state)
        if result.kind == factors.UNAVAILABLE:
            return StepOutcome(UNAVAILABLE, detail=result.detail)
        if result.kind == factors.CHALLENGE:
            return StepOutcome(CHALLENGE, message=result.message, state=result.state)
        if not result.ok:
            return StepOutcome(FAILED, detail=result.detail or "RADIUS Access-Reject")
        return StepOutcome(OK, message="")

    async def _rehash(self, session: BrokerSession, record: UserRecord, password: str) -> None:
        """Store the password again with the current parameters (best effort: busy means later)."""
        try:
            new_hash = await self.hasher.hash(password)
        except passwords.HasherBusy:
            return
        with self.store.db.transaction():
            replaced = self.store.replace_password_hash(record.id, record.password_hash or "", new_hash)
        if replaced:
            session.log.info("password hash upgraded to the current parameters", extra={"user": record.name})

    def _current_user(self, session: BrokerSession) -> UserRecord:
        if session.user is None:
            raise p.ProtocolError(p.E_OUT_OF_STATE, "authenticate first")
        # The account may have been disabled or removed since authentication.
        record = self.store.user_record(session.user.domain, session.user.name)
        if record is None or not record.enabled or record.id != session.user.id:
            session.user = None
            session.log.info("user no longer allowed; authentication required again")
            raise p.ProtocolError(p.E_USER_AUTH, "the account is no longer allowed; authenticate again")
        return record

    def _down_sites(self, now: float) -> frozenset[str]:
        return placement.down_sites(self.store.site_last_reports(), now, self.settings.agent_stale_after)

    def _desktop_available(self, desktop: DesktopRecord, down: frozenset[str]) -> bool:
        members = self.store.members(desktop_id=desktop.id)
        member = members[0] if members else None
        stale = self.settings.agent_stale_after
        return placement.choose_desktop(member, time.time(), stale, down=down) is not None

    def _pool_available(self, pool_id: int, down: frozenset[str]) -> bool:
        members = self.store.members(pool_id=pool_id)
        stale = self.settings.agent_stale_after
        return placement.choose_from_pool(members, time.time(), stale, down=down) is not None

    def _list(self, session: BrokerSession) -> p.Message:
        user = self._current_user(session)
        desktops, pools = self.store.entitled(user.id, user.domain, session.directory_groups)
        down = self._down_sites(time.time())
        resources = [
            p.Resource(f"d-{d.id}", d.name, state="ONLINE" if self._desktop_available(d, down) else "OFFLINE")
            for d in desktops
        ]
        resources += [
            p.Resource(
                f"p-{pool['id']}",
                pool["name"],
                state="ONLINE" if self._pool_available(pool["id"], down) else "OFFLINE",
            )
            for pool in pools
        ]
        session.log.info("resource list sent", extra={"resources": len(resources)})
        return p.GetResourceListResp(p.LIST_OK, "resources listed", resources)

    def _allocate(self, session: BrokerSession, alloc: p.AllocateResource) -> p.Message:
        user = self._current_user(session)
        parsed = parse_resource_id(alloc.resource_id)
        desktops, pools = self.store.entitled(user.id, user.domain, session.directory_groups)
        entitled = {("d", d.id) for d in desktops} | {("p", pool["id"]) for pool in pools}
        if parsed is None or parsed not in entitled:
            return self._alloc_result(session, alloc, p.ALLOC_NOT_ENTITLED, "not entitled to this resource")
        kind, number = parsed
        now = time.time()
        stale = self.settings.agent_stale_after
        # Choose and record in one transaction with no await in between: placements cannot interleave.
        with self.store.db.transaction():
            down = self._down_sites(now)
            if kind == "d":
                found = self.store.members(desktop_id=number)
                chosen = placement.choose_desktop(found[0] if found else None, now, stale, down=down)
            else:
                pool = self.store.pool_by_id(number)
                persistent = bool(pool and pool["persistent"])
                assigned = self.store.assignment(user.id, number) if persistent else None
                chosen = placement.choose_from_pool(
                    self.store.members(pool_id=number), now, stale, assigned_id=assigned, down=down
                )
                if chosen is not None and persistent and chosen.desktop_id != assigned:
                    self.store.set_assignment(user.id, number, chosen.desktop_id)
            if chosen is not None:
                self.store.record_placement(chosen.desktop_id)
        desktop = self.store.desktop_by_id(chosen.desktop_id) if chosen else None
        if desktop is None:
            return self._alloc_result(session, alloc, p.ALLOC_UNAVAILABLE, "no desktop is available")
        agent = p.AgentInfo(
            desktop.address,
            desktop.hostname,
            desktop.agent_port,
            desktop.session_port,
            desktop.logon,
            desktop.agent_ca_pem,
            desktop.agent_cert_sha256,
            desktop.site,
        )
        session.log.info(
            "resource allocated",
            extra={
                "resource_id": alloc.resource_id,
                "desktop": desktop.name,
                "agent": desktop.address,
                "site": desktop.site,
            },
        )
        self.metrics.allocations.labels(p.ALLOC_OK).inc()
        return p.AllocateResourceResp(p.ALLOC_OK, "allocated", alloc.resource_id, agent=agent)

    def _alloc_result(
        self, session: BrokerSession, alloc: p.AllocateResource, result: str, text: str
    ) -> p.Message:
        self.metrics.allocations.labels(result).inc()
        session.log.info(
            "allocation refused", extra={"resource_id": alloc.resource_id[:64], "result": result}
        )
        return p.AllocateResourceResp(result, text, alloc.resource_id[:64])
