"""TLS on the wire, over memory streams: what a refused or stalled handshake
puts on the wire (an alert, never plaintext after the 220), close_notify after
QUIT, and the handshake-failure metric.  The client side of each handshake is
Python's ``ssl`` with memory BIOs, so every byte smtpguard sends is seen."""

from __future__ import annotations

import contextlib
import ssl

import pytest
import trio
import trio.testing
from support.driver import Harness, Replies, read_to_eof, session
from support.tls import TLSFiles
from support.upstream import ScriptedUpstream

TLS_ALERT = 21
PROTOCOL_VERSION = 70
HANDSHAKE_FAILURE = 40


async def _after_220(h: Harness) -> Replies:
    plain = Replies(h.client)
    assert await plain.one() == b"220 fake ESMTP\r\n"
    await h.client.send_all(b"EHLO client.test\r\n")
    await plain.one()
    await h.client.send_all(b"STARTTLS\r\n")
    assert await plain.one() == b"220 2.0.0 Ready to start TLS\r\n"
    return plain


def _alerts(data: bytes) -> list[tuple[int, int]]:
    """(level, description) of the alert records in ``data``."""
    found = []
    while len(data) >= 5:
        kind, length = data[0], int.from_bytes(data[3:5], "big")
        body, data = data[5 : 5 + length], data[5 + length :]
        if kind == TLS_ALERT and len(body) == 2:
            found.append((body[0], body[1]))
    return found


def _client_hello(context: ssl.SSLContext) -> bytes:
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = context.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        client.do_handshake()
    return outgoing.read()


def _tls10_only() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    context.minimum_version = context.maximum_version = ssl.TLSVersion.TLSv1
    return context


def _cbc_only() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers("ECDHE-RSA-AES128-SHA256:AES128-SHA")
    return context


def _session(tls_files: TLSFiles) -> contextlib.AbstractAsyncContextManager[Harness]:
    """A session with STARTTLS offered, from a client at 127.0.0.1:4242."""
    tls = {"certificate": str(tls_files.cert), "key": str(tls_files.key)}
    return session(
        ScriptedUpstream(auth=True),
        peer="127.0.0.1:4242",
        client_host="127.0.0.1",
        tls=tls,
        timeouts={"client_command_seconds": 20},
    )


@pytest.mark.parametrize(
    ("context", "description", "reason"),
    [
        (_tls10_only, PROTOCOL_VERSION, "protocol_version"),
        (_cbc_only, HANDSHAKE_FAILURE, "no_shared_cipher"),
    ],
    ids=["tls1.0", "cbc-only"],
)
async def test_a_refused_handshake_ends_with_its_alert(
    tls_files: TLSFiles, context: object, description: int, reason: str
) -> None:
    # Before: a bare TCP close (trio drops the alert OpenSSL wrote).
    async with _session(tls_files) as h:
        await _after_220(h)
        await h.client.send_all(_client_hello(context()))  # type: ignore[operator]
        reply = await read_to_eof(h.client)
        await h.handled.wait()
        assert _alerts(reply) == [(2, description)]
        assert h.value("smtpguard_tls_handshake_failures_total", listener="starttls", reason=reason)
        assert h.upstream.lines == [b"EHLO client.test"]


async def test_a_stalled_handshake_gets_no_plaintext_after_the_220(
    tls_files: TLSFiles, autojump_clock: trio.testing.MockClock
) -> None:
    # Before: "421 4.4.2 ... timeout exceeded" in plaintext, into a TLS stream.
    async with _session(tls_files) as h:
        plain = await _after_220(h)
        assert await read_to_eof(h.client) == b""
        assert plain.buf == b""
        await h.handled.wait()
        value = h.value(
            "smtpguard_tls_handshake_failures_total", listener="starttls", reason="timeout"
        )
        assert value == 1


async def test_the_upstream_leaving_during_the_handshake_sends_no_plaintext(
    tls_files: TLSFiles,
) -> None:
    async with _session(tls_files) as h:
        await _after_220(h)
        await h.upstream.stream.aclose()  # the upstream goes away mid-handshake
        await trio.sleep(0.1)
        # The client now sends its hello: it gets TLS or a close, never "421 ...".
        await h.client.send_all(_client_hello(_cbc_only()))
        rest = await read_to_eof(h.client)
        assert b"421" not in rest and not rest.startswith(b"4")
        await h.handled.wait()


async def test_a_client_closing_mid_handshake_is_counted(tls_files: TLSFiles) -> None:
    async with _session(tls_files) as h:
        await _after_220(h)
        await h.client.send_all(_client_hello(_cbc_only())[:20])
        await h.client.aclose()
        await h.handled.wait()
        value = h.value(
            "smtpguard_tls_handshake_failures_total", listener="starttls", reason="client_closed"
        )
        assert value == 1


async def test_quit_over_tls_ends_with_close_notify(tls_files: TLSFiles) -> None:
    # Before: a TCP close without close_notify (a "truncation" to the client).
    async with _session(tls_files) as h:
        await _after_220(h)
        tls = trio.SSLStream(h.client, tls_files.client_context(), server_hostname="localhost")
        await tls.do_handshake()
        replies = Replies(tls)
        await tls.send_all(b"EHLO client.test\r\nQUIT\r\n")
        assert (await replies.read(2))[1] == b"221 2.0.0 bye\r\n"
        # trio's SSLStream returns b"" only on close_notify; a bare close raises.
        assert await tls.receive_some(1) == b""
        await h.handled.wait()
