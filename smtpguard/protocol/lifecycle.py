"""How a session ends, and what counts toward its end.

A session ends in one of three ways:

- at once (:meth:`Lifecycle.abort`): the client is gone or stuck; nothing
  more goes upstream, and a message under way is abandoned, never completed;
- with a last reply (:meth:`Lifecycle.fail`): the replies already known
  go out, then a 421 or 554 of smtpguard's own;
- after the replies owed (:meth:`Lifecycle.end_after_replies`): a policy
  stops reading the client; once every reply owed is out, its last reply
  (if any) follows;
- or as the upstream ends it (:meth:`Lifecycle.close`): its 221 or 421 is
  relayed, then the session closes.

Error replies count toward Postfix's hard error limit
(``smtpd_hard_error_limit``): smtpguard's own (:meth:`Lifecycle.local`) and
the upstream's.  ``close_reason`` says why the session ended, once it has.
"""

from __future__ import annotations

from . import policy as P
from . import replies as R
from .defences import Defences
from .events import CloseReason
from .exchange import Exchange
from .message import MessageContent
from .options import SessionOptions
from .rules import Phase, Verb
from .starttls import StartTls

_C = CloseReason


class Lifecycle:
    """The session's end: when, why, and its last words."""

    __slots__ = (
        "close_reason",
        "final",
        "client_done",
        "_ex",
        "_options",
        "_defences",
        "_message",
        "_tls",
        "_buf",
    )

    def __init__(
        self,
        ex: Exchange,
        options: SessionOptions,
        *,
        defences: Defences,
        message: MessageContent,
        tls: StartTls,
        buf: bytearray,
    ) -> None:
        #: Why the session ended, once it has.
        self.close_reason: CloseReason | None = None
        #: Set when a policy ends the session: the reply to send once every
        #: owed reply is out (None: none), and the close reason.
        self.final: tuple[R.Reply | None, CloseReason] | None = None
        #: The client sent its last bytes (or will not be read any more).
        self.client_done = False
        self._ex = ex
        self._options = options
        self._defences, self._message, self._tls = defences, message, tls
        self._buf = buf  # the client's unread bytes

    def close(self, reason: CloseReason) -> None:
        """Close now: the last words (the upstream's own, or smtpguard's) are out."""
        self.close_reason = reason

    def local(self, verb: Verb, reply: R.Reply, /, **fields: str) -> None:
        """Answer ``verb`` locally; error replies count toward the error limit."""
        self._ex.local_reply(verb, reply, fields)
        if reply.code >= 400 and reply.code != 421:
            self.count_error()

    def count_error(self) -> None:
        """Postfix's hard error limit: too many error replies end the session."""
        if self._defences.error_reply():
            self.end_after_replies(P.TOO_MANY_ERRORS)

    def end_after_replies(self, reply: R.Reply | None, reason: CloseReason = _C.POLICY) -> None:
        """Stop reading the client; once owed replies are out, send ``reply`` and close."""
        self.client_done = True
        self._ex.queue.held = None  # the final reply (a 421) answers it (RFC 5321 3.8)
        self._buf.clear()
        if self.final is None:
            self.final = (reply, reason)
        self.maybe_finish()

    def maybe_finish(self) -> None:
        """Close if nothing is owed any more and an end was decided."""
        queue = self._ex.queue
        # An internal reply still owed (deferred connect: the upstream's
        # greeting) comes before anything buffered is answered.
        if queue.owed or queue.inflight or queue.held is not None:
            return
        if self.close_reason is not None:
            return
        if self.final is not None:
            reply, reason = self.final
            if reply is not None:
                self._ex.last_reply(reply, self._options.hostname)
            if self._message.under_way:
                self.abort(reason)
            else:
                self.close_reason = reason
        elif self.client_done:
            self.abort(_C.CLIENT_CLOSED)

    def fail(self, reply: R.Reply, reason: CloseReason) -> None:
        """Send the replies already known, then ``reply``, then close."""
        if self.close_reason is not None:
            return
        ex = self._ex
        ex.flush()
        if self._message.under_way:
            ex.abandon_message()
        if not self._tls.pending:
            ex.last_reply(reply, self._options.hostname)
        # else: after "220 Ready to start TLS" the client reads TLS records:
        # a plaintext reply would be garbage to it; the session just closes.
        ex.to_upstream.clear()
        self.close_reason = reason

    def abort(self, reason: str) -> None:
        """Close at once: nothing more is sent upstream."""
        if self.close_reason is not None:
            return
        if self._message.under_way:
            self._ex.abandon_message()
        self._ex.to_upstream.clear()
        self.close_reason = CloseReason(reason)

    def client_eof(self) -> None:
        """The client closed its side (or vanished)."""
        if self.close_reason is not None:
            return
        if self._message.under_way:
            # Never complete a message the client did not finish: the I/O
            # layer closes the upstream without sending anything more.
            self.abort(_C.CLIENT_CLOSED)
            return
        # A client may half-close after its last command (printf ... | nc -N):
        # answer what it sent, as Postfix does, then close.
        self.client_done = True
        self.maybe_finish()

    def upstream_eof(self) -> None:
        """The upstream closed its side."""
        if self.close_reason is not None:
            return
        if self._ex.state.phase is Phase.CLOSED:
            self.close(_C.QUIT)
            return
        self.fail(R.UPSTREAM_LOST, _C.UPSTREAM_CLOSED)

    def non_smtp(self, detail: str) -> bool:
        """Not an SMTP client; True if the session ends here."""
        if not self._defences.non_smtp(detail):
            return False
        if detail.startswith("TLS"):
            self.abort(_C.POLICY)  # a text reply means nothing to a TLS client
        else:
            self.fail(P.NON_SMTP_COMMAND, _C.POLICY)
        return True
