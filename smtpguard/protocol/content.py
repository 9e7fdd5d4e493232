"""Message content, read side by side: a DATA body and a BDAT chunk.

Theory of operation
-------------------

Once a DATA body or a BDAT chunk has begun, the client's bytes are message
content until the body's final dot or the chunk's last byte.  A reader takes
what it can from the client's buffer and says what to send upstream and a
:data:`Verdict`:

- :data:`MORE`: wait for more bytes;
- :data:`END`: the body or chunk is over (the final dot is in the bytes);
- a :class:`~.replies.Reply`: a defence refuses the message; the session
  ends with that reply and nothing of the message goes upstream.

Both readers apply the same defences in the same order: bare line breaks
(:meth:`.Defences.smuggling`), the text line length (DATA only), 8-bit
content for an upstream without 8BITMIME (``body.eight_bit: reject``), and
the message size, counted in the :class:`~.transaction.Transaction`.
"""

from __future__ import annotations

import enum

from . import bdat
from . import policy as P
from . import replies as R
from .annotate import header
from .body import DataReader
from .defences import Defences
from .options import SessionOptions
from .policy import Action, Defence
from .transaction import Transaction


class Progress(enum.Enum):
    #: Wait for more client bytes.
    MORE = "more"
    #: The body or chunk is over.
    END = "end"


MORE, END = Progress.MORE, Progress.END
#: What a reader says after a read: go on, done, or end the session with a reply.
Verdict = Progress | R.Reply


class BodyReader:
    """One DATA body, from the 354 to the final dot."""

    __slots__ = ("data", "defences", "txn")

    def __init__(self, defences: Defences, txn: Transaction) -> None:
        self.data = DataReader(defences.policy.smuggling)
        self.defences = defences
        self.txn = txn

    def read(self, buf: bytearray, upstream: frozenset[bytes]) -> tuple[bytes, Verdict]:
        """Take what can be decided from ``buf`` (``upstream``: the
        upstream's EHLO keywords); the bytes to forward, and the verdict."""
        data, defences, policy = self.data, self.defences, self.defences.policy
        out, used, ended = data.filter.feed(buf)
        if len(data.filter.findings) > len(data.reported) and defences.smuggling(
            data.new_findings()
        ):
            return b"", P.BARE_NEWLINE
        if policy.max_text_line_bytes and not self._lines_ok(out):
            return b"", P.TEXT_LINE_TOO_LONG
        if policy.reject_eight_bit and eight_bit_refused(defences, out, upstream):
            return b"", P.EIGHT_BIT_REFUSED
        self.txn.content_bytes += used
        del buf[:used]
        if not size_ok(defences, self.txn):
            return b"", P.MESSAGE_TOO_BIG
        return out, END if ended else MORE

    def _lines_ok(self, out: bytes) -> bool:
        """Text line length (only when configured: it costs a split per chunk)."""
        data = self.data
        longest = data.longest_line(out)
        if longest <= self.defences.policy.max_text_line_bytes or data.line_reported:
            return True
        data.line_reported = True
        return not self.defences.text_line_too_long()


class ChunkReader:
    """One BDAT chunk: ``remaining`` bytes, relayed or (``forward`` False:
    the BDAT was answered locally) read and dropped."""

    __slots__ = ("remaining", "forward", "defences", "txn")

    def __init__(self, size: int, forward: bool, defences: Defences, txn: Transaction) -> None:
        self.remaining = size
        self.forward = forward
        self.defences = defences
        self.txn = txn

    def read(self, buf: bytearray, upstream: frozenset[bytes]) -> tuple[bytes, Verdict]:
        """Take the chunk's bytes from ``buf``; the bytes to forward, and the verdict."""
        n = min(self.remaining, len(buf))
        out = b""
        if self.forward:
            defences, txn = self.defences, self.txn
            out = bytes(buf[:n])
            bare, txn.bdat_tail = bdat.bare_breaks(txn.bdat_tail, out)
            if bare:
                new = [] if txn.bdat_bare else ["bare_lf_or_cr"]
                txn.bdat_bare = True
                if defences.smuggling(new):
                    return b"", P.BARE_NEWLINE
            if defences.policy.reject_eight_bit and eight_bit_refused(defences, out, upstream):
                return b"", P.EIGHT_BIT_REFUSED
            txn.content_bytes += n
            if not size_ok(defences, txn):
                return b"", P.MESSAGE_TOO_BIG
        del buf[:n]
        self.remaining -= n
        if self.remaining:
            return out, MORE
        txn = self.txn
        if txn.last_chunk is not None:
            # The message is complete: its size goes with the reply it awaits.
            txn.last_chunk.size, txn.content_bytes = txn.content_bytes, 0
            txn.last_chunk = None
        return out, END


def eight_bit_refused(defences: Defences, content: bytes, upstream: frozenset[bytes]) -> bool:
    """``body.eight_bit: reject``: 8-bit content for an upstream that did not
    advertise 8BITMIME ends the session with 554 5.6.1 before the end of the
    message reaches it (nothing is delivered)."""
    if content.isascii() or b"8BITMIME" in upstream:
        return False
    defences.report(Defence.EIGHT_BIT, Action.REJECT, "8-bit content")
    return True


def size_ok(defences: Defences, txn: Transaction) -> bool:
    """The message size limit: False if the policy ends the session."""
    limit = defences.policy.max_message_bytes
    if limit and txn.content_bytes > limit and not txn.size_reported:
        txn.size_reported = True  # observe mode: report once per message
        return not defences.message_too_big()
    return True


def annotation(txn: Transaction, options: SessionOptions, defences: Defences) -> bytes:
    """The header to prepend to ``txn``'s message, once (or b"")."""
    if txn.annotated:
        return b""
    d, opts = defences, options
    text = header(opts.annotate, opts.annotate_header, opts.hostname, d.violations, d.kinds)
    txn.annotated = bool(text)
    return text
