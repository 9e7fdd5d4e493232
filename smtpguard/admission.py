"""Upstream admission: at most ``max_sessions`` sessions per upstream address,
the others waiting in line (FIFO) for a slot, for a bounded time.

A fragile upstream has few slots (Postfix's default is 100 smtpd processes):
the cap keeps smtpguard's sessions below it, so a flood of clients queues
here instead of taking the upstream offline.  With ``workers: N`` each worker
holds ``max_sessions // N`` of the slots (at least one): exact with
``workers: 1``.

With a shared store (store.py) the cap is the fleet's: every worker of every
instance takes its slots from one sorted set in Redis.  This process's
clients still wait in a FIFO line of their own; its head asks Redis again
when a slot of this process comes free, and every ``SLOT_POLL_SECONDS``
otherwise (a slot freed by another process).  While the store is down, the
per-process split above applies.
"""

from __future__ import annotations

import math

import trio

from .config import Address
from .metrics import Metrics
from .store import SLOT_POLL_SECONDS, RedisStore


class UpstreamBusy(Exception):
    """No upstream slot came free within the queue time."""


class Permit:
    """One upstream slot, held for a session's life; :meth:`release` gives it back."""

    __slots__ = ("_limiter", "_address", "_member")

    def __init__(
        self, limiter: UpstreamLimiter | None, address: Address, member: str | None = None
    ) -> None:
        self._limiter = limiter
        self._address = address
        #: The slot's member in the shared store (None: a slot of this process).
        self._member = member

    def release(self) -> None:
        if self._limiter is not None:
            self._limiter._release(self._address, self._member)
            self._limiter = None


class UpstreamLimiter:
    """The slots of every upstream address, for the sessions of one config."""

    def __init__(
        self,
        max_sessions: int,
        workers: int,
        queue_seconds: float,
        metrics: Metrics,
        store: RedisStore | None = None,
    ):
        self.max_sessions = max_sessions
        self.store = store
        self.workers = workers
        #: Slots per address in this process (0: no cap).
        self.per_process = max(1, max_sessions // max(1, workers)) if max_sessions else 0
        self.queue_seconds = queue_seconds
        self._metrics = metrics
        self._slots: dict[Address, trio.Semaphore] = {}
        #: The shared path: one line per address, and a wake-up for its head.
        self._lines: dict[Address, trio.Lock] = {}
        self._freed: dict[Address, trio.Event] = {}

    async def acquire(self, address: Address, deadline: float = math.inf) -> Permit:
        """A slot for ``address``, waiting in line until ``deadline`` (trio
        time; default: the queue time from now).  Raises :class:`UpstreamBusy`."""
        if not self.per_process:
            return Permit(None, address)
        if deadline == math.inf:
            deadline = trio.current_time() + self.queue_seconds
        if self.store is not None and self.store.up:
            permit = await self._acquire_shared(self.store, address, deadline)
            if permit is not None:
                return permit
        slots = self._slots.get(address)
        if slots is None:
            slots = self._slots[address] = trio.Semaphore(self.per_process)
            self._metrics.upstream_cap(self.per_process)
        try:
            slots.acquire_nowait()
        except trio.WouldBlock:
            started = trio.current_time()
            self._metrics.upstream_queue(+1)
            try:
                with trio.move_on_at(deadline):
                    await slots.acquire()  # trio's Semaphore wakes its waiters in order
                    self._metrics.upstream_waited(trio.current_time() - started)
                    self._metrics.upstream_sessions(+1)
                    return Permit(self, address)
            finally:
                self._metrics.upstream_queue(-1)
            self._metrics.upstream_busy()
            raise UpstreamBusy(str(address)) from None
        self._metrics.upstream_waited(0.0)
        self._metrics.upstream_sessions(+1)
        return Permit(self, address)

    async def _acquire_shared(
        self, store: RedisStore, address: Address, deadline: float
    ) -> Permit | None:
        """A fleet-wide slot, waiting in this process's line until
        ``deadline``.  None: the store is down (take a slot of this process)."""
        line = self._lines.get(address)
        if line is None:
            line = self._lines[address] = trio.Lock()  # trio's Lock is fair: FIFO
            self._metrics.upstream_cap(self.per_process)  # summed: the instance's
        started = trio.current_time()
        waiting = line.locked()
        if waiting:
            self._metrics.upstream_queue(+1)
        try:
            with trio.move_on_at(deadline):
                async with line:
                    while True:
                        member = await store.take_slot(str(address), self.max_sessions)
                        if member is None:
                            return None
                        if isinstance(member, str):
                            self._metrics.upstream_waited(trio.current_time() - started)
                            self._metrics.upstream_sessions(+1)
                            return Permit(self, address, member)
                        if not waiting:
                            waiting = True
                            self._metrics.upstream_queue(+1)
                        freed = self._freed.setdefault(address, trio.Event())
                        with trio.move_on_after(SLOT_POLL_SECONDS):
                            await freed.wait()
                            # ask again once the release has reached the store
                            await store.next_sync().wait()
        finally:
            if waiting:
                self._metrics.upstream_queue(-1)
        self._metrics.upstream_busy()
        raise UpstreamBusy(str(address))

    def _release(self, address: Address, member: str | None) -> None:
        if member is None:
            self._slots[address].release()
        else:
            assert self.store is not None
            self.store.give_slot(str(address), member)
            freed = self._freed.pop(address, None)
            if freed is not None:
                freed.set()
        self._metrics.upstream_sessions(-1)
