"""The accept path: the listening sockets, and what comes before the session.

:func:`open_listeners` makes (or, in a worker, inherits) one listening
socket per configured listener; :func:`arrive` takes an accepted socket
through its listener's steps: a PROXY header from a trusted balancer (the
real client's address), then implicit TLS.  A connection that fails them
is closed here, counted and logged; the SMTP session never starts.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass

import trio

from .config import Config, Listener, listener_specs
from .edges import (
    HandshakeFailed,
    PrefixedStream,
    handshake_failure,
    read_proxy_header,
    start_server_tls,
    tls_summary,
)
from .logs import fields
from .metrics import Metrics
from .protocol.policy import Defence
from .protocol.proxyproto import ProxyHeaderError

log = logging.getLogger("smtpguard")

Addr = tuple[str, int]


@dataclass(frozen=True, slots=True)
class Arrival:
    """A client ready for its SMTP session."""

    #: The stream to relay on (TLS or after a PROXY header: not the socket).
    stream: trio.abc.Stream
    #: The client's address (a trusted PROXY header's source), if known.
    client_addr: Addr | None
    #: The address it connected to (a trusted PROXY header's destination).
    local_addr: Addr | None

    @property
    def peer(self) -> str:
        """The client's address as logs show it."""
        return show(self.client_addr)

    @property
    def host(self) -> str:
        """The client's host: the key of its limits and rates."""
        return self.client_addr[0] if self.client_addr else "-"


async def open_listeners(
    config: Config, listen_fds: Sequence[int]
) -> list[tuple[trio.SocketListener, Listener]]:
    """A listening socket per configured listener, with its settings.

    A worker gets ``listen_fds``, the sockets its supervisor made: every
    worker accepts from the same sockets, so the kernel hands each
    connection to a worker that is waiting for one (a busy worker takes
    fewer), and a worker that dies loses no queued connection.
    """
    listeners: list[tuple[trio.SocketListener, Listener]] = []
    specs = listener_specs(config)
    if listen_fds:
        for spec, fd in zip(specs, listen_fds, strict=True):
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
            extra=fields(address=_sockname(sock), tls=spec.tls, proxy_protocol=spec.proxy_protocol),
        )
    return listeners


async def arrive(
    stream: trio.SocketStream,
    spec: Listener,
    tls_context: ssl.SSLContext | None,
    metrics: Metrics,
    seconds: float,
) -> Arrival | None:
    """The PROXY header and implicit TLS of ``spec``, within ``seconds``.
    None: the connection failed them and is closed."""
    try:
        sock_peer = stream.socket.getpeername()
        local = stream.socket.getsockname()
        client_addr: Addr | None = (sock_peer[0], sock_peer[1])
        local_addr: Addr | None = (local[0], local[1])
    except OSError:
        client_addr = local_addr = None
    if not spec.proxy_protocol and spec.tls != "implicit":
        return Arrival(stream, client_addr, local_addr)
    client: trio.abc.Stream = stream
    awaiting_header = spec.proxy_protocol
    try:
        with trio.fail_after(seconds):
            if spec.proxy_protocol:
                client, client_addr, local_addr = await _proxy_header(
                    stream, spec, client_addr, local_addr, metrics
                )
                awaiting_header = False
            if spec.tls == "implicit":
                if tls_context is None:
                    raise ssl.SSLError("no TLS certificate configured")
                client = await start_server_tls(client, tls_context)
                metrics.tls_session(tls_summary(client).get("tls_protocol", "unknown"))
    except (
        ProxyHeaderError,
        HandshakeFailed,
        trio.TooSlowError,
        trio.BrokenResourceError,
        OSError,
    ) as exc:
        _refused(exc, spec, awaiting_header, client_addr, metrics)
        await trio.aclose_forcefully(client)
        return None
    return Arrival(client, client_addr, local_addr)


def _refused(
    exc: BaseException,
    spec: Listener,
    awaiting_header: bool,
    client_addr: Addr | None,
    metrics: Metrics,
) -> None:
    """Count and log a connection turned away at accept."""
    if spec.tls == "implicit" and not awaiting_header:
        failure = handshake_failure(exc)
        metrics.tls_handshake_failed("implicit", failure.reason)
        log.info(
            "tls handshake failed",
            extra=fields(client=show(client_addr), reason=failure.reason, detail=failure.detail),
        )
        return
    if awaiting_header and not isinstance(exc, ProxyHeaderError):
        # No header in time (a plain client waiting for a greeting).
        metrics.policy_actions.labels(Defence.PROXY_PROTOCOL.value, "reject").inc()
    log.warning(
        "refused at accept",
        extra=fields(client=show(client_addr), reason=str(exc)[:200] or type(exc).__name__),
    )


async def _proxy_header(
    stream: trio.SocketStream,
    spec: Listener,
    client_addr: Addr | None,
    local_addr: Addr | None,
    metrics: Metrics,
) -> tuple[trio.abc.Stream, Addr | None, Addr | None]:
    """A PROXY header from a trusted balancer gives the real client address."""
    trusted = client_addr is not None and any(
        ipaddress.ip_address(client_addr[0]) in net for net in spec.trusted
    )
    try:
        if not trusted:
            raise ProxyHeaderError("PROXY header expected from an untrusted address")
        info, rest = await read_proxy_header(stream)
    except ProxyHeaderError:
        metrics.policy_actions.labels(Defence.PROXY_PROTOCOL.value, "reject").inc()
        raise
    wrapped: trio.abc.Stream = PrefixedStream(stream, rest) if rest else stream
    if info.source_host is None or info.source_port is None:
        return wrapped, client_addr, local_addr  # LOCAL: the balancer's own check
    dest = local_addr
    if info.dest_host is not None and info.dest_port is not None:
        dest = (info.dest_host, info.dest_port)
    return wrapped, (info.source_host, info.source_port), dest


def show(addr: Addr | None) -> str:
    """``host:port``, ``[v6]:port``, or ``-``."""
    if addr is None:
        return "-"
    host, port = addr
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _sockname(listener: trio.SocketListener) -> str:
    host, port = listener.socket.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
