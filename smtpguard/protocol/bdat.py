"""BDAT chunks (RFC 3030): the command's syntax, and a chunk's bytes.

BDAT frames content by size, so nothing inside a chunk can end it; a chunk
is relayed as it is (its size is the client's).  A bare CR or LF is still
found and reported, for upstreams that rewrite line endings.
"""

from __future__ import annotations

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


class Chunk:
    """One chunk being read: ``remaining`` bytes, relayed or dropped."""

    __slots__ = ("remaining", "forward")

    def __init__(self, size: int, forward: bool) -> None:
        self.remaining = size
        #: False: answered locally, the bytes are read and dropped.
        self.forward = forward


def bare_breaks(tail: bytes, piece: bytes) -> tuple[bool, bytes]:
    """Whether ``piece`` (after ``tail``, a CR ending the previous piece, or
    b"") holds a bare CR or LF; and the tail for the next piece."""
    joined = tail + piece
    crlf = joined.count(b"\r\n")
    bare = joined.count(b"\n") != crlf or joined.rstrip(b"\r").count(b"\r") != crlf
    # Only a CR may pair with the next piece's LF.
    return bare, b"\r" if piece.endswith(b"\r") else b""
