"""Deferred upstream connect: smtpguard greets the client itself and judges
its first line before any upstream slot is spent (as Postfix's postscreen
does before it hands a client to a real smtpd).

A pure function of the client's first bytes (:func:`judge`), called while
the upstream is not connected yet, and what the session knows about the two
greetings (:class:`Deferred`).
"""

from __future__ import annotations

import enum

from .framing import UpstreamReply
from .policy import NON_SMTP_WORDS, TLS_HANDSHAKE_PREFIX
from .rules import first_word


class FirstLine(enum.Enum):
    #: No complete line yet: keep reading (no upstream).
    INCOMPLETE = "incomplete"
    #: A command the upstream must answer: connect now.
    COMMAND = "command"
    #: QUIT: smtpguard answers 221 itself, no upstream is needed.
    QUIT = "quit"
    #: A TLS ClientHello on a plaintext port.
    TLS = "tls"
    #: An HTTP request or a header line: not an SMTP client.
    HTTP = "http"


def judge(buf: bytes | bytearray, max_line_bytes: int) -> FirstLine:
    """What the client's first bytes after smtpguard's greeting are."""
    if buf.startswith(TLS_HANDSHAKE_PREFIX):
        return FirstLine.TLS
    end = buf.find(b"\n")
    if end < 0:
        # A line longer than any command: let the session answer it (500).
        return FirstLine.COMMAND if len(buf) >= max_line_bytes else FirstLine.INCOMPLETE
    word = first_word(bytes(buf[:end]))
    if word == b"QUIT":
        return FirstLine.QUIT
    if word in NON_SMTP_WORDS or word.endswith(b":"):
        return FirstLine.HTTP
    return FirstLine.COMMAND


class Deferred:
    """What a deferred-connect session knows about the greetings: whether
    smtpguard's own is out, whether the client's first line was judged, and
    what the upstream's greeting said (a banner, or a refusal to relay)."""

    __slots__ = ("greeted", "judged", "refusal", "banner")

    def __init__(self) -> None:
        #: smtpguard's own greeting is out.
        self.greeted = False
        #: The client's first line was judged (once: later bytes wait in the
        #: buffer for the upstream).
        self.judged = False
        #: The upstream's refusing greeting (554), for the client's first command.
        self.refusal: bytes | None = None
        #: The text of the upstream's 2xx greeting, once seen (the I/O layer
        #: greets the next clients with it).
        self.banner: bytes | None = None

    def judge_once(self, buf: bytes | bytearray, max_line_bytes: int) -> FirstLine | None:
        """The client's first line, the first time it can be judged; None
        before (incomplete) and after."""
        if self.judged:
            return None
        first = judge(buf, max_line_bytes)
        if first is FirstLine.INCOMPLETE:
            return None
        self.judged = True
        return first

    def upstream_greeted(self, reply: UpstreamReply) -> bool:
        """The upstream's greeting, after smtpguard's; True if it closes the
        session (421 or 4xx: relay it, as the upstream would, and close)."""
        cls = reply.reply_class
        if cls == 2:
            self.banner = reply.lines[0][4:].rstrip(b"\r\n")
            return False
        if cls == 4:  # (421 included)
            return True
        # 554 (RFC 5321 3.1): the client's first command gets the refusal;
        # then only QUIT, as if it had seen the 554 itself.
        self.refusal = reply.raw
        return False

    def take_refusal(self) -> bytes | None:
        """The refusal, for the one command that hears it (None: none)."""
        refusal, self.refusal = self.refusal, None
        return refusal


def wants_upstream(buf: bytes | bytearray, max_line_bytes: int) -> bool:
    """The client's first bytes are a command the upstream must answer (or,
    with ``non_smtp: observe``, anything that is a whole line)."""
    first = judge(buf, max_line_bytes)
    return first is not FirstLine.INCOMPLETE and first is not FirstLine.QUIT
