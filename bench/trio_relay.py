#!/usr/bin/env python3
"""A plain TCP relay on trio, parsing nothing: the floor for any trio proxy.

``bench/run.py --trio-relay`` runs it beside HAProxy and smtpguard, so the
report shows how much of smtpguard's cost is trio's and how much its own.
It uses the same I/O steps as smtpguard's hot path (direct non-blocking
reads and writes, a wait only when a socket is empty or full), two tasks per
connection, and nothing else: no SMTP, no deadlines, no metrics.

    python3 bench/trio_relay.py LISTEN_PORT UPSTREAM_PORT
"""

from __future__ import annotations

import contextlib
import os
import sys

import trio

HOST = "127.0.0.1"


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


async def main(listen_port: int, upstream_port: int) -> None:
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

    listeners = await trio.open_tcp_listeners(listen_port, host=HOST)
    print(f"trio-relay: listening on {HOST}:{listen_port}", flush=True)
    await trio.serve_listeners(handle, listeners)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        trio.run(main, int(sys.argv[1]), int(sys.argv[2]))
