"""STARTTLS with the client: smtpguard's own (RFC 3207).

The upstream never sees the client's STARTTLS: smtpguard answers 220, the
I/O layer runs the handshake, and the upstream's session goes on as it was.
So after the handshake the client's EHLO must be answered here, from the
upstream's last EHLO reply (RFC 3207 4.2: the client must not rely on what
it learnt before TLS).  Whether STARTTLS is answered at all, and how its
220 moves the state, are rules (:data:`.rules.LOCAL_ANSWERS`,
:data:`.rules.APPLIED_LOCALLY`); this part carries the answers out.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from . import ehlo, local
from . import replies as R
from .defences import Defences
from .events import LocalReply
from .exchange import Exchange
from .options import SessionOptions
from .policy import Action, Defence
from .queue import Slot
from .rules import Verb


class StartTls:
    """The client's STARTTLS: the handshake owed, and the EHLO owed after it."""

    __slots__ = ("pending", "reidentify", "upstream_ehlo", "_ex", "_options", "_defences", "_use")

    def __init__(
        self,
        ex: Exchange,
        options: SessionOptions,
        defences: Defences,
        use: Callable[[ehlo.Capabilities], None],
    ) -> None:
        #: STARTTLS was answered: the I/O layer owes the handshake.
        self.pending = False
        #: See rules.Condition.REIDENTIFY: the next EHLO/HELO is answered here.
        self.reidentify = False
        #: The upstream's last EHLO reply lines (None: its last was HELO's).
        self.upstream_ehlo: Sequence[bytes] | None = None
        self._ex = ex
        self._options = options
        self._defences = defences
        self._use = use

    def start(self, buf: bytearray) -> None:
        """Answer 220 (the handshake follows); ``buf``: the client's unread bytes."""
        if buf:
            # Commands pipelined behind STARTTLS in plaintext would run as if
            # they came over TLS (CVE-2011-0411): drop them.
            self.injection("plaintext pipelined after STARTTLS")
            buf.clear()
        ex = self._ex
        ex.local_reply(Verb.STARTTLS, R.STARTTLS_READY, {})
        self.reidentify = self.upstream_ehlo is not None
        self._use(ehlo.after_starttls(ex.caps))
        self.pending = True

    def identify(self, verb: Verb) -> None:
        """EHLO/HELO after STARTTLS, answered from the upstream's EHLO reply."""
        assert self.upstream_ehlo is not None
        ex = self._ex
        self.reidentify = False
        data, caps = local.identify(verb, self.upstream_ehlo, self._options, ex.state.tls)
        self._use(caps)
        ex.events.append(LocalReply(verb, 250))
        ex.push(Slot(verb, verb, data))

    def injection(self, detail: str) -> None:
        """Plaintext where only TLS may come."""
        self._defences.report(Defence.STARTTLS_INJECTION, Action.REJECT, detail)
