"""The tests' session drivers: :class:`Peer` drives the sans-I/O core,
:func:`open_session` / :func:`session` drive the trio layer (``Proxy.handle``
on memory streams, with a :class:`~upstream.ScriptedUpstream` behind it).
:class:`Replies` reads SMTP replies as a client does."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass

import trio
import trio.testing
from prometheus_client import CollectorRegistry
from support.ehlo import EHLO_FULL
from support.upstream import ScriptedUpstream

from smtpguard.config import load
from smtpguard.metrics import Metrics
from smtpguard.protocol import Session, SessionOptions
from smtpguard.protocol.events import PolicyAction
from smtpguard.protocol.policy import Defence
from smtpguard.protocol.rules import Phase
from smtpguard.proxy import Proxy

# ---------------------------------------------------------------- the core


class Peer:
    """Drives a session: returns what each side would receive."""

    def __init__(self, **options: object) -> None:
        self.s = Session(SessionOptions(**options))  # type: ignore[arg-type]

    def client(self, data: bytes) -> tuple[bytes, bytes]:
        self.s.receive_client(data)
        return self.s.take_upstream_bytes(), self.s.take_client_bytes()

    def upstream(self, data: bytes) -> tuple[bytes, bytes]:
        self.s.receive_upstream(data)
        return self.s.take_upstream_bytes(), self.s.take_client_bytes()

    def answer(self, *replies: bytes) -> tuple[bytes, bytes]:
        """The upstream answers one reply at a time, as a real one would (a
        command held for a reply goes out in between)."""
        up, down = b"", b""
        for reply in replies:
            u, d = self.upstream(reply)
            up, down = up + u, down + d
        return up, down

    def ready(self, ehlo_reply: bytes = EHLO_FULL) -> None:
        """Greeted and EHLO done."""
        assert self.upstream(b"220 up ESMTP\r\n") == (b"", b"220 up ESMTP\r\n")
        assert self.client(b"EHLO c\r\n")[0] == b"EHLO c\r\n"
        self.upstream(ehlo_reply)
        assert self.s.state.phase is Phase.READY

    def envelope(self) -> None:
        """MAIL and RCPT accepted, one at a time; the events so far dropped."""
        for line in (b"MAIL FROM:<a@b>\r\n", b"RCPT TO:<c@d>\r\n"):
            self.client(line)
            self.upstream(b"250 ok\r\n")
        assert self.s.state.phase is Phase.RCPT
        self.s.take_events()


# ---------------------------------------------------------- the trio layer


class Replies:
    """Reads SMTP replies from a stream, keeping what it read beyond the last one."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.buf = b""

    async def read(self, n: int = 1) -> list[bytes]:
        """The next ``n`` complete replies (multi-line joined)."""
        replies: list[bytes] = []
        current = b""
        while len(replies) < n:
            while b"\r\n" not in self.buf:
                chunk = await self.stream.receive_some(65536)
                assert chunk, f"closed after {replies!r} + {current!r}"
                self.buf += chunk
            line, self.buf = self.buf.split(b"\r\n", 1)
            current += line + b"\r\n"
            if line[3:4] != b"-":
                replies.append(current)
                current = b""
        return replies

    async def one(self) -> bytes:
        return (await self.read(1))[0]

    async def rest(self) -> bytes:
        """Everything until the stream ends."""
        data, self.buf = self.buf, b""
        while chunk := await self.stream.receive_some(65536):
            data += chunk
        return data


async def read_replies(stream: trio.abc.Stream, n: int) -> list[bytes]:
    """Read until ``n`` complete replies arrived (multi-line joined)."""
    return await Replies(stream).read(n)


async def read_to_eof(stream: trio.abc.Stream) -> bytes:
    return await Replies(stream).rest()


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    """A sample's value; 0 for a series that does not exist."""
    v = registry.get_sample_value(name, labels)
    return 0.0 if v is None else v


def make_proxy(
    registry: CollectorRegistry, connect: Callable[[], Awaitable[trio.abc.Stream]], **raw: object
) -> Proxy:
    """A Proxy with the config ``raw`` (over a test base) that connects with ``connect``.

    The upstream's own greeting is relayed (``upstream_connect: on_accept``):
    most tests check it; deferred connect has tests of its own.
    """
    base = {"upstream": "127.0.0.1:25", "hostname": "guard.test", "upstream_connect": "on_accept"}
    return Proxy(load({**base, **raw}), Metrics(registry), connect=connect)


def connect_upstreams(
    nursery: trio.Nursery,
    make: Callable[[], ScriptedUpstream] = ScriptedUpstream,
    started: list[ScriptedUpstream] | None = None,
) -> Callable[[], Awaitable[trio.abc.Stream]]:
    """A connect function: each call starts a new upstream (``make()``) in
    ``nursery``, listed in ``started``."""

    async def connect() -> trio.abc.Stream:
        mine, theirs = trio.testing.memory_stream_pair()
        upstream = make()
        if started is not None:
            started.append(upstream)
        nursery.start_soon(upstream.run, theirs)
        return mine

    return connect


@dataclass
class Harness:
    """One client session through the proxy, on memory streams."""

    client: trio.abc.Stream
    upstream: ScriptedUpstream
    registry: CollectorRegistry
    handled: trio.Event

    def value(self, name: str, **labels: str) -> float:
        return value(self.registry, name, **labels)


async def open_session(
    nursery: trio.Nursery,
    upstream: ScriptedUpstream | None = None,
    *,
    peer: str = "-",
    client_host: str = "-",
    client_addr: tuple[str, int] | None = None,
    **raw: object,
) -> Harness:
    """Start ``Proxy.handle`` in ``nursery`` for one client, with the config
    ``raw`` and ``upstream`` (a default :class:`ScriptedUpstream`) behind it."""
    upstream = upstream if upstream is not None else ScriptedUpstream()
    registry = CollectorRegistry()
    client, proxy_side = trio.testing.memory_stream_pair()
    up_proxy_side, up_side = trio.testing.memory_stream_pair()

    async def connect() -> trio.abc.Stream:
        nursery.start_soon(upstream.run, up_side)
        return up_proxy_side

    proxy = make_proxy(registry, connect, **raw)
    handled = trio.Event()

    async def handle() -> None:
        try:
            await proxy.handle(proxy_side, peer, client_host, client_addr=client_addr)
        finally:
            handled.set()

    nursery.start_soon(handle)
    return Harness(client, upstream, registry, handled)


@contextlib.asynccontextmanager
async def session(
    upstream: ScriptedUpstream | None = None,
    *,
    deadline_seconds: float = 30,
    **options: object,
) -> AsyncIterator[Harness]:
    """:func:`open_session` in a nursery of its own: the block, then the
    session's end, within ``deadline_seconds``; what is left is cancelled."""
    async with trio.open_nursery() as nursery:
        with trio.fail_after(deadline_seconds):
            h = await open_session(nursery, upstream, **options)  # type: ignore[arg-type]
            yield h
            await h.handled.wait()
        nursery.cancel_scope.cancel()


def policy_actions(events: Iterable[object], defence: Defence) -> list[PolicyAction]:
    """The PolicyAction events of ``defence`` among ``events``."""
    return [e for e in events if isinstance(e, PolicyAction) and e.defence is defence]
