"""The trio layer: accept clients, connect upstream, pump bytes through the core.

Thin by design: every SMTP decision is the core's (:mod:`smtpguard.protocol`).
This module reads, feeds, writes what the core says, keeps the deadlines and
closes cleanly.  Each connection handler catches its own errors: a broken
client never takes the server down, and never sees a traceback.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import errno
import heapq
import ipaddress
import itertools
import logging
import os
import socket
import ssl
from collections.abc import Awaitable, Callable, Sequence

import trio

from .admission import Permit, UpstreamBusy, UpstreamLimiter
from .clientrates import ClientRates, client_key
from .config import Address, Config, Listener, Timeouts, listener_specs, server_context
from .edges import (
    HandshakeFailed,
    PrefixedStream,
    handshake_failure,
    read_proxy_header,
    send_identity,
    start_server_tls,
    tls_summary,
    upstream_context,
    upstream_starttls,
)
from .logs import fields
from .metrics import Metrics
from .protocol.framing import UpstreamProtocolError
from .protocol.policy import (
    CONNECTION_RATE,
    PENALTY_DENIED,
    PENALTY_TRY_LATER,
    TOO_MANY_CONNECTIONS,
    Defence,
)
from .protocol.proxyproto import ProxyHeaderError
from .protocol.replies import Reply
from .protocol.rules import Verb
from .protocol.session import (
    Event,
    Forwarded,
    PolicyAction,
    Session,
    SyntaxFinding,
    UpstreamReplied,
    Violation,
)
from .store import RedisStore, Refusal
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


class _Turn:
    """Whose turn it is to write to one stream: one writer at a time, in order.

    A cheaper trio.Lock for the hot path: taking a free turn is one
    attribute test and store, with no checkpoint, no task lookup and no
    coroutine (``if turn.busy: await turn.take()`` then ``turn.busy = True``).
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


_INF = float("inf")
# What the deadline in force is for (see Connection._rearm).
_UP, _BODY, _CMD = 0, 1, 2


def _read_now(fd: int) -> bytes | None:
    """What a non-blocking socket has for us: None when nothing yet, b"" at EOF.

    The pumps read plain TCP sockets with this and ``wait_readable`` instead
    of ``SocketStream.receive_some``: the same steps (try, then wait), without
    its layers of coroutines and context managers, which an idle connection
    would keep alive (about 2 KiB per waiting read) and a busy one would run
    on every read.
    """
    try:
        return os.read(fd, READ_BYTES)
    except BlockingIOError:
        return None
    except OSError as exc:
        if exc.errno in (errno.EBADF, errno.ENOTSOCK):
            raise trio.ClosedResourceError("this socket was already closed") from None
        return b""  # what the pumps make of a BrokenResourceError


class _Timer:
    """Wakes connections at their deadlines: one task for all of them.

    Each connection has at most one live entry, ``[when, seq, conn]``; moving
    a wake-up pushes a new entry and clears the old one's ``conn`` (it is
    dropped when it reaches the top, or when dead entries are the majority).
    The task runs only while there are entries; it is a system task, so that
    it serves :meth:`Proxy.handle` with or without :meth:`Proxy.serve`, and a
    connection's wake-up costs a heap entry instead of a task, its coroutines
    and a cancel scope.
    """

    def __init__(self) -> None:
        self._heap: list[list[object]] = []
        self._seq = itertools.count()
        self._dead = 0
        self._running = False
        self._scope: trio.CancelScope | None = None

    def schedule(self, when: float, conn: Connection) -> list[object]:
        entry: list[object] = [when, next(self._seq), conn]
        heapq.heappush(self._heap, entry)
        if not self._running:
            self._running = True
            trio.lowlevel.spawn_system_task(self._run, name="smtpguard-timer")
        elif self._scope is not None and when < self._scope.deadline:
            self._scope.deadline = when
        return entry

    def cancel(self, entry: list[object]) -> None:
        entry[2] = None
        self._dead += 1
        heap = self._heap
        if self._dead > 64 and self._dead * 2 > len(heap):
            heap[:] = [e for e in heap if e[2] is not None]
            heapq.heapify(heap)
            self._dead = 0

    async def _run(self) -> None:
        heap = self._heap
        try:
            while heap:
                with trio.CancelScope(deadline=heap[0][0]) as self._scope:  # type: ignore[arg-type]
                    await trio.sleep_forever()
                self._scope = None
                now = trio.current_time()
                while heap and heap[0][0] <= now:  # type: ignore[operator]
                    conn = heapq.heappop(heap)[2]
                    if conn is None:
                        self._dead -= 1
                        continue
                    try:
                        conn._timer_fired(now)  # type: ignore[attr-defined]
                    except Exception:
                        log.exception("internal error in a timer")
        finally:
            # Also when the run ends under us: start afresh in the next one.
            heap.clear()
            self._dead = 0
            self._scope = None
            self._running = False


class Connection:
    """One client and its upstream connection, driven by a :class:`Session`."""

    # Slots: thousands of idle connections each keep one of these (a dict of
    # this many attributes would cost about 1.5 KiB more per connection).
    __slots__ = (
        "client",
        "tls_context",
        "tls_info",
        "_recv_scope",
        "_tls_done_event",
        "upstream",
        "session",
        "timeouts",
        "metrics",
        "conn_id",
        "peer",
        "_client_lock",
        "_upstream_lock",
        "_room",
        "_deadline",
        "_deadline_kind",
        "_deadline_a",
        "_deadline_b",
        "_wake_at",
        "_timer",
        "_timer_entry",
        "_watching",
        "_send_timeout",
        "_client_send_since",
        "_client_reads",
        "_sent_at",
        "_opened_at",
        "summary",
        "bytes_from_client",
        "bytes_to_client",
        "_nursery",
    )

    def __init__(
        self,
        client: trio.abc.Stream,
        upstream: trio.abc.Stream,
        session: Session,
        timeouts: Timeouts,
        metrics: Metrics,
        conn_id: int = 0,
        peer: str = "-",
        tls_context: ssl.SSLContext | None = None,
        timer: _Timer | None = None,
    ) -> None:
        self.client = client
        self.tls_context = tls_context
        #: Negotiated protocol and cipher, read at the handshake (a TLS stream
        #: closed without close_notify no longer reports its version).
        self.tls_info = tls_summary(client)
        self._recv_scope: trio.CancelScope | None = None
        # Made when first needed (an idle connection holds as few objects as
        # it can): set once a STARTTLS handshake is over.
        self._tls_done_event: trio.Event | None = None
        self.upstream = upstream
        self.session = session
        self.timeouts = timeouts
        self.metrics = metrics
        self.conn_id = conn_id
        self.peer = peer
        self._client_lock = _Turn()
        self._upstream_lock = _Turn()
        #: Set when the client pump may read again (made when it waits).
        self._room: trio.Event | None = None
        now = trio.current_time()
        # The deadline in force and what it is for: (kind, progress counters).
        self._deadline = now + timeouts.greeting_seconds
        self._deadline_kind = _UP
        self._deadline_a = 0
        self._deadline_b = 0
        # When the timer wakes us: never after the deadline in force nor after
        # the deadline of a reply being sent to the client.  It lags behind
        # when those move later (most moves), so that moving them costs no
        # timer update; the timer then sets the next wake-up.
        self._wake_at = self._deadline
        self._timer = timer or _Timer()
        self._timer_entry: list[object] | None = None
        self._watching = False  # the timer keeps our deadlines (see _timer_fired)
        self._send_timeout = timeouts.client_command_seconds
        self._client_send_since: float | None = None
        self._client_reads = 0
        # When each forwarded command went (FIFO; a list: short, and smaller
        # than a deque).
        self._sent_at: list[float] = []
        self._opened_at = now
        self.summary = SessionSummary()
        self.bytes_from_client = 0
        self.bytes_to_client = 0
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
                self._watching = True
                self._timer_entry = self._timer.schedule(self._wake_at, self)
                await self._pump_upstream()
        finally:
            self._stop_watching()
            await _close_stream(self.upstream)
            await _close_stream(self.client)

    # Every path that changes the session ends here: one place writes,
    # re-arms the deadline and closes.  Bytes are taken inside the writer's
    # turn so two pumps settling at once cannot reorder them; a free turn
    # is taken without a checkpoint (the common case: this is the hot path,
    # run twice per command).  A writer sends everything the session has
    # for its stream, including what came while it was sending.
    async def _settle(self) -> None:
        session = self.session
        switching = session.tls_pending and not self._tls_done.is_set()
        if switching and self._recv_scope is not None:
            # The client pump must not read the handshake as plaintext.
            self._recv_scope.cancel()
        # Bytes first, bookkeeping after: the peer starts on a command (or
        # the client on a reply) while the metrics and logs are done.  Only
        # the forwarding times are taken now (a reply could come while a
        # send waits, and must find its command's time).
        events = session.take_events()
        taken_at = self._stamp(events) if events else -1.0
        try:
            if session.has_upstream_bytes:
                turn = self._upstream_lock
                if turn.busy:
                    await turn.wait()
                turn.busy = True
                try:
                    while session.has_upstream_bytes:
                        data = session.take_upstream_bytes()
                        try:
                            await _send(self.upstream, data)
                        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                            session.upstream_eof()
                        self.metrics.relayed_bytes("client_to_upstream", len(data))
                finally:
                    turn.release()
            if session.has_client_bytes:
                turn = self._client_lock
                if turn.busy:
                    await turn.wait()
                turn.busy = True
                try:
                    while session.has_client_bytes:
                        data = session.take_client_bytes()
                        # The send's deadline is kept by the shared timer (no
                        # cancel scope per send): make sure it wakes in time.
                        since = self._client_send_since = trio.current_time()
                        if since + self._send_timeout < self._wake_at:
                            self._wake(since + self._send_timeout)
                        try:
                            await _send(self.client, data)
                        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                            session.abort("client_closed")
                        finally:
                            self._client_send_since = None
                        self.bytes_to_client += len(data)
                        self.metrics.relayed_bytes("upstream_to_client", len(data))
                finally:
                    turn.release()
        finally:
            if events:
                self._observe(events, taken_at)
            self._observe_pending()
        if session.closed:
            await self._close()
            return
        if switching:
            await self._start_tls()
            if session.closed:
                await self._close()
                return
        self._rearm()

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
        with trio.move_on_after(self.timeouts.client_command_seconds) as scope:
            await _acquire(self._client_lock)
            try:
                self.client = await start_server_tls(self.client, self.tls_context)
            except HandshakeFailed as exc:
                failure = exc
            finally:
                self._client_lock.release()
        if scope.cancelled_caught:
            failure = handshake_failure(trio.TooSlowError())
        if failure is not None:
            # After "220 Ready to start TLS" only TLS may go on the wire: the
            # session closes without a reply (the core writes none now).
            self.metrics.tls_handshake_failed("starttls", failure.reason)
            log.info(
                "tls handshake failed",
                extra=fields(
                    conn=self.conn_id,
                    client=self.peer,
                    reason=failure.reason,
                    detail=failure.detail,
                ),
            )
            self.session.abort("tls_failed")
        if not self.session.closed:
            self.session.tls_started()
            self.tls_info = tls_summary(self.client)
            self.metrics.tls_session(self.tls_info.get("tls_protocol", "unknown"))
        self._tls_done.set()

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
        self._end()

    def _observe_pending(self) -> None:
        events = self.session.take_events()
        if events:
            self._observe(events)

    def _stamp(self, events: list[Event]) -> float:
        """Note when each forwarded command went (for the reply latency);
        returns the time now if a command went or a reply came, else -1."""
        now = -1.0
        for event in events:
            if type(event) is Forwarded:
                if now < 0:
                    now = trio.current_time()
                self._sent_at.append(now)
            elif type(event) is UpstreamReplied and now < 0:
                now = trio.current_time()
        return now

    def _observe(self, events: list[Event], now: float | None = None) -> None:
        """Metrics, logs and summary for ``events``; ``now``: what :meth:`_stamp`
        returned when they were taken (None: stamp them now)."""
        if now is None:
            now = self._stamp(events)
        for event in events:
            if type(event) is UpstreamReplied:
                if event.step is Verb.GREETING:
                    self.metrics.reply_latency(event.step, now - self._opened_at)
                elif self._sent_at:
                    self.metrics.reply_latency(event.step, now - self._sent_at.pop(0))
            elif type(event) is Violation:
                log.info(
                    "violation",
                    extra=fields(
                        conn=self.conn_id,
                        client=self.peer,
                        state=event.phase.value,
                        command=event.verb.value,
                        expected=event.expected,
                        action=event.action,
                    ),
                )
            elif type(event) is SyntaxFinding:
                # The reason, the length and the octet class: never the argument
                # (addresses are personal data).
                log.info(
                    "syntax",
                    extra=fields(
                        conn=self.conn_id,
                        client=self.peer,
                        command=event.verb.value,
                        reason=event.reason,
                        action="refused" if event.refused else "forwarded",
                        argument_bytes=event.argument_bytes,
                        octet=event.octet or "-",
                    ),
                )
            elif type(event) is PolicyAction and event.defence is not Defence.SEQUENCE:
                # A sequence violation is logged once, as ``event=violation``.
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

        While the client sends a message body (DATA, or a BDAT chunk, whose
        BDAT line the upstream already has) the client's data timeout runs,
        per chunk read; else, while the upstream owes a reply, its
        per-command timeout; else the client's per command (partial bytes do
        not extend it, so a client trickling a byte a minute is still cut off).
        """
        s = self.session
        if s.in_body:
            a, b = self._client_reads, 0
            if self._deadline_kind == _BODY and a == self._deadline_a:
                return
            kind, timeout = _BODY, self.timeouts.client_data_seconds
        elif s.awaiting_upstream:
            a, b = s.upstream_replies, 0
            if self._deadline_kind == _UP and a == self._deadline_a:
                return  # same reply still owed: keep its deadline
            kind, timeout = _UP, _reply_timeout(self.timeouts, s.head_step)
        else:
            a, b = s.commands_seen, s.upstream_replies
            if self._deadline_kind == _CMD and a == self._deadline_a and b == self._deadline_b:
                return
            kind, timeout = _CMD, self.timeouts.client_command_seconds
        self._deadline_kind, self._deadline_a, self._deadline_b = kind, a, b
        deadline = self._deadline = trio.current_time() + timeout
        if deadline < self._wake_at:
            self._wake(deadline)

    def _wake(self, when: float) -> None:
        """Have the timer wake us at ``when`` (earlier than it would)."""
        self._wake_at = when
        if self._watching:
            entry = self._timer_entry
            if entry is not None:
                self._timer.cancel(entry)
            self._timer_entry = self._timer.schedule(when, self)

    def _end(self) -> None:
        """Stop both pumps (and every deadline): the connection is over."""
        self._stop_watching()
        self._nursery.cancel_scope.cancel()

    def _stop_watching(self) -> None:
        self._watching = False
        entry = self._timer_entry
        if entry is not None:
            self._timer_entry = None
            self._timer.cancel(entry)

    def _timer_fired(self, now: float) -> None:
        """The shared timer woke us (at ``_wake_at``): act on what is due."""
        self._timer_entry = None
        if not self._watching:
            return
        session = self.session
        since = self._client_send_since
        if since is not None and now >= since + self._send_timeout:
            # The client has not taken a reply in time.
            session.abort("client_timeout")
            self._observe_pending()
            self._end()
            return
        if now >= self._deadline and not session.closed:
            if self._deadline_kind == _UP:  # whose deadline it was (see _rearm)
                session.upstream_timeout()
            else:
                session.client_timeout()
            if since is None:
                self._watching = False
                with contextlib.suppress(RuntimeError):  # the nursery is closing
                    self._nursery.start_soon(self._expire)
                return
            # A reply is being sent: its sender sends the 421 after it
            # and closes, unless the send's own deadline comes first.
        wake = _INF if session.closed else self._deadline
        if since is not None:
            wake = min(wake, since + self._send_timeout)
        self._wake_at = wake
        if wake < _INF:
            self._timer_entry = self._timer.schedule(wake, self)

    async def _expire(self) -> None:
        """A deadline passed with no reply being sent: send the 421, then close."""
        with trio.move_on_after(self._send_timeout):
            await self._settle()
        self._end()

    async def _pump_client(self) -> None:
        session = self.session
        drained = False
        while True:
            while not session.wants_client_bytes:
                room = self._room = trio.Event()
                await room.wait()
            if session.tls_pending:
                await self._tls_done.wait()
            client = self.client
            if self.tls_context is None and type(client) is trio.SocketStream:
                # No STARTTLS can take the stream over: no cancel scope.
                data: bytes | bytearray = await _read_fd(client.socket.fileno(), drained)
                drained = len(data) < READ_BYTES
            else:
                with trio.CancelScope() as scope:
                    self._recv_scope = scope
                    try:
                        data = await client.receive_some(READ_BYTES)
                    except (trio.BrokenResourceError, OSError):
                        data = b""
                self._recv_scope = None
                if scope.cancelled_caught:
                    continue  # a TLS switch took over the stream
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
        upstream = self.upstream
        fd = upstream.socket.fileno() if type(upstream) is trio.SocketStream else -1
        drained = False
        while True:
            if fd >= 0:
                data: bytes | bytearray = await _read_fd(fd, drained)
                drained = len(data) < READ_BYTES
            else:
                try:
                    data = await upstream.receive_some(READ_BYTES)
                except (trio.BrokenResourceError, OSError):
                    data = b""
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


async def _close_stream(stream: trio.abc.Stream) -> None:
    """``trio.aclose_forcefully``; a plain socket is closed at once (no cancel
    scope, no checkpoint: a connection's last steps, run for every one).

    A TLS stream first gets a ``close_notify`` (RFC 8446 6.1), as Postfix
    sends after its 221: without it clients log a truncation, and a TLS 1.2
    session cannot be resumed.  Its own reply is not awaited."""
    if type(stream) is trio.SocketStream:
        stream.socket.close()
        return
    with trio.CancelScope(shield=True):
        if isinstance(stream, trio.SSLStream):
            with trio.move_on_after(_CLOSE_NOTIFY_SECONDS):
                await stream.aclose()
                return
        await trio.aclose_forcefully(stream)


#: How long a TLS close may take to send its close_notify.
_CLOSE_NOTIFY_SECONDS = 1.0


async def _read_fd(fd: int, drained: bool) -> bytes:
    """``SocketStream.receive_some`` for a plain socket, minus its layers (they
    cost about 3 KiB per waiting connection).

    ``drained``: the last read emptied the socket (it got less than it asked
    for), as it does after each command or reply of a request-response
    exchange: wait for readiness first instead of trying a read that fails
    with EAGAIN.  Otherwise try first; a read that finds data at once yields
    to the other tasks only every :data:`_EAGER_READS` times in a row (trio's
    own read yields every time: a scheduler round per read).
    """
    global _eager
    if not drained:
        await trio.lowlevel.checkpoint_if_cancelled()
        got = _read_now(fd)
        if got is not None:
            if _eager >= _EAGER_READS:
                _eager = 0
                await trio.lowlevel.cancel_shielded_checkpoint()
            else:
                _eager += 1
            return got
    _eager = 0
    while True:
        await trio.lowlevel.wait_readable(fd)
        got = _read_now(fd)
        if got is not None:
            return got


#: Reads in a row (process-wide) that may run on without letting other tasks
#: in.  Measured (one client flooding a DATA body through one process while
#: another sends NOOPs, to a fair upstream): at 16 the NOOPs waited 13 ms
#: (p50) behind the flood; at 1, 1.8 ms, close to trio's own yield after
#: every read (1.1 ms); large-message throughput was the same for all three.
_EAGER_READS = 1
_eager = 0


async def _send(stream: trio.abc.Stream, data: bytes) -> None:
    """``stream.send_all(data)``; on a plain socket, straight to the kernel.

    ``SocketStream.send_all`` yields to the scheduler after every send, even
    when the kernel took everything at once (the usual case for a reply or a
    command): here a send only waits, and yields, when the socket buffer is
    full.  Errors are OSErrors, as the callers expect of a broken stream.
    """
    if type(stream) is not trio.SocketStream:
        await stream.send_all(data)
        return
    fd = stream.socket.fileno()
    view = memoryview(data)
    while True:
        try:
            sent = os.write(fd, view)
        except BlockingIOError:
            sent = 0
        if sent == len(view):
            return
        view = view[sent:]
        await trio.lowlevel.wait_writable(fd)


async def _open_tcp(address: Address) -> trio.SocketStream:
    """Connect to ``address``.  An IP address is connected to directly: trio's
    ``open_tcp_stream`` (happy eyeballs: a nursery and a task per attempt)
    is for names, and costs as much as a short session's SMTP work."""
    try:
        family = (
            socket.AF_INET6 if ipaddress.ip_address(address.host).version == 6 else socket.AF_INET
        )
    except ValueError:
        return await trio.open_tcp_stream(address.host, address.port)
    sock = trio.socket.socket(family, socket.SOCK_STREAM)
    try:
        await sock.connect((address.host, address.port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


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
        listen_fds: Sequence[int] = (),
    ) -> None:
        self.config = config
        #: In a worker: the listening sockets the supervisor made, one per
        #: configured listener in order (inherited descriptors).
        self.listen_fds = tuple(listen_fds)
        self.metrics = metrics
        upstream = upstream or config.upstream
        if upstream is None:
            raise ValueError("no upstream address")
        #: The default upstream (the first global one, or the one given).
        self.upstream = upstream
        self._connect = connect
        self._tls_context = server_context(config.tls) if config.tls else None
        self._upstream_tls_context = upstream_context(
            config.upstream_tls,
            config.upstream_tls_ca_file,
            config.upstream_tls_ciphers,
            config.upstream_tls_groups,
        )
        self._connections: collections.Counter[str] = collections.Counter()
        self._active: set[Connection] = set()
        self._idle = trio.Event()  # set (and renewed) whenever a session ends
        self._timer = _Timer()  # the connections' deadlines
        self._accepting = trio.CancelScope()
        self._handlers: trio.Nursery
        self._total_connections = 0
        self._fixed_upstream = upstream is not config.upstream
        self._use_upstreams(config)
        #: Per-client connection rates and the penalty box (kept across reloads;
        #: with a store, they back it up while it is down).
        self._rates = ClientRates(config.rates)
        #: The shared store (Redis), for the life of the process: a reload
        #: that changes ``store`` needs a restart.
        self._store = (
            RedisStore(config.store, self.metrics, self._own_count)
            if config.store.configured
            else None
        )
        self._limiter = self._new_limiter(config)
        #: Sessions' members in the shared store's per-client sets: conn -> (key, member).
        self._members: dict[int, tuple[str, str]] = {}
        #: The text of each upstream's last 2xx greeting (deferred connect).
        self._banners: dict[Address, bytes] = {}

    def _new_limiter(self, config: Config) -> UpstreamLimiter:
        return UpstreamLimiter(
            config.upstream_max_sessions,
            config.workers,
            config.upstream_queue_seconds,
            self.metrics,
            self._store,
        )

    def _greeting(self, listener: Listener | None) -> bytes:
        """smtpguard's own greeting (deferred connect): the configured banner,
        or the upstream's own as last seen, or ``<hostname> ESMTP``."""
        config = self.config
        if config.banner is not None:
            text = config.banner.encode("utf-8", "replace")
        else:
            first = self._upstreams_for(listener)[0]
            text = self._banners.get(first) or f"{config.session.hostname} ESMTP".encode()
        return b"220 " + text + b"\r\n"

    async def _first_command(self, client: trio.abc.Stream, session: Session) -> tuple[int, int]:
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
                        await client.send_all(data)
                        written += len(data)
                    if session.closed or session.wants_upstream:
                        break
                    chunk = await client.receive_some(READ_BYTES)
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
            await self._answer_and_close(client, session)
        else:
            self.metrics.observe(session.take_events())
        return read, written

    def reload(self, config: Config) -> None:
        """Use ``config`` for new sessions; sessions in flight keep theirs."""
        if config.store != self.config.store:
            log.warning("store unchanged: a new store section needs a restart", extra=fields())
        self.config = config
        self._tls_context = server_context(config.tls) if config.tls else None
        self._upstream_tls_context = upstream_context(
            config.upstream_tls,
            config.upstream_tls_ca_file,
            config.upstream_tls_ciphers,
            config.upstream_tls_groups,
        )
        if not self._fixed_upstream and config.upstream is not None:
            self.upstream = config.upstream
        self._use_upstreams(config)
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
        self._rates.settings = config.rates

    def _use_upstreams(self, config: Config) -> None:
        """The upstream lists of ``config``: the global one (or the fixed
        upstream) and the listeners' own.  ``upstreams`` holds every address
        once, global ones first: an address's index there is its
        ``smtpguard_upstream_up`` label."""
        base = (self.upstream,) if self._fixed_upstream else (config.upstreams or (self.upstream,))
        everything = list(base)
        for spec in listener_specs(config):
            everything += [a for a in spec.upstreams if a not in everything]
        self._base_upstreams = base
        self.upstreams: tuple[Address, ...] = tuple(everything)
        self._upstream_index = {a: i for i, a in enumerate(self.upstreams)}
        self._round_robin: dict[tuple[Address, ...], int] = {}
        # No ``smtpguard_upstream_up`` series until an upstream is tried: a
        # backup never needed is not "down" (and with workers, one that has
        # not tried an upstream must not pull the others' minimum to 0).

    def _upstreams_for(self, listener: Listener | None) -> tuple[Address, ...]:
        own = listener.upstreams if listener is not None else ()
        return own or self._base_upstreams

    async def _connect_upstream(
        self, listener: Listener | None
    ) -> tuple[trio.abc.Stream, Address, Permit]:
        """A connection to this listener's upstreams (or the global ones), and
        its slot (upstream_limits).  Raises :class:`UpstreamBusy`."""
        limiter = self._limiter
        deadline = trio.current_time() + limiter.queue_seconds
        if self._connect is not None:  # tests: a stream from elsewhere
            permit = await limiter.acquire(self.upstream, deadline)
            try:
                return await self._connect(), self.upstream, permit
            except BaseException:
                permit.release()
                raise
        return await self._connect_tcp(self._upstreams_for(listener), deadline)

    async def _connect_tcp(
        self, upstreams: tuple[Address, ...], deadline: float
    ) -> tuple[trio.abc.Stream, Address, Permit]:
        """Connect to the first upstream that answers (failover), in the
        configured order or round robin; each failure is counted.  Each
        address's slot is taken first, waiting in line until ``deadline``."""
        start = 0
        if self.config.upstream_selection == "round_robin":
            turn = self._round_robin.get(upstreams, 0)
            self._round_robin[upstreams] = turn + 1
            start = turn % len(upstreams)
        error: BaseException | None = None
        for k in range(len(upstreams)):
            address = upstreams[(start + k) % len(upstreams)]
            index = self._upstream_index.get(address, 0)
            permit = await self._limiter.acquire(address, deadline)
            try:
                with trio.fail_after(self.config.timeouts.connect_seconds):
                    stream = await _open_tcp(address)
            except (OSError, trio.TooSlowError) as exc:
                permit.release()
                self.metrics.upstream_up.labels(str(index)).set(0)
                if k + 1 < len(upstreams):
                    self.metrics.connect_failed(_connect_failure_reason(exc))
                    log.warning(
                        "upstream failover",
                        extra=fields(upstream=str(address), reason=_connect_failure_reason(exc)),
                    )
                error = exc
                continue
            self.metrics.upstream_up.labels(str(index)).set(1)
            return stream, address, permit
        assert error is not None
        raise error

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
        """Serve one client until its session ends.  Never raises (but Cancelled)."""
        conn_id = next(_ids)
        metrics = self.metrics
        metrics.session_opened()
        config = self.config  # a reload mid-session must not mix two configs
        options = config.session
        deferred = config.upstream_connect == "on_command"
        rated = config.rates.messages_per_minute or config.rates.recipients_per_minute
        if implicit_tls or deferred or rated:
            options = dataclasses.replace(
                options,
                implicit_tls=implicit_tls,
                local_greeting=self._greeting(listener) if deferred else None,
                admit=self._admitter(client_host) if rated else None,
            )
        session = Session(options)
        permit: Permit | None = None
        up_address: Address | None = None
        tls_context = self._tls_context
        conn: Connection | None = None
        opened = trio.current_time()
        if log.isEnabledFor(logging.DEBUG):
            log.debug("connect", extra=fields(conn=conn_id, client=peer))
        self._connections[client_host] += 1
        self._total_connections += 1
        try:
            if not await self._admit(client, session, client_host, conn_id, peer):
                return
            early_bytes = (0, 0)  # (from, to) the client before the upstream existed
            if deferred:
                early_bytes = await self._first_command(client, session)
                if session.closed:
                    return
            try:
                upstream, up_address, permit = await self._connect_upstream(listener)
            except UpstreamBusy:
                log.warning(
                    "upstream busy",
                    extra=fields(
                        conn=conn_id, client=peer, queue_seconds=self._limiter.queue_seconds
                    ),
                )
                session.upstream_busy()
                await self._answer_and_close(client, session)
                return
            except (OSError, trio.TooSlowError) as exc:
                failure = _connect_failure_reason(exc)
                metrics.connect_failed(failure)
                log.warning(
                    "upstream unreachable",
                    extra=fields(
                        conn=conn_id,
                        client=peer,
                        upstream=",".join(str(a) for a in self._upstreams_for(listener)),
                        reason=failure,
                    ),
                )
                session.upstream_refused()
                metrics.observe(session.take_events())
                with trio.move_on_after(10):
                    await client.send_all(session.take_client_bytes())
                return
            try:
                with trio.fail_after(config.timeouts.greeting_seconds):
                    early = await send_identity(
                        upstream, config.upstream_identity, client_addr, local_addr
                    )
                    if config.upstream_tls != "none":
                        upstream, early, up_tls = await upstream_starttls(
                            upstream,
                            config.upstream_tls,
                            self._upstream_tls_context,
                            config.upstream_tls_server_name or up_address.host,
                            config.session.hostname,
                            early,
                        )
                        metrics.upstream_tls.labels(up_tls.result).inc()
                        if up_tls.injected:
                            metrics.policy_actions.labels(
                                Defence.STARTTLS_INJECTION.value, "reject"
                            ).inc()
                            log.warning(
                                "policy",
                                extra=fields(
                                    conn=conn_id,
                                    defence="starttls_injection",
                                    action="reject",
                                    detail="bytes after the upstream's 220 to STARTTLS",
                                ),
                            )
            except (
                UpstreamProtocolError,
                trio.TooSlowError,
                trio.BrokenResourceError,
                ssl.SSLError,
                OSError,
            ) as e:
                if config.upstream_tls != "none":
                    metrics.upstream_tls.labels("failed").inc()
                log.error(
                    "upstream setup failed",
                    extra=fields(conn=conn_id, client=peer, error=str(e)[:200]),
                )
                await trio.aclose_forcefully(upstream)
                session.upstream_refused()
                await self._answer_and_close(client, session)
                return
            if early:
                session.receive_upstream(early)
            conn = Connection(
                client,
                upstream,
                session,
                config.timeouts,
                metrics,
                conn_id,
                peer,
                tls_context,
                self._timer,
            )
            conn.bytes_from_client, conn.bytes_to_client = early_bytes
            self._active.add(conn)
            try:
                await conn.run()
            finally:
                self._active.discard(conn)
                self._idle.set()
                self._idle = trio.Event()
        except Exception:
            log.exception("internal error", extra=fields(conn=conn_id, client=peer))
        finally:
            if permit is not None:
                permit.release()
            held = self._members.pop(conn_id, None)
            if held is not None and self._store is not None:
                self._store.disconnect(*held)
            if session.violations:
                await self._count_violations(client_host, session, conn_id, peer)
            if session.upstream_banner is not None and up_address is not None:
                self._banners[up_address] = session.upstream_banner
            self._connections[client_host] -= 1
            if not self._connections[client_host]:
                del self._connections[client_host]
            self._total_connections -= 1
            reason = session.close_reason or "internal_error"
            metrics.session_closed(reason)
            await _close_stream(client)
            if log.isEnabledFor(logging.INFO):
                try:
                    self._log_summary(conn, conn_id, peer, reason, opened)
                except Exception:
                    # A handler's own failure must never end the server.
                    log.exception("internal error", extra=fields(conn=conn_id, client=peer))

    @staticmethod
    def _log_summary(
        conn: Connection | None, conn_id: int, peer: str, reason: str, opened: float
    ) -> None:
        """The session's one summary line (Postfix style counts, bytes, TLS)."""
        summary: dict[str, object] = {"conn": conn_id, "client": peer, "reason": reason}
        if conn is not None:
            summary.update(conn.tls_info)
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
        refusal = await self._client_refusal(host, conn_id, peer)
        if refusal is not None:
            session.refuse(refusal)
            await self._answer_and_close(client, session)
            return False
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

    async def _client_refusal(self, host: str, conn_id: int, peer: str) -> Reply | None:
        """The penalty box, the connection rate and (with a shared store) the
        client's concurrent sessions: see clientrates.py and store.py."""
        rates = self._rates
        key = client_key(host, rates.settings)
        now = trio.current_time()
        observe = self.config.connections_observe  # policy.mode: observe counts only
        store = self._store
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
            penalty_reply = self._rates.settings.penalty_reply
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

    def _admitter(self, host: str) -> Callable[[str], bool]:
        """The session's question "may this client send one more message
        (recipient)?", answered from this process's per-client rates and,
        with a shared store, the other processes' counts as last read."""
        rates = self._rates
        key = client_key(host, rates.settings)
        observe = self.config.connections_observe  # policy.mode: observe counts only
        store = self._store

        def admit(kind: str) -> bool:
            others = store.others(kind, key) if store is not None else 0
            if rates.allow(kind, key, trio.current_time(), others):
                if store is not None:
                    store.count(kind, key)
                return True
            self.metrics.rate_refusals_commands.labels(kind).inc()
            return observe

        return admit

    async def _count_violations(self, host: str, session: Session, conn_id: int, peer: str) -> None:
        """A session's violations, towards its client's penalty box (the
        fleet's with a shared store: only the process that boxed it logs)."""
        rates = self._rates
        settings = rates.settings
        key = client_key(host, settings)
        now = trio.current_time()
        boxed: bool | None = None
        store = self._store
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
        """Listen on every configured address and serve until :meth:`stop` is done.

        Sessions run in their own nursery, apart from the accept loops, so
        that stopping to accept leaves the sessions in flight alone.
        """
        listeners: list[tuple[trio.SocketListener, Listener]] = []
        specs = listener_specs(self.config)
        if self.listen_fds:
            # A worker: every worker accepts from the same sockets, so the
            # kernel hands each connection to a worker that is waiting for
            # one (a busy worker takes fewer), and a worker that dies loses
            # no queued connection.
            for spec, fd in zip(specs, self.listen_fds, strict=True):
                inherited = trio.socket.from_stdlib_socket(socket.socket(fileno=fd))
                listeners.append((trio.SocketListener(inherited), spec))
        else:
            for spec in specs:
                host, port = spec.address.host, spec.address.port
                for sock in await trio.open_tcp_listeners(port, host=host):
                    listeners.append((sock, spec))
        for sock, spec in listeners:
            log.info(
                "listening",
                extra=fields(
                    address=_sockname(sock), tls=spec.tls, proxy_protocol=spec.proxy_protocol
                ),
            )
        async with trio.open_nursery() as background:
            if self._store is not None:
                await background.start(self._store.run)
            async with trio.open_nursery() as handlers:
                self._handlers = handlers
                with trio.CancelScope() as self._accepting:
                    async with trio.open_nursery() as accept:
                        task_status.started([sock for sock, _ in listeners])
                        for sock, spec in listeners:
                            accept.start_soon(self._accept_loop, sock, spec)
                # stop() cancelled the accept loops (and closed the listeners);
                # the sessions in flight finish in the handlers nursery.
            background.cancel_scope.cancel()

    def _own_count(self, kind: str, key: str) -> int:
        return self._rates.count(kind, key, trio.current_time())

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

    async def _accept_loop(self, listener: trio.SocketListener, spec: Listener) -> None:
        async with listener:
            while True:
                try:
                    stream = await listener.accept()
                except OSError as exc:
                    # EMFILE and friends: back off instead of spinning (as trio does).
                    log.error("accept failed", extra=fields(error=str(exc)))
                    await trio.sleep(0.1)
                    continue
                self._handlers.start_soon(self._handle_stream, stream, spec)

    async def _handle_stream(self, stream: trio.SocketStream, spec: Listener) -> None:
        """The accept path: PROXY header, implicit TLS, then the SMTP session."""
        try:
            sock_peer = stream.socket.getpeername()
            local = stream.socket.getsockname()
            client_addr: tuple[str, int] | None = (sock_peer[0], sock_peer[1])
            local_addr: tuple[str, int] | None = (local[0], local[1])
        except OSError:
            client_addr = local_addr = None
        client: trio.abc.Stream = stream
        awaiting_header = spec.proxy_protocol
        if not spec.proxy_protocol and spec.tls != "implicit":
            await self.handle(
                client,
                _show(client_addr),
                client_addr[0] if client_addr else "-",
                client_addr=client_addr,
                local_addr=local_addr,
                listener=spec,
            )
            return
        try:
            with trio.fail_after(self.config.timeouts.connect_seconds):
                if spec.proxy_protocol:
                    client, client_addr, local_addr = await self._proxy_header(
                        stream, spec, client_addr, local_addr
                    )
                    awaiting_header = False
                if spec.tls == "implicit":
                    if self._tls_context is None:
                        raise ssl.SSLError("no TLS certificate configured")
                    client = await start_server_tls(client, self._tls_context)
                    self.metrics.tls_session(tls_summary(client).get("tls_protocol", "unknown"))
        except (
            ProxyHeaderError,
            HandshakeFailed,
            trio.TooSlowError,
            trio.BrokenResourceError,
            OSError,
        ) as exc:
            if spec.tls == "implicit" and not awaiting_header:
                failure = handshake_failure(exc)
                self.metrics.tls_handshake_failed("implicit", failure.reason)
                log.info(
                    "tls handshake failed",
                    extra=fields(
                        client=_show(client_addr), reason=failure.reason, detail=failure.detail
                    ),
                )
                await trio.aclose_forcefully(client)
                return
            if awaiting_header and not isinstance(exc, ProxyHeaderError):
                # No header in time (a plain client waiting for a greeting).
                self.metrics.policy_actions.labels(Defence.PROXY_PROTOCOL.value, "reject").inc()
            log.warning(
                "refused at accept",
                extra=fields(
                    client=_show(client_addr), reason=str(exc)[:200] or type(exc).__name__
                ),
            )
            await trio.aclose_forcefully(client)
            return
        await self.handle(
            client,
            _show(client_addr),
            client_addr[0] if client_addr else "-",
            client_addr=client_addr,
            local_addr=local_addr,
            implicit_tls=spec.tls == "implicit",
            listener=spec,
        )

    async def _proxy_header(
        self,
        stream: trio.SocketStream,
        spec: Listener,
        client_addr: tuple[str, int] | None,
        local_addr: tuple[str, int] | None,
    ) -> tuple[trio.abc.Stream, tuple[str, int] | None, tuple[str, int] | None]:
        """A PROXY header from a trusted balancer gives the real client address."""
        trusted = client_addr is not None and any(
            ipaddress.ip_address(client_addr[0]) in net for net in spec.trusted
        )
        try:
            if not trusted:
                raise ProxyHeaderError("PROXY header expected from an untrusted address")
            info, rest = await read_proxy_header(stream)
        except ProxyHeaderError:
            self.metrics.policy_actions.labels(Defence.PROXY_PROTOCOL.value, "reject").inc()
            raise
        wrapped: trio.abc.Stream = PrefixedStream(stream, rest) if rest else stream
        if info.source_host is None or info.source_port is None:
            return wrapped, client_addr, local_addr  # LOCAL: the balancer's own check
        dest = local_addr
        if info.dest_host is not None and info.dest_port is not None:
            dest = (info.dest_host, info.dest_port)
        return wrapped, (info.source_host, info.source_port), dest


def _show(addr: tuple[str, int] | None) -> str:
    if addr is None:
        return "-"
    host, port = addr
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _sockname(listener: trio.SocketListener) -> str:
    host, port = listener.socket.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
