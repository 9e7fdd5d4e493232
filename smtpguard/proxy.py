"""The trio layer: accept clients, connect upstream, pump bytes through the core.

Thin by design: every SMTP decision is the core's (:mod:`smtpguard.protocol`).
This module reads, feeds, writes what the core says, keeps the deadlines and
closes cleanly.  Each connection handler catches its own errors: a broken
client never takes the server down, and never sees a traceback.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import itertools
import logging
from collections import deque
from collections.abc import Awaitable, Callable

import trio

from .config import Address, Config, Timeouts
from .logs import fields
from .metrics import Metrics
from .protocol.policy import TOO_MANY_CONNECTIONS, Defence
from .protocol.rules import Verb
from .protocol.session import Forwarded, PolicyAction, Session, UpstreamReplied, Violation
from .summary import SessionSummary

log = logging.getLogger("smtpguard")

READ_BYTES = 65536
_ids = itertools.count(1)


def _reply_timeout(timeouts: Timeouts, step: Verb | None) -> float:
    if step is Verb.GREETING:
        return timeouts.greeting_seconds
    if step is Verb.DATA:
        return timeouts.data_init_seconds
    if step in (Verb.DATA_END, Verb.BDAT, Verb.BDAT_LAST):
        return timeouts.data_end_seconds
    return timeouts.command_reply_seconds


async def _acquire(lock: trio.Lock) -> None:
    try:
        lock.acquire_nowait()
    except trio.WouldBlock:
        await lock.acquire()


class Connection:
    """One client and its upstream connection, driven by a :class:`Session`."""

    def __init__(
        self,
        client: trio.abc.Stream,
        upstream: trio.abc.Stream,
        session: Session,
        timeouts: Timeouts,
        metrics: Metrics,
        conn_id: int = 0,
        peer: str = "-",
    ) -> None:
        self.client = client
        self.upstream = upstream
        self.session = session
        self.timeouts = timeouts
        self.metrics = metrics
        self.conn_id = conn_id
        self.peer = peer
        self._client_lock = trio.Lock()
        self._upstream_lock = trio.Lock()
        self._room = trio.Event()
        self._deadline = trio.current_time() + timeouts.greeting_seconds
        self._deadline_key: tuple[object, ...] = ("up", 0)
        self._watch_scope: trio.CancelScope | None = None
        self._client_reads = 0
        self._sent_at: deque[float] = deque()
        self._opened_at = trio.current_time()
        self.summary = SessionSummary()
        self.bytes_from_client = 0
        self.bytes_to_client = 0
        self._nursery: trio.Nursery

    async def run(self) -> None:
        """Relay until the session ends; returns with both streams closed."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._pump_client)
                nursery.start_soon(self._pump_upstream)
                nursery.start_soon(self._watchdog)
        finally:
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(self.upstream)
                await trio.aclose_forcefully(self.client)

    # Every path that changes the session ends here: one place writes,
    # re-arms the deadline and closes.  Bytes are taken inside the lock so
    # two pumps settling at once cannot reorder them; the lock is taken
    # without a checkpoint when it is free (the common case: this is the hot
    # path, run several times per message).
    async def _settle(self) -> None:
        session = self.session
        self._observe()
        if session.has_upstream_bytes:
            await _acquire(self._upstream_lock)
            try:
                data = session.take_upstream_bytes()
                if data:
                    self.metrics.relayed_bytes("client_to_upstream", len(data))
                    try:
                        await self.upstream.send_all(data)
                    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                        session.upstream_eof()
                        self._observe()
            finally:
                self._upstream_lock.release()
        if session.has_client_bytes:
            await _acquire(self._client_lock)
            try:
                data = session.take_client_bytes()
                if data:
                    self.bytes_to_client += len(data)
                    self.metrics.relayed_bytes("upstream_to_client", len(data))
                    try:
                        with trio.move_on_after(self.timeouts.client_command_seconds) as scope:
                            await self.client.send_all(data)
                        if scope.cancelled_caught:
                            session.abort("client_timeout")
                    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                        session.abort("client_closed")
                    self._observe()
            finally:
                self._client_lock.release()
        if session.closed:
            await self._close()
            return
        self._rearm()

    async def _close(self) -> None:
        """The session is over: the last replies reach the client, then both sides close.

        The other pump may be waiting for the client lock with the final
        reply (a 221, a 421) still in the session: take the lock and send
        whatever is left before cancelling anything.
        """
        with trio.CancelScope(shield=True), trio.move_on_after(10):
            await _acquire(self._client_lock)
            try:
                data = self.session.take_client_bytes()
                if data:
                    self.bytes_to_client += len(data)
                    with contextlib.suppress(
                        trio.BrokenResourceError, trio.ClosedResourceError, OSError
                    ):
                        await self.client.send_all(data)
            finally:
                self._client_lock.release()
        self._nursery.cancel_scope.cancel()

    def _observe(self) -> None:
        events = self.session.take_events()
        now = trio.current_time()
        for event in events:
            if type(event) is Forwarded:
                self._sent_at.append(now)
            elif type(event) is UpstreamReplied:
                start = self._opened_at if event.step is Verb.GREETING else None
                if start is None and self._sent_at:
                    start = self._sent_at.popleft()
                if start is not None:
                    self.metrics.reply_latency(event.step, now - start)
            elif type(event) is Violation:
                log.info(
                    "violation",
                    extra=fields(
                        conn=self.conn_id,
                        client=self.peer,
                        state=event.phase.value,
                        command=event.verb.value,
                        expected=event.expected,
                        action="reject",
                    ),
                )
            elif type(event) is PolicyAction:
                log.info(
                    "policy",
                    extra=fields(
                        conn=self.conn_id,
                        client=self.peer,
                        defence=event.defence.value,
                        action=event.action,
                        detail=event.detail,
                    ),
                )
        self.metrics.observe(events)
        self.summary.observe(events)

    def _rearm(self) -> None:
        """Move the one deadline that applies now (RFC 5321 4.5.3.2).

        While the upstream owes a reply, its per-command timeout runs; else
        the client's: per command (partial bytes do not extend it, so a
        client trickling a byte a minute is still cut off), or per chunk
        while it sends a message body.
        """
        s = self.session
        key: tuple[object, ...]
        if s.awaiting_upstream:
            key = ("up", s.upstream_replies, s.commands_seen)
            timeout = _reply_timeout(self.timeouts, s.head_step)
            if key[:2] == self._deadline_key[:2]:
                return  # same reply still owed: keep its deadline
        elif s.in_body:
            key = ("body", self._client_reads)
            timeout = self.timeouts.client_data_seconds
        else:
            key = ("cmd", s.commands_seen, s.upstream_replies)
            timeout = self.timeouts.client_command_seconds
        if key == self._deadline_key:
            return
        self._deadline_key = key
        self._deadline = trio.current_time() + timeout
        if self._watch_scope is not None:
            self._watch_scope.deadline = self._deadline

    async def _watchdog(self) -> None:
        while True:
            with trio.CancelScope(deadline=self._deadline) as scope:
                self._watch_scope = scope
                await trio.sleep_forever()
            if trio.current_time() >= self._deadline:
                break
        if self.session.awaiting_upstream:
            self.session.upstream_timeout()
        else:
            self.session.client_timeout()
        await self._settle()

    async def _pump_client(self) -> None:
        session = self.session
        while True:
            while not session.wants_client_bytes:
                await self._room.wait()
                self._room = trio.Event()
            try:
                data = await self.client.receive_some(READ_BYTES)
            except (trio.BrokenResourceError, OSError):
                data = b""
            self._client_reads += 1
            self.bytes_from_client += len(data)
            if not data:
                session.client_eof()
                await self._settle()
                return
            session.receive_client(data)
            await self._settle()

    async def _pump_upstream(self) -> None:
        session = self.session
        while True:
            try:
                data = await self.upstream.receive_some(READ_BYTES)
            except (trio.BrokenResourceError, OSError):
                data = b""
            if not data:
                session.upstream_eof()
                await self._settle()
                return
            session.receive_upstream(data)
            self._room.set()
            await self._settle()


def _connect_failure_reason(exc: BaseException) -> str:
    # trio.open_tcp_stream wraps the per-address errors in an OSError whose
    # cause is a group of them: judge by the first.
    cause = exc.__cause__
    if isinstance(cause, BaseExceptionGroup) and cause.exceptions:
        exc = cause.exceptions[0]
    if isinstance(exc, trio.TooSlowError):
        return "timeout"
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, OSError) and exc.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH):
        return "unreachable"
    return "error"


class Proxy:
    """Accepts clients and relays each to its own upstream connection."""

    def __init__(
        self,
        config: Config,
        metrics: Metrics,
        upstream: Address | None = None,
        connect: Callable[[], Awaitable[trio.abc.Stream]] | None = None,
    ) -> None:
        self.config = config
        self.metrics = metrics
        upstream = upstream or config.upstream
        if upstream is None:
            raise ValueError("no upstream address")
        self.upstream = upstream
        self._connect = connect or self._connect_tcp
        self._connections: collections.Counter[str] = collections.Counter()
        self._total_connections = 0
        self._fixed_upstream = upstream is not config.upstream

    def reload(self, config: Config) -> None:
        """Use ``config`` for new sessions; sessions in flight keep theirs."""
        self.config = config
        if not self._fixed_upstream and config.upstream is not None:
            self.upstream = config.upstream

    async def _connect_tcp(self) -> trio.abc.Stream:
        with trio.fail_after(self.config.timeouts.connect_seconds):
            return await trio.open_tcp_stream(self.upstream.host, self.upstream.port)

    async def handle(
        self, client: trio.abc.Stream, peer: str = "-", client_host: str = "-"
    ) -> None:
        """Serve one client until its session ends.  Never raises (but Cancelled)."""
        conn_id = next(_ids)
        metrics = self.metrics
        metrics.session_opened()
        config = self.config  # a reload mid-session must not mix two configs
        session = Session(config.session)
        conn: Connection | None = None
        opened = trio.current_time()
        log.debug("connect", extra=fields(conn=conn_id, client=peer))
        self._connections[client_host] += 1
        self._total_connections += 1
        try:
            if not await self._admit(client, session, client_host, conn_id, peer):
                return
            try:
                upstream = await self._connect()
            except (OSError, trio.TooSlowError) as exc:
                failure = _connect_failure_reason(exc)
                metrics.connect_failed(failure)
                log.warning(
                    "upstream unreachable",
                    extra=fields(
                        conn=conn_id, client=peer, upstream=str(self.upstream), reason=failure
                    ),
                )
                session.upstream_refused()
                metrics.observe(session.take_events())
                with trio.move_on_after(10):
                    await client.send_all(session.take_client_bytes())
                return
            conn = Connection(client, upstream, session, config.timeouts, metrics, conn_id, peer)
            await conn.run()
        except Exception:
            log.exception("internal error", extra=fields(conn=conn_id, client=peer))
        finally:
            self._connections[client_host] -= 1
            if not self._connections[client_host]:
                del self._connections[client_host]
            self._total_connections -= 1
            reason = session.close_reason or "internal_error"
            metrics.session_closed(reason)
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(client)
            summary: dict[str, object] = {"conn": conn_id, "client": peer, "reason": reason}
            if conn is not None:
                summary.update(conn.summary.fields())
                summary["bytes_in"] = conn.bytes_from_client
                summary["bytes_out"] = conn.bytes_to_client
            summary["duration_seconds"] = round(trio.current_time() - opened, 3)
            log.info("disconnect", extra=fields(**summary))

    async def _admit(
        self, client: trio.abc.Stream, session: Session, host: str, conn_id: int, peer: str
    ) -> bool:
        """Connection limits and greet_wait, before the upstream is bothered."""
        config = self.config
        over = (
            self._total_connections > config.max_connections
            or self._connections[host] > config.max_connections_per_client
        )
        if over:
            action = "observe" if config.connections_observe else "reject"
            self.metrics.policy_actions.labels(Defence.CONNECTIONS.value, action).inc()
            log.warning(
                "policy",
                extra=fields(conn=conn_id, client=peer, defence="connections", action=action),
            )
            if action == "reject":
                session.refuse(TOO_MANY_CONNECTIONS)
                await self._answer_and_close(client, session)
                return False
        if config.greet_wait_seconds > 0:
            early: bytes | bytearray = b""
            with trio.move_on_after(config.greet_wait_seconds):
                try:
                    early = await client.receive_some(READ_BYTES)
                except (trio.BrokenResourceError, OSError):
                    session.abort("client_closed")
                    return False
                if not early:
                    session.abort("client_closed")
                    return False
            if early:
                session.receive_client(early)
                if session.closed:  # early_talk: disconnect
                    await self._answer_and_close(client, session)
                    return False
        return True

    async def _answer_and_close(self, client: trio.abc.Stream, session: Session) -> None:
        events = session.take_events()
        self.metrics.observe(events)
        with trio.move_on_after(10):
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                await client.send_all(session.take_client_bytes())

    async def serve(
        self,
        *,
        task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen on every configured address and serve until cancelled."""
        listeners: list[trio.SocketListener] = []
        for address in self.config.listen:
            listeners += await trio.open_tcp_listeners(address.port, host=address.host)
        for listener in listeners:
            log.info("listening", extra=fields(address=_sockname(listener)))
        async with trio.open_nursery() as nursery:
            task_status.started(listeners)
            for listener in listeners:
                nursery.start_soon(self._accept_loop, listener)

    async def _accept_loop(self, listener: trio.SocketListener) -> None:
        async with listener, trio.open_nursery() as handlers:
            while True:
                try:
                    stream = await listener.accept()
                except OSError as exc:
                    # EMFILE and friends: back off instead of spinning (as trio does).
                    log.error("accept failed", extra=fields(error=str(exc)))
                    await trio.sleep(0.1)
                    continue
                handlers.start_soon(self._handle_stream, stream)

    async def _handle_stream(self, stream: trio.SocketStream) -> None:
        try:
            host, port = stream.socket.getpeername()[:2]
            peer = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        except OSError:
            host, peer = "-", "-"
        await self.handle(stream, peer, host)


def _sockname(listener: trio.SocketListener) -> str:
    host, port = listener.socket.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
