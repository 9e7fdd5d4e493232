"""The tests' upstream: one server-side SMTP framing, one scripted upstream.

:class:`Framing` cuts what smtpguard sends an upstream into command lines,
DATA bodies and BDAT chunks, written once (sans-I/O).  Whoever answers says
when a body or a chunk comes next, as a real server does from its own reply.

:class:`ScriptedUpstream` answers with fixed replies, configurable: greeting,
EHLO keywords (PIPELINING, CHUNKING, AUTH or not), a reply per verb, chunks
refused, silence, a close at a given line, a slow reader, STARTTLS with
bytes injected after its ``220``.  It records every byte and line it got and
every body.  Sans-I/O through :meth:`ScriptedUpstream.conversation`, or on a
trio stream with :meth:`ScriptedUpstream.run` (also a ``serve_tcp`` handler).
"""

from __future__ import annotations

import ssl
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import trio
from support.ehlo import ehlo_reply

#: ``replies`` key: the reply to any verb without one of its own.
DEFAULT = b"*"
#: ``replies`` key: the reply to a DATA body's final dot.
DATA_END = b"."
#: ``replies`` key: the reply to a BDAT chunk (the chunk, not the line).
BDAT = b"BDAT"


@dataclass(frozen=True)
class Line:
    """A command line (or a SASL response), without its CRLF."""

    line: bytes


@dataclass(frozen=True)
class Body:
    """A DATA body up to the CRLF before the final dot (that CRLF included)."""

    body: bytes


@dataclass(frozen=True)
class Chunk:
    """A BDAT chunk, complete."""

    line: bytes
    data: bytes


class Framing:
    """Server-side SMTP framing: lines, then a body or a chunk when told.

    ``for unit in framing.feed(data)`` yields each complete unit; the caller
    answers it and, before asking for the next, calls :meth:`expect_body`
    (after a ``354``) or :meth:`expect_chunk` (after a BDAT line).
    """

    def __init__(self) -> None:
        self.buf = bytearray()
        self.in_body = False
        self._chunk_left = -1  # bytes of a BDAT chunk still to come (-1: none)
        self._chunk_line = b""
        self._chunk = bytearray()

    def expect_body(self) -> None:
        self.in_body = True

    def expect_chunk(self, line: bytes, size: int) -> None:
        self._chunk_line, self._chunk_left = line, size

    def feed(self, data: bytes) -> Iterator[Line | Body | Chunk]:
        self.buf += data
        while True:
            if self._chunk_left >= 0:
                taken = min(self._chunk_left, len(self.buf))
                self._chunk += self.buf[:taken]
                del self.buf[:taken]
                self._chunk_left -= taken
                if self._chunk_left:
                    return
                self._chunk_left = -1
                chunk, self._chunk = bytes(self._chunk), bytearray()
                yield Chunk(self._chunk_line, chunk)
                continue
            if self.in_body:
                end = self.buf.find(b"\r\n.\r\n")
                if end < 0:
                    return
                body = bytes(self.buf[: end + 2])
                del self.buf[: end + 5]
                self.in_body = False
                yield Body(body)
                continue
            end = self.buf.find(b"\r\n")
            if end < 0:
                return
            line = bytes(self.buf[:end])
            del self.buf[: end + 2]
            yield Line(line)


def verb_of(line: bytes) -> bytes:
    return line.split(b" ")[0].upper()


@dataclass
class ScriptedUpstream:
    """A scripted SMTP upstream that records what it got.

    Defaults: ``220 fake ESMTP``; EHLO ``250-fake``, PIPELINING, then
    ENHANCEDSTATUSCODES; ``354 go ahead``; ``250 2.0.0 queued``; ``221 2.0.0
    bye`` and a close; ``250 2.0.0 ok`` to the rest.  No STARTTLS of its own
    (smtpguard must never forward one: it gets a 454); XCLIENT is answered
    with a fresh greeting, as Postfix does.
    """

    greeting: bytes = b"220 fake ESMTP"
    name: bytes = b"fake"  # the EHLO reply's first line
    pipelining: bool = True  # offer PIPELINING
    auth: bool = False  # offer AUTH PLAIN
    chunking: bool = False  # offer CHUNKING
    #: EHLO keywords after those above.
    keywords: tuple[bytes, ...] = (b"ENHANCEDSTATUSCODES",)
    #: Replies by verb (or DEFAULT, DATA_END, BDAT), without CRLF; a multi-line
    #: reply has CRLF between its lines.  ``EHLO`` here replaces the built one.
    replies: Mapping[bytes, bytes] = field(default_factory=dict)
    refuse_chunks: bool = False  # answer every BDAT chunk 551, as Postfix a null one
    silent: bool = False  # stop answering (for timeouts)
    close_after: bytes | None = None  # close, without a reply, when this line arrives
    read_bytes: int = 65536
    #: A slow reader: a pause before each read of a DATA body.
    body_read_pause_seconds: float = 0.0
    #: Offer STARTTLS and do it with this (server-side) context.
    tls: ssl.SSLContext | None = None
    #: Sent right after the ``220`` to STARTTLS, in the same write (injection).
    after_starttls: bytes = b""
    #: Replies once TLS is on (then ``replies``, then the defaults).
    tls_replies: Mapping[bytes, bytes] = field(default_factory=dict)

    # What it got, over all its connections.
    received: bytearray = field(default_factory=bytearray)
    lines: list[bytes] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)  # each DATA body (see Body)
    chunks: list[bytes] = field(default_factory=list)
    sessions: int = 0
    closed: trio.Event = field(default_factory=trio.Event)
    stream: trio.abc.Stream | None = None  # the last one served

    @property
    def verbs(self) -> list[bytes]:
        return [verb_of(line) for line in self.lines]

    @property
    def messages(self) -> int:
        """DATA bodies completed."""
        return len(self.bodies)

    def ehlo(self) -> bytes:
        keywords = [b"PIPELINING"] if self.pipelining else []
        keywords += [b"AUTH PLAIN"] if self.auth else []
        keywords += [b"CHUNKING"] if self.chunking else []
        keywords += [b"STARTTLS"] if self.tls is not None else []
        return ehlo_reply(self.name, *keywords, *self.keywords)

    def conversation(self) -> Conversation:
        """One connection, sans-I/O: its greeting is already in ``out``."""
        return Conversation(self)

    async def run(self, stream: trio.abc.Stream) -> None:
        """Serve one connection on ``stream`` until QUIT or either side closes."""
        self.sessions += 1
        self.stream = stream
        talk = self.conversation()
        try:
            await stream.send_all(talk.take())
            while not talk.done:
                if talk.framing.in_body and self.body_read_pause_seconds:
                    await trio.sleep(self.body_read_pause_seconds)
                chunk = await stream.receive_some(self.read_bytes)
                if not chunk:
                    break
                talk.feed(chunk)
                if out := talk.take():
                    await stream.send_all(out)
                if talk.start_tls:
                    assert self.tls is not None
                    stream = self.stream = trio.SSLStream(stream, self.tls, server_side=True)
                    await stream.do_handshake()
                    talk.tls_started()
            if talk.done:
                await stream.aclose()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self.closed.set()

    # The name trio.serve_tcp and friends expect of a handler.
    handle = run


class Conversation:
    """One connection of a :class:`ScriptedUpstream`, sans-I/O: ``feed`` it
    what smtpguard sent, ``take`` (or read ``out``) what it answers."""

    def __init__(self, upstream: ScriptedUpstream) -> None:
        self.upstream = upstream
        self.framing = Framing()
        self.out = bytearray(upstream.greeting + b"\r\n")
        self.done = False  # QUIT answered, or closed by close_after
        self.start_tls = False  # the 220 to STARTTLS is in ``out``: TLS next
        self.tls_active = False
        self.messages = 0  # DATA bodies completed on this connection

    def take(self) -> bytes:
        out, self.out = bytes(self.out), bytearray()
        return out

    def tls_started(self) -> None:
        self.start_tls, self.tls_active = False, True
        self.framing = Framing()

    def reply(self, key: bytes, default: bytes, *, generic: bool = False) -> None:
        """Queue the reply for ``key``: the configured one (once TLS is on,
        ``tls_replies`` first), else for a ``generic`` verb the configured
        DEFAULT, else ``default``."""
        up = self.upstream
        tables = (up.tls_replies, up.replies) if self.tls_active else (up.replies,)
        keys = (key, DEFAULT) if generic else (key,)
        for k in keys:
            for table in tables:
                if k in table:
                    self.out += table[k] + b"\r\n"
                    return
        self.out += default + b"\r\n"

    def feed(self, data: bytes) -> None:
        up = self.upstream
        if self.done or self.start_tls:
            return
        up.received += data
        for unit in self.framing.feed(data):
            if isinstance(unit, Body):
                up.bodies.append(unit.body)
                self.messages += 1
                self.reply(DATA_END, b"250 2.0.0 queued")
            elif isinstance(unit, Chunk):
                up.chunks.append(unit.data)
                refused = b"551 5.7.1 chunk refused"
                self.reply(BDAT, refused if up.refuse_chunks else b"250 2.0.0 chunk ok")
            else:
                self.command(unit.line)
            if self.done or self.start_tls:
                return

    def command(self, line: bytes) -> None:
        up = self.upstream
        up.lines.append(line)
        if line == up.close_after:
            self.done = True
            return
        if up.silent:
            return
        verb = verb_of(line)
        if verb == b"BDAT":
            try:
                size = int(line.split(b" ")[1])
            except (IndexError, ValueError):
                self.out += b"501 5.5.4 Syntax: BDAT count [LAST]\r\n"
                return
            self.framing.expect_chunk(line, size)
            return
        if verb == b"EHLO":
            self.reply(b"EHLO", up.ehlo().removesuffix(b"\r\n"))
        elif verb == b"DATA":
            self.reply(b"DATA", b"354 go ahead")
            self.framing.expect_body()
        elif verb == b"XCLIENT":
            self.reply(b"XCLIENT", up.greeting + b" after XCLIENT")
        elif verb == b"STARTTLS" and up.tls is not None and not self.tls_active:
            self.reply(b"STARTTLS", b"220 2.0.0 Ready to start TLS")
            self.out += up.after_starttls
            self.start_tls = True
        elif verb == b"STARTTLS":
            self.reply(b"STARTTLS", b"454 4.7.0 upstream must never see this")
        elif verb == b"QUIT":
            self.reply(b"QUIT", b"221 2.0.0 bye")
            self.done = True
        else:
            self.reply(verb, b"250 2.0.0 ok", generic=True)
