"""The edges of a connection: PROXY headers in, TLS, and the client's identity out.

These run before the SMTP session starts relaying (or, for STARTTLS, when
the core asks for it); the SMTP rules stay in :mod:`smtpguard.protocol`.
"""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import Sequence
from dataclasses import dataclass

import trio

from .protocol.framing import ReplyParser, UpstreamProtocolError
from .protocol.proxyproto import (
    ProxyHeaderError,
    ProxyInfo,
    build_proxy_v1,
    build_proxy_v2,
    build_xclient,
    parse_proxy_header,
)
from .tlsctx import DEFAULT_GROUPS, client_context

MAX_PREAMBLE_BYTES = 4096


class PrefixedStream(trio.abc.Stream):
    """A stream that first yields bytes already read from it (after a PROXY header)."""

    def __init__(self, stream: trio.abc.Stream, prefix: bytes) -> None:
        self.stream = stream
        self._prefix = prefix

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if self._prefix:
            n = len(self._prefix) if max_bytes is None else max_bytes
            data, self._prefix = self._prefix[:n], self._prefix[n:]
            await trio.lowlevel.checkpoint()
            return data
        return await self.stream.receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        if isinstance(self.stream, trio.abc.HalfCloseableStream):
            await self.stream.send_eof()

    async def aclose(self) -> None:
        await self.stream.aclose()


async def read_proxy_header(stream: trio.abc.Stream) -> tuple[ProxyInfo, bytes]:
    """Read a PROXY v1/v2 header; return it and the bytes that followed it.

    Raises :class:`ProxyHeaderError` for a missing or malformed header (and on
    EOF); the caller bounds the time.
    """
    buf = bytearray()
    while True:
        parsed = parse_proxy_header(buf)
        if parsed is not None:
            info, used = parsed
            return info, bytes(buf[used:])
        if len(buf) > MAX_PREAMBLE_BYTES:
            raise ProxyHeaderError("PROXY header too long")
        chunk = await stream.receive_some(MAX_PREAMBLE_BYTES)
        if not chunk:
            raise ProxyHeaderError("connection closed before a PROXY header")
        buf += chunk


#: Why a TLS handshake with a client failed: the closed label set of
#: ``smtpguard_tls_handshake_failures_total``.
HANDSHAKE_FAILURES = ("protocol_version", "no_shared_cipher", "client_closed", "timeout", "other")
_PROTOCOL_VERSION = (
    "UNSUPPORTED_PROTOCOL",
    "WRONG_VERSION_NUMBER",
    "TLSV1_ALERT_PROTOCOL_VERSION",
    "VERSION_TOO_LOW",
)
_NO_SHARED = ("NO_SHARED_CIPHER", "NO_SHARED_GROUP", "NO_SUITABLE_KEY_SHARE")


class HandshakeFailed(Exception):
    """The TLS handshake with a client failed; ``reason`` is one of
    :data:`HANDSHAKE_FAILURES`, ``detail`` OpenSSL's words (for the log)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def handshake_failure(exc: BaseException) -> HandshakeFailed:
    """Name the reason of a failed handshake (``trio.TooSlowError``: a timeout)."""
    if isinstance(exc, HandshakeFailed):
        return exc
    if isinstance(exc, trio.TooSlowError):
        return HandshakeFailed("timeout", "no handshake in time")
    cause = exc.__cause__ if exc.__cause__ is not None else exc
    if isinstance(cause, ssl.SSLEOFError) or not isinstance(cause, ssl.SSLError):
        return HandshakeFailed("client_closed", type(cause).__name__)
    reason = cause.reason or ""
    if reason in _PROTOCOL_VERSION:
        return HandshakeFailed("protocol_version", reason)
    if reason in _NO_SHARED:
        return HandshakeFailed("no_shared_cipher", reason)
    if reason == "UNEXPECTED_EOF_WHILE_READING":
        return HandshakeFailed("client_closed", reason)
    return HandshakeFailed("other", reason or str(cause)[:80])


async def start_server_tls(
    stream: trio.abc.Stream, context: ssl.SSLContext
) -> trio.SSLStream[trio.abc.Stream]:
    """TLS towards a client (implicit TLS or after STARTTLS); the caller bounds the time.

    A handshake OpenSSL refuses (an old protocol, no shared suite) ends with
    the alert it wrote (RFC 8446 6, RFC 5246 7.2), as ``openssl s_server``
    and Postfix send: trio's SSLStream drops it when the handshake fails, so
    it is sent here.  Raises :class:`HandshakeFailed`.
    """
    tls = trio.SSLStream(stream, context, server_side=True)
    try:
        await tls.do_handshake()
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
        failure = handshake_failure(exc)
        if failure.reason in ("protocol_version", "no_shared_cipher", "other"):
            await _send_alert(tls, stream)
        raise failure from exc
    return tls


async def _send_alert(tls: trio.SSLStream[trio.abc.Stream], transport: trio.abc.Stream) -> None:
    # The alert is in the stream's outgoing memory BIO (trio keeps no public
    # way to it).  If trio changes, this sends nothing: a bare close, as before.
    outgoing = getattr(tls, "_outgoing", None)
    pending = outgoing.read() if isinstance(outgoing, ssl.MemoryBIO) else b""
    if pending:
        with trio.move_on_after(1), contextlib.suppress(trio.BrokenResourceError, OSError):
            await transport.send_all(pending)


def tls_summary(stream: trio.abc.Stream) -> dict[str, str]:
    """Negotiated protocol and cipher, for the session log line."""
    if not isinstance(stream, trio.SSLStream):
        return {}
    cipher = stream.cipher()
    return {"tls_protocol": str(stream.version()), "tls_cipher": cipher[0] if cipher else "-"}


async def send_identity(
    upstream: trio.abc.Stream,
    mode: str,
    client: tuple[str, int] | None,
    local: tuple[str, int] | None,
) -> bytes:
    """Tell the upstream who the real client is.

    ``proxy_v1``/``proxy_v2``: a PROXY header before anything else.
    ``xclient`` (Postfix XCLIENT_README): read the greeting, send XCLIENT
    with the client's address and port; Postfix answers each with a fresh
    220 greeting, the last of which is returned for the session to relay.
    Returns the upstream bytes already read (to feed to the session), or
    b"" when nothing was read.  Raises :class:`UpstreamProtocolError` if
    the upstream refuses XCLIENT: without it the upstream would apply its
    policy to smtpguard's address, which is what the operator asked not to do.
    """
    if mode == "none" or client is None:
        return b""
    host, port = client
    dst_host, dst_port = local if local is not None else (None, None)
    if mode == "proxy_v1":
        await upstream.send_all(build_proxy_v1(host, port, dst_host, dst_port))
        return b""
    if mode == "proxy_v2":
        await upstream.send_all(build_proxy_v2(host, port, dst_host, dst_port))
        return b""
    parser = ReplyParser()
    greeting = await _one_reply(upstream, parser)
    if greeting[:1] != b"2":
        return greeting  # the session relays the upstream's refusal itself
    last = greeting
    for line in build_xclient(host, port):
        await upstream.send_all(line)
        last = await _one_reply(upstream, parser)
        if last[:3] != b"220":
            raise UpstreamProtocolError(f"XCLIENT refused: {last[:60]!r}")
    return last


@dataclass
class UpstreamTLS:
    """What happened with TLS to the upstream, for logs and metrics."""

    result: str = "none"  #: "established", "plaintext", "none"
    injected: bool = False  #: bytes followed the upstream's 220 (discarded)
    protocol: str | None = None


async def upstream_starttls(
    upstream: trio.abc.Stream,
    mode: str,
    context: ssl.SSLContext,
    server_name: str | None,
    hostname: str,
    greeting: bytes,
) -> tuple[trio.abc.Stream, bytes, UpstreamTLS]:
    """STARTTLS from smtpguard to the upstream, before relaying the client.

    ``greeting`` is the upstream's greeting if it was already read (after
    XCLIENT), else b"".  Returns the stream to use, the greeting to relay
    to the client, and what happened.  ``opportunistic`` carries on in
    plaintext when STARTTLS is not offered; ``required`` raises
    :class:`UpstreamProtocolError` then, or when the certificate does not
    verify.  Bytes after the upstream's 220 (STARTTLS response injection)
    are discarded and reported, never relayed.
    """
    parser = ReplyParser()
    if not greeting:
        greeting = await _one_reply(upstream, parser)
    if greeting[:1] != b"2":
        return upstream, greeting, UpstreamTLS("none")
    await upstream.send_all(b"EHLO " + hostname.encode("ascii", "replace") + b"\r\n")
    ehlo = await _one_reply(upstream, parser)
    offered = ehlo[:1] == b"2" and any(
        line[4:].strip().upper() == b"STARTTLS" for line in ehlo.split(b"\r\n")[1:]
    )
    if not offered:
        if mode == "required":
            raise UpstreamProtocolError("upstream does not offer STARTTLS")
        return upstream, greeting, UpstreamTLS("plaintext")
    await upstream.send_all(b"STARTTLS\r\n")
    reply, injected = await _one_reply_and_rest(upstream, parser)
    if reply[:3] != b"220":
        if mode == "required":
            raise UpstreamProtocolError(f"upstream refused STARTTLS: {reply[:60]!r}")
        return upstream, greeting, UpstreamTLS("plaintext", injected)
    tls = trio.SSLStream(upstream, context, server_hostname=server_name)
    try:
        await tls.do_handshake()
    except trio.BrokenResourceError as exc:
        raise UpstreamProtocolError(f"TLS handshake with the upstream failed: {exc}") from None
    return tls, greeting, UpstreamTLS("established", injected, str(tls.version()))


def upstream_context(
    mode: str,
    ca_file: str | None,
    ciphers: str | None = None,
    groups: Sequence[str] = DEFAULT_GROUPS,
) -> ssl.SSLContext:
    """Client context towards the upstream: verified when required, not otherwise
    (opportunistic TLS beats plaintext even with a self-signed certificate)."""
    return client_context(
        verify=mode == "required", ca_file=ca_file, ciphers=ciphers, groups=groups
    )


async def _one_reply_and_rest(stream: trio.abc.Stream, parser: ReplyParser) -> tuple[bytes, bool]:
    """One reply; whether anything followed it in the same read (then discarded)."""
    while True:
        chunk = await stream.receive_some(4096)
        if not chunk:
            raise UpstreamProtocolError("upstream closed during STARTTLS")
        replies = parser.feed(chunk)
        if replies:
            return replies[0].raw, len(replies) > 1 or parser.pending


async def _one_reply(stream: trio.abc.Stream, parser: ReplyParser) -> bytes:
    while True:
        chunk = await stream.receive_some(4096)
        if not chunk:
            raise UpstreamProtocolError("upstream closed during the identity exchange")
        replies = parser.feed(chunk)
        if replies:
            if len(replies) > 1 or parser.pending:
                raise UpstreamProtocolError("unexpected bytes after a reply")
            return replies[0].raw
