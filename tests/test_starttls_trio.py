"""STARTTLS terminated by smtpguard, over in-memory streams (no sockets).

The client side wraps its memory stream in ``trio.SSLStream`` after the 220, like a real
client; the scripted upstream records every line it got, so these tests prove what the
upstream never saw: the STARTTLS itself, plaintext injected behind it (CVE-2011-0411), and
commands sent after TLS before the new EHLO.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import pytest
import trio
from support.driver import Harness, Replies, session
from support.tls import TLSFiles
from support.upstream import ScriptedUpstream

#: Where the client is, as a listener would say.
CLIENT = {"peer": "127.0.0.1:4242", "client_host": "127.0.0.1"}


@pytest.fixture
async def harness(tls_files: TLSFiles) -> AsyncIterator[Harness]:
    tls = {"certificate": str(tls_files.cert), "key": str(tls_files.key)}
    config = {"tls": tls, "timeouts": {"client_command_seconds": 20}}
    async with session(ScriptedUpstream(auth=True), **CLIENT, **config) as h:
        yield h


async def _starttls(h: Harness, tls_files: TLSFiles) -> tuple[trio.SSLStream, Replies]:
    """Greeting, EHLO (STARTTLS offered), STARTTLS, handshake: the TLS stream and its reader."""
    plain = Replies(h.client)
    assert await plain.one() == b"220 fake ESMTP\r\n"
    await h.client.send_all(b"EHLO client.test\r\n")
    ehlo = await plain.one()
    assert b"250-STARTTLS\r\n" in ehlo or ehlo.endswith(b"250 STARTTLS\r\n"), ehlo
    assert b"AUTH" not in ehlo  # auth.require_tls (default): no AUTH on plaintext
    await h.client.send_all(b"STARTTLS\r\n")
    assert await plain.one() == b"220 2.0.0 Ready to start TLS\r\n"
    assert plain.buf == b""
    tls = trio.SSLStream(h.client, tls_files.client_context(), server_hostname="localhost")
    await tls.do_handshake()
    return tls, Replies(tls)


async def test_starttls_is_terminated_by_smtpguard_and_never_reaches_the_upstream(
    harness: Harness, tls_files: TLSFiles, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="smtpguard")
    h = harness
    tls, replies = await _starttls(h, tls_files)
    assert tls.version() in ("TLSv1.2", "TLSv1.3")

    # RFC 3207 4.2: the session starts over; MAIL before the new EHLO is refused locally.
    await tls.send_all(b"MAIL FROM:<early@example.org>\r\n")
    assert await replies.one() == b"503 Error: send HELO/EHLO first\r\n"

    await tls.send_all(b"EHLO client.test\r\n")
    ehlo = await replies.one()
    assert ehlo.startswith(b"250-fake\r\n"), ehlo
    assert b"STARTTLS" not in ehlo
    assert b"AUTH PLAIN" in ehlo  # now encrypted: AUTH is offered

    await tls.send_all(b"STARTTLS\r\n")
    assert await replies.one() == b"554 5.5.1 Error: TLS already active\r\n"

    await tls.send_all(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n")
    assert await replies.read(3) == [
        b"250 2.0.0 ok\r\n",
        b"250 2.0.0 ok\r\n",
        b"354 go ahead\r\n",
    ]
    await tls.send_all(b"Subject: over TLS\r\n\r\nhello\r\n.\r\nQUIT\r\n")
    assert await replies.read(2) == [b"250 2.0.0 queued\r\n", b"221 2.0.0 bye\r\n"]
    await h.handled.wait()

    # The EHLO after STARTTLS is answered from the upstream's own EHLO reply:
    # the upstream never saw STARTTLS and may refuse a second EHLO.
    assert h.upstream.lines == [
        b"EHLO client.test",
        b"MAIL FROM:<a@example.org>",
        b"RCPT TO:<b@example.org>",
        b"DATA",
        b"QUIT",
    ]
    assert h.upstream.bodies == [b"Subject: over TLS\r\n\r\nhello\r\n"]
    assert b"STARTTLS" not in h.upstream.verbs
    assert h.value("smtpguard_tls_sessions_total", protocol=str(tls.version())) == 1
    assert h.value("smtpguard_commands_forwarded_total", command="STARTTLS") == 0

    [summary] = [r for r in caplog.records if r.getMessage() == "disconnect"]
    fields = summary.fields  # type: ignore[attr-defined]
    assert fields["reason"] == "quit"
    assert fields["tls_protocol"] == tls.version()
    assert fields["tls_cipher"] == tls.cipher()[0]  # type: ignore[index]
    assert fields["starttls"] == "1/2"  # the second one got 554


@pytest.mark.parametrize(
    "injected",
    [b"RSET\r\n", b"MAIL FROM:<evil@example.org>\r\n", b"AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n"],
    ids=["rset", "mail", "auth"],
)
async def test_plaintext_pipelined_after_starttls_is_discarded(
    harness: Harness, tls_files: TLSFiles, injected: bytes
) -> None:
    h = harness
    plain = Replies(h.client)
    assert await plain.one() == b"220 fake ESMTP\r\n"
    await h.client.send_all(b"EHLO client.test\r\n")
    await plain.one()
    await h.client.send_all(b"STARTTLS\r\n" + injected)
    assert await plain.one() == b"220 2.0.0 Ready to start TLS\r\n"
    tls = trio.SSLStream(h.client, tls_files.client_context(), server_hostname="localhost")
    with trio.fail_after(10):
        await tls.do_handshake()
    replies = Replies(tls)
    await tls.send_all(b"EHLO again.test\r\n")
    assert (await replies.one()).startswith(b"250-fake\r\n")
    await tls.send_all(b"QUIT\r\n")
    assert await replies.one() == b"221 2.0.0 bye\r\n"
    await h.handled.wait()

    assert h.upstream.lines == [b"EHLO client.test", b"QUIT"]
    assert (
        h.value("smtpguard_policy_actions_total", defence="starttls_injection", action="reject")
        == 1
    )


async def test_pipelined_ehlo_and_starttls_in_one_write(
    harness: Harness, tls_files: TLSFiles
) -> None:
    """STARTTLS held behind a pipelined EHLO is decided when the EHLO reply comes in."""
    h = harness
    plain = Replies(h.client)
    assert await plain.one() == b"220 fake ESMTP\r\n"
    await h.client.send_all(b"EHLO client.test\r\nSTARTTLS\r\n")
    ehlo, ready = await plain.read(2)
    assert b"STARTTLS" in ehlo
    assert ready == b"220 2.0.0 Ready to start TLS\r\n"
    tls = trio.SSLStream(h.client, tls_files.client_context(), server_hostname="localhost")
    with trio.fail_after(10):
        await tls.do_handshake()
    replies = Replies(tls)
    await tls.send_all(b"EHLO client.test\r\nQUIT\r\n")
    first, last = await replies.read(2)
    assert first.startswith(b"250-fake\r\n") and last == b"221 2.0.0 bye\r\n"
    await h.handled.wait()
    assert h.upstream.lines == [b"EHLO client.test", b"QUIT"]
    assert (
        h.value("smtpguard_policy_actions_total", defence="starttls_injection", action="reject")
        == 0
    )


async def test_failed_handshake_closes_the_session(harness: Harness) -> None:
    h = harness
    plain = Replies(h.client)
    await plain.one()
    await h.client.send_all(b"EHLO client.test\r\n")
    await plain.one()
    await h.client.send_all(b"STARTTLS\r\n")
    assert await plain.one() == b"220 2.0.0 Ready to start TLS\r\n"
    # Not a TLS ClientHello: the handshake fails and smtpguard hangs up.
    await h.client.send_all(b"MAIL FROM:<x@example.org>\r\n")
    with trio.fail_after(10):
        while await h.client.receive_some(65536):
            pass
        await h.handled.wait()
    assert h.upstream.lines == [b"EHLO client.test"]
    assert h.value("smtpguard_sessions_closed_total", reason="tls_failed") == 1


async def test_summary_keeps_tls_protocol_when_the_client_vanishes(
    harness: Harness, tls_files: TLSFiles, caplog: pytest.LogCaptureFixture
) -> None:
    """A client closing its TCP connection without a TLS close_notify (what Python's ssl and
    most MTAs do) must not erase the session's TLS protocol from the summary line."""
    caplog.set_level(logging.INFO, logger="smtpguard")
    h = harness
    tls, replies = await _starttls(h, tls_files)
    version = tls.version()
    await tls.send_all(b"EHLO client.test\r\n")
    assert (await replies.one()).startswith(b"250-fake\r\n")
    await trio.aclose_forcefully(h.client)  # the transport, under the TLS layer
    await h.handled.wait()
    [summary] = [r for r in caplog.records if r.getMessage() == "disconnect"]
    fields = summary.fields  # type: ignore[attr-defined]
    assert fields["reason"] == "client_closed"
    assert fields["tls_protocol"] == version


async def test_xclient_identity_greeting_reaches_the_client() -> None:
    """upstream_identity: xclient: the greeting the upstream sends after XCLIENT is relayed."""
    async with session(
        ScriptedUpstream(auth=True),
        **CLIENT,
        client_addr=("192.0.2.7", 4242),
        upstream_identity="xclient",
    ) as h:
        replies = Replies(h.client)
        with trio.move_on_after(5) as scope:
            greeting = await replies.one()
        assert not scope.cancelled_caught, "no greeting within 5 s after the XCLIENT exchange"
        assert greeting == b"220 fake ESMTP after XCLIENT\r\n"
        await h.client.send_all(b"EHLO client.test\r\nQUIT\r\n")
        ehlo, bye = await replies.read(2)
        assert ehlo.startswith(b"250-fake\r\n") and bye == b"221 2.0.0 bye\r\n"
        await h.handled.wait()
        assert h.upstream.lines == [
            b"XCLIENT NAME=[UNAVAILABLE] ADDR=192.0.2.7 PORT=4242",
            b"EHLO client.test",
            b"QUIT",
        ]
