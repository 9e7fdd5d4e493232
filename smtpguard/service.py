"""What a running service shares, one process or a supervisor of workers:
systemd's notify protocol, the readiness probe of the upstream, the
metrics endpoint, and the embedded sink that stands in for an upstream when
none is configured.

``cli`` (one process, or one worker) and ``workers`` (the supervisor) both
use it; it imports neither, so neither imports the other's private parts.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Awaitable, Callable

import trio

from .config import Address, Config
from .logs import fields
from .metrics import Exposition, serve_http

log = logging.getLogger("smtpguard")

#: How long the readiness probe waits for the upstream to accept a connection.
REACHABLE_TIMEOUT_SECONDS = 2.0


def notify(message: bytes) -> None:
    """systemd's notify protocol (Type=notify): one datagram to $NOTIFY_SOCKET.

    ``READY=1``, ``RELOADING=1``, ``STOPPING=1``; nothing happens without the
    variable (not started by systemd), and a failed send is only logged.
    """
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path.startswith("@"):
        path = "\0" + path[1:]  # abstract namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(message, path)
    except OSError as exc:
        log.warning("sd_notify failed", extra=fields(error=str(exc)))


async def upstream_reachable(address: Address) -> bool:
    """``/readyz``: does ``address`` accept a TCP connection (within 2 s)?"""
    with trio.move_on_after(REACHABLE_TIMEOUT_SECONDS):
        try:
            stream = await trio.open_tcp_stream(address.host, address.port)
        except OSError:
            return False
        await trio.aclose_forcefully(stream)
        return True
    return False


async def start_embedded_sink(nursery: trio.Nursery, config: Config) -> Address:
    """Start the embedded sink on a free loopback port in ``nursery``; its address.

    For ``upstream: none``: accepted mail is stored in ``config.sink_directory``.
    """
    from .sink import serve_sink  # only a quick start needs it

    host, port = await nursery.start(serve_sink, config.sink_directory, "127.0.0.1", 0)
    upstream = Address(host, port)
    log.info(
        "embedded sink",
        extra=fields(upstream=str(upstream), directory=str(config.sink_directory)),
    )
    print(f"smtpguard: messages will be stored in {config.sink_directory}", flush=True)
    return upstream


async def start_metrics_endpoint(
    nursery: trio.Nursery,
    exposition: Exposition,
    address: Address,
    ready: Callable[[], Awaitable[bool]],
) -> None:
    """Serve ``/metrics``, ``/healthz`` and ``/readyz`` on ``address`` in ``nursery``."""
    port = await nursery.start(serve_http, exposition, address.host, address.port, ready)
    print(f"smtpguard: metrics on http://{Address(address.host, port)}/metrics", flush=True)
