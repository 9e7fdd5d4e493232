"""The exchange: what one session has said, owes, and where it stands.

The session's parts decide; they act on one :class:`Exchange`, which holds
everything they share: the bytes owed to each side, the events for the
metrics, the reply queue, the state and the states the replies in flight
may lead to, the transaction, and the capabilities the client was shown.
Nothing here decides anything: each method is one act, the same wherever
a part does it (a local reply always queues its slot and its event, a
forwarded command always moves the possible states).
"""

from __future__ import annotations

from . import ehlo
from . import replies as R
from .events import FORWARDED, Event, LocalReply, MessageDone, MessageOutcome
from .queue import ReplyQueue, Slot
from .rules import Phase, State, Verb, advance, only, transition
from .transaction import Transaction


class Exchange:
    """The shared record of one session (see the module docstring)."""

    __slots__ = ("to_client", "to_upstream", "events", "queue", "state", "possible", "txn", "caps")

    def __init__(self, state: State) -> None:
        self.to_client = bytearray()
        self.to_upstream = bytearray()
        self.events: list[Event] = []
        self.queue = ReplyQueue()
        self.state = state
        #: Every state the replies in flight may lead to.
        self.possible: frozenset[State] = only(state)
        self.txn = Transaction()
        #: What the client was shown (and may use).
        self.caps = ehlo.NO_EXTENSIONS

    # ------------------------------------------------------ the bytes

    def take_client(self) -> bytes:
        data = bytes(self.to_client)
        self.to_client.clear()
        return data

    def take_upstream(self) -> bytes:
        data = bytes(self.to_upstream)
        self.to_upstream.clear()
        return data

    def take_events(self) -> list[Event]:
        events = self.events[:]
        self.events.clear()
        return events

    # ------------------------------------------------------ the replies

    def flush(self) -> None:
        """Send every reply known at the head of the queue."""
        self.queue.flush(self.to_client, self.caps.enhanced)

    def push(self, slot: Slot) -> None:
        """Queue a reply owed to the client (sent at once if it is the head)."""
        if self.queue.push(slot):
            self.flush()

    def local_reply(self, verb: Verb, reply: R.Reply, fields: dict[str, str]) -> None:
        """Answer ``verb`` with smtpguard's own ``reply``, in its turn.

        Not counted toward the error limit: parts answer through
        :meth:`.lifecycle.Lifecycle.local`, which counts; this is for a
        reply that can never be an error (STARTTLS's 220)."""
        self.events.append(LocalReply(verb, reply.code))
        self.push(Slot(verb, verb, lambda enhanced: reply.render(enhanced, **fields)))

    def last_reply(self, reply: R.Reply, hostname: str) -> None:
        """The session's last reply, written now (it is ending)."""
        # 421s carry their enhanced code even before EHLO, as Postfix's do.
        self.to_client += reply.render(True, hostname=hostname)
        self.events.append(LocalReply(Verb.UNKNOWN, reply.code))

    def forward(self, verb: Verb, step: Verb, line: bytes) -> Slot:
        """Send ``line`` upstream; its reply is owed to the client."""
        self.to_upstream += line + b"\r\n"
        slot = Slot(verb, step)
        self.queue.push(slot)
        self.queue.expect(slot)
        self.possible = advance(self.possible, step)
        self.events.append(FORWARDED[step])
        return slot

    def send_internal(self, step: Verb) -> None:
        """A command of smtpguard's own (an RSET): its reply is consumed."""
        self.to_upstream += step.value.encode("ascii") + b"\r\n"
        self.queue.expect(Slot(step, step, internal=True))
        self.possible = advance(self.possible, step)

    # ------------------------------------------------------ the state

    def replied(self, step: Verb, reply_class: int) -> None:
        """The upstream answered ``step``: the state moves."""
        self.state = transition(self.state, step, reply_class)

    def recompute(self) -> None:
        """The possible states, from the state and the replies in flight."""
        possible = only(self.state)
        for slot in self.queue.inflight:
            possible = advance(possible, slot.step)
        self.possible = possible

    def apply_locally(self, verb: Verb) -> None:
        """A local 2xx that moves the state as the upstream's would."""
        self.state = transition(self.state, verb, 2)
        self.recompute()

    def reported_phase(self) -> Phase:
        """The phase to report a violation in: with replies in flight, the
        phase the upstream will be in."""
        if self.state in self.possible:
            return self.state.phase
        return min((s.phase for s in self.possible), key=lambda p: p.value)

    # ------------------------------------------------------ the message

    def new_transaction(self) -> Transaction:
        """MAIL is going out: a new transaction replaces the last one."""
        if self.txn.content_bytes:
            # BDAT content of an abandoned transaction (RSET/EHLO ended it).
            self.abandon_message()
        self.txn = Transaction()
        return self.txn

    def abandon_message(self) -> None:
        """The message under way will never be complete."""
        self.events.append(MessageDone(MessageOutcome.ABORTED, self.txn.content_bytes))
