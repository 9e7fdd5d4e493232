"""The sans-I/O session: client bytes and upstream bytes in, decisions out.

Theory of operation
-------------------

The I/O layer feeds bytes with :meth:`Session.receive_client` and
:meth:`Session.receive_upstream` (and reports EOFs and timeouts), then takes
the bytes to write with :meth:`Session.take_client_bytes` and
:meth:`Session.take_upstream_bytes`, and the metric events with
:meth:`Session.take_events`.  When :attr:`Session.closed` is true it writes
what is left and closes both sides.

Every client command gets exactly one reply, in command order (RFC 2920).
``_slots`` is the queue of replies owed to the client; a slot is filled
either at once (a local reply) or when the upstream answers (a forwarded
command; those slots are also in ``_inflight``).  Replies leave only from
the head of the queue, so local 503s interleave with upstream replies in
the right places.

The state moves only on the upstream's replies (see :mod:`.rules`).  To
decide a new command while replies are still in flight, the session
computes every state those replies could lead to (``_possible``).  If the
command is permitted in all of them it is forwarded at once; if in none, it
gets a local 503; if the answer depends on a reply still in flight (RCPT
after a pipelined MAIL) the command is held, and no further client bytes
are read, until that reply arrives.  So the upstream never receives a
command that is out of sequence given the replies it has sent.

The same holds for framing: after DATA or AUTH is forwarded, the next bytes
are a body or a SASL line only if the reply says so, so they wait for it.
A DATA body streams straight through: the session only looks for
``<CRLF>.<CRLF>`` across chunk boundaries and never parses body lines.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from . import ehlo, greeting
from . import policy as P
from . import replies as R
from .body import BodyFilter
from .framing import ReplyParser, UpstreamProtocolError, UpstreamReply
from .policy import Defence, Policy
from .rules import (
    EXTENSION_OF,
    HOLD,
    LOCAL_ONLY,
    RSET_ENDS,
    VERB_BY_NAME,
    Framing,
    Phase,
    State,
    Verb,
    advance,
    framing_of,
    only,
    transition,
    verdict,
)


@dataclass(frozen=True, slots=True)
class SessionOptions:
    """What the core needs to know from the configuration."""

    hostname: str = "smtpguard"
    #: Answer HELP locally with 214 instead of forwarding it.
    help_local: bool = False
    help_text: tuple[str, ...] = ("smtpguard SMTP proxy",)
    help_topics: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    #: Advertise PIPELINING to clients even if the upstream does not.
    offer_pipelining: bool = True
    #: Pipeline commands to the upstream when it advertises PIPELINING;
    #: False feeds it one command at a time.
    upstream_pipelining: bool = True
    #: Relay BDAT (RFC 3030); False removes CHUNKING from EHLO.
    chunking: bool = True
    #: Extra EHLO keywords to remove (upper case).
    discard_keywords: frozenset[str] = frozenset()
    #: Longest command line, CRLF included (RFC 5321 4.5.3.1.4).
    max_line_bytes: int = 512
    #: Longest AUTH line or SASL response (RFC 4954 4: 12288).
    max_sasl_line_bytes: int = 12288
    #: Most replies owed to the client before we stop reading from it.
    max_pipelined_commands: int = 100
    #: Prepend a header recording the session's violations to each message:
    #: "off", "always" or "violations" (only when there were some).
    annotate: str = "off"
    annotate_header: str = "X-SMTPGuard"
    #: Protection policies: actions per defence and limits.
    policy: Policy = field(default_factory=Policy)
    #: smtpguard terminates STARTTLS itself (a certificate is configured).
    tls_offered: bool = False
    #: The session is encrypted from the start (implicit TLS listener).
    implicit_tls: bool = False
    #: Postfix's smtpd_tls_auth_only: no AUTH on a plaintext session.
    auth_require_tls: bool = True
    #: Per-client rates (clientrates.py): asked before a MAIL ("message") or
    #: a RCPT ("recipient") goes out; False answers it 450 4.7.1 locally.
    admit: Callable[[str], bool] | None = None
    #: Deferred upstream connect: smtpguard's own greeting (a whole reply,
    #: ``220 ...\r\n``), sent by :meth:`Session.greet`; the upstream's is
    #: then consumed.  None: the upstream's greeting is relayed.
    local_greeting: bytes | None = None


# Events for the metrics and logs layer.  Small tuples: they are made on
# every command.
class Violation(NamedTuple):
    verb: Verb
    phase: Phase
    expected: str
    action: str = "reject"  #: what was done: observe, reject or disconnect


class LocalReply(NamedTuple):
    verb: Verb
    code: int


class Forwarded(NamedTuple):
    step: Verb  #: the verb, or DATA_END / BDAT_LAST / AUTH_RESPONSE


class UpstreamReplied(NamedTuple):
    step: Verb  #: the verb, or GREETING / DATA_END / BDAT_LAST / AUTH_RESPONSE
    code: int


class MessageDone(NamedTuple):
    outcome: str  #: "accepted", "rejected" or "aborted"
    size_bytes: int


class PolicyAction(NamedTuple):
    defence: Defence
    action: str  #: what was done: observe, reject, disconnect or normalize
    detail: str  #: for the log line (never client data)


#: The per-command events are immutable: made once, shared (no allocation
#: per command).
_FORWARDED = {verb: Forwarded(verb) for verb in Verb}
_REPLIED: dict[tuple[Verb, int], UpstreamReplied] = {}


def _replied(step: Verb, code: int) -> UpstreamReplied:
    key = (step, code)
    event = _REPLIED.get(key)
    if event is None:  # at most one per step and reply code (200-599)
        event = _REPLIED[key] = UpstreamReplied(step, code)
    return event


Event = Violation | LocalReply | Forwarded | UpstreamReplied | MessageDone | PolicyAction


#: A local reply, rendered when it is sent: whether enhanced status codes
#: apply is known only once the replies before it (EHLO's) have arrived.
Render = Callable[[bool], bytes]


class _Slot:
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
        #: in line): its reply is consumed, never relayed.
        self.internal = internal


class Session:
    """One proxied SMTP session, without I/O."""

    # Slots: one Session per connection, so its size is per-connection memory.
    __slots__ = (
        "_annotated",
        "_bdat_forward",
        "_bdat_remaining",
        "_bdat_tail",
        "_body",
        "_body_open",
        "_body_reported",
        "_caps",
        "_client_buf",
        "_client_done",
        "_client_pipelining",
        "_discarding_long_line",
        "_early_reported",
        "_enhanced",
        "_errors",
        "_events",
        "_final",
        "_held",
        "_inflight",
        "_last_chunk",
        "_line_bytes",
        "_message_bytes",
        "_parser",
        "_possible",
        "_rcpts",
        "_refusal",
        "_reidentify",
        "_replies_queued",
        "_size_reported",
        "_slots",
        "_sync_reported",
        "_text_line_reported",
        "_tls_pending",
        "_to_client",
        "_to_upstream",
        "_unknown",
        "_upstream_ehlo",
        "_greeted",
        "_judged",
        "upstream_banner",
        "_upstream_pipelining",
        "_upstream_replies",
        "_violation_count",
        "_violation_kinds",
        "close_reason",
        "options",
        "state",
    )

    def __init__(self, options: SessionOptions | None = None) -> None:
        self.options = options or SessionOptions()
        self.state = State(Phase.GREETING, tls=self.options.implicit_tls)
        self._client_buf = bytearray()
        self._to_client = bytearray()
        self._to_upstream = bytearray()
        self._events: list[Event] = []
        self._parser = ReplyParser()
        local = self.options.local_greeting is not None
        first = _Slot(Verb.GREETING, Verb.GREETING, internal=local)
        self._slots: deque[_Slot] = deque() if local else deque([first])
        self._inflight: deque[_Slot] = deque([first])
        #: smtpguard's own greeting is out (deferred connect).
        self._greeted = False
        #: The client's first line has been judged (deferred connect).
        self._judged = False
        #: The upstream's refusing greeting (554), for the client's first command.
        self._refusal: bytes | None = None
        #: The text of the upstream's 2xx greeting, once seen (deferred connect:
        #: the I/O layer greets the next clients with it).
        self.upstream_banner: bytes | None = None
        self._possible: frozenset[State] = frozenset()
        self._recompute_possible()
        self._held: tuple[Verb, bytes] | None = None
        self._discarding_long_line = False
        self._body: BodyFilter | None = None
        self._body_reported: set[str] = set()
        self._message_bytes = 0
        self._bdat_remaining = 0
        self._bdat_forward = False
        self._enhanced = False
        self._upstream_pipelining = False
        self._body_open = False
        self._replies_queued = 0
        self._upstream_replies = 0
        self._violation_count = 0
        self._violation_kinds: set[str] = set()  # "VERB@phase", at most 32 kinds
        self._annotated = False  # the current transaction's header is out
        self._client_done = False
        #: Set when a policy ends the session: the reply to send once every
        #: owed reply is out (None: none), and the close reason.
        self._final: tuple[R.Reply | None, str] | None = None
        self._client_pipelining = False  # PIPELINING offered in our EHLO reply
        self._caps = ehlo.NO_EXTENSIONS  # what the upstream and the client were offered
        #: The upstream's last EHLO reply lines (for the EHLO after STARTTLS).
        self._upstream_ehlo: Sequence[bytes] | None = None
        #: STARTTLS ended the client's EHLO state but not the upstream's: its
        #: next EHLO/HELO is answered from the upstream's capabilities.
        self._reidentify = False
        #: The BDAT LAST chunk still being streamed (its slot gets the size).
        self._last_chunk: _Slot | None = None
        self._rcpts = 0  # RCPTs forwarded in this transaction
        self._unknown = 0
        self._errors = 0
        self._early_reported = False
        self._sync_reported: _Slot | None = None
        self._tls_pending = False  # STARTTLS answered: waiting for the handshake
        self._size_reported = False  # the size limit was reported for this message
        self._line_bytes = 0  # length of the DATA text line in progress
        self._text_line_reported = False
        self._bdat_tail = b""
        #: Why the session ended, once it has: "quit", "client_closed",
        #: "client_timeout", "upstream_closed", "upstream_timeout",
        #: "upstream_error", "upstream_refused", "shutdown".
        self.close_reason: str | None = None

    # ------------------------------------------------------------ outputs

    def take_client_bytes(self) -> bytes:
        """Bytes to write to the client, in order; empties the buffer."""
        data = bytes(self._to_client)
        self._to_client.clear()
        return data

    def take_upstream_bytes(self) -> bytes:
        """Bytes to write to the upstream, in order; empties the buffer."""
        data = bytes(self._to_upstream)
        self._to_upstream.clear()
        return data

    @property
    def has_client_bytes(self) -> bool:
        return bool(self._to_client)

    @property
    def has_upstream_bytes(self) -> bool:
        return bool(self._to_upstream)

    def take_events(self) -> list[Event]:
        """Events since the last call (for metrics and logs)."""
        events = self._events
        self._events = []
        return events

    @property
    def closed(self) -> bool:
        """True once the session is over: flush the client bytes, then close."""
        return self.close_reason is not None

    @property
    def awaiting_upstream(self) -> bool:
        """True while the upstream owes a reply."""
        return bool(self._inflight)

    @property
    def head_step(self) -> Verb | None:
        """The step whose reply the upstream owes first (for its timeout)."""
        return self._inflight[0].step if self._inflight else None

    @property
    def in_body(self) -> bool:
        """True while client bytes are message content (DATA body or BDAT chunk)."""
        return self._bdat_remaining > 0 or self._body_open

    @property
    def in_transaction_content(self) -> bool:
        """True while a message's content has started but not ended."""
        if self.in_body:
            return True
        if self.state.phase is not Phase.BDAT:
            return False
        # BDAT ... LAST fully sent: the message is complete, only its reply is due.
        return not any(slot.step is Verb.BDAT_LAST for slot in self._inflight)

    @property
    def wants_client_bytes(self) -> bool:
        """False when the buffered client bytes are enough: stop reading (backpressure)."""
        return not self.closed and len(self._client_buf) < 65536

    @property
    def upstream_replies(self) -> int:
        """How many replies the upstream has sent (a progress counter)."""
        return self._upstream_replies

    @property
    def violations(self) -> int:
        """Sequence violations so far (for the penalty box)."""
        return self._violation_count

    @property
    def commands_seen(self) -> int:
        """How many replies the client has been sent or is owed (a progress counter)."""
        return self._replies_queued

    # ------------------------------------------------------------- inputs

    def receive_client(self, data: bytes | bytearray) -> None:
        """Bytes from the client."""
        if self.closed or self._client_done:
            return
        if self._tls_pending:
            self._injection("plaintext after STARTTLS, before the TLS handshake")
            return
        if self.state.phase is Phase.GREETING:
            if self._greeted:
                # Deferred connect: the first command decides whether the
                # upstream is needed at all.
                self._client_buf += data
                self._judge_first_line()
                return
            if not self._early_talk():
                return
        if (
            self._slots
            and not (self._bdat_remaining or self._body_open)  # content, not commands
            and self._sent_ahead(data)
            and self.options.policy.pipelining != "observe"
        ):
            # Bytes that arrived too early: answer what is owed, then end.
            self._end_after_replies(P.SYNC_ERROR)
            return
        self._client_buf += data
        self._process_client()
        self._maybe_finish()

    def receive_upstream(self, data: bytes | bytearray) -> None:
        """Bytes from the upstream."""
        if self.closed:
            return
        try:
            replies = self._parser.feed(data)
        except UpstreamProtocolError:
            self._fail(R.UPSTREAM_LOST, "upstream_error")
            return
        for reply in replies:
            self._on_upstream_reply(reply)
            if self.closed:
                return
        self._flush_replies()
        self._process_client()
        self._maybe_finish()

    def client_eof(self) -> None:
        """The client closed its side (or vanished)."""
        if self.closed:
            return
        if self.in_transaction_content:
            # Never complete a message the client did not finish: the I/O
            # layer closes the upstream without sending anything more.
            self._events.append(MessageDone("aborted", self._message_bytes))
            self._to_upstream.clear()
            self.close_reason = "client_closed"
            return
        # A client may half-close after its last command (printf ... | nc -N):
        # answer what it sent, as Postfix does, then close.
        self._client_done = True
        self._maybe_finish()

    # ------------------------------------------------- deferred connect

    def greet(self) -> None:
        """Deferred connect: send smtpguard's own greeting now (after any
        greet_wait: bytes before it are early talk)."""
        assert self.options.local_greeting is not None and not self._greeted
        if self.closed:
            return
        self._greeted = True
        self._events.append(LocalReply(Verb.GREETING, 220))
        self._queue(_Slot(Verb.GREETING, Verb.GREETING, self.options.local_greeting))
        self._judge_first_line()

    @property
    def wants_upstream(self) -> bool:
        """Deferred connect: the client sent a command the upstream must answer
        (or, with ``non_smtp: observe``, anything that is a whole line)."""
        if self.closed or not self._greeted or self.state.phase is not Phase.GREETING:
            return False
        limit = max(self.options.max_line_bytes, self.options.max_sasl_line_bytes)
        first = greeting.judge(self._client_buf, limit)
        return first is not greeting.FirstLine.INCOMPLETE and first is not greeting.FirstLine.QUIT

    def _judge_first_line(self) -> None:
        """Non-SMTP clients and QUIT are settled before any upstream exists
        (once: later bytes wait in the buffer for the upstream)."""
        if self._judged:
            return
        limit = max(self.options.max_line_bytes, self.options.max_sasl_line_bytes)
        first = greeting.judge(self._client_buf, limit)
        if first is not greeting.FirstLine.INCOMPLETE:
            self._judged = True
        if first is greeting.FirstLine.QUIT:
            self._client_buf.clear()
            self._local(Verb.QUIT, R.BYE)
            self.close_reason = "quit"
        elif first is greeting.FirstLine.TLS:
            self._non_smtp("TLS handshake on a plaintext port")
        elif first is greeting.FirstLine.HTTP:
            self._non_smtp("HTTP request or header line as a command")

    def _upstream_greeted(self, reply: UpstreamReply) -> None:
        """The upstream's own greeting, after smtpguard's (deferred connect)."""
        cls = reply.reply_class
        if cls == 2:
            self.upstream_banner = reply.lines[0][4:].rstrip(b"\r\n")
        elif reply.code == 421 or cls == 4:
            self._to_client += reply.raw  # closing: say why, as the upstream would
            self.close_reason = "upstream_closed"
        else:
            # 554 (RFC 5321 3.1): the client's first command gets the refusal;
            # then only QUIT, as if it had seen the 554 itself.
            self._refusal = reply.raw

    def _maybe_finish(self) -> None:
        # An internal reply still owed (deferred connect: the upstream's
        # greeting) comes before anything buffered is answered.
        if self._slots or self._inflight or self._held is not None or self.closed:
            return
        if self._final is not None:
            reply, reason = self._final
            if reply is not None:
                self._to_client += reply.render(True, hostname=self.options.hostname)
                self._events.append(LocalReply(Verb.UNKNOWN, reply.code))
            if self.in_transaction_content:
                self.abort(reason)
            else:
                self.close_reason = reason
        elif self._client_done:
            self.abort("client_closed")

    def upstream_eof(self) -> None:
        """The upstream closed its side."""
        if self.closed:
            return
        if self.state.phase is Phase.CLOSED:
            self.close_reason = "quit"
            return
        self._fail(R.UPSTREAM_LOST, "upstream_closed")

    def abort(self, reason: str) -> None:
        """Close at once (the client is gone or stuck): nothing more is sent upstream."""
        if self.closed:
            return
        if self.in_transaction_content:
            self._events.append(MessageDone("aborted", self._message_bytes))
        self._to_upstream.clear()
        self.close_reason = reason

    def _end_after_replies(self, reply: R.Reply | None, reason: str = "policy") -> None:
        """Stop reading the client; once owed replies are out, send ``reply`` and close."""
        self._client_done = True
        self._held = None  # the final reply (a 421) answers it (RFC 5321 3.8)
        self._client_buf.clear()
        if self._final is None:
            self._final = (reply, reason)
        self._maybe_finish()

    def _policy(self, defence: Defence, action: str, detail: str) -> None:
        self._events.append(PolicyAction(defence, action, detail))

    def _limit_action(self, defence: Defence, detail: str) -> bool:
        """Report a limit; True if it is enforced (not observe mode)."""
        observe = self.options.policy.observe_limits
        self._policy(defence, "observe" if observe else "reject", detail)
        return not observe

    def _early_talk(self) -> bool:
        """Bytes before the greeting; False if they must be dropped."""
        action = self.options.policy.early_talk
        if not self._early_reported:
            self._early_reported = True
            self._policy(Defence.EARLY_TALK, action, "client talked before the greeting")
        if action == "disconnect":
            self._fail(P.EARLY_TALKER, "policy")
            return False
        return action == "observe"

    @property
    def tls_pending(self) -> bool:
        """STARTTLS was answered with 220: the I/O layer must now run the handshake."""
        return self._tls_pending

    def tls_started(self) -> None:
        """The TLS handshake with the client completed; read commands again."""
        self._tls_pending = False

    def _injection(self, detail: str) -> None:
        self._policy(Defence.STARTTLS_INJECTION, "reject", detail)

    def refuse(self, reply: R.Reply) -> None:
        """Turn the client away before any upstream exists (limits): ``reply`` and close."""
        self._fail(reply, "policy")

    def upstream_busy(self) -> None:
        """No upstream slot came free in time (upstream_limits): 421 and close."""
        self._fail(R.UPSTREAM_BUSY, "upstream_busy")

    def upstream_refused(self) -> None:
        """The upstream could not be reached: 421 and close."""
        self._fail(R.UPSTREAM_UNAVAILABLE, "upstream_refused")

    def client_timeout(self) -> None:
        """The client sent no complete command in time."""
        self._fail(R.CLIENT_TIMEOUT, "client_timeout")

    def upstream_timeout(self) -> None:
        """The upstream did not answer in time."""
        self._fail(R.UPSTREAM_TIMEOUT, "upstream_timeout")

    def shutdown(self) -> None:
        """The service is stopping: 421 and close."""
        self._fail(R.SHUTTING_DOWN, "shutdown")

    # ----------------------------------------------------------- internals

    def _fail(self, reply: R.Reply, reason: str) -> None:
        """Send the replies already known, then ``reply``, then close."""
        if self.closed:
            return
        self._flush_replies()
        if self.in_transaction_content:
            self._events.append(MessageDone("aborted", self._message_bytes))
        if not self._tls_pending:
            # 421s carry their enhanced code even before EHLO, as Postfix's do.
            self._to_client += reply.render(True, hostname=self.options.hostname)
            self._events.append(LocalReply(Verb.UNKNOWN, reply.code))
        # else: after "220 Ready to start TLS" the client reads TLS records:
        # a plaintext reply would be garbage to it; the session just closes.
        self._to_upstream.clear()
        self.close_reason = reason

    def _flush_replies(self) -> None:
        slots = self._slots
        while slots:
            reply = slots[0].reply
            if reply is None:
                return
            slots.popleft()
            self._to_client += reply if isinstance(reply, bytes) else reply(self._enhanced)

    def _recompute_possible(self) -> None:
        possible = only(self.state)
        for slot in self._inflight:
            possible = advance(possible, slot.step)
        self._possible = possible

    def _on_upstream_reply(self, reply: UpstreamReply) -> None:
        if not self._inflight:
            if reply.code == 421:  # e.g. the upstream's own idle timeout
                self._flush_replies()
                if self.in_transaction_content:
                    self._events.append(MessageDone("aborted", self._message_bytes))
                self._to_upstream.clear()
                if not self._tls_pending:  # no plaintext into a TLS handshake
                    self._to_client += reply.raw
                self.close_reason = "upstream_closed"
            else:
                self._fail(R.UPSTREAM_LOST, "upstream_error")
            return
        slot = self._inflight[0]
        step = slot.step
        cls = reply.reply_class
        if step is Verb.GREETING and cls == 3:
            # RFC 5321 4.3.2: a greeting is 220, 554 or 421.
            self._fail(R.UPSTREAM_LOST, "upstream_error")
            return
        self._inflight.popleft()
        self.state = transition(self.state, step, cls)
        self._upstream_replies += 1
        if slot.internal:
            self._recompute_possible()
            if step is Verb.GREETING:
                self._events.append(_replied(step, reply.code))
                self._upstream_greeted(reply)
            elif cls != 2:
                # The upstream refused to end its transaction: it and the
                # client no longer agree on the session, so it ends here.
                self._fail(R.UPSTREAM_LOST, "upstream_error")
            return
        self._events.append(_replied(step, reply.code))
        if cls >= 4 and reply.code != 421:
            self._count_error()
        data = reply.raw
        if step is Verb.EHLO and cls == 2:
            self._upstream_ehlo = reply.lines
            data = self._learn_capabilities(reply.lines)
        elif cls == 2 and step is Verb.HELO:
            # No ESMTP after HELO.
            self._upstream_ehlo = None
            self._set_capabilities(ehlo.NO_EXTENSIONS)
        elif step is Verb.DATA_END or step is Verb.BDAT_LAST:
            outcome = "accepted" if cls == 2 else "rejected"
            size = slot.size
            if slot is self._last_chunk:  # answered before the chunk was all sent
                size, self._message_bytes, self._last_chunk = self._message_bytes, 0, None
            self._events.append(MessageDone(outcome, size))
        if self.state.phase is Phase.DATA:
            self._body_open = True
            self._line_bytes = 0
            self._text_line_reported = False
            self._body = BodyFilter(self.options.policy.smuggling)
            self._body_reported = set()
            # Nothing was sent after DATA (it waits for this 354), so the
            # header goes first in the body.
            self._to_upstream += self._annotation()
        slot.reply = data
        self._recompute_possible()
        if reply.code == 421 or self.state.phase is Phase.CLOSED:
            self._flush_replies()
            self.close_reason = "quit" if step is Verb.QUIT else "upstream_closed"

    def _learn_capabilities(self, lines: Sequence[bytes]) -> bytes:
        """The client's EHLO reply, from the upstream's (see :mod:`.ehlo`)."""
        data, caps = ehlo.rewrite(lines, self.options, self.state.tls)
        self._set_capabilities(caps)
        return data

    def _set_capabilities(self, caps: ehlo.Capabilities) -> None:
        self._caps = caps
        self._enhanced = caps.enhanced
        self._upstream_pipelining = caps.upstream_pipelining
        self._client_pipelining = caps.client_pipelining

    # --------------------------------------------------- client processing

    def _framing(self) -> Framing | None:
        """How to read the next client bytes, or None if a reply must come first."""
        if self.state.phase is Phase.GREETING:
            return None  # no early talking to the upstream
        return framing_of(self._possible)

    def _process_client(self) -> None:
        buf = self._client_buf
        while not self.closed and self._final is None and not self._tls_pending:
            if self._held is not None:
                if not self._decide(*self._held):
                    return
                self._held = None
                continue
            if self._bdat_remaining:
                if not buf:
                    if self._client_done:
                        self.abort("client_closed")  # the chunk can never complete
                    return
                self._consume_bdat()
                continue
            if not buf:
                return
            framing = self._framing()
            if framing is None or framing is Framing.NONE:
                return
            if framing is Framing.BODY:
                if not self._consume_body():
                    return
                continue
            if len(self._slots) >= self.options.max_pipelined_commands:
                return  # backpressure: wait for replies to drain
            limit = (
                self.options.max_sasl_line_bytes
                if framing is Framing.SASL
                else max(self.options.max_line_bytes, self.options.max_sasl_line_bytes)
            )
            if framing is Framing.COMMAND and buf.startswith(P.TLS_HANDSHAKE_PREFIX):
                if self._non_smtp("TLS handshake on a plaintext port"):
                    return
            taken = self._take_line(limit, framing is Framing.SASL)
            if taken is None:
                return
            line, bare = taken
            if framing is Framing.SASL:
                if b"\r" in line or b"\0" in line:
                    line = self._bare_sasl(line)
                self._forward(Verb.AUTH, Verb.AUTH_RESPONSE, line)
                continue
            if (bare or b"\r" in line) and not self._bare_command(line, bare):
                continue
            if self._slots and not self._in_sync(line):
                continue
            self._command(line)

    def _take_line(self, limit: int, sasl: bool = False) -> tuple[bytes, bool] | None:
        """The next complete line without its line ending, and whether it ended
        in a bare LF; None if there is none.

        Over-long lines are answered with 500 and dropped here, so memory
        stays bounded by ``limit`` whatever the client sends.
        """
        buf = self._client_buf
        while True:
            end = buf.find(b"\n")
            if end < 0:
                if len(buf) >= limit or self._discarding_long_line:
                    buf.clear()
                    self._discarding_long_line = True
                return None
            if end >= limit or self._discarding_long_line:
                del buf[: end + 1]
                self._discarding_long_line = False
                if sasl:
                    # The upstream waits for a SASL response: cancel the
                    # exchange (RFC 4954 4) and relay its 501.
                    self._forward(Verb.AUTH, Verb.AUTH_RESPONSE, b"*")
                    return None
                self._local(Verb.UNKNOWN, R.LINE_TOO_LONG)
                continue
            line = bytes(buf[:end])
            del buf[: end + 1]
            if line.endswith(b"\r"):
                return line[:-1], False
            return line, True

    def _bare_command(self, line: bytes, bare_lf: bool) -> bool:
        """A command line with a bare CR or LF; True if it may go on."""
        action = self.options.policy.smuggling
        detail = "bare <LF> ends a command" if bare_lf else "bare <CR> in a command"
        self._policy(Defence.SMUGGLING, action if action != "normalize" else "normalize", detail)
        if action == "observe" or (action == "normalize" and b"\r" not in line):
            return True  # sent on with CRLF: one command for every reader
        self._local(Verb.UNKNOWN, P.BARE_NEWLINE_COMMAND)
        return False

    def _bare_sasl(self, line: bytes) -> bytes:
        """A SASL response with a bare CR or a NUL (never in base64): what to
        send instead.  An upstream that ends lines at a bare CR would read a
        second line, unchecked, as a command: unless the policy only
        observes, the exchange is cancelled (RFC 4954 4) and its 501 relayed."""
        action = self.options.policy.smuggling
        detail = "bare <CR> or NUL in an AUTH response"
        self._policy(Defence.SMUGGLING, "observe" if action == "observe" else "reject", detail)
        return line if action == "observe" else b"*"

    def _sent_ahead(self, data: bytes | bytearray) -> bool:
        """RFC 2920 3.1: are ``data`` sent before a reply they had to wait for?

        Checked when bytes arrive (a later packet) and when a line is parsed
        (the same packet); one violation is reported once per owed reply.
        """
        if data[:4].upper() == b"QUIT":
            return False  # tolerated after anything (common client behaviour)
        blocker = None
        for slot in self._slots:
            if slot.step is Verb.GREETING:
                continue
            if not self._client_pipelining or slot.step.value in P.GROUP_ENDERS:
                blocker = slot
                break
        if blocker is None:
            return False
        if self._sync_reported is not blocker:
            self._sync_reported = blocker
            action = self.options.policy.pipelining
            self._policy(Defence.PIPELINING, action, "command sent before the reply it depends on")
        return True

    def _in_sync(self, line: bytes) -> bool:
        """A parsed line: False if the pipelining policy refuses it."""
        if not self._sent_ahead(line):
            return True
        action = self.options.policy.pipelining
        if action == "observe":
            return True
        self._local(Verb.UNKNOWN, P.SYNC_ERROR)
        if action == "disconnect":
            self._end_after_replies(None)
        return False

    def _non_smtp(self, detail: str) -> bool:
        """Not an SMTP client; True if the session ends here."""
        action = self.options.policy.non_smtp
        self._policy(Defence.NON_SMTP, action, detail)
        if action != "disconnect":
            return False
        if detail.startswith("TLS"):
            self.abort("policy")  # a text reply means nothing to a TLS client
        else:
            self._fail(P.NON_SMTP_COMMAND, "policy")
        return True

    def _count_error(self) -> None:
        """Postfix's hard error limit: too many error replies end the session."""
        self._errors += 1
        limit = self.options.policy.hard_error_limit
        if self._errors == limit and self._limit_action(Defence.ERROR_LIMIT, "error replies"):
            self._end_after_replies(P.TOO_MANY_ERRORS)

    def _command(self, line: bytes) -> None:
        word = line.split(b" ", 1)[0].upper()
        verb = VERB_BY_NAME.get(word, Verb.UNKNOWN)
        if verb is not Verb.AUTH and len(line) + 2 > self.options.max_line_bytes:
            # Service extensions raise the limit (RFC 5321 4.5.3.1.4).
            limit = self._caps.line_limits.get(verb, self.options.max_line_bytes)
            if len(line) + 2 > limit:
                self._local(verb, R.LINE_TOO_LONG)
                return
        if b"\0" in line:
            self._local(verb, R.BAD_SYNTAX)
            return
        if verb is Verb.UNKNOWN:
            if (word in P.NON_SMTP_WORDS or word.endswith(b":")) and self._non_smtp(
                "HTTP request or header line as a command"
            ):
                return
            self._unknown += 1
        if not self._decide(verb, line):
            self._held = (verb, line)
        if verb is Verb.UNKNOWN and self._unknown == self.options.policy.max_unknown_commands + 1:
            if self._limit_action(Defence.UNKNOWN_COMMANDS, "unknown commands"):
                self._end_after_replies(P.TOO_MANY_ERRORS)

    def _decide(self, verb: Verb, line: bytes) -> bool:
        """Answer, forward or reject ``line``; False means hold it for a reply."""
        if self._refusal is not None and verb is not Verb.QUIT:
            # The upstream refused the session (554): this first command hears it.
            refusal, self._refusal = self._refusal, None
            self._queue(_Slot(verb, verb, refusal))  # counted as the upstream's greeting
            return True
        if verb in LOCAL_ONLY:
            self._local(verb, R.UNKNOWN_COMMAND)
            return True
        expected = verdict(self._possible, verb)
        if expected is HOLD:
            return False  # depends on a reply still in flight
        if verb is Verb.BDAT:
            return self._bdat(line, expected)
        if expected is None and verb in EXTENSION_OF and not self._offered(verb):
            self._local(verb, R.AUTH_NOT_ENABLED if verb is Verb.AUTH else R.NOT_IMPLEMENTED)
            return True
        if self._reidentify and (verb is Verb.EHLO or verb is Verb.HELO):
            return self._identify_locally(verb)
        local_answer = (verb is Verb.HELP and self.options.help_local) or verb is Verb.STARTTLS
        if expected is not None:
            action = self.options.policy.sequence
            # STARTTLS is never forwarded, so there is nothing to observe:
            # answering it (and starting TLS mid-transaction) would be worse.
            if action != "observe" or verb is Verb.STARTTLS:
                action = "reject" if action == "observe" else action
                self._violation(verb, expected, action=action)
                if action == "disconnect":
                    self._end_after_replies(None)
                return True
        if not local_answer and self._inflight and not self._upstream_pipelining:
            return False  # the upstream takes one command at a time (decided, and reported, later)
        if expected is not None:
            self._violation(verb, expected, local=False, action="observe")
        elif verb is Verb.MAIL and not self._mail_size_ok(line):
            return True
        elif verb is Verb.RCPT and self._rcpts >= self.options.policy.max_recipients:
            if self._limit_action(Defence.RECIPIENTS, "recipients in one transaction"):
                self._local(verb, P.TOO_MANY_RECIPIENTS)
                return True
        if verb is Verb.HELP and self.options.help_local:
            self._help(line)
            return True
        if verb is Verb.STARTTLS:
            return self._starttls()
        if verb is Verb.AUTH and self.options.auth_require_tls and not self.state.tls:
            self._local(verb, R.AUTH_NEEDS_TLS)
            return True
        if verb is Verb.MAIL or verb is Verb.RCPT:
            admit = self.options.admit
            if admit is not None and not admit("message" if verb is Verb.MAIL else "recipient"):
                self._local(verb, P.TOO_MUCH_MAIL if verb is Verb.MAIL else P.RCPT_RATE)
                return True
        if verb is Verb.MAIL:
            self._new_transaction()
        elif verb is Verb.RCPT:
            self._rcpts += 1
        self._forward(verb, verb, line)
        return True

    def _offered(self, verb: Verb) -> bool:
        """Did the upstream advertise ``verb``'s extension, and the client see it?

        An extension smtpguard hid for policy (AUTH before TLS) still counts
        as offered: that refusal has its own reply."""
        keyword = EXTENSION_OF[verb]
        caps = self._caps
        if keyword not in caps.upstream:
            return False
        if keyword in caps.offered:
            return True
        opts = self.options
        return (
            verb is Verb.AUTH
            and opts.auth_require_tls
            and not self.state.tls
            and "AUTH" not in opts.discard_keywords
        )

    def _identify_locally(self, verb: Verb) -> bool:
        """EHLO/HELO after STARTTLS: the client must greet again (RFC 3207 4.2),
        but the upstream, which never saw STARTTLS, has its greeting already
        and may refuse a second one (OpenSMTPD: "503 5.5.1 Already
        identified").  Answer from the upstream's own EHLO reply; its session
        is outside any transaction, as the client's now is."""
        if self._inflight:
            return False
        assert self._upstream_ehlo is not None
        self._reidentify = False
        if verb is Verb.EHLO:
            data = self._learn_capabilities(self._upstream_ehlo)
        else:
            self._set_capabilities(ehlo.NO_EXTENSIONS)
            words = self._upstream_ehlo[0][4:].split(None, 1)
            name = words[0] if words else self.options.hostname.encode()
            data = b"250 " + name + b"\r\n"
        self.state = transition(self.state, verb, 2)
        self._recompute_possible()
        self._events.append(LocalReply(verb, 250))
        self._queue(_Slot(verb, verb, data))
        return True

    def _end_upstream_transaction(self) -> None:
        """The client's transaction failed on a reply of ours (a BDAT refused
        locally, RFC 3030 2): end the upstream's too, with an RSET whose reply
        is consumed, so that both agree that no transaction is open."""
        if not any(s.phase in RSET_ENDS for s in self._possible):
            return
        self._to_upstream += b"RSET\r\n"
        self._inflight.append(_Slot(Verb.RSET, Verb.RSET, internal=True))
        self._possible = advance(self._possible, Verb.RSET)

    def _new_transaction(self) -> None:
        """MAIL is going out: per-message state starts afresh."""
        if self._message_bytes:
            # BDAT content of an abandoned transaction (RSET/EHLO ended it).
            self._events.append(MessageDone("aborted", self._message_bytes))
        self._annotated = False
        self._rcpts = 0
        self._size_reported = False
        self._message_bytes = 0
        self._bdat_tail = b""

    def _starttls(self) -> bool:
        """STARTTLS is smtpguard's own (RFC 3207); False: hold until replies are in."""
        if self.state.tls:
            self._local(Verb.STARTTLS, R.TLS_ALREADY_ACTIVE)
            return True
        if not self.options.tls_offered:
            self._local(Verb.STARTTLS, R.STARTTLS_UNAVAILABLE)
            return True
        if self._inflight:
            return False
        if self._client_buf:
            # Commands pipelined behind STARTTLS in plaintext would run as if
            # they came over TLS (CVE-2011-0411): drop them.
            self._injection("plaintext pipelined after STARTTLS")
            self._client_buf.clear()
        self._local(Verb.STARTTLS, R.STARTTLS_READY)
        # RFC 3207 4.2: forget what the client said before; a new EHLO is due.
        # The upstream's own session is untouched (it never sees STARTTLS).
        self._reidentify = self._upstream_ehlo is not None
        self.state = transition(self.state, Verb.STARTTLS, 2)
        self._recompute_possible()
        self._caps = self._caps._replace(offered=frozenset(), line_limits={})
        self._enhanced = False
        self._client_pipelining = False
        self._tls_pending = True
        return True

    def _mail_size_ok(self, line: bytes) -> bool:
        """MAIL ... SIZE=n above our limit gets 552 (RFC 1870)."""
        limit = self.options.policy.max_message_bytes
        if not limit:
            return True
        for param in line.upper().split()[2:] if b"SIZE=" in line.upper() else ():
            if param.startswith(b"SIZE=") and param[5:].isdigit() and int(param[5:]) > limit:
                if self._limit_action(Defence.MESSAGE_SIZE, "declared SIZE above the limit"):
                    self._local(Verb.MAIL, P.MESSAGE_TOO_BIG)
                    return False
        return True

    def _violation(
        self, verb: Verb, expected: str, local: bool = True, action: str = "reject"
    ) -> None:
        """Report ``verb`` out of sequence (one event, logged once) and, if
        ``local``, answer it with 503."""
        # With replies in flight, report the phase the upstream will be in.
        if self.state in self._possible:
            phase = self.state.phase
        else:
            phase = min((s.phase for s in self._possible), key=lambda p: p.value)
        self._events.append(Violation(verb, phase, expected, action))
        self._policy(Defence.SEQUENCE, action, expected)
        self._violation_count += 1
        if len(self._violation_kinds) < 32:
            self._violation_kinds.add(f"{verb.value}@{phase.value}")
        if local:
            self._local(verb, R.BAD_SEQUENCE, expected=expected)

    def _local(self, verb: Verb, reply: R.Reply, **fields: str) -> None:
        self._events.append(LocalReply(verb, reply.code))
        self._queue(_Slot(verb, verb, lambda enhanced: reply.render(enhanced, **fields)))
        if reply.code >= 400 and reply.code != 421:
            self._count_error()

    def _queue(self, slot: _Slot) -> None:
        self._replies_queued += 1
        self._slots.append(slot)
        if slot.reply is not None and len(self._slots) == 1:
            self._flush_replies()

    def _forward(self, verb: Verb, step: Verb, line: bytes) -> None:
        self._to_upstream += line + b"\r\n"
        slot = _Slot(verb, step)
        self._queue(slot)
        self._inflight.append(slot)
        self._possible = advance(self._possible, step)
        self._events.append(_FORWARDED[step])

    def _help(self, line: bytes) -> None:
        opts = self.options
        parts = line.split(None, 1)
        topic = parts[1].strip().upper().decode("ascii", "replace") if len(parts) > 1 else ""
        text = opts.help_topics.get(topic, opts.help_text) if topic else opts.help_text

        def render(enhanced: bool) -> bytes:
            code = "214-2.0.0 " if enhanced else "214-"
            out = "".join(f"{code}{t}\r\n" for t in text)
            out += "214 2.0.0 End of HELP info\r\n" if enhanced else "214 End of HELP info\r\n"
            return out.encode()

        self._events.append(LocalReply(Verb.HELP, 214))
        self._queue(_Slot(Verb.HELP, Verb.HELP, render))

    def _bdat(self, line: bytes, expected: str | None) -> bool:
        parts = line.split()
        size_ok = len(parts) in (2, 3) and parts[1].isdigit() and len(parts[1]) <= 12
        last = len(parts) == 3 and parts[2].upper() == b"LAST"
        if not size_ok or (len(parts) == 3 and not last):
            # The chunk's length is unknown, so nothing after this line can be
            # framed (read as commands, chunk bytes would run as commands):
            # 521 and hang up, as Postfix does.
            self._local(Verb.BDAT, R.BAD_BDAT)
            self._end_after_replies(None, "policy")
            return True
        size = int(parts[1])
        if expected is None and not self._offered(Verb.BDAT):
            # CHUNKING was not offered (the upstream lacks it, or it is
            # switched off): never forward BDAT, whose chunk such an upstream
            # would read as commands.  The chunk is framed all the same.
            if self._inflight and not self._upstream_pipelining:
                return False  # the RSET that may follow waits its turn
            self._refuse_chunk(size, last)
            self._local(Verb.BDAT, R.NOT_IMPLEMENTED)
            return True
        if expected is not None and self.options.policy.sequence != "observe":
            action = self.options.policy.sequence
            if self._inflight and not self._upstream_pipelining:
                return False  # the RSET that may follow waits its turn
            self._refuse_chunk(size, last)
            self._violation(Verb.BDAT, expected, action=action)
            if action == "disconnect":
                self._end_after_replies(None)
            return True
        if self._inflight and not self._upstream_pipelining:
            return False
        if self._client_done and len(self._client_buf) < size:
            # The client is gone and this chunk can never complete: never start it.
            self._flush_replies()
            self.abort("client_closed")
            return True
        if expected is not None:
            self._violation(Verb.BDAT, expected, local=False, action="observe")
        self._bdat_remaining, self._bdat_forward = size, True
        header = self._annotation()
        if header:
            # The header is part of the first chunk: announce its size too.
            line = b"BDAT %d" % (size + len(header)) + (b" LAST" if last else b"")
        self._forward(Verb.BDAT, Verb.BDAT_LAST if last else Verb.BDAT, line)
        if last:
            self._last_chunk = self._inflight[-1]
        self._to_upstream += header
        return True

    def _refuse_chunk(self, size: int, last: bool) -> None:
        """A BDAT answered locally: its chunk is read and dropped, and the
        transaction fails (RFC 3030 2) on the upstream too."""
        self._bdat_remaining, self._bdat_forward = size, False
        self._end_upstream_transaction()

    def _annotation(self) -> bytes:
        """The header to prepend to this transaction's message, once (or b"")."""
        mode = self.options.annotate
        if self._annotated or mode == "off" or (mode == "violations" and not self._violation_count):
            return b""
        self._annotated = True
        text = f"{self.options.annotate_header}: {self.options.hostname}; "
        text += f"violations={self._violation_count}"
        if self._violation_kinds:
            kinds = sorted(self._violation_kinds)
            text += "; kinds=" + ",".join(kinds[:20])
        return text.encode("ascii", "replace") + b"\r\n"

    def _consume_bdat(self) -> None:
        buf = self._client_buf
        n = min(self._bdat_remaining, len(buf))
        if self._bdat_forward:
            chunk = bytes(buf[:n])
            # BDAT frames by size, so a bare CR/LF cannot end it here; it is
            # still reported (and rejected if configured) for upstreams that
            # rewrite line endings.  Chunk sizes are the client's: no rewrite.
            joined = self._bdat_tail + chunk
            crlf = joined.count(b"\r\n")
            if joined.count(b"\n") != crlf or joined.rstrip(b"\r").count(b"\r") != crlf:
                if self._smuggling_found({"bare_lf_or_cr"}):
                    return
            # Only a CR may pair with the next piece's LF.
            self._bdat_tail = b"\r" if chunk.endswith(b"\r") else b""
            self._to_upstream += chunk
            self._message_bytes += n
            if not self._size_ok():
                return
        del buf[:n]
        self._bdat_remaining -= n
        if not self._bdat_remaining and self._last_chunk is not None:
            # The message is complete: its size goes with the reply it awaits.
            self._last_chunk.size = self._message_bytes
            self._message_bytes = 0
            self._last_chunk = None

    def _size_ok(self) -> bool:
        limit = self.options.policy.max_message_bytes
        if limit and self._message_bytes > limit and not self._size_reported:
            self._size_reported = True  # observe mode: report once per message
            if self._limit_action(Defence.MESSAGE_SIZE, "message above the limit"):
                self._fail(P.MESSAGE_TOO_BIG, "policy")
                return False
        return True

    def _smuggling_found(self, findings: set[str]) -> bool:
        """Report new findings; True if the session ends (reject)."""
        action = self.options.policy.smuggling
        new = findings - self._body_reported
        for finding in sorted(new):
            self._policy(Defence.SMUGGLING, action, finding)
        self._body_reported |= new
        if action == "reject":
            # The message cannot be completed upstream any more: refuse it
            # and drop the upstream connection without a final dot.
            self._fail(P.BARE_NEWLINE, "policy")
            return True
        return False

    def _lines_ok(self, out: bytes) -> bool:
        """Text line length in DATA (only when configured: it costs a split per chunk)."""
        limit = self.options.policy.max_text_line_bytes
        last = out.rfind(b"\n")
        if last < 0:
            self._line_bytes += len(out)
            longest = self._line_bytes
        else:
            lines = out.split(b"\n")
            longest = max(
                [self._line_bytes + len(lines[0]) + 1, *(len(x) + 1 for x in lines[1:-1])]
            )
            self._line_bytes = len(lines[-1])
        if longest <= limit or self._text_line_reported:
            return True
        self._text_line_reported = True
        if self._limit_action(Defence.TEXT_LINE_LENGTH, "text line above the limit"):
            self._fail(P.TEXT_LINE_TOO_LONG, "policy")
            return False
        return True

    def _consume_body(self) -> bool:
        """Stream DATA body bytes; True once the final dot has been passed on."""
        buf = self._client_buf
        assert self._body is not None
        out, used, ended = self._body.feed(buf)
        if self._body.findings - self._body_reported and self._smuggling_found(self._body.findings):
            return False
        if self.options.policy.max_text_line_bytes and not self._lines_ok(out):
            return False
        self._to_upstream += out
        self._message_bytes += used
        del buf[:used]
        if not self._size_ok():
            return False
        if not ended:
            return False
        self._body = None
        self._body_open = False
        self._events.append(_FORWARDED[Verb.DATA_END])
        slot = _Slot(Verb.DATA, Verb.DATA_END)
        # The next MAIL may follow before the reply (RFC 2920 4): the size
        # goes with the slot, not with the session.
        slot.size = self._message_bytes
        self._message_bytes = 0
        self._replies_queued += 1
        self._slots.append(slot)
        self._inflight.append(slot)
        self._recompute_possible()
        return True
