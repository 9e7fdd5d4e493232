"""Upstream selection, failover and health, and the upstream connection's setup.

Each listener has its upstreams (its own, or the global ones), tried in
the configured order or round robin (:func:`rotation`); the first that
accepts a TCP connection within ``timeouts.connect_seconds`` gets the
session (failover).  Each attempt sets ``smtpguard_upstream_up`` for that
address and each failure but the last is counted and logged.  Before the
session starts, :meth:`Upstreams.prepare` sends the client's identity
(PROXY header, XCLIENT) and, if configured, makes the connection TLS.

The upstream's slots (``upstream_limits``) are admission.py's; the SMTP
dialogue is the core's.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable

import trio

from .admission import Permit, UpstreamLimiter
from .config import Address, Config, Listener, listener_specs
from .edges import send_identity, upstream_context, upstream_starttls
from .logs import fields
from .metrics import Metrics
from .protocol.policy import Defence

log = logging.getLogger("smtpguard")

Connect = Callable[[], Awaitable[trio.abc.Stream]]


def rotation(upstreams: tuple[Address, ...], start: int) -> list[Address]:
    """``upstreams`` in the order to try them, from the ``start``-th on (wrapping)."""
    start %= len(upstreams)
    return list(upstreams[start:] + upstreams[:start])


def connect_failure_reason(exc: BaseException) -> str:
    """The ``smtpguard_upstream_connect_failures_total`` label for a failed connect."""
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


async def open_tcp(address: Address) -> trio.SocketStream:
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


class Upstreams:
    """The upstream lists of the config in use, the choice among them, and
    each address's last greeting."""

    def __init__(
        self,
        config: Config,
        metrics: Metrics,
        upstream: Address | None = None,
        connect: Connect | None = None,
    ) -> None:
        self.metrics = metrics
        default = upstream or config.upstream
        if default is None:
            raise ValueError("no upstream address")
        #: The default upstream (the first global one, or the one given).
        self.default = default
        #: Given by the caller (the command line, a test): reloads keep it.
        self._fixed = default is not config.upstream
        #: Tests: a stream from elsewhere instead of a TCP connection.
        self._connect = connect
        #: The text of each upstream's last 2xx greeting (deferred connect).
        self._banners: dict[Address, bytes] = {}
        self.use(config)

    def use(self, config: Config) -> None:
        """The upstream lists and TLS settings of ``config`` (start, reload).

        ``addresses`` holds every address once, global ones first: an
        address's index there is its ``smtpguard_upstream_up`` label.
        """
        self.config = config
        if not self._fixed and config.upstream is not None:
            self.default = config.upstream
        base = (self.default,) if self._fixed else (config.upstreams or (self.default,))
        everything = list(base)
        for spec in listener_specs(config):
            everything += [a for a in spec.upstreams if a not in everything]
        self._base = base
        self.addresses: tuple[Address, ...] = tuple(everything)
        self._index = {a: i for i, a in enumerate(self.addresses)}
        self._round_robin: dict[tuple[Address, ...], int] = {}
        self._tls_context = upstream_context(
            config.upstream_tls,
            config.upstream_tls_ca_file,
            config.upstream_tls_ciphers,
            config.upstream_tls_groups,
        )
        # No ``smtpguard_upstream_up`` series until an upstream is tried: a
        # backup never needed is not "down" (and with workers, one that has
        # not tried an upstream must not pull the others' minimum to 0).

    def for_listener(self, listener: Listener | None) -> tuple[Address, ...]:
        """The upstreams of ``listener``: its own, else the global ones."""
        own = listener.upstreams if listener is not None else ()
        return own or self._base

    def banner(self, listener: Listener | None) -> bytes | None:
        """The last greeting text of ``listener``'s first upstream, if seen."""
        return self._banners.get(self.for_listener(listener)[0])

    def remember_banner(self, address: Address, banner: bytes) -> None:
        self._banners[address] = banner

    def order(self, upstreams: tuple[Address, ...]) -> list[Address]:
        """The order to try ``upstreams`` in this time (a round robin turns)."""
        start = 0
        if self.config.upstream_selection == "round_robin":
            start = self._round_robin.get(upstreams, 0)
            self._round_robin[upstreams] = start + 1
        return rotation(upstreams, start)

    async def connect(
        self, listener: Listener | None, limiter: UpstreamLimiter
    ) -> tuple[trio.abc.Stream, Address, Permit]:
        """A connection to ``listener``'s upstreams and its slot (see
        admission.py).  Raises :class:`~smtpguard.admission.UpstreamBusy`, or
        the last connect error (OSError, ``trio.TooSlowError``)."""
        deadline = trio.current_time() + limiter.queue_seconds
        if self._connect is not None:
            permit = await limiter.acquire(self.default, deadline)
            try:
                return await self._connect(), self.default, permit
            except BaseException:
                permit.release()
                raise
        return await self._failover(self.order(self.for_listener(listener)), limiter, deadline)

    async def _failover(
        self, order: list[Address], limiter: UpstreamLimiter, deadline: float
    ) -> tuple[trio.abc.Stream, Address, Permit]:
        """Connect to the first of ``order`` that answers; each address's slot
        is taken first, waiting in line until ``deadline``."""
        error: BaseException | None = None
        for k, address in enumerate(order):
            index = str(self._index.get(address, 0))
            permit = await limiter.acquire(address, deadline)
            try:
                with trio.fail_after(self.config.timeouts.connect_seconds):
                    stream = await open_tcp(address)
            except (OSError, trio.TooSlowError) as exc:
                permit.release()
                self.metrics.upstream_up.labels(index).set(0)
                if k + 1 < len(order):
                    reason = connect_failure_reason(exc)
                    self.metrics.connect_failed(reason)
                    log.warning(
                        "upstream failover", extra=fields(upstream=str(address), reason=reason)
                    )
                error = exc
                continue
            self.metrics.upstream_up.labels(index).set(1)
            return stream, address, permit
        assert error is not None
        raise error

    async def prepare(
        self,
        stream: trio.abc.Stream,
        address: Address,
        config: Config,
        client_addr: tuple[str, int] | None,
        local_addr: tuple[str, int] | None,
        conn_id: int,
    ) -> tuple[trio.abc.Stream, bytes]:
        """Identity (PROXY header, XCLIENT) and upstream TLS, per ``config``:
        the stream to relay on, and the upstream's bytes read meanwhile.

        Raises what the setup raises (UpstreamProtocolError, TooSlowError,
        BrokenResourceError, SSLError, OSError); the caller bounds the time.
        """
        early = await send_identity(stream, config.upstream_identity, client_addr, local_addr)
        if config.upstream_tls == "none":
            return stream, early
        stream, early, up_tls = await upstream_starttls(
            stream,
            config.upstream_tls,
            self._tls_context,
            config.upstream_tls_server_name or address.host,
            config.session.hostname,
            early,
        )
        self.metrics.upstream_tls.labels(up_tls.result).inc()
        if up_tls.injected:
            self.metrics.policy_actions.labels(Defence.STARTTLS_INJECTION.value, "reject").inc()
            log.warning(
                "policy",
                extra=fields(
                    conn=conn_id,
                    defence="starttls_injection",
                    action="reject",
                    detail="bytes after the upstream's 220 to STARTTLS",
                ),
            )
        return stream, early
