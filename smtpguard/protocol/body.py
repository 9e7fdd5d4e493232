"""DATA bodies: find the one real end, and defuse SMTP smuggling on the way.

Theory of operation
-------------------

Only ``<CRLF>.<CRLF>`` ends a DATA body (RFC 5321 4.1.1.4).  Servers that
also accept ``<LF>.<LF>``, ``<CR>.<CR>``, a dot with NULs around it and the
like can be made to see two messages where smtpguard sees one
(CVE-2023-51764/51765/51766).  :class:`BodyFilter` streams a body through:

- **fast path** (nearly all mail): a chunk is passed on as it is after three
  C-level counts prove it holds no bare CR, no bare LF and no NUL.  No
  Python work per line.
- **line mode**, entered for the rest of a message at the first bare CR,
  bare LF or NUL: the body is cut into lines at every break a lenient server
  could see (CRLF, CR, LF), and

  - ``normalize`` rewrites every break to CRLF and drops NULs;
  - ``observe`` keeps the bytes as they are;
  - either way, a line a lenient server could take as the end of data (a
    lone dot after a bare break, or before one, or with NULs) gets one more
    leading dot, so it stays message content for every reader.  The upstream
    never receives a second message smuggled inside the first.

  ``reject`` is decided by the session from :attr:`BodyFilter.findings`.
"""

from __future__ import annotations

import re

from .framing import find_data_end

_BREAK = re.compile(rb"[\r\n]")


class BodyFilter:
    """One DATA body, chunk by chunk."""

    def __init__(self, action: str = "normalize") -> None:
        self.normalize = action == "normalize"
        self.findings: set[str] = set()
        self._tail = b"\r\n"  # the DATA line's CRLF starts the first line
        self._line_mode = False
        self._at_line_start = True
        self._prev_crlf = True

    def feed(self, buf: bytearray) -> tuple[bytes, int, bool]:
        """Take what can be decided from ``buf``.

        Returns the bytes to send upstream, how many bytes of ``buf`` were
        used, and whether the body ended (the terminator is included).
        """
        if not self._line_mode:
            end = find_data_end(self._tail, buf)
            stop = end if end >= 0 else len(buf)
            if end < 0 and stop and buf[stop - 1] == 13:
                stop -= 1  # a CR at the end may start a CRLF: judge it with the next byte
            if end < 0:
                # A lone dot starting the last line waits for its line break:
                # only that tells an end look-alike from content.
                start = buf.rfind(b"\n", 0, stop) + 1
                if buf[start:stop] == b"." and (start or self._tail.endswith(b"\n")):
                    stop = start
            seg = bytes(buf[:stop])
            crlf = seg.count(b"\r\n")
            if seg.count(b"\n") == crlf and seg.count(b"\r") == crlf and b"\0" not in seg:
                self._tail = (self._tail + seg[-4:])[-4:]
                return seg, stop, end >= 0
            self._line_mode = True
            self._at_line_start = self._tail.endswith(b"\r\n")
            self._prev_crlf = self._at_line_start
        return self._feed_lines(buf)

    def _feed_lines(self, buf: bytearray) -> tuple[bytes, int, bool]:
        out = bytearray()
        pos, n = 0, len(buf)
        while pos < n:
            m = _BREAK.search(buf, pos)
            if m is None:
                piece = bytes(buf[pos:])
                if self._undecided(piece):
                    break  # could still become a lone dot: wait for its break
                out += self._content(piece)
                self._at_line_start = False
                pos = n
                break
            i = m.start()
            if buf[i] == 13:
                if i + 1 >= n:
                    piece = bytes(buf[pos:i])
                    if piece and not self._undecided(piece):
                        out += self._content(piece)
                        self._at_line_start = False
                        pos = i
                    break  # CR or CRLF: decided by the next byte
                brk = b"\r\n" if buf[i + 1] == 10 else b"\r"
            else:
                brk = b"\n"
            content = bytes(buf[pos:i])
            if self._at_line_start and self._prev_crlf and brk == b"\r\n" and content == b".":
                out += b".\r\n"
                return bytes(out), i + 2, True
            if brk != b"\r\n":
                self.findings.add("bare_lf" if brk == b"\n" else "bare_cr")
            out += self._content(content, brk)
            out += b"\r\n" if self.normalize else brk
            self._at_line_start = True
            self._prev_crlf = brk == b"\r\n"
            pos = i + len(brk)
        return bytes(out), pos, False

    def _undecided(self, piece: bytes) -> bool:
        """A line start that may still turn out to be a lone dot (bounded wait).

        Past 1024 bytes (a run of NULs) it is sent on as if it were one: the
        extra dot that costs is removed again by the receiver's unstuffing.
        """
        return (
            self._at_line_start and len(piece) <= 1024 and piece.replace(b"\0", b"") in (b"", b".")
        )

    def _content(self, content: bytes, brk: bytes | None = None) -> bytes:
        """A line (or the start of one) as it goes upstream."""
        had_nul = b"\0" in content
        if had_nul:
            self.findings.add("nul")
        cleaned = content.replace(b"\0", b"") if had_nul else content
        if self._at_line_start and cleaned.startswith(b"."):
            # A dot at a line start that the client did not stuff for every
            # reader: after a bare break, or a lone dot ended by a bare break
            # or hidden by NULs.  One more dot keeps it content.
            lone = cleaned == b"."
            if not self._prev_crlf or (lone and (brk != b"\r\n" or had_nul)):
                if lone:
                    self.findings.add("end_lookalike")
                content = b"." + content
                cleaned = b"." + cleaned
        return cleaned if self.normalize else content


class DataReader:
    """One DATA body, from the 354 to the final dot: the filter, and what the
    defences need to know about it (findings already reported, text lines)."""

    __slots__ = ("filter", "reported", "line_bytes", "line_reported")

    def __init__(self, action: str = "normalize") -> None:
        self.filter = BodyFilter(action)
        self.reported: set[str] = set()
        #: Length of the text line in progress.
        self.line_bytes = 0
        #: The text line limit was reported (once per message).
        self.line_reported = False

    def new_findings(self) -> list[str]:
        """Findings not reported yet (sorted), now counted as reported."""
        new = self.filter.findings - self.reported
        self.reported |= new
        return sorted(new)

    def longest_line(self, out: bytes) -> int:
        """The longest text line ``out`` ends or continues, CRLF included
        (only asked when a limit is configured: it costs a split)."""
        if out.rfind(b"\n") < 0:
            self.line_bytes += len(out)
            return self.line_bytes
        lines = out.split(b"\n")
        longest = max([self.line_bytes + len(lines[0]) + 1, *(len(x) + 1 for x in lines[1:-1])])
        self.line_bytes = len(lines[-1])
        return longest
