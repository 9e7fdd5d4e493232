#!/usr/bin/env python3
"""A plain TCP relay on trio, parsing nothing: the floor for any trio proxy.

``bench/run.py --trio-relay`` runs it beside HAProxy and smtpguard, so the
report shows how much of smtpguard's cost is trio's and how much its own.
It uses the same I/O steps as smtpguard's hot path (direct non-blocking
reads and writes, a wait only when a socket is empty or full), two tasks per
connection, and nothing else: no SMTP, no deadlines, no metrics.

    python3 bench/trio_relay.py LISTEN_PORT UPSTREAM_PORT [PROCESSES]

With PROCESSES > 1 (``run.py`` passes smtpguard's worker count), that many
processes accept from one listening socket, as smtpguard's workers do; a
SIGTERM to the first stops them all.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import sys

import trio

HOST = "127.0.0.1"
PR_SET_PDEATHSIG = 1


async def pump(src: trio.SocketStream, dst: trio.SocketStream) -> None:
    rfd, wfd = src.socket.fileno(), dst.socket.fileno()
    while True:
        await trio.lowlevel.wait_readable(rfd)
        try:
            data = os.read(rfd, 65536)
        except BlockingIOError:
            continue
        except OSError:
            return
        if not data:
            return
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(wfd, view) :]
            except BlockingIOError:
                pass
            except OSError:
                return
            if view:
                await trio.lowlevel.wait_writable(wfd)


async def main(listener: socket.socket, upstream_port: int) -> None:
    async def handle(client: trio.SocketStream) -> None:
        try:
            upstream = await trio.open_tcp_stream(HOST, upstream_port)
        except OSError:
            await client.aclose()
            return
        async with trio.open_nursery() as nursery:

            async def one_way(src: trio.SocketStream, dst: trio.SocketStream) -> None:
                await pump(src, dst)
                nursery.cancel_scope.cancel()

            nursery.start_soon(one_way, client, upstream)
            nursery.start_soon(one_way, upstream, client)
        client.socket.close()
        upstream.socket.close()

    socket_listener = trio.SocketListener(trio.socket.from_stdlib_socket(listener))
    await trio.serve_listeners(handle, [socket_listener])


def run(listen_port: int, upstream_port: int, processes: int) -> None:
    listener = socket.create_server((HOST, listen_port), backlog=4096)
    listener.setblocking(False)
    children = []
    for _ in range(processes - 1):
        pid = os.fork()
        if pid == 0:
            children = []
            # End with the first process, even if it is killed (Linux).
            with contextlib.suppress(OSError, AttributeError):
                ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
            break
        children.append(pid)

    def stop(signum: int, frame: object) -> None:
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        os._exit(0)

    if children:
        signal.signal(signal.SIGTERM, stop)
        print(f"trio-relay: listening on {HOST}:{listen_port} ({processes} processes)", flush=True)
    elif processes == 1:
        print(f"trio-relay: listening on {HOST}:{listen_port}", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        trio.run(main, listener, upstream_port)


if __name__ == "__main__":
    run(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 1)
