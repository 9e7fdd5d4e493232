"""The penalty box and the connection rate in the trio layer (memory streams):
what a client is told at connect, and that the upstream is never bothered."""

from __future__ import annotations

import trio
import trio.testing
from prometheus_client import CollectorRegistry
from support.driver import connect_upstreams, make_proxy, read_replies, read_to_eof, value
from support.upstream import ScriptedUpstream


async def _session(nursery: trio.Nursery, proxy: object, host: str) -> trio.abc.Stream:
    client, proxy_side = trio.testing.memory_stream_pair()
    nursery.start_soon(proxy.handle, proxy_side, f"{host}:1234", host)  # type: ignore[attr-defined]
    return client


async def test_repeated_violations_put_a_client_in_the_penalty_box() -> None:
    registry = CollectorRegistry()
    connected: list[ScriptedUpstream] = []
    async with trio.open_nursery() as nursery:
        connect = connect_upstreams(nursery, started=connected)
        proxy = make_proxy(
            registry,
            connect,
            penalty_box={"violations": 3, "window_seconds": 60, "seconds": 600},
            rates={"ipv4_prefix": 24},
        )
        bad = await _session(nursery, proxy, "192.0.2.7")
        await read_replies(bad, 1)
        await bad.send_all(b"EHLO bad\r\nRCPT TO:<a@b>\r\nDATA\r\nRCPT TO:<c@d>\r\nQUIT\r\n")
        replies = await read_replies(bad, 5)
        assert [r[:3] for r in replies] == [b"250", b"503", b"503", b"503", b"221"]
        await read_to_eof(bad)
        with trio.fail_after(5):
            while not value(registry, "smtpguard_penalty_box_entries_total"):
                await trio.sleep(0.01)
        # The same /24, another address: refused at connect, no upstream.
        upstreams = len(connected)
        again = await _session(nursery, proxy, "192.0.2.99")
        assert await read_to_eof(again) == (
            b"421 4.7.0 guard.test Error: too many protocol violations, try again later\r\n"
        )
        assert len(connected) == upstreams
        assert value(registry, "smtpguard_penalty_box_refusals_total") == 1
        # Another network is served.
        other = await _session(nursery, proxy, "198.51.100.1")
        assert (await read_replies(other, 1))[0] == b"220 fake ESMTP\r\n"
        await other.send_all(b"QUIT\r\n")
        await read_to_eof(other)


async def test_connection_rate_per_client() -> None:
    registry = CollectorRegistry()
    async with trio.open_nursery() as nursery:
        connect = connect_upstreams(nursery)

        proxy = make_proxy(registry, connect, rates={"connections_per_minute": 2})
        for _ in range(2):
            client = await _session(nursery, proxy, "203.0.113.5")
            assert (await read_replies(client, 1))[0] == b"220 fake ESMTP\r\n"
            await client.send_all(b"QUIT\r\n")
            await read_to_eof(client)
        third = await _session(nursery, proxy, "203.0.113.5")
        assert await read_to_eof(third) == (
            b"421 4.7.0 guard.test Error: too many connections from you\r\n"
        )
        assert value(registry, "smtpguard_connection_rate_refusals_total") == 1


async def test_message_rate_per_client_across_sessions() -> None:
    registry = CollectorRegistry()
    async with trio.open_nursery() as nursery:
        connect = connect_upstreams(nursery)

        proxy = make_proxy(registry, connect, rates={"messages_per_minute": 1})
        first = await _session(nursery, proxy, "203.0.113.9")
        await read_replies(first, 1)
        await first.send_all(b"EHLO c\r\nMAIL FROM:<a@b>\r\nRSET\r\nQUIT\r\n")
        assert [r[:3] for r in await read_replies(first, 4)] == [b"250", b"250", b"250", b"221"]
        second = await _session(nursery, proxy, "203.0.113.9")
        await read_replies(second, 1)
        await second.send_all(b"EHLO c\r\nMAIL FROM:<a@b>\r\nQUIT\r\n")
        replies = await read_replies(second, 3)
        assert replies[1] == b"450 4.7.1 Error: too much mail from you, try again later\r\n"
        await read_to_eof(second)
    kind = {"kind": "message"}
    assert registry.get_sample_value("smtpguard_client_rate_refusals_total", kind) == 1


async def test_observe_mode_counts_rates_and_the_penalty_box_but_refuses_nothing() -> None:
    registry = CollectorRegistry()
    async with trio.open_nursery() as nursery:
        connect = connect_upstreams(nursery)

        proxy = make_proxy(
            registry,
            connect,
            policy={"mode": "observe"},
            penalty_box={"violations": 1},
            rates={"connections_per_minute": 1, "messages_per_minute": 1},
        )
        first = await _session(nursery, proxy, "192.0.2.50")
        await read_replies(first, 1)
        await first.send_all(b"EHLO c\r\nRCPT TO:<a@b>\r\nMAIL FROM:<a@b>\r\nQUIT\r\n")
        await read_replies(first, 4)
        await read_to_eof(first)
        with trio.fail_after(5):
            while not value(registry, "smtpguard_penalty_box_entries_total"):
                await trio.sleep(0.01)
        second = await _session(nursery, proxy, "192.0.2.50")
        assert (await read_replies(second, 1))[0] == b"220 fake ESMTP\r\n"  # served
        await second.send_all(b"EHLO c\r\nMAIL FROM:<a@b>\r\nQUIT\r\n")
        assert (await read_replies(second, 3))[1].startswith(b"250")  # the MAIL went on
        await read_to_eof(second)
    assert value(registry, "smtpguard_penalty_box_refusals_total") == 1  # counted only
    assert value(registry, "smtpguard_connection_rate_refusals_total") == 1
    assert value(registry, "smtpguard_client_rate_refusals_total", kind="message") == 1
