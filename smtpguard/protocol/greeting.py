"""Deferred upstream connect: smtpguard greets the client itself and judges
its first line before any upstream slot is spent (as Postfix's postscreen
does before it hands a client to a real smtpd).

A pure function of the client's first bytes; :class:`~.session.Session`
calls it while the upstream is not connected yet.
"""

from __future__ import annotations

import enum

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
