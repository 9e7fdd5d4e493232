"""Upstream admission: at most ``max_sessions`` sessions per upstream address,
the others waiting in line (FIFO) for a slot, for a bounded time.

A fragile upstream has few slots (Postfix's default is 100 smtpd processes):
the cap keeps smtpguard's sessions below it, so a flood of clients queues
here instead of taking the upstream offline.  With ``workers: N`` each worker
holds ``max_sessions // N`` of the slots (at least one): exact with
``workers: 1``.
"""

from __future__ import annotations

import math

import trio

from .config import Address
from .metrics import Metrics


class UpstreamBusy(Exception):
    """No upstream slot came free within the queue time."""


class Permit:
    """One upstream slot, held for a session's life; :meth:`release` gives it back."""

    __slots__ = ("_limiter", "_address")

    def __init__(self, limiter: UpstreamLimiter | None, address: Address) -> None:
        self._limiter = limiter
        self._address = address

    def release(self) -> None:
        if self._limiter is not None:
            self._limiter._release(self._address)
            self._limiter = None


class UpstreamLimiter:
    """The slots of every upstream address, for the sessions of one config."""

    def __init__(self, max_sessions: int, workers: int, queue_seconds: float, metrics: Metrics):
        self.max_sessions = max_sessions
        self.workers = workers
        #: Slots per address in this process (0: no cap).
        self.per_process = max(1, max_sessions // max(1, workers)) if max_sessions else 0
        self.queue_seconds = queue_seconds
        self._metrics = metrics
        self._slots: dict[Address, trio.Semaphore] = {}

    async def acquire(self, address: Address, deadline: float = math.inf) -> Permit:
        """A slot for ``address``, waiting in line until ``deadline`` (trio
        time; default: the queue time from now).  Raises :class:`UpstreamBusy`."""
        if not self.per_process:
            return Permit(None, address)
        slots = self._slots.get(address)
        if slots is None:
            slots = self._slots[address] = trio.Semaphore(self.per_process)
            self._metrics.upstream_cap(self.per_process)
        if deadline == math.inf:
            deadline = trio.current_time() + self.queue_seconds
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

    def _release(self, address: Address) -> None:
        self._slots[address].release()
        self._metrics.upstream_sessions(-1)
