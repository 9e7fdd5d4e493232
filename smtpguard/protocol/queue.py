"""The reply queue: one reply owed to the client per command, in order.

Every client command gets exactly one reply, in command order (RFC 2920).
:attr:`ReplyQueue.owed` holds the replies owed to the client; a
:class:`Slot` is filled either at once (a local reply) or when the upstream
answers (a forwarded command: those slots are also in
:attr:`ReplyQueue.inflight`, in the order the upstream answers them).
Replies leave only from the head, so local replies interleave with the
upstream's in the right places.  A command whose verdict depends on a reply
in flight waits in :attr:`ReplyQueue.held` (the pipelining hold).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from .rules import GROUP_ENDERS, Verb

#: A local reply, rendered when it is sent: whether enhanced status codes
#: apply is known only once the replies before it (EHLO's) have arrived.
Render = Callable[[bool], bytes]


class Slot:
    """One reply owed to the client (or, ``internal``, to smtpguard itself)."""

    __slots__ = ("verb", "step", "reply", "size", "internal")

    def __init__(
        self, verb: Verb, step: Verb, reply: bytes | Render | None = None, internal: bool = False
    ) -> None:
        self.verb = verb  #: the client's verb (for metrics)
        self.step = step  #: what the upstream answers (for transitions)
        self.reply = reply  #: the bytes to send (or how to render them), once known
        #: The message's size, for the reply to its end (DATA_END, BDAT_LAST).
        self.size = 0
        #: A command smtpguard sent on its own (an RSET keeping the upstream
        #: in line, the upstream's greeting after smtpguard's): its reply is
        #: consumed, never relayed.
        self.internal = internal


class ReplyQueue:
    """Replies owed to the client, replies owed by the upstream, and the held command."""

    __slots__ = ("owed", "inflight", "held", "queued")

    def __init__(self) -> None:
        self.owed: deque[Slot] = deque()
        self.inflight: deque[Slot] = deque()
        #: A command whose verdict waits for a reply in flight.
        self.held: tuple[Verb, bytes] | None = None
        #: Replies ever queued for the client (a progress counter).
        self.queued = 0

    def push(self, slot: Slot) -> bool:
        """Queue a reply owed to the client; True if it can leave now (it is
        the head and known)."""
        self.queued += 1
        self.owed.append(slot)
        return slot.reply is not None and len(self.owed) == 1

    def expect(self, slot: Slot) -> None:
        """The upstream owes ``slot``'s reply (after those already in flight)."""
        self.inflight.append(slot)

    def flush(self, out: bytearray, enhanced: bool) -> None:
        """Move every reply known at the head of the queue to ``out``."""
        owed = self.owed
        while owed:
            reply = owed[0].reply
            if reply is None:
                return
            owed.popleft()
            out += reply if isinstance(reply, bytes) else reply(enhanced)

    def blocker(self, client_pipelining: bool) -> Slot | None:
        """The first owed reply the client had to wait for before sending
        more (RFC 2920 3.1): any reply without PIPELINING, a group ender's with."""
        for slot in self.owed:
            if slot.step is Verb.GREETING:
                continue
            if not client_pipelining or slot.step in GROUP_ENDERS:
                return slot
        return None

    def awaits(self, step: Verb) -> bool:
        """True if a reply to ``step`` is in flight."""
        return any(slot.step is step for slot in self.inflight)
