"""BDAT chunks (RFC 3030): the command's syntax, and a chunk's bytes.

BDAT frames content by size, so nothing inside a chunk can end it; a chunk
is relayed as it is (its size is the client's).  A bare CR or LF is still
found and reported, for upstreams that rewrite line endings.

:func:`decide` is what the session does with a BDAT command (RFC 3030),
given what it knows; :func:`announced` is the line that goes upstream.
"""

from __future__ import annotations

import enum
from typing import NamedTuple


class Bdat(NamedTuple):
    """A parsed ``BDAT size [LAST]`` line."""

    size: int
    last: bool


def parse(line: bytes) -> Bdat | None:
    """The chunk's size and whether it is the last; None if malformed (its
    length is unknown, so nothing after the line can be framed)."""
    parts = line.split()
    if len(parts) not in (2, 3) or not parts[1].isdigit() or len(parts[1]) > 12:
        return None
    last = len(parts) == 3 and parts[2].upper() == b"LAST"
    if len(parts) == 3 and not last:
        return None
    return Bdat(int(parts[1]), last)


def bare_breaks(tail: bytes, piece: bytes) -> tuple[bool, bytes]:
    """Whether ``piece`` (after ``tail``, a CR ending the previous piece, or
    b"") holds a bare CR or LF; and the tail for the next piece."""
    joined = tail + piece
    crlf = joined.count(b"\r\n")
    bare = joined.count(b"\n") != crlf or joined.rstrip(b"\r").count(b"\r") != crlf
    # Only a CR may pair with the next piece's LF.
    return bare, b"\r" if piece.endswith(b"\r") else b""


class Move(enum.Enum):
    """What the session does with a BDAT command."""

    #: Malformed: the chunk's length is unknown, so nothing after the line
    #: can be framed (read as commands, chunk bytes would run as commands):
    #: 521 and hang up, as Postfix does.
    MALFORMED = "malformed"
    #: Wait for the replies in flight (the upstream takes one command at a
    #: time; the RSET that may follow a refusal waits its turn too).
    WAIT = "wait"
    #: Answered locally (never forward BDAT to an upstream without
    #: CHUNKING: it would read the chunk as commands); the chunk is read and
    #: dropped.
    ANSWER = "answer"
    #: Out of sequence, and the policy refuses it; the chunk is read and
    #: dropped.
    OUT_OF_SEQUENCE = "out of sequence"
    #: The client is gone and the chunk can never complete: never start it.
    STARVED = "starved"
    #: Forward the command, then its chunk.
    FORWARD = "forward"


def decide(
    parsed: Bdat | None,
    expected: str | None,
    answered: bool,
    *,
    waits: bool,
    observe: bool,
    client_gone: bool,
    buffered: int,
) -> Move:
    """The move for a BDAT line parsed as ``parsed``.

    ``expected``: why it is out of sequence (None: in sequence);
    ``answered``: in sequence, it has a local answer (.rules.LOCAL_ANSWERS);
    ``waits``: replies are in flight to an upstream without pipelining;
    ``observe``: the sequence policy only observes; ``client_gone``: the
    client has closed its side, with ``buffered`` bytes left unread.
    """
    if parsed is None:
        return Move.MALFORMED
    if waits:
        return Move.WAIT
    if expected is None:
        if answered:
            return Move.ANSWER
    elif not observe:
        return Move.OUT_OF_SEQUENCE
    if client_gone and buffered < parsed.size:
        return Move.STARVED
    return Move.FORWARD


def announced(parsed: Bdat, line: bytes, header: bytes) -> bytes:
    """The BDAT line for the upstream: ``line``, or with ``header`` (the
    annotation, part of the first chunk) its size counted too."""
    if not header:
        return line
    return b"BDAT %d" % (parsed.size + len(header)) + (b" LAST" if parsed.last else b"")
