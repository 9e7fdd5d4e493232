"""Byte-level framing: upstream replies and the DATA terminator.

Both parsers are incremental: feed bytes as they arrive, in chunks of any
size (one byte at a time included), and they give the same result.
"""

from __future__ import annotations

from dataclasses import dataclass

#: The only end of a DATA body (RFC 5321 4.1.1.4).
DATA_TERMINATOR = b"\r\n.\r\n"


class UpstreamProtocolError(Exception):
    """The upstream sent something that is not an SMTP reply."""


@dataclass(slots=True)
class UpstreamReply:
    """One complete (possibly multi-line) reply from the upstream."""

    code: int
    lines: tuple[bytes, ...]  #: each line as received, CRLF included

    @property
    def reply_class(self) -> int:
        return self.code // 100

    @property
    def raw(self) -> bytes:
        return b"".join(self.lines)


class ReplyParser:
    """Split upstream bytes into replies (RFC 5321 4.2.1), bounded in memory."""

    def __init__(self, max_line_bytes: int = 4096, max_lines: int = 256) -> None:
        self._buf = bytearray()
        self._lines: list[bytes] = []
        self._max_line_bytes = max_line_bytes
        self._max_lines = max_lines

    def feed(self, data: bytes | bytearray) -> list[UpstreamReply]:
        """Add bytes; return the replies they complete, in order."""
        buf = self._buf
        if not buf and not self._lines:
            # The usual case: one whole single-line reply in one read.
            single = self._single(data)
            if single is not None:
                return [single]
        buf += data
        replies: list[UpstreamReply] = []
        while True:
            end = buf.find(b"\n")
            if end < 0:
                if len(buf) > self._max_line_bytes:
                    raise UpstreamProtocolError("reply line too long")
                return replies
            line = bytes(buf[: end + 1])
            del buf[: end + 1]
            reply = self._line(line)
            if reply is not None:
                replies.append(reply)

    def _single(self, data: bytes | bytearray) -> UpstreamReply | None:
        """``data`` as one whole single-line reply, or None if it is not one."""
        end = data.find(b"\n")
        if end == len(data) - 1 and 5 < end < self._max_line_bytes and data[end - 1] == 13:
            code_bytes = data[:3]
            if data[3] == 32 and code_bytes.isdigit() and 200 <= int(code_bytes) <= 599:
                return UpstreamReply(int(code_bytes), (bytes(data),))
        return None

    def _line(self, line: bytes) -> UpstreamReply | None:
        """One reply line (LF included); the reply if it ends one."""
        if len(line) > self._max_line_bytes:
            raise UpstreamProtocolError("reply line too long")
        code_bytes = line[:3]
        sep = line[3:4]
        if not code_bytes.isdigit() or sep not in (b"-", b" ", b"\r", b"\n"):
            raise UpstreamProtocolError("malformed reply line")
        code = int(code_bytes)
        if not 200 <= code <= 599:
            raise UpstreamProtocolError("reply code out of range")
        if self._lines and int(self._lines[0][:3]) != code:
            raise UpstreamProtocolError("reply code changed inside a multi-line reply")
        if not line.endswith(b"\r\n"):
            line = line[:-1] + b"\r\n"
        self._lines.append(line)
        if sep == b"-":
            if len(self._lines) > self._max_lines:
                raise UpstreamProtocolError("too many reply lines")
            return None
        reply = UpstreamReply(code, tuple(self._lines))
        self._lines = []
        return reply

    @property
    def pending(self) -> bool:
        """True while a reply has started but not ended."""
        return bool(self._buf or self._lines)


def find_data_end(tail: bytes, chunk: bytes | bytearray) -> int:
    """Where the DATA terminator ends in ``chunk``, or -1.

    ``tail`` is the last bytes of the body before ``chunk`` (at most 4; two
    CRLF bytes at the start of a body, since the DATA line's CRLF counts).
    Returns the index just past the terminator's final LF.
    """
    head = tail + bytes(chunk[:4])
    idx = head.find(DATA_TERMINATOR)
    if idx >= 0:
        return idx + len(DATA_TERMINATOR) - len(tail)
    idx = chunk.find(DATA_TERMINATOR)
    if idx >= 0:
        return idx + len(DATA_TERMINATOR)
    return -1
