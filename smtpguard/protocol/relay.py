"""The upstream's replies on their way to the client.

Each reply answers the oldest command in flight (RFC 5321 4.1.1; RFC 2920
4 keeps the order).  It moves the state (:func:`.rules.transition`) and is
relayed, rewritten (the EHLO reply: :mod:`.ehlo`), or consumed (the reply
to a command of smtpguard's own: the upstream's greeting after smtpguard's,
an RSET ending a refused BDAT transaction).  What a reply is and what it
teaches is :mod:`.upstream`'s; this part carries it out, and ends the
session (:mod:`.lifecycle`) when the upstream does or breaks.
"""

from __future__ import annotations

from collections.abc import Callable

from . import ehlo, upstream
from . import replies as R
from .events import CloseReason, replied
from .exchange import Exchange
from .framing import UpstreamReply
from .greeting import Deferred
from .lifecycle import Lifecycle
from .message import MessageContent
from .options import SessionOptions
from .queue import Slot
from .rules import Phase, Verb
from .starttls import StartTls

_RELAY, _INTERNAL, _UNSOLICITED = upstream.RELAY, upstream.INTERNAL, upstream.UNSOLICITED


class Relay:
    """Takes the upstream's replies, one at a time."""

    __slots__ = ("replies", "_ex", "_options", "_deferred", "_tls", "_message", "_life", "_use")

    def __init__(
        self,
        ex: Exchange,
        options: SessionOptions,
        *,
        deferred: Deferred,
        tls: StartTls,
        message: MessageContent,
        life: Lifecycle,
        use: Callable[[ehlo.Capabilities], None],
    ) -> None:
        #: How many replies the upstream has sent (a progress counter).
        self.replies = 0
        self._ex = ex
        self._options = options
        self._deferred, self._tls, self._message = deferred, tls, message
        self._life = life
        #: The client was shown new capabilities (an EHLO or HELO reply).
        self._use = use

    def reply(self, reply: UpstreamReply) -> None:
        """One reply: relayed, rewritten or consumed (the session may end)."""
        ex = self._ex
        inflight = ex.queue.inflight
        how = upstream.disposition(inflight[0] if inflight else None, reply.code)
        if how is _UNSOLICITED:
            # A 421 nobody asked for: relayed, and the session closes.
            ex.flush()
            if self._message.under_way:
                ex.abandon_message()
            ex.to_upstream.clear()
            if not self._tls.pending:  # no plaintext into a TLS handshake
                ex.to_client += reply.raw
            self._life.close(CloseReason.UPSTREAM_CLOSED)
            return
        if how is not _RELAY and how is not _INTERNAL:
            self._life.fail(R.UPSTREAM_LOST, CloseReason.UPSTREAM_ERROR)
            return
        slot = inflight.popleft()
        step = slot.step
        cls = reply.code // 100
        ex.replied(step, cls)
        self.replies += 1
        if how is _INTERNAL:
            self._internal(slot, reply)
            return
        ex.events.append(replied(step, reply.code))
        if cls >= 4 and reply.code != 421:
            self._life.count_error()
        slot.reply = self._relayed(slot, reply)
        if ex.state.phase is Phase.DATA:
            self._message.open_body()
        ex.recompute()
        if reply.code == 421 or ex.state.phase is Phase.CLOSED:
            ex.flush()
            self._life.close(CloseReason.QUIT if step is Verb.QUIT else CloseReason.UPSTREAM_CLOSED)

    def _internal(self, slot: Slot, reply: UpstreamReply) -> None:
        """The reply to a command of smtpguard's own: consumed."""
        ex = self._ex
        ex.recompute()
        if slot.step is Verb.GREETING:
            ex.events.append(replied(Verb.GREETING, reply.code))
        outcome = upstream.internal(slot.step, reply, self._deferred)
        if outcome is upstream.Internal.CLOSE:
            ex.to_client += reply.raw  # closing: say why, as the upstream would
            self._life.close(CloseReason.UPSTREAM_CLOSED)
        elif outcome is upstream.Internal.BROKEN:
            self._life.fail(R.UPSTREAM_LOST, CloseReason.UPSTREAM_ERROR)

    def _relayed(self, slot: Slot, reply: UpstreamReply) -> bytes:
        """What the client gets for ``reply`` (the EHLO reply is rewritten)."""
        step = slot.step
        if step is Verb.EHLO or step is Verb.HELO:
            learnt = upstream.identified(step, reply, self._options, self._ex.state.tls)
            if learnt is not None:
                # The upstream's EHLO reply answers the EHLO after STARTTLS.
                self._tls.upstream_ehlo = reply.lines if step is Verb.EHLO else None
                self._use(learnt[1])
                return learnt[0]
        elif step is Verb.DATA_END or step is Verb.BDAT_LAST:
            self._ex.events.append(upstream.message_done(slot, reply.code, self._ex.txn))
        return reply.raw
