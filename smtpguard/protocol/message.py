"""A message's content on its way: the DATA body and the BDAT chunks.

Once the upstream's 354 opens a DATA body, or a BDAT command is forwarded or
refused, the client's next bytes are content, not commands.  This part
keeps the reader in force (:mod:`.content`), passes what it reads on, and
closes the message: the body's end is a command of its own (``DATA_END``)
whose reply the client is owed; a refused chunk is read and dropped, and
the transaction is ended on the upstream too (RFC 3030 2).  Whether a BDAT
command is forwarded at all is the command's decision (:mod:`.commands`).
"""

from __future__ import annotations

from . import bdat
from . import replies as R
from .content import END, MORE, BodyReader, ChunkReader, annotation
from .defences import Defences
from .events import FORWARDED
from .exchange import Exchange
from .options import SessionOptions
from .queue import Slot
from .rules import Phase, Verb, must_end_transaction


class MessageContent:
    """The reader of the DATA body or BDAT chunk in progress, if any."""

    __slots__ = ("body", "chunk", "_ex", "_options", "_defences")

    def __init__(self, ex: Exchange, options: SessionOptions, defences: Defences) -> None:
        self.body: BodyReader | None = None
        self.chunk: ChunkReader | None = None
        self._ex = ex
        self._options = options
        self._defences = defences

    @property
    def reading(self) -> bool:
        """True while client bytes are message content."""
        return self.body is not None or self.chunk is not None

    @property
    def under_way(self) -> bool:
        """True while a message's content has started but not ended."""
        if self.body is not None or self.chunk is not None:
            return True
        # BDAT ... LAST fully sent: the message is complete, only its reply is due.
        ex = self._ex
        return ex.state.phase is Phase.BDAT and not ex.queue.awaits(Verb.BDAT_LAST)

    # ------------------------------------------------------------- DATA

    def open_body(self) -> None:
        """The upstream's 354: the body follows, after smtpguard's header.

        Nothing was sent after DATA (it waits for this 354), so the header
        goes first in the body."""
        self.body = BodyReader(self._defences, self._ex.txn)
        self._ex.to_upstream += self._header()

    def read_body(self, buf: bytearray) -> bool | R.Reply:
        """Stream body bytes from ``buf``; True once the final dot has been
        passed on, a reply if a defence refuses the message."""
        assert self.body is not None
        ex = self._ex
        out, verdict = self.body.read(buf, ex.caps.upstream)
        if isinstance(verdict, R.Reply):
            return verdict
        ex.to_upstream += out
        if verdict is MORE:
            return False
        self.body = None
        ex.events.append(FORWARDED[Verb.DATA_END])
        slot, txn = Slot(Verb.DATA, Verb.DATA_END), ex.txn
        # The next MAIL may follow before the reply (RFC 2920 4): the size
        # goes with the slot, not with the session.
        slot.size, txn.content_bytes = txn.content_bytes, 0
        ex.queue.push(slot)
        ex.queue.expect(slot)
        ex.recompute()
        return True

    # ------------------------------------------------------------- BDAT

    def forward_chunk(self, parsed: bdat.Bdat, line: bytes) -> None:
        """Forward a BDAT command; its chunk follows it upstream."""
        ex = self._ex
        self.chunk = self._reader(parsed.size, True)
        header = self._header()
        line = bdat.announced(parsed, line, header)
        slot = ex.forward(Verb.BDAT, Verb.BDAT_LAST if parsed.last else Verb.BDAT, line)
        if parsed.last:
            ex.txn.last_chunk = slot
        ex.to_upstream += header

    def refuse_chunk(self, parsed: bdat.Bdat) -> None:
        """A BDAT answered locally: its chunk is read and dropped, and the
        transaction fails (RFC 3030 2) on the upstream too, with an RSET
        whose reply is consumed."""
        self.chunk = self._reader(parsed.size, False)
        if must_end_transaction(self._ex.possible):
            self._ex.send_internal(Verb.RSET)

    def read_chunk(self, buf: bytearray) -> R.Reply | None:
        """Pass on (or drop) chunk bytes from ``buf``; a reply if a defence
        refuses the message."""
        assert self.chunk is not None
        out, verdict = self.chunk.read(buf, self._ex.caps.upstream)
        if isinstance(verdict, R.Reply):
            return verdict
        self._ex.to_upstream += out
        if verdict is END:
            self.chunk = None
        return None

    def _reader(self, size: int, forward: bool) -> ChunkReader | None:
        """The reader of a chunk of ``size`` bytes (None: an empty chunk)."""
        return ChunkReader(size, forward, self._defences, self._ex.txn) if size else None

    def _header(self) -> bytes:
        """The header to prepend to this transaction's message, once (or b"")."""
        return annotation(self._ex.txn, self._options, self._defences)
