"""The trio layer: the pumps, the settling, and one client's way through.

Every SMTP decision is the core's (:mod:`smtpguard.protocol`).  Here a
:class:`Connection` pumps bytes between a client and its upstream, feeds
them to its :class:`~smtpguard.protocol.Session`, and settles after each
feed: writes what the session says, moves the deadline, closes.
:class:`Proxy` takes each client through admission, the upstream's
connection and the relay (:meth:`Proxy.handle`), and serves the listeners.

The concerns around it live next door: wire.py (socket I/O), deadlines.py
(timeouts), accept.py (PROXY header, implicit TLS), clientadmission.py
(limits, rates, penalty box, greet_wait), admission.py (upstream slots),
upstreams.py (selection, failover, health, identity and upstream TLS),
observer.py (metrics, logs and summary of a session).  Each connection
handler catches its own errors: a broken client never takes the server
down, and never sees a traceback.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import logging
import ssl
from collections.abc import Sequence

import trio

from .accept import arrive, open_listeners
from .admission import Permit, UpstreamBusy, UpstreamLimiter
from .clientadmission import ClientAdmission, answer_and_close
from .config import Address, Config, Listener, Timeouts, server_context
from .deadlines import Deadlines, Kind, Timer
from .edges import HandshakeFailed, handshake_failure, start_server_tls, tls_summary
from .logs import fields
from .metrics import Metrics
from .observer import ConnectionObserver, log_disconnect
from .protocol import SessionOptions
from .protocol.framing import UpstreamProtocolError
from .protocol.session import Session
from .upstreams import Connect, Upstreams, connect_failure_reason
from .wire import READ_BYTES, Wire, wire

log = logging.getLogger("smtpguard")

_ids = itertools.count(1)


class _Turn:
    """Whose turn it is to write to one stream: one writer at a time, in order.

    A cheaper trio.Lock for the hot path: taking a free turn is one
    attribute test and store, with no checkpoint, no task lookup and no
    coroutine (``if turn.busy: await turn.wait()`` then ``turn.busy = True``).
    """

    __slots__ = ("busy", "_free")

    def __init__(self) -> None:
        self.busy = False
        self._free: trio.Event | None = None

    async def wait(self) -> None:
        """Return once the turn is free (the caller then sets ``busy``)."""
        while self.busy:
            if self._free is None:
                self._free = trio.Event()
            await self._free.wait()

    def release(self) -> None:
        self.busy = False
        if self._free is not None:
            self._free.set()
            self._free = None


async def _acquire(turn: _Turn) -> None:
    if turn.busy:
        await turn.wait()
    turn.busy = True


class Connection:
    """One client and its upstream connection, driven by a :class:`Session`."""

    # Slots: thousands of idle connections each keep one of these (a dict of
    # this many attributes would cost about 1.5 KiB more per connection).
    __slots__ = (
        "client",
        "upstream",
        "session",
        "observer",
        "deadlines",
        "tls_context",
        "_recv_scope",
        "_tls_done_event",
        "_client_turn",
        "_upstream_turn",
        "_room",
        "_client_reads",
        "_nursery",
    )

    def __init__(
        self,
        client: Wire,
        upstream: Wire,
        session: Session,
        timeouts: Timeouts,
        observer: ConnectionObserver,
        tls_context: ssl.SSLContext | None = None,
        timer: Timer | None = None,
    ) -> None:
        self.client = client
        self.upstream = upstream
        self.session = session
        self.observer = observer
        self.deadlines = Deadlines(session, timeouts, self, timer or Timer())
        #: For STARTTLS (None: not offered, the stream stays as it is).
        self.tls_context = tls_context
        self._recv_scope: trio.CancelScope | None = None
        # Made when first needed (an idle connection holds as few objects as
        # it can): set once a STARTTLS handshake is over.
        self._tls_done_event: trio.Event | None = None
        self._client_turn = _Turn()
        self._upstream_turn = _Turn()
        #: Set when the client pump may read again (made when it waits).
        self._room: trio.Event | None = None
        self._client_reads = 0
        self._nursery: trio.Nursery

    async def run(self) -> None:
        """Relay until the session ends; returns with both streams closed.

        Two tasks: this one pumps the upstream's bytes, a child the client's;
        the shared timer keeps the deadlines (no task of their own).
        """
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                if self.session.has_client_bytes or self.session.has_upstream_bytes:
                    # Fed before the pumps started: the greeting after XCLIENT,
                    # or (deferred connect) the client's first command, ready
                    # once the upstream's greeting came with its TLS or XCLIENT.
                    nursery.start_soon(self._settle)
                nursery.start_soon(self._pump_client)
                self.deadlines.start()
                await self._pump_upstream()
        finally:
            self.deadlines.stop()
            await self.upstream.close()
            await self.client.close()

    async def _pump_client(self) -> None:
        session = self.session
        while True:
            while not session.wants_client_bytes:
                room = self._room = trio.Event()
                await room.wait()
            if session.tls_pending:
                await self._tls_done.wait()
            if self.tls_context is None:
                # No STARTTLS can take the stream over: no cancel scope.
                data = await self.client.receive()
            else:
                with trio.CancelScope() as scope:
                    self._recv_scope = scope
                    data = await self.client.receive()
                self._recv_scope = None
                if scope.cancelled_caught:
                    continue  # a TLS switch took over the stream
            self._client_reads += 1
            self.observer.bytes_from_client += len(data)
            if not data:
                session.client_eof()
                await self._settle()
                return
            session.receive_client(data)
            await self._settle()

    async def _pump_upstream(self) -> None:
        session = self.session
        upstream = self.upstream
        while True:
            data = await upstream.receive()
            if not data:
                session.upstream_eof()
                await self._settle()
                return
            session.receive_upstream(data)
            room = self._room
            if room is not None:
                self._room = None
                room.set()
            await self._settle()

    # Every path that changes the session ends here: one place writes,
    # re-arms the deadline and closes.  Bytes are taken inside the writer's
    # turn so two pumps settling at once cannot reorder them; a free turn
    # is taken without a checkpoint (the common case: this is the hot path,
    # run twice per command).  A writer sends everything the session has
    # for its stream, including what came while it was sending.
    async def _settle(self) -> None:
        session = self.session
        observer = self.observer
        switching = session.tls_pending and not self._tls_done.is_set()
        if switching and self._recv_scope is not None:
            # The client pump must not read the handshake as plaintext.
            self._recv_scope.cancel()
        # Bytes first, bookkeeping after: the peer starts on a command (or
        # the client on a reply) while the metrics and logs are done.  Only
        # the forwarding times are taken now (a reply could come while a
        # send waits, and must find its command's time).
        events = session.take_events()
        taken_at = observer.stamp(events) if events else -1.0
        # The two writers are inline: a coroutine each would cost the hot
        # path two more per command.
        try:
            if session.has_upstream_bytes:
                turn = self._upstream_turn
                if turn.busy:
                    await turn.wait()
                turn.busy = True
                try:
                    while session.has_upstream_bytes:
                        data = session.take_upstream_bytes()
                        try:
                            await self.upstream.send(data)
                        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                            session.upstream_eof()
                        observer.metrics.relayed_bytes("client_to_upstream", len(data))
                finally:
                    turn.release()
            if session.has_client_bytes:
                deadlines = self.deadlines
                turn = self._client_turn
                if turn.busy:
                    await turn.wait()
                turn.busy = True
                try:
                    while session.has_client_bytes:
                        data = session.take_client_bytes()
                        # The send's deadline is kept by the shared timer (no
                        # cancel scope per send).
                        deadlines.sending()
                        try:
                            await self.client.send(data)
                        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                            session.abort("client_closed")
                        finally:
                            deadlines.sent()
                        observer.bytes_to_client += len(data)
                        observer.metrics.relayed_bytes("upstream_to_client", len(data))
                finally:
                    turn.release()
        finally:
            if events:
                observer.observe(events, taken_at)
            self._observe_pending()
        if session.closed:
            await self._close()
            return
        if switching:
            await self._start_tls()
            if session.closed:
                await self._close()
                return
        self.deadlines.rearm(self._client_reads)

    @property
    def _tls_done(self) -> trio.Event:
        """Set once the STARTTLS handshake is over (made on first use)."""
        event = self._tls_done_event
        if event is None:
            event = self._tls_done_event = trio.Event()
        return event

    async def shutdown(self) -> None:
        """The service is stopping and the grace period is over: 421 and close."""
        self.session.shutdown()
        await self._settle()

    async def _start_tls(self) -> None:
        """STARTTLS was answered with 220: wrap the client stream (RFC 3207)."""
        assert self.tls_context is not None
        failure: HandshakeFailed | None = None
        with trio.move_on_after(self.deadlines.send_seconds) as scope:
            await _acquire(self._client_turn)
            try:
                stream = await start_server_tls(self.client.stream, self.tls_context)
                self.client = wire(stream)
            except HandshakeFailed as exc:
                failure = exc
            finally:
                self._client_turn.release()
        if scope.cancelled_caught:
            failure = handshake_failure(trio.TooSlowError())
        if failure is not None:
            # After "220 Ready to start TLS" only TLS may go on the wire: the
            # session closes without a reply (the core writes none now).
            self.observer.tls_failed(failure)
            self.session.abort("tls_failed")
        if not self.session.closed:
            self.session.tls_started()
            self.observer.tls_started(tls_summary(self.client.stream))
        self._tls_done.set()

    async def _close(self) -> None:
        """The session is over: the last replies reach the client, then both sides close.

        The other pump may be waiting for the client's turn with the final
        reply (a 221, a 421) still in the session: take the turn and send
        whatever is left before cancelling anything.
        """
        with trio.CancelScope(shield=True), trio.move_on_after(10):
            await _acquire(self._client_turn)
            try:
                data = self.session.take_client_bytes()
                if data:
                    self.observer.bytes_to_client += len(data)
                    with contextlib.suppress(
                        trio.BrokenResourceError, trio.ClosedResourceError, OSError
                    ):
                        await self.client.send(data)
            finally:
                self._client_turn.release()
        self._end()

    def _observe_pending(self) -> None:
        events = self.session.take_events()
        if events:
            self.observer.observe(events)

    def _end(self) -> None:
        """Stop both pumps (and every deadline): the connection is over."""
        self.deadlines.stop()
        self._nursery.cancel_scope.cancel()

    # The deadlines' Watcher (see deadlines.py).
    def send_expired(self) -> None:
        """The client has not taken a reply in time."""
        self.session.abort("client_timeout")
        self._observe_pending()
        self._end()

    def deadline_passed(self, kind: Kind, sending: bool) -> None:
        if kind is Kind.UPSTREAM_REPLY:
            self.session.upstream_timeout()
        else:
            self.session.client_timeout()
        if not sending:
            # Else the reply's sender sends the 421 after it and closes.
            with contextlib.suppress(RuntimeError):  # the nursery is closing
                self._nursery.start_soon(self._expire)

    async def _expire(self) -> None:
        """A deadline passed with no reply being sent: send the 421, then close."""
        with trio.move_on_after(self.deadlines.send_seconds):
            await self._settle()
        self._end()


@dataclasses.dataclass(slots=True)
class _Visit:
    """One client's way through :meth:`Proxy.handle`, as its end sees it."""

    conn_id: int
    peer: str
    host: str
    session: Session
    client: Wire
    #: The STARTTLS context when the client came (a reload may change it).
    tls_context: ssl.SSLContext | None
    opened: float
    permit: Permit | None = None
    upstream: Address | None = None
    #: Set once the session is relayed.
    observer: ConnectionObserver | None = None


class Proxy:
    """Accepts clients and relays each to its own upstream connection."""

    def __init__(
        self,
        config: Config,
        metrics: Metrics,
        upstream: Address | None = None,
        connect: Connect | None = None,
        listen_fds: Sequence[int] = (),
    ) -> None:
        self.config = config
        #: In a worker: the listening sockets the supervisor made, one per
        #: configured listener in order (inherited descriptors).
        self.listen_fds = tuple(listen_fds)
        self.metrics = metrics
        self._upstreams = Upstreams(config, metrics, upstream, connect)
        self._tls_context = server_context(config.tls) if config.tls else None
        self._clients = ClientAdmission(config, metrics)
        self._limiter = self._new_limiter(config)
        self._active: set[Connection] = set()
        self._idle = trio.Event()  # set (and renewed) whenever a session ends
        self._timer = Timer()  # the connections' deadlines
        self._accepting = trio.CancelScope()
        self._handlers: trio.Nursery

    def _new_limiter(self, config: Config) -> UpstreamLimiter:
        return UpstreamLimiter(
            config.upstream_max_sessions,
            config.workers,
            config.upstream_queue_seconds,
            self.metrics,
            self._clients.store,
        )

    def reload(self, config: Config) -> None:
        """Use ``config`` for new sessions; sessions in flight keep theirs."""
        self._clients.reload(config)
        self.config = config
        self._tls_context = server_context(config.tls) if config.tls else None
        self._upstreams.use(config)
        limiter = self._limiter
        if (limiter.max_sessions, limiter.workers, limiter.queue_seconds) != (
            config.upstream_max_sessions,
            config.workers,
            config.upstream_queue_seconds,
        ):
            # A changed cap applies to new sessions; those in flight keep
            # their slots in the old one.  Unchanged (a certificate renewal),
            # the same slots go on: a reload must not lift the cap.
            self._limiter = self._new_limiter(config)

    async def handle(
        self,
        client: trio.abc.Stream,
        peer: str = "-",
        client_host: str = "-",
        *,
        client_addr: tuple[str, int] | None = None,
        local_addr: tuple[str, int] | None = None,
        implicit_tls: bool = False,
        listener: Listener | None = None,
    ) -> None:
        """Serve one client until its session ends.  Never raises (but Cancelled).

        Admission (clientadmission.py), with deferred connect the client's
        first command, the upstream's connection (upstreams.py), then the
        relay (:class:`Connection`); at the end, the accounting.
        """
        conn_id = next(_ids)
        self.metrics.session_opened()
        config = self.config  # a reload mid-session must not mix two configs
        session = Session(self._options(config, client_host, implicit_tls, listener))
        visit = _Visit(
            conn_id,
            peer,
            client_host,
            session,
            wire(client),
            self._tls_context,
            trio.current_time(),
        )
        if log.isEnabledFor(logging.DEBUG):
            log.debug("connect", extra=fields(conn=conn_id, client=peer))
        self._clients.opened(client_host)
        try:
            if not await self._clients.admit(visit.client, session, client_host, conn_id, peer):
                return
            early_bytes = (0, 0)  # (from, to) the client before the upstream existed
            if config.upstream_connect == "on_command":
                early_bytes = await self._first_command(visit.client, session)
                if session.closed:
                    return
            upstream = await self._open_upstream(visit, config, listener, client_addr, local_addr)
            if upstream is not None:
                await self._relay(visit, config, upstream, early_bytes)
        except Exception:
            log.exception("internal error", extra=fields(conn=conn_id, client=peer))
        finally:
            await self._leave(visit)

    def _options(
        self, config: Config, host: str, implicit_tls: bool, listener: Listener | None
    ) -> SessionOptions:
        """The session's options: the config's, and this client's own."""
        options = config.session
        deferred = config.upstream_connect == "on_command"
        rated = config.rates.messages_per_minute or config.rates.recipients_per_minute
        if implicit_tls or deferred or rated:
            options = dataclasses.replace(
                options,
                implicit_tls=implicit_tls,
                local_greeting=self._greeting(listener) if deferred else None,
                admit=self._clients.admitter(host) if rated else None,
            )
        return options

    def _greeting(self, listener: Listener | None) -> bytes:
        """smtpguard's own greeting (deferred connect): the configured banner,
        or the upstream's own as last seen, or ``<hostname> ESMTP``."""
        config = self.config
        if config.banner is not None:
            text = config.banner.encode("utf-8", "replace")
        else:
            text = self._upstreams.banner(listener) or f"{config.session.hostname} ESMTP".encode()
        return b"220 " + text + b"\r\n"

    async def _first_command(self, client: Wire, session: Session) -> tuple[int, int]:
        """Deferred connect: greet, and read until the client's first command
        needs the upstream (else the session is closed: QUIT, a non-SMTP
        client, silence, a close).  Returns the bytes read from and written
        to the client (for the session's summary line)."""
        session.greet()
        read = written = 0
        with trio.move_on_after(self.config.timeouts.client_command_seconds) as scope:
            try:
                while True:
                    data = session.take_client_bytes()
                    if data:
                        await client.send(data)
                        written += len(data)
                    if session.closed or session.wants_upstream:
                        break
                    chunk = await client.stream.receive_some(READ_BYTES)
                    if not chunk:
                        # Half-closed after its commands (printf ... | nc -N):
                        # they are still answered; with none, the session ends.
                        session.client_eof()
                        if not session.wants_upstream:
                            session.abort("client_closed")
                        break
                    read += len(chunk)
                    session.receive_client(chunk)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                session.abort("client_closed")
        if scope.cancelled_caught:
            session.client_timeout()
        if session.closed:
            await answer_and_close(client, session, self.metrics)
        else:
            self.metrics.observe(session.take_events())
        return read, written

    async def _open_upstream(
        self,
        visit: _Visit,
        config: Config,
        listener: Listener | None,
        client_addr: tuple[str, int] | None,
        local_addr: tuple[str, int] | None,
    ) -> trio.abc.Stream | None:
        """The upstream connection, its slot taken, its setup done and its
        first bytes fed to the session.  None: the client got a 4xx."""
        session = visit.session
        try:
            stream, visit.upstream, visit.permit = await self._upstreams.connect(
                listener, self._limiter
            )
        except UpstreamBusy:
            log.warning(
                "upstream busy",
                extra=fields(
                    conn=visit.conn_id,
                    client=visit.peer,
                    queue_seconds=self._limiter.queue_seconds,
                ),
            )
            session.upstream_busy()
            await answer_and_close(visit.client, session, self.metrics)
            return None
        except (OSError, trio.TooSlowError) as exc:
            failure = connect_failure_reason(exc)
            self.metrics.connect_failed(failure)
            log.warning(
                "upstream unreachable",
                extra=fields(
                    conn=visit.conn_id,
                    client=visit.peer,
                    upstream=",".join(str(a) for a in self._upstreams.for_listener(listener)),
                    reason=failure,
                ),
            )
            session.upstream_refused()
            # The client may be gone already: send_last swallows that.
            await answer_and_close(visit.client, session, self.metrics)
            return None
        try:
            with trio.fail_after(config.timeouts.greeting_seconds):
                stream, early = await self._upstreams.prepare(
                    stream, visit.upstream, config, client_addr, local_addr, visit.conn_id
                )
        except (
            UpstreamProtocolError,
            trio.TooSlowError,
            trio.BrokenResourceError,
            ssl.SSLError,
            OSError,
        ) as e:
            if config.upstream_tls != "none":
                self.metrics.upstream_tls.labels("failed").inc()
            log.error(
                "upstream setup failed",
                extra=fields(conn=visit.conn_id, client=visit.peer, error=str(e)[:200]),
            )
            await trio.aclose_forcefully(stream)
            session.upstream_refused()
            await answer_and_close(visit.client, session, self.metrics)
            return None
        if early:
            session.receive_upstream(early)
        return stream

    async def _relay(
        self, visit: _Visit, config: Config, upstream: trio.abc.Stream, early_bytes: tuple[int, int]
    ) -> None:
        """The session's relay, until it ends."""
        observer = visit.observer = ConnectionObserver(
            self.metrics, visit.conn_id, visit.peer, tls_summary(visit.client.stream)
        )
        observer.bytes_from_client, observer.bytes_to_client = early_bytes
        conn = Connection(
            visit.client,
            wire(upstream),
            visit.session,
            config.timeouts,
            observer,
            visit.tls_context,
            self._timer,
        )
        self._active.add(conn)
        try:
            await conn.run()
        finally:
            self._active.discard(conn)
            self._idle.set()
            self._idle = trio.Event()

    async def _leave(self, visit: _Visit) -> None:
        """The end of every visit: slots and counts given back, the penalty
        box fed, the client closed, the summary line written."""
        session = visit.session
        if visit.permit is not None:
            visit.permit.release()
        self._clients.release(visit.conn_id)
        if session.violations:
            await self._clients.count_violations(visit.host, session, visit.conn_id, visit.peer)
        if session.upstream_banner is not None and visit.upstream is not None:
            self._upstreams.remember_banner(visit.upstream, session.upstream_banner)
        self._clients.closed(visit.host)
        reason = session.close_reason or "internal_error"
        self.metrics.session_closed(reason)
        await visit.client.close()
        if log.isEnabledFor(logging.INFO):
            try:
                log_disconnect(visit.observer, visit.conn_id, visit.peer, reason, visit.opened)
            except Exception:
                # A handler's own failure must never end the server.
                log.exception("internal error", extra=fields(conn=visit.conn_id, client=visit.peer))

    async def serve(
        self,
        *,
        task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen on every configured address and serve until :meth:`stop` is done.

        Sessions run in their own nursery, apart from the accept loops, so
        that stopping to accept leaves the sessions in flight alone (as
        hypercorn does).  Each listener is served by ``trio.serve_listeners``
        on its own: the handler must know which listener's settings apply.
        trio's loop sleeps on EMFILE, ENFILE, ENOMEM and ENOBUFS; other accept
        errors (a listener closed under it) end the service, as they should.
        """
        listeners = await open_listeners(self.config, self.listen_fds)
        async with trio.open_nursery() as background:
            store = self._clients.store
            if store is not None:
                await background.start(store.run)
            async with trio.open_nursery() as handlers:
                self._handlers = handlers
                with trio.CancelScope() as self._accepting:
                    async with trio.open_nursery() as accept:
                        task_status.started([sock for sock, _ in listeners])
                        for sock, spec in listeners:
                            accept.start_soon(
                                functools.partial(
                                    trio.serve_listeners,
                                    functools.partial(self._accepted, spec),
                                    [sock],
                                    handler_nursery=handlers,
                                )
                            )
                # stop() cancelled the accept loops (and closed the listeners);
                # the sessions in flight finish in the handlers nursery.
            background.cancel_scope.cancel()

    async def _accepted(self, spec: Listener, stream: trio.SocketStream) -> None:
        """An accepted connection: its listener's steps (accept.py), then its session."""
        arrival = await arrive(
            stream, spec, self._tls_context, self.metrics, self.config.timeouts.connect_seconds
        )
        if arrival is None:
            return
        await self.handle(
            arrival.stream,
            arrival.peer,
            arrival.host,
            client_addr=arrival.client_addr,
            local_addr=arrival.local_addr,
            implicit_tls=spec.tls == "implicit",
            listener=spec,
        )

    async def stop(self, grace_seconds: float) -> None:
        """Graceful shutdown: stop accepting, let sessions finish within the
        grace period, then answer ``421 4.3.2`` to those left and close them."""
        self._accepting.cancel()
        with trio.move_on_after(grace_seconds):
            while self._active:
                await self._idle.wait()
        left = list(self._active)
        if left:
            log.info("shutdown: closing sessions", extra=fields(sessions=len(left)))
        for conn in left:
            self._handlers.start_soon(conn.shutdown)
        with trio.move_on_after(10):
            while self._active:
                await self._idle.wait()
        self._handlers.cancel_scope.cancel()
