"""The trio layer over in-memory streams: pipelining, trickling, timeouts, failures."""

from __future__ import annotations

import logging

import pytest
import trio
import trio.testing
from prometheus_client import CollectorRegistry
from support.driver import make_proxy, open_session, read_replies, read_to_eof, value
from support.upstream import ScriptedUpstream


async def test_pipelined_batch_gets_ordered_replies_and_upstream_never_sees_violation() -> None:
    async with trio.open_nursery() as nursery:
        h = await open_session(nursery)
        client, upstream, registry = h.client, h.upstream, h.registry
        assert await read_replies(client, 1) == [b"220 fake ESMTP\r\n"]
        await client.send_all(
            b"EHLO c\r\nRCPT TO:<early@x>\r\nMAIL FROM:<a@x>\r\nRCPT TO:<b@x>\r\n"
            b"MAIL FROM:<nested@x>\r\nDATA\r\n"
        )
        replies = await read_replies(client, 6)
        assert replies[0].startswith(b"250-fake")
        assert replies[1] == b"503 5.5.1 Error: need MAIL before RCPT\r\n"
        assert replies[2] == b"250 2.0.0 ok\r\n"
        assert replies[3] == b"250 2.0.0 ok\r\n"
        assert replies[4] == b"503 5.5.1 Error: nested MAIL command\r\n"
        assert replies[5] == b"354 go ahead\r\n"
        await client.send_all(b"Subject: hi\r\n\r\n..dot\r\n.\r\nQUIT\r\n")
        assert await read_replies(client, 2) == [b"250 2.0.0 queued\r\n", b"221 2.0.0 bye\r\n"]
        assert await read_to_eof(client) == b""
    assert upstream.lines == [b"EHLO c", b"MAIL FROM:<a@x>", b"RCPT TO:<b@x>", b"DATA", b"QUIT"]
    assert bytes(upstream.received) == (
        b"EHLO c\r\nMAIL FROM:<a@x>\r\nRCPT TO:<b@x>\r\nDATA\r\n"
        b"Subject: hi\r\n\r\n..dot\r\n.\r\nQUIT\r\n"
    )
    assert value(registry, "smtpguard_sequence_violations_total", command="RCPT", state="ready")
    assert value(registry, "smtpguard_sequence_violations_total", command="MAIL", state="mail")
    assert value(registry, "smtpguard_local_replies_total", code="503") == 2
    assert value(registry, "smtpguard_sessions_closed_total", reason="quit") == 1
    assert value(registry, "smtpguard_messages_total", outcome="accepted") == 1


async def test_trickled_bytes_one_at_a_time() -> None:
    async with trio.open_nursery() as nursery:
        h = await open_session(nursery)
        client, upstream = h.client, h.upstream
        await read_replies(client, 1)
        script = b"EHLO c\r\nMAIL FROM:<a@x>\r\nRCPT TO:<b@x>\r\nDATA\r\n"
        for byte in script:
            await client.send_all(bytes([byte]))
            await trio.sleep(0)
        replies = await read_replies(client, 4)
        assert replies[-1] == b"354 go ahead\r\n"
        for byte in b"x\r\n.\r\nQUIT\r\n":
            await client.send_all(bytes([byte]))
        assert await read_replies(client, 2) == [b"250 2.0.0 queued\r\n", b"221 2.0.0 bye\r\n"]
    assert bytes(upstream.received) == script + b"x\r\n.\r\nQUIT\r\n"


async def test_client_idle_timeout_gives_421(autojump_clock: trio.testing.MockClock) -> None:
    async with trio.open_nursery() as nursery:
        h = await open_session(nursery, timeouts={"client_command_seconds": 300})
        client, registry = h.client, h.registry
        await read_replies(client, 1)
        start_time = trio.current_time()
        rest = await read_to_eof(client)
        assert rest == b"421 4.4.2 guard.test Error: timeout exceeded\r\n"
        assert 299 <= trio.current_time() - start_time <= 301
    assert value(registry, "smtpguard_sessions_closed_total", reason="client_timeout") == 1


async def test_slowloris_is_cut_off_by_the_per_command_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        h = await open_session(nursery, timeouts={"client_command_seconds": 300})
        client, upstream = h.client, h.upstream
        await read_replies(client, 1)
        start_time = trio.current_time()

        async def trickle() -> None:
            try:
                for byte in b"NOOP and a very long line that never ends" * 10:
                    await client.send_all(bytes([byte]))
                    await trio.sleep(60)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

        nursery.start_soon(trickle)
        rest = await read_to_eof(client)
        assert rest.startswith(b"421 4.4.2")
        # Cut off at the deadline, not kept alive by each byte.
        assert trio.current_time() - start_time <= 301
        nursery.cancel_scope.cancel()
    assert upstream.lines == []


async def test_upstream_reply_timeout_gives_421(autojump_clock: trio.testing.MockClock) -> None:
    async with trio.open_nursery() as nursery:
        h = await open_session(nursery, timeouts={"command_reply_seconds": 50})
        client, upstream, registry = h.client, h.upstream, h.registry
        await read_replies(client, 1)
        await client.send_all(b"EHLO c\r\n")
        await read_replies(client, 1)
        upstream.silent = True
        await client.send_all(b"MAIL FROM:<a@x>\r\n")
        t0 = trio.current_time()
        assert await read_to_eof(client) == b"421 4.4.2 guard.test Error: mail server timeout\r\n"
        assert 49 <= trio.current_time() - t0 <= 51
    assert value(registry, "smtpguard_sessions_closed_total", reason="upstream_timeout") == 1


async def test_long_data_reply_wait_does_not_trip_the_client_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """While the upstream owes a reply the client is not idle (RFC 5321 4.5.3.2)."""
    async with trio.open_nursery() as nursery:
        h = await open_session(
            nursery, timeouts={"client_command_seconds": 10, "command_reply_seconds": 100}
        )
        client, upstream = h.client, h.upstream
        await read_replies(client, 1)
        await client.send_all(b"EHLO c\r\n")
        await read_replies(client, 1)
        upstream.silent = True
        await client.send_all(b"NOOP\r\n")
        t0 = trio.current_time()
        out = await read_to_eof(client)
        assert out.startswith(b"421 4.4.2 guard.test Error: mail server timeout")
        assert trio.current_time() - t0 >= 99


async def test_a_client_silent_inside_a_bdat_chunk_gets_the_client_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The BDAT line is forwarded at once, so the upstream "owes" its reply, but
    the bytes it waits for are the client's: the client's data timeout applies
    and the close is the client's, not the upstream's (found by fuzzing: it
    used to wait for data_end_seconds and blame the upstream)."""
    for announce in (b"BDAT 1000\r\nSubject: x\r\n", b"BDAT 1000 LAST\r\n"):
        async with trio.open_nursery() as nursery:
            h = await open_session(
                nursery,
                ScriptedUpstream(chunking=True),
                timeouts={"client_data_seconds": 60, "data_end_seconds": 600},
            )
            client, registry = h.client, h.registry
            await read_replies(client, 1)
            await client.send_all(b"EHLO c\r\nMAIL FROM:<a@x>\r\nRCPT TO:<b@x>\r\n" + announce)
            assert b"CHUNKING" in (await read_replies(client, 3))[0]
            t0 = trio.current_time()
            assert await read_to_eof(client) == b"421 4.4.2 guard.test Error: timeout exceeded\r\n"
            assert 59 <= trio.current_time() - t0 <= 61
        assert value(registry, "smtpguard_sessions_closed_total", reason="client_timeout") == 1
        assert value(registry, "smtpguard_sessions_closed_total", reason="upstream_timeout") == 0


async def test_after_a_refused_bdat_chunk_rcpt_and_data_are_answered_locally() -> None:
    """A refused chunk fails the transaction but keeps it in BDAT mode, as
    Postfix does ("503 5.5.1 Error: RCPT after BDAT"); BDAT ... LAST ends it
    whatever the reply ("need MAIL command"). The upstream sees no command out
    of sequence (found by fuzzing against Postfix: they used to be forwarded)."""
    async with trio.open_nursery() as nursery:
        h = await open_session(nursery, ScriptedUpstream(chunking=True))
        client, upstream, registry = h.client, h.upstream, h.registry
        upstream.refuse_chunks = True
        await read_replies(client, 1)
        await client.send_all(b"EHLO c\r\nMAIL FROM:<a@x>\r\nRCPT TO:<b@x>\r\nBDAT 3\r\nabc")
        assert (await read_replies(client, 4))[3] == b"551 5.7.1 chunk refused\r\n"
        await client.send_all(b"RCPT TO:<c@x>\r\nDATA\r\n")
        assert await read_replies(client, 2) == [
            b"503 5.5.1 Error: RCPT after BDAT; send BDAT ... LAST or RSET\r\n",
            b"503 5.5.1 Error: DATA not allowed after BDAT; send BDAT ... LAST\r\n",
        ]
        await client.send_all(b"BDAT 0 LAST\r\nRCPT TO:<c@x>\r\nQUIT\r\n")
        replies = await read_replies(client, 3)
        assert replies[0] == b"551 5.7.1 chunk refused\r\n"
        assert replies[1] == b"503 5.5.1 Error: need MAIL before RCPT\r\n"
        assert replies[2] == b"221 2.0.0 bye\r\n"
    assert upstream.lines == [
        b"EHLO c",
        b"MAIL FROM:<a@x>",
        b"RCPT TO:<b@x>",
        b"BDAT 3",
        b"BDAT 0 LAST",
        b"QUIT",
    ]
    assert value(registry, "smtpguard_local_replies_total", code="503") == 3


async def test_upstream_unreachable_gives_421_and_is_counted() -> None:
    registry = CollectorRegistry()

    async def refuse() -> trio.abc.Stream:
        raise ConnectionRefusedError(111, "Connection refused")

    proxy = make_proxy(registry, refuse)
    client, proxy_side = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(proxy.handle, proxy_side)
        out = await read_to_eof(client)
    assert out == b"421 4.3.0 guard.test Service not available, try again later\r\n"
    assert value(registry, "smtpguard_upstream_connect_failures_total", reason="refused") == 1
    assert value(registry, "smtpguard_local_replies_total", code="421") == 1
    assert value(registry, "smtpguard_sessions_open") == 0


async def test_upstream_unreachable_for_a_client_already_gone_is_no_internal_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    registry = CollectorRegistry()

    async def refuse() -> trio.abc.Stream:
        raise ConnectionRefusedError(111, "Connection refused")

    proxy = make_proxy(registry, refuse)
    client, proxy_side = trio.testing.memory_stream_pair()
    await client.aclose()  # gone before the 421 can be written
    with caplog.at_level(logging.INFO, logger="smtpguard"):
        await proxy.handle(proxy_side)
    assert "internal error" not in caplog.text
    assert value(registry, "smtpguard_sessions_closed_total", reason="upstream_refused") == 1
    assert value(registry, "smtpguard_sessions_open") == 0


async def test_upstream_closing_mid_session_gives_421() -> None:
    async with trio.open_nursery() as nursery:
        h = await open_session(nursery)
        client, upstream, registry = h.client, h.upstream, h.registry
        await read_replies(client, 1)
        upstream.close_after = b"MAIL FROM:<a@x>"
        await client.send_all(b"EHLO c\r\nMAIL FROM:<a@x>\r\n")
        out = await read_to_eof(client)
    assert out.endswith(b"421 4.4.2 guard.test Error: lost connection to mail server\r\n")
    assert value(registry, "smtpguard_sessions_closed_total", reason="upstream_closed") == 1


async def test_client_vanishing_mid_data_never_completes_the_message() -> None:
    async with trio.open_nursery() as nursery:
        h = await open_session(nursery)
        client, upstream, registry = h.client, h.upstream, h.registry
        await read_replies(client, 1)
        await client.send_all(b"EHLO c\r\nMAIL FROM:<a@x>\r\nRCPT TO:<b@x>\r\nDATA\r\n")
        await read_replies(client, 4)
        await client.send_all(b"Subject: cut\r\n\r\nhalf a message\r\n.")
        await trio.sleep(0.05)
        await client.aclose()
        with trio.fail_after(5):
            await upstream.closed.wait()
    assert upstream.received.endswith(b"half a message\r\n")  # the lone dot was held back
    assert b"\r\n.\r\n" not in bytes(upstream.received)
    assert value(registry, "smtpguard_messages_total", outcome="aborted") == 1
    assert value(registry, "smtpguard_messages_total", outcome="accepted") == 0


async def test_serial_upstream_receives_one_command_at_a_time() -> None:
    async with trio.open_nursery() as nursery:
        h = await open_session(nursery, ScriptedUpstream(pipelining=False))
        client, upstream = h.client, h.upstream
        await read_replies(client, 1)
        await client.send_all(b"EHLO c\r\n")
        ehlo = (await read_replies(client, 1))[0]
        assert b"PIPELINING" in ehlo  # offered by smtpguard itself
        await client.send_all(b"NOOP\r\nNOOP\r\nNOOP\r\nQUIT\r\n")
        assert len(await read_replies(client, 4)) == 4
    # Each command went alone: the upstream received them in separate reads
    # is not observable over a memory stream, but order and count are.
    assert upstream.lines == [b"EHLO c", b"NOOP", b"NOOP", b"NOOP", b"QUIT"]


async def test_garbage_from_client_never_crashes_and_gets_replies() -> None:
    async with trio.open_nursery() as nursery:
        h = await open_session(nursery)
        client, upstream = h.client, h.upstream
        await read_replies(client, 1)
        await client.send_all(b"\x00\xff\xfe\r\nWIBBLE / x\r\n\r\n" + b"X" * 100000 + b"\r\n")
        replies = await read_replies(client, 4)
        assert [r[:3] for r in replies] == [b"500", b"500", b"500", b"500"]
        await client.send_all(b"QUIT\r\n")
        assert (await read_replies(client, 1))[0].startswith(b"221")
    assert upstream.lines == [b"QUIT"]


async def test_http_request_is_dropped_without_bothering_the_upstream() -> None:
    async with trio.open_nursery() as nursery:
        h = await open_session(nursery)
        client, upstream, registry = h.client, h.upstream, h.registry
        await read_replies(client, 1)
        await client.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        out = await read_to_eof(client)
    assert out == b"521 5.7.0 guard.test Error: non-SMTP command\r\n"
    assert upstream.lines == []
    assert (
        value(registry, "smtpguard_policy_actions_total", defence="non_smtp", action="disconnect")
        == 1
    )


async def test_a_failing_summary_line_ends_only_its_own_session(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A verb missing from the summary's table (ETRN) raised as the session
    # ended and the exception took the whole server down.
    def broken(self: object) -> dict[str, object]:
        raise TypeError("summary bug")

    monkeypatch.setattr("smtpguard.summary.SessionSummary.fields", broken)
    caplog.set_level(logging.INFO, logger="smtpguard")
    async with trio.open_nursery() as nursery:
        h = await open_session(nursery)
        client = h.client
        await read_replies(client, 1)
        await client.send_all(b"QUIT\r\n")
        assert (await read_replies(client, 1))[0].startswith(b"221")
        assert await read_to_eof(client) == b""
    assert any(r.getMessage() == "internal error" for r in caplog.records)
