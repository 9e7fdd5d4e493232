"""Deferred connect in the trio layer (memory streams): the upstream is
connected at the first command, and the session's summary counts every byte,
those read before the upstream existed included."""

from __future__ import annotations

import logging

import pytest
import trio
import trio.testing
from prometheus_client import CollectorRegistry
from test_proxy import FakeUpstream, make_proxy, read_to_eof


async def test_the_upstream_is_connected_at_the_first_command(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="smtpguard")
    connects = 0
    async with trio.open_nursery() as nursery:

        async def connect() -> trio.abc.Stream:
            nonlocal connects
            connects += 1
            mine, theirs = trio.testing.memory_stream_pair()
            nursery.start_soon(FakeUpstream(theirs).run)
            return mine

        proxy = make_proxy(CollectorRegistry(), connect, upstream_connect="on_command")
        client, proxy_side = trio.testing.memory_stream_pair()
        nursery.start_soon(proxy.handle, proxy_side, "192.0.2.1:1", "192.0.2.1")
        assert await client.receive_some(100) == b"220 guard.test ESMTP\r\n"
        await trio.sleep(0.1)
        assert connects == 0  # a silent client costs no upstream
        sent = b"EHLO client.test\r\nQUIT\r\n"
        await client.send_all(sent)
        received = b"220 guard.test ESMTP\r\n" + await read_to_eof(client)
    assert connects == 1
    assert received.endswith(b"221 2.0.0 bye\r\n") and b"250" in received
    [summary] = [r for r in caplog.records if r.getMessage() == "disconnect"]
    fields = summary.fields  # type: ignore[attr-defined]
    assert fields["reason"] == "quit"
    # Before: bytes_in=0, the bytes read before the upstream existed were lost.
    assert fields["bytes_in"] == len(sent)
    assert fields["bytes_out"] == len(received)
