"""Per-client connection rates and the penalty box, in the spirit of Postfix's
anvil and postscreen's cache of bad clients.  Pure: the caller passes the
time (trio's clock in the proxy, plain numbers in the tests).

- **Connection rate**: at most ``connections_per_minute`` new connections per
  client key in any 60-second window; beyond it, ``421 4.7.0``.
- **Message and recipient rates**: at most ``messages_per_minute`` MAIL and
  ``recipients_per_minute`` RCPT commands per client key in any 60 seconds;
  beyond them ``450 4.7.1`` (Postfix's anvil: "too much mail", "too many
  recipients"), asked by the session through :meth:`ClientRates.allow`.
- **Penalty box**: a client key that commits ``violations`` violations within
  ``window_seconds`` is refused at connect for ``seconds`` (``421 4.7.0``, or
  ``554 5.7.1`` if configured), and that is logged once per period.

The key is the client's address, or its network (``/24``, ``/64``) where
configured.  The state is per process: with ``workers: N`` each worker
keeps its own (a client's connections spread over the workers), unless a
shared store is configured (store.py), which this state then backs up while
the store is down.
"""

from __future__ import annotations

import ipaddress
from collections import deque
from dataclasses import dataclass

#: Keys remembered at most (oldest forgotten first): memory stays bounded
#: whatever addresses a flood comes from.
MAX_KEYS = 100_000


@dataclass(frozen=True, slots=True)
class RateSettings:
    connections_per_minute: int = 0  #: 0: no limit
    messages_per_minute: int = 0  #: MAIL commands per client key; 0: no limit
    recipients_per_minute: int = 0  #: RCPT commands per client key; 0: no limit
    penalty_violations: int = 0  #: 0: no penalty box
    penalty_window_seconds: float = 60.0
    penalty_seconds: float = 600.0
    penalty_reply: int = 421  #: 421 (try later) or 554 (go away)
    ipv4_prefix: int = 32
    ipv6_prefix: int = 128


def client_key(host: str, settings: RateSettings) -> str:
    """The address, or its network under the configured prefix."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    prefix = settings.ipv4_prefix if address.version == 4 else settings.ipv6_prefix
    if prefix >= address.max_prefixlen:
        return str(address)
    return str(ipaddress.ip_network(f"{address}/{prefix}", strict=False))


class _Window:
    """Times of the last events of one key, within a window."""

    __slots__ = ("times",)

    def __init__(self) -> None:
        self.times: deque[float] = deque()

    def count(self, now: float, window: float) -> int:
        times = self.times
        while times and times[0] <= now - window:
            times.popleft()
        return len(times)


class ClientRates:
    """The per-client state of one process."""

    def __init__(self, settings: RateSettings) -> None:
        self.settings = settings
        self._connections: dict[str, _Window] = {}
        self._messages: dict[str, _Window] = {}
        self._recipients: dict[str, _Window] = {}
        self._violations: dict[str, _Window] = {}
        #: key -> until when it is refused at connect
        self._boxed: dict[str, float] = {}

    def _window(self, table: dict[str, _Window], key: str) -> _Window:
        window = table.get(key)
        if window is None:
            if len(table) >= MAX_KEYS:
                table.pop(next(iter(table)))
            window = table[key] = _Window()
        return window

    def penalized(self, key: str, now: float) -> float | None:
        """Until when ``key`` is in the penalty box (None: it is not)."""
        until = self._boxed.get(key)
        if until is None:
            return None
        if until <= now:
            del self._boxed[key]
            return None
        return until

    def connect(self, key: str, now: float) -> bool:
        """A new connection from ``key``: False if over the connection rate."""
        limit = self.settings.connections_per_minute
        return self._take(self._connections, limit, key, now) if limit else True

    def allow(self, kind: str, key: str, now: float, others: int = 0) -> bool:
        """A MAIL (``kind`` "message") or RCPT ("recipient") from ``key``:
        False if over its rate, counting ``others`` admitted elsewhere (the
        other processes, through the shared store)."""
        if kind == "message":
            limit, table = self.settings.messages_per_minute, self._messages
        else:
            limit, table = self.settings.recipients_per_minute, self._recipients
        return self._take(table, limit - others, key, now) if limit else True

    def count(self, kind: str, key: str, now: float) -> int:
        """How many ``kind`` events of ``key`` this process admitted in the
        last 60 seconds."""
        table = self._messages if kind == "message" else self._recipients
        window = table.get(key)
        return window.count(now, 60.0) if window is not None else 0

    def _take(self, table: dict[str, _Window], limit: int, key: str, now: float) -> bool:
        window = self._window(table, key)
        if window.count(now, 60.0) >= limit:
            return False
        window.times.append(now)
        return True

    def violations(self, key: str, count: int, now: float) -> bool:
        """``count`` violations by ``key`` (a session's, at its end): True if
        that puts it in the penalty box now."""
        needed = self.settings.penalty_violations
        if not needed or count <= 0 or key in self._boxed:
            return False
        window = self._window(self._violations, key)
        span = self.settings.penalty_window_seconds
        window.count(now, span)
        window.times.extend([now] * min(count, needed))
        while len(window.times) > needed:
            window.times.popleft()
        if len(window.times) < needed:
            return False
        window.times.clear()
        if len(self._boxed) >= MAX_KEYS:
            self._boxed.pop(next(iter(self._boxed)))
        self._boxed[key] = now + self.settings.penalty_seconds
        return True
