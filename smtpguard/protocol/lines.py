"""Command and SASL lines from the client's bytes, with a bounded buffer.

A line ends at LF (RFC 5321 2.3.8 wants CRLF; a bare LF is reported by the
session, not here).  A line longer than the limit is never kept: its bytes
are dropped as they arrive, up to and including its LF, and the reader says
:data:`TOO_LONG` once, when the line's end is found.  So memory stays
bounded by the limit whatever the client sends.
"""

from __future__ import annotations

import enum


class TooLong(enum.Enum):
    #: An over-long line was dropped, up to and including its LF.
    TOO_LONG = "too long"


TOO_LONG = TooLong.TOO_LONG


class LineReader:
    """Lines from ``buf`` (the client's buffered bytes, shared with the
    session, which also reads DATA bodies and BDAT chunks from it)."""

    __slots__ = ("buf", "discarding")

    def __init__(self, buf: bytearray) -> None:
        self.buf = buf
        #: The line in progress is over-long: its bytes are being dropped.
        self.discarding = False

    def take(self, limit: int) -> tuple[bytes, bool] | TooLong | None:
        """The next complete line without its line ending, and whether it
        ended in a bare LF; :data:`TOO_LONG` if an over-long line was dropped
        instead; None if there is no complete line yet."""
        buf = self.buf
        end = buf.find(b"\n")
        if end < 0:
            if len(buf) >= limit or self.discarding:
                buf.clear()
                self.discarding = True
            return None
        if end >= limit or self.discarding:
            del buf[: end + 1]
            self.discarding = False
            return TOO_LONG
        line = bytes(buf[:end])
        del buf[: end + 1]
        if line.endswith(b"\r"):
            return line[:-1], False
        return line, True
