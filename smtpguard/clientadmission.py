"""Client admission: which clients may go on, before the upstream is bothered.

At connect, in this order: the penalty box, the connection rate and (with
a shared store) the client's sessions across the fleet (clientrates.py,
store.py); then this process's connection limits (``limits.max_connections``,
``limits.max_connections_per_client``); then ``policy.greet_wait_seconds``
(a client that talks before the greeting).  During the session, the
message and recipient rates (:meth:`ClientAdmission.admitter`); at its end,
its violations go towards the client's penalty box.

``policy.mode: observe`` counts and logs every refusal but refuses nothing.
The replies are the core's (protocol/policy.py); a refusal is sent by the
session (:meth:`Session.refuse`).  The upstream's own slots are admission.py's.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable

import trio

from .clientrates import ClientRates, client_key
from .config import Config
from .logs import fields
from .metrics import Metrics
from .protocol.policy import (
    CONNECTION_RATE,
    PENALTY_DENIED,
    PENALTY_TRY_LATER,
    TOO_MANY_CONNECTIONS,
    Defence,
)
from .protocol.replies import Reply
from .protocol.session import Session
from .store import RedisStore, Refusal
from .wire import READ_BYTES, Wire, send_last

log = logging.getLogger("smtpguard")


async def answer_and_close(client: Wire, session: Session, metrics: Metrics) -> None:
    """Count the session's events, and send its last replies to the client."""
    metrics.observe(session.take_events())
    await send_last(client, session.take_client_bytes())


class ClientAdmission:
    """The clients' connection counts, rates and penalty box (kept across
    reloads), and the shared store that backs them across processes."""

    def __init__(self, config: Config, metrics: Metrics) -> None:
        self.config = config
        self.metrics = metrics
        #: Sessions in this process, per client host and in all.
        self._connections: collections.Counter[str] = collections.Counter()
        self._total = 0
        #: Per-client connection rates and the penalty box (with a store,
        #: they back it up while it is down).
        self.rates = ClientRates(config.rates)
        #: The shared store (Redis), for the life of the process: a reload
        #: that changes ``store`` needs a restart.
        self.store = (
            RedisStore(config.store, metrics, self._own_count) if config.store.configured else None
        )
        #: Sessions' members in the shared store's per-client sets: conn -> (key, member).
        self._members: dict[int, tuple[str, str]] = {}

    def reload(self, config: Config) -> None:
        if config.store != self.config.store:
            log.warning("store unchanged: a new store section needs a restart", extra=fields())
        self.config = config
        self.rates.settings = config.rates

    def _own_count(self, kind: str, key: str) -> int:
        return self.rates.count(kind, key, trio.current_time())

    def opened(self, host: str) -> None:
        """A session of ``host`` starts (counted before :meth:`admit`)."""
        self._connections[host] += 1
        self._total += 1

    def release(self, conn_id: int) -> None:
        """The session ``conn_id`` leaves the shared store's count."""
        held = self._members.pop(conn_id, None)
        if held is not None and self.store is not None:
            self.store.disconnect(*held)

    def closed(self, host: str) -> None:
        """A session of ``host`` is over."""
        self._connections[host] -= 1
        if not self._connections[host]:
            del self._connections[host]
        self._total -= 1

    async def admit(
        self, client: Wire, session: Session, host: str, conn_id: int, peer: str
    ) -> bool:
        """Rates, connection limits and greet_wait.  False: the session is
        over (its refusal, if any, sent)."""
        refusal = await self._refusal(host, conn_id, peer)
        if refusal is None:
            refusal = self._over_limits(host, conn_id, peer)
        if refusal is not None:
            session.refuse(refusal)
            await answer_and_close(client, session, self.metrics)
            return False
        if self.config.greet_wait_seconds > 0:
            return await self._greet_wait(client, session)
        return True

    def _over_limits(self, host: str, conn_id: int, peer: str) -> Reply | None:
        """This process's connection limits: the reply to refuse with, if any."""
        config = self.config
        over = (
            self._total > config.max_connections
            or self._connections[host] > config.max_connections_per_client
        )
        if not over:
            return None
        action = "observe" if config.connections_observe else "reject"
        self.metrics.policy_actions.labels(Defence.CONNECTIONS.value, action).inc()
        log.warning(
            "policy",
            extra=fields(conn=conn_id, client=peer, defence="connections", action=action),
        )
        return TOO_MANY_CONNECTIONS if action == "reject" else None

    async def _greet_wait(self, client: Wire, session: Session) -> bool:
        """A client that talks before the greeting is no SMTP client (early_talk)."""
        early: bytes | bytearray = b""
        with trio.move_on_after(self.config.greet_wait_seconds):
            try:
                early = await client.stream.receive_some(READ_BYTES)
            except (trio.BrokenResourceError, OSError):
                session.abort("client_closed")
                return False
            if not early:
                session.abort("client_closed")
                return False
        if early:
            session.receive_client(early)
            if session.closed:  # early_talk: disconnect
                await answer_and_close(client, session, self.metrics)
                return False
        return True

    async def _refusal(self, host: str, conn_id: int, peer: str) -> Reply | None:
        """The penalty box, the connection rate and (with a shared store) the
        client's concurrent sessions: see clientrates.py and store.py."""
        rates = self.rates
        key = client_key(host, rates.settings)
        now = trio.current_time()
        observe = self.config.connections_observe  # policy.mode: observe counts only
        store = self.store
        if store is not None and store.up:
            verdict = await store.connect(
                key,
                rates.settings.connections_per_minute,
                self.config.max_connections_per_client,
                observe,
            )
            if verdict is not None:
                self._members[conn_id] = (key, verdict.member)
                rates.connect(key, now)  # this process's state backs the store up
                if verdict.refusal is None:
                    return None
                return self._refused(verdict.refusal, conn_id, peer)
        if rates.penalized(key, now) is not None:
            refusal = self._refused(Refusal.PENALTY, conn_id, peer)
            if refusal is not None:  # observe mode goes on counting
                return refusal
        if not rates.connect(key, now):
            return self._refused(Refusal.RATE, conn_id, peer)
        return None

    def _refused(self, refusal: Refusal, conn_id: int, peer: str) -> Reply | None:
        """Count (and log) a refusal at connect; its reply, None in observe mode."""
        observe = self.config.connections_observe
        action = "observe" if observe else "reject"
        if refusal is Refusal.PENALTY:
            self.metrics.penalty_refusals.inc()  # logged once, when it went in
            penalty_reply = self.rates.settings.penalty_reply
            reply = PENALTY_DENIED if penalty_reply == 554 else PENALTY_TRY_LATER
        elif refusal is Refusal.RATE:
            self.metrics.rate_refusals.inc()
            log.warning(
                "policy",
                extra=fields(conn=conn_id, client=peer, defence="connection_rate", action=action),
            )
            reply = CONNECTION_RATE
        else:
            self.metrics.policy_actions.labels(Defence.CONNECTIONS.value, action).inc()
            log.warning(
                "policy",
                extra=fields(conn=conn_id, client=peer, defence="connections", action=action),
            )
            reply = TOO_MANY_CONNECTIONS
        return None if observe else reply

    def admitter(self, host: str) -> Callable[[str], bool]:
        """The session's question "may this client send one more message
        (recipient)?", answered from this process's per-client rates and,
        with a shared store, the other processes' counts as last read."""
        rates = self.rates
        key = client_key(host, rates.settings)
        observe = self.config.connections_observe  # policy.mode: observe counts only
        store = self.store

        def admit(kind: str) -> bool:
            others = store.others(kind, key) if store is not None else 0
            if rates.allow(kind, key, trio.current_time(), others):
                if store is not None:
                    store.count(kind, key)
                return True
            self.metrics.rate_refusals_commands.labels(kind).inc()
            return observe

        return admit

    async def count_violations(self, host: str, session: Session, conn_id: int, peer: str) -> None:
        """A session's violations, towards its client's penalty box (the
        fleet's with a shared store: only the process that boxed it logs)."""
        rates = self.rates
        settings = rates.settings
        key = client_key(host, settings)
        now = trio.current_time()
        boxed: bool | None = None
        store = self.store
        if store is not None and settings.penalty_violations:
            boxed = await store.violations(
                key,
                session.violations,
                settings.penalty_violations,
                settings.penalty_window_seconds,
                settings.penalty_seconds,
            )
        if boxed is None:
            boxed = rates.violations(key, session.violations, now)
        if boxed:
            self.metrics.penalty_entries.inc()
            log.warning(
                "penalty box",
                extra=fields(conn=conn_id, client=peer, key=key, seconds=settings.penalty_seconds),
            )
