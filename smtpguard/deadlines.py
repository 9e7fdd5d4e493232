"""Deadlines: the one deadline in force on a connection, and one timer for all.

RFC 5321 4.5.3.2 gives each wait its own timeout.  At any moment one of
them applies to a connection (:class:`Kind`): while the client sends a
message body, the client's data timeout, per read; else, while the
upstream owes a reply, the timeout for that reply's step; else the
client's per-command timeout (partial bytes do not extend it, so a client
trickling a byte a minute is still cut off).  Besides it, a reply being
sent to the client must be taken within the per-command timeout.

:class:`Deadlines` keeps those two for one connection and says which
passed; the connection acts on it (:class:`Watcher`).  :class:`Timer` wakes
every connection's :class:`Deadlines` from one task: a wake-up costs a heap
entry instead of a task, its coroutines and a cancel scope.

Moving a deadline is the hot path (twice per command): :meth:`Deadlines.rearm`
returns at once when the same wait goes on, and a deadline that moves
later costs no timer update: the wake-up lags behind, and when it comes
early the timer sets the next one.
"""

from __future__ import annotations

import enum
import heapq
import itertools
import logging
from collections.abc import Callable
from typing import Protocol

import trio

from .config import Timeouts
from .protocol.rules import Verb

log = logging.getLogger("smtpguard")

_INF = float("inf")


class Kind(enum.Enum):
    """What the deadline in force is for."""

    #: The upstream owes a reply (the greeting's, DATA's, the body's or a command's timeout).
    UPSTREAM_REPLY = "upstream_reply"
    #: The client sends a message body (the data timeout, per read).
    CLIENT_BODY = "client_body"
    #: The client's next command (the per-command timeout).
    CLIENT_COMMAND = "client_command"


def reply_timeout(timeouts: Timeouts, step: Verb | None) -> float:
    """How long the upstream may take to answer ``step``."""
    if step is Verb.GREETING:
        return timeouts.greeting_seconds
    if step is Verb.DATA:
        return timeouts.data_init_seconds
    if step in (Verb.DATA_END, Verb.BDAT, Verb.BDAT_LAST):
        return timeouts.data_end_seconds
    return timeouts.command_reply_seconds


class SessionView(Protocol):
    """What the deadlines read of a session (:class:`~smtpguard.protocol.Session`)."""

    @property
    def in_body(self) -> bool: ...
    @property
    def awaiting_upstream(self) -> bool: ...
    @property
    def upstream_replies(self) -> int: ...
    @property
    def commands_seen(self) -> int: ...
    @property
    def head_step(self) -> Verb | None: ...
    @property
    def closed(self) -> bool: ...


class Watcher(Protocol):
    """The connection: acts when a deadline passes."""

    def send_expired(self) -> None:
        """The client did not take a reply in time (deadlines stopped next)."""

    def deadline_passed(self, kind: Kind, sending: bool) -> None:
        """The deadline for ``kind`` passed; ``sending``: a reply is being sent
        to the client (its deadline is still kept, else none is)."""


class Deadlines:
    """One connection's deadline in force, and its send's deadline."""

    __slots__ = (
        "_session",
        "_timeouts",
        "_watcher",
        "_timer",
        "_clock",
        "at",
        "kind",
        "_progress",
        "_wake_at",
        "_entry",
        "_watching",
        "send_seconds",
        "send_since",
    )

    def __init__(
        self,
        session: SessionView,
        timeouts: Timeouts,
        watcher: Watcher,
        timer: Timer,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        self._session = session
        self._timeouts = timeouts
        self._watcher = watcher
        self._timer = timer
        self._clock = clock
        #: The deadline in force, what it is for, and the progress counters it
        #: was set at (the same wait going on keeps it).
        self.at = clock() + timeouts.greeting_seconds
        self.kind = Kind.UPSTREAM_REPLY
        self._progress = (0, 0)
        # When the timer wakes us: never after ``at`` nor after the send's
        # deadline (it may be earlier: see the module's docstring).
        self._wake_at = self.at
        self._entry: list[object] | None = None
        self._watching = False
        #: How long the client has to take a reply.
        self.send_seconds = timeouts.client_command_seconds
        #: When the reply being sent to the client started going (None: none is).
        self.send_since: float | None = None

    def start(self) -> None:
        """Have the timer keep the deadlines."""
        self._watching = True
        self._entry = self._timer.schedule(self._wake_at, self)

    def stop(self) -> None:
        """No deadline any more: the connection is over."""
        self._watching = False
        entry = self._entry
        if entry is not None:
            self._entry = None
            self._timer.cancel(entry)

    def rearm(self, client_reads: int) -> None:
        """Set the deadline that applies now (see the module's docstring);
        ``client_reads``: how many reads the client pump has made."""
        s = self._session
        if s.in_body:
            progress = (client_reads, 0)
            if self.kind is Kind.CLIENT_BODY and progress == self._progress:
                return
            kind, timeout = Kind.CLIENT_BODY, self._timeouts.client_data_seconds
        elif s.awaiting_upstream:
            progress = (s.upstream_replies, 0)
            if self.kind is Kind.UPSTREAM_REPLY and progress == self._progress:
                return  # same reply still owed: keep its deadline
            kind, timeout = Kind.UPSTREAM_REPLY, reply_timeout(self._timeouts, s.head_step)
        else:
            progress = (s.commands_seen, s.upstream_replies)
            if self.kind is Kind.CLIENT_COMMAND and progress == self._progress:
                return
            kind, timeout = Kind.CLIENT_COMMAND, self._timeouts.client_command_seconds
        self.kind, self._progress = kind, progress
        deadline = self.at = self._clock() + timeout
        if deadline < self._wake_at:
            self._wake(deadline)

    def sending(self) -> None:
        """A reply starts going to the client: it must be taken in time."""
        since = self.send_since = self._clock()
        if since + self.send_seconds < self._wake_at:
            self._wake(since + self.send_seconds)

    def sent(self) -> None:
        """The reply went (or the client is gone)."""
        self.send_since = None

    def _wake(self, when: float) -> None:
        """Have the timer wake us at ``when`` (earlier than it would)."""
        self._wake_at = when
        if self._watching:
            entry = self._entry
            if entry is not None:
                self._timer.cancel(entry)
            self._entry = self._timer.schedule(when, self)

    def fired(self, now: float) -> None:
        """The timer woke us: tell the watcher what passed, wake again when due."""
        self._entry = None
        if not self._watching:
            return
        session = self._session
        since = self.send_since
        if since is not None and now >= since + self.send_seconds:
            self._watcher.send_expired()
            return
        if now >= self.at and not session.closed:
            if since is None:
                self._watching = False
            self._watcher.deadline_passed(self.kind, since is not None)
            if since is None:
                return
            # A reply is being sent: its sender sends the 421 after it and
            # closes, unless the send's own deadline comes first.
        wake = _INF if session.closed else self.at
        if since is not None:
            wake = min(wake, since + self.send_seconds)
        self._wake_at = wake
        if wake < _INF:
            self._entry = self._timer.schedule(wake, self)


class Timer:
    """Wakes every connection's :class:`Deadlines` from one task.

    Each has at most one live entry, ``[when, seq, deadlines]``; moving a
    wake-up pushes a new entry and clears the old one's target (it is
    dropped when it reaches the top, or when dead entries are the majority).
    The task runs only while there are entries; it is a system task, so that
    it serves ``Proxy.handle`` with or without ``Proxy.serve``.
    """

    def __init__(self) -> None:
        self._heap: list[list[object]] = []
        self._seq = itertools.count()
        self._dead = 0
        self._running = False
        self._scope: trio.CancelScope | None = None

    def schedule(self, when: float, target: Deadlines) -> list[object]:
        """Call ``target.fired(now)`` at ``when``; returns the entry to cancel."""
        entry: list[object] = [when, next(self._seq), target]
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
                    target = heapq.heappop(heap)[2]
                    if target is None:
                        self._dead -= 1
                        continue
                    try:
                        target.fired(now)  # type: ignore[attr-defined]
                    except Exception:
                        log.exception("internal error in a timer")
        finally:
            # Also when the run ends under us: start afresh in the next one.
            heap.clear()
            self._dead = 0
            self._scope = None
            self._running = False
