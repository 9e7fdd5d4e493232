"""Deferred connect in the trio layer (memory streams): the upstream is
connected at the first command, and the session's summary counts every byte,
those read before the upstream existed included."""

from __future__ import annotations

import logging

import pytest
import trio
import trio.testing
from prometheus_client import CollectorRegistry
from support.driver import Replies, connect_upstreams, make_proxy, read_to_eof, session
from support.upstream import ScriptedUpstream


async def test_the_upstream_is_connected_at_the_first_command(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="smtpguard")
    started: list[ScriptedUpstream] = []
    async with trio.open_nursery() as nursery:
        connect = connect_upstreams(nursery, started=started)
        proxy = make_proxy(CollectorRegistry(), connect, upstream_connect="on_command")
        client, proxy_side = trio.testing.memory_stream_pair()
        nursery.start_soon(proxy.handle, proxy_side, "192.0.2.1:1", "192.0.2.1")
        assert await client.receive_some(100) == b"220 guard.test ESMTP\r\n"
        await trio.sleep(0.1)
        assert len(started) == 0  # a silent client costs no upstream
        sent = b"EHLO client.test\r\nQUIT\r\n"
        await client.send_all(sent)
        received = b"220 guard.test ESMTP\r\n" + await read_to_eof(client)
    assert len(started) == 1
    assert received.endswith(b"221 2.0.0 bye\r\n") and b"250" in received
    [summary] = [r for r in caplog.records if r.getMessage() == "disconnect"]
    fields = summary.fields  # type: ignore[attr-defined]
    assert fields["reason"] == "quit"
    # Before: bytes_in=0, the bytes read before the upstream existed were lost.
    assert fields["bytes_in"] == len(sent)
    assert fields["bytes_out"] == len(received)


async def test_deferred_connect_with_xclient_sends_the_first_command() -> None:
    # Before: the upstream's greeting after XCLIENT was consumed, the client's
    # EHLO waited in the session and nothing sent it: 421 after the timeout.
    async with session(
        ScriptedUpstream(auth=True),
        peer="127.0.0.1:4242",
        client_host="127.0.0.1",
        client_addr=("192.0.2.7", 4242),
        upstream_identity="xclient",
        upstream_connect="on_command",
    ) as h:
        replies = Replies(h.client)
        assert await replies.one() == b"220 guard.test ESMTP\r\n"
        await h.client.send_all(b"EHLO client.test\r\nQUIT\r\n")
        with trio.fail_after(5):
            ehlo, bye = await replies.read(2)
        assert ehlo.startswith(b"250-fake\r\n") and bye == b"221 2.0.0 bye\r\n"
        await h.handled.wait()
        assert h.upstream.lines == [
            b"XCLIENT NAME=[UNAVAILABLE] ADDR=192.0.2.7 PORT=4242",
            b"EHLO client.test",
            b"QUIT",
        ]


def test_a_reload_keeps_the_upstream_slots_unless_the_cap_changes() -> None:
    from smtpguard.config import load
    from smtpguard.metrics import Metrics
    from smtpguard.proxy import Proxy

    base = {"upstream": "127.0.0.1:25", "workers": 1, "upstream_limits": {"max_sessions": 2}}
    proxy = Proxy(load(base), Metrics(CollectorRegistry()))
    limiter = proxy._limiter
    proxy.reload(load(base))  # a certificate renewal, say
    assert proxy._limiter is limiter  # before: new slots, the cap lifted
    proxy.reload(load({**base, "upstream_limits": {"max_sessions": 3}}))
    assert proxy._limiter is not limiter and proxy._limiter.per_process == 3
