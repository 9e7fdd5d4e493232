"""The upstream's replies: what each one is for, and what it teaches.

Theory of operation
-------------------

The upstream answers smtpguard's commands in order, so each reply belongs
to the head of the in-flight queue (:class:`~.queue.Slot`).
:func:`disposition` says what a reply is:

- :data:`Disposition.RELAY`: the reply to a client's command; the state
  moves on it and the client gets it (the EHLO reply rewritten);
- :data:`Disposition.INTERNAL`: the reply to a command smtpguard sent on its
  own (the upstream's greeting under deferred connect, an RSET keeping the
  upstream in line): the state moves on it, and :func:`internal` says
  whether the session goes on;
- :data:`Disposition.UNSOLICITED`: a 421 nobody asked for (the upstream's own
  idle timeout or shutdown, RFC 5321 3.8): relayed, and the session closes;
- :data:`Disposition.BROKEN`: not SMTP here (a reply nobody asked for that
  is not 421, a 3xx greeting; :data:`.rules.BROKEN`): the session ends.

A 2xx reply to EHLO or HELO sets what the client may use from now on
(:func:`identified`); the reply to the end of a message gives its
:class:`~.events.MessageDone` (:func:`message_done`).
"""

from __future__ import annotations

import enum

from . import ehlo
from .events import MessageDone, MessageOutcome
from .framing import UpstreamReply
from .greeting import Deferred
from .options import SessionOptions
from .queue import Slot
from .rules import BROKEN, Verb
from .transaction import Transaction


class Disposition(enum.Enum):
    #: The reply to the client's command at the head: relay it.
    RELAY = "relay"
    #: The reply to smtpguard's own command: consumed (see :func:`internal`).
    INTERNAL = "internal"
    #: A 421 nobody asked for: relay it and close.
    UNSOLICITED = "unsolicited"
    #: Not SMTP here: the upstream is broken and the session ends.
    BROKEN = "broken"


class Internal(enum.Enum):
    #: Consumed; the session goes on.
    CONSUMED = "consumed"
    #: The upstream's greeting refuses the session for now (4xx, 421
    #: included): relay it, as the upstream would, and close.
    CLOSE = "close"
    #: The upstream refused to end its transaction: it and the client no
    #: longer agree on the session, so it ends.
    BROKEN = "broken"


RELAY, INTERNAL, UNSOLICITED = Disposition.RELAY, Disposition.INTERNAL, Disposition.UNSOLICITED


def disposition(head: Slot | None, code: int) -> Disposition:
    """What a reply with ``code`` is, given the head of the in-flight
    queue (None: nothing is in flight)."""
    if head is None:
        return UNSOLICITED if code == 421 else Disposition.BROKEN
    if code // 100 in BROKEN.get(head.step, ()):
        return Disposition.BROKEN
    return INTERNAL if head.internal else RELAY


def internal(step: Verb, reply: UpstreamReply, deferred: Deferred) -> Internal:
    """What the reply to smtpguard's own ``step`` means (the upstream's
    greeting is recorded in ``deferred``: its banner, or its refusal)."""
    if step is Verb.GREETING:
        return Internal.CLOSE if deferred.upstream_greeted(reply) else Internal.CONSUMED
    return Internal.CONSUMED if reply.code // 100 == 2 else Internal.BROKEN


def identified(
    step: Verb, reply: UpstreamReply, options: SessionOptions, tls_active: bool
) -> tuple[bytes, ehlo.Capabilities] | None:
    """A 2xx reply to EHLO or HELO: what the client gets (the EHLO reply
    rewritten, see :mod:`.ehlo`) and what it may use from now on (nothing
    after HELO); None for any other reply."""
    if reply.code // 100 != 2:
        return None
    if step is Verb.EHLO:
        return ehlo.rewrite(reply.lines, options, tls_active)
    if step is Verb.HELO:
        return reply.raw, ehlo.NO_EXTENSIONS
    return None


def message_done(slot: Slot, code: int, txn: Transaction) -> MessageDone:
    """The reply ``code`` to the end of a message (DATA_END, BDAT_LAST).

    The size goes with the slot; but a BDAT LAST answered before its chunk
    was all sent takes the size counted so far, and ends ``txn``'s count.
    """
    outcome = MessageOutcome.ACCEPTED if code < 300 else MessageOutcome.REJECTED
    size = slot.size
    if slot is txn.last_chunk:
        size, txn.content_bytes, txn.last_chunk = txn.content_bytes, 0, None
    return MessageDone(outcome, size)
