"""The proxy over real loopback sockets, in process: the descriptor reads and
writes (``wire.SocketWire``) that memory streams never take.

A client streams a large message as fast as it can; the upstream reads it
slowly, so smtpguard's sends find the socket full and must wait for room.
The body must arrive byte for byte, and only the upstream's verdict may
reach the client.
"""

from __future__ import annotations

import functools
import hashlib

import pytest
import trio
from prometheus_client import CollectorRegistry
from support.driver import read_replies
from support.upstream import DATA_END, ScriptedUpstream

from smtpguard.config import load
from smtpguard.metrics import Metrics
from smtpguard.proxy import Proxy

BODY_BYTES = 6 * 1024 * 1024


def make_body() -> bytes:
    line = b"".join(bytes([65 + i % 26]) for i in range(76)) + b"\r\n"
    body = b"Subject: stream\r\n\r\n" + line * (BODY_BYTES // len(line))
    return body + b"\r\n"  # ends in CRLF: the final dot follows


def slow_upstream() -> ScriptedUpstream:
    """An upstream that reads message bodies slowly: small reads, pauses."""
    return ScriptedUpstream(
        greeting=b"220 slow ESMTP",
        name=b"slow",
        keywords=(),
        replies={DATA_END: b"250 2.0.0 queued as STREAM"},
        read_bytes=16384,
        body_read_pause_seconds=0.001,
    )


async def test_a_large_message_streams_through_real_sockets_intact(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    waits = 0
    real_wait_writable = trio.lowlevel.wait_writable

    async def counting_wait_writable(fd: int) -> None:
        nonlocal waits
        waits += 1
        await real_wait_writable(fd)

    # smtpguard's _send looks it up at call time; trio's own sockets do not.
    monkeypatch.setattr(trio.lowlevel, "wait_writable", counting_wait_writable)

    upstream = slow_upstream()
    body = make_body()
    with trio.fail_after(60):
        await _stream(upstream, body)

    assert [len(b) for b in upstream.bodies] == [len(body)]
    assert [hashlib.sha256(b).hexdigest() for b in upstream.bodies] == [
        hashlib.sha256(body).hexdigest()
    ]
    # The slow reader filled smtpguard's socket buffer: its sends had to wait.
    assert waits > 0


async def _stream(upstream: ScriptedUpstream, body: bytes) -> None:
    async with trio.open_nursery() as nursery:
        up_listeners = await nursery.start(
            functools.partial(trio.serve_tcp, upstream.handle, 0, host="127.0.0.1")
        )
        up_port = up_listeners[0].socket.getsockname()[1]
        config = load(
            {
                "upstream_connect": "on_accept",  # these tests read the upstream's greeting
                "listen": "127.0.0.1:0",
                "upstream": f"127.0.0.1:{up_port}",
                "hostname": "guard.test",
                "workers": 1,
            }
        )
        proxy = Proxy(config, Metrics(CollectorRegistry()))
        listeners = await nursery.start(proxy.serve)
        port = listeners[0].socket.getsockname()[1]

        client = await trio.open_tcp_stream("127.0.0.1", port)
        assert (await read_replies(client, 1))[0].startswith(b"220 slow")
        await client.send_all(b"EHLO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\n")
        replies = await read_replies(client, 3)
        assert [r[:3] for r in replies] == [b"250", b"250", b"250"]
        await client.send_all(b"DATA\r\n")
        assert (await read_replies(client, 1))[0].startswith(b"354")
        await client.send_all(body + b".\r\n")
        assert await read_replies(client, 1) == [b"250 2.0.0 queued as STREAM\r\n"]
        await client.send_all(b"QUIT\r\n")
        assert await read_replies(client, 1) == [b"221 2.0.0 bye\r\n"]
        await client.aclose()
        nursery.cancel_scope.cancel()


def named_upstream(name: bytes) -> ScriptedUpstream:
    """An upstream that greets with its own name (and answers QUIT)."""
    return ScriptedUpstream(greeting=b"220 " + name + b" ESMTP")


async def serve_upstreams(nursery: trio.Nursery, *upstreams: ScriptedUpstream) -> list[int]:
    """Serve each upstream on a free loopback port; their ports, in order."""
    ports = []
    for upstream in upstreams:
        started = await nursery.start(
            functools.partial(trio.serve_tcp, upstream.handle, 0, host="127.0.0.1")
        )
        ports.append(started[0].socket.getsockname()[1])
    return ports


async def test_each_listener_fails_over_over_its_own_upstreams() -> None:
    """``listen: [{address, upstream: [...]}]``: a listener with its own
    upstream list uses it (failing over past a dead one); the others use the
    global list; ``smtpguard_upstream_up`` has one series per address."""
    alpha, beta = named_upstream(b"alpha"), named_upstream(b"beta")
    dead = trio.socket.socket()
    await dead.bind(("127.0.0.1", 0))  # bound, never listening: refused
    dead_port = dead.getsockname()[1]
    registry = CollectorRegistry()
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            ports = await serve_upstreams(nursery, alpha, beta)
            config = load(
                {
                    "upstream_connect": "on_accept",  # these tests read the upstream's greeting
                    "listen": [
                        "127.0.0.1:0",
                        {
                            "address": "127.0.0.1:0",
                            "upstream": [f"127.0.0.1:{dead_port}", f"127.0.0.1:{ports[1]}"],
                        },
                    ],
                    "upstream": f"127.0.0.1:{ports[0]}",
                    "workers": 1,
                }
            )
            proxy = Proxy(config, Metrics(registry))
            listeners = await nursery.start(proxy.serve)
            greetings = []
            for listener in listeners:
                port = listener.socket.getsockname()[1]
                client = await trio.open_tcp_stream("127.0.0.1", port)
                greetings.append((await read_replies(client, 1))[0])
                await client.send_all(b"QUIT\r\n")
                assert await read_replies(client, 1) == [b"221 2.0.0 bye\r\n"]
                await client.aclose()
            nursery.cancel_scope.cancel()
    dead.close()
    assert greetings == [b"220 alpha ESMTP\r\n", b"220 beta ESMTP\r\n"]
    assert (alpha.sessions, beta.sessions) == (1, 1)
    # Index = place among all configured upstreams, the global ones first.
    up = {
        i: registry.get_sample_value("smtpguard_upstream_up", {"upstream": str(i)})
        for i in range(3)
    }
    assert up == {0: 1.0, 1: 0.0, 2: 1.0}
    failures = registry.get_sample_value(
        "smtpguard_upstream_connect_failures_total", {"reason": "refused"}
    )
    assert failures == 1


async def test_a_backup_upstream_never_tried_has_no_health_series() -> None:
    """Ordered failover with a healthy first upstream: the second is never
    connected to, so it has no ``smtpguard_upstream_up`` series (not a 0 that
    would read as "down" on the dashboard and in the failover alert)."""
    primary, backup = named_upstream(b"primary"), named_upstream(b"backup")
    registry = CollectorRegistry()
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            ports = await serve_upstreams(nursery, primary, backup)
            config = load(
                {
                    "upstream_connect": "on_accept",  # these tests read the upstream's greeting
                    "listen": "127.0.0.1:0",
                    "upstream": [f"127.0.0.1:{port}" for port in ports],
                    "workers": 1,
                }
            )
            proxy = Proxy(config, Metrics(registry))
            [listener] = await nursery.start(proxy.serve)
            client = await trio.open_tcp_stream("127.0.0.1", listener.socket.getsockname()[1])
            assert await read_replies(client, 1) == [b"220 primary ESMTP\r\n"]
            await client.send_all(b"QUIT\r\n")
            assert await read_replies(client, 1) == [b"221 2.0.0 bye\r\n"]
            await client.aclose()
            nursery.cancel_scope.cancel()
    assert (primary.sessions, backup.sessions) == (1, 0)
    up = registry.get_sample_value
    assert up("smtpguard_upstream_up", {"upstream": "0"}) == 1.0
    assert up("smtpguard_upstream_up", {"upstream": "1"}) is None
