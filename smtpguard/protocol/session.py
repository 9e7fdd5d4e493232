"""The sans-I/O session: client bytes and upstream bytes in, decisions out.

Theory of operation
-------------------

The I/O layer feeds bytes with :meth:`Session.receive_client` and
:meth:`Session.receive_upstream` (and reports EOFs and timeouts), then takes
the bytes to write with :meth:`Session.take_client_bytes` and
:meth:`Session.take_upstream_bytes`, and the metric events with
:meth:`Session.take_events`.  When :attr:`Session.closed` is true it writes
what is left and closes both sides.

The session is a coordinator; each concern is a part of its own, pure and
tested alone:

- :mod:`.rules`: the whole command order, as data;
- :mod:`.queue`: the replies owed to the client, in command order, and the
  command held for a reply in flight;
- :mod:`.transaction`: one message's state, replaced at each MAIL;
- :mod:`.ehlo`: the client's EHLO reply from the upstream's;
- :mod:`.lines`: command and SASL lines from the client's bytes;
- :mod:`.content`: the DATA body and BDAT chunk readers, side by side (on
  :mod:`.body` and :mod:`.bdat`, which also decides a BDAT command);
- :mod:`.defences`: the policy's decisions and the session's counters;
- :mod:`.limits`: the limits and rates on MAIL and RCPT;
- :mod:`.upstream`: what each upstream reply is, and what it teaches;
- :mod:`.local`: the local answers beyond a fixed reply (HELP, EHLO/HELO
  after STARTTLS);
- :mod:`.greeting`: deferred connect: the client's first line, the upstream's
  greeting.

The state moves only on the upstream's replies.  To decide a new command
while replies are still in flight, the session computes every state those
replies could lead to (``_possible``).  If the command is permitted in all
of them it is forwarded at once; if in none, it gets a local 503; if the
answer depends on a reply still in flight (RCPT after a pipelined MAIL) the
command is held, and no further client bytes are read, until that reply
arrives.  So the upstream never receives a command that is out of sequence
given the replies it has sent.  The same holds for framing: after DATA or
AUTH is forwarded, the next bytes are a body or a SASL line only if the
reply says so, so they wait for it.  A DATA body streams straight through.
"""

from __future__ import annotations

from collections.abc import Sequence

from . import bdat, ehlo, greeting, local, upstream
from . import policy as P
from . import replies as R
from .arguments import ArgumentGuard, parameters
from .content import END, MORE, BodyReader, ChunkReader, annotation
from .defences import Defences
from .events import (
    FORWARDED,
    CloseReason,
    Event,
    Forwarded,
    LocalReply,
    MessageDone,
    MessageOutcome,
    Normalized,
    PolicyAction,
    SyntaxFinding,
    UpstreamReplied,
    Violation,
    replied,
)
from .framing import ReplyParser, UpstreamProtocolError, UpstreamReply
from .limits import rate_refusal
from .limits import refusal as limit_refusal
from .lines import TOO_LONG, LineReader
from .options import SessionOptions
from .policy import Action, Defence
from .queue import Render, ReplyQueue, Slot
from .rules import (
    EXTENSION_OF,
    FRAMING,
    HOLD,
    LOCAL_ANSWERS,
    LOCAL_ONLY,
    VERB_BY_NAME,
    Answer,
    Facts,
    Framing,
    Phase,
    State,
    Verb,
    advance,
    first_word,
    framing_of,
    local_answer,
    must_end_transaction,
    only,
    permitted,
    transition,
    verdict,
)
from .syntax import SHAPE_OF
from .transaction import Transaction

__all__ = [
    "CloseReason",
    "Event",
    "Forwarded",
    "LocalReply",
    "MessageDone",
    "Normalized",
    "PolicyAction",
    "SyntaxFinding",
    "Render",
    "Session",
    "SessionOptions",
    "UpstreamReplied",
    "Violation",
]

_OBSERVE, _REJECT, _DISCONNECT = Action.OBSERVE, Action.REJECT, Action.DISCONNECT
#: Verbs the fast path forwards when in sequence (the others may have a
#: local answer: see rules.LOCAL_ANSWERS; EHLO/HELO only without one).
_FAST_VERBS = frozenset(
    {
        Verb.EHLO,
        Verb.HELO,
        Verb.MAIL,
        Verb.RCPT,
        Verb.DATA,
        Verb.RSET,
        Verb.NOOP,
        Verb.QUIT,
        Verb.VRFY,
        Verb.EXPN,
    }
)
_ABORTED = MessageOutcome.ABORTED
_RELAY, _INTERNAL, _UNSOLICITED = upstream.RELAY, upstream.INTERNAL, upstream.UNSOLICITED
_C = CloseReason


class Session:
    """One proxied SMTP session, without I/O."""

    # Slots: one Session per connection, so its size is per-connection memory.
    __slots__ = (
        "_body",
        "_caps",
        "_chunk",
        "_client_buf",
        "_client_done",
        "_defences",
        "_events",
        "_final",
        "_deferred",
        "_lines",
        "_parser",
        "_possible",
        "_queue",
        "_reidentify",
        "_tls_pending",
        "_to_client",
        "_to_upstream",
        "_txn",
        "_syntax",
        "_upstream_ehlo",
        "_upstream_replies",
        "close_reason",
        "options",
        "state",
    )

    def __init__(self, options: SessionOptions | None = None) -> None:
        self.options = opts = options or SessionOptions()
        self.state = State(Phase.GREETING, tls=opts.implicit_tls)
        self._client_buf = bytearray()
        self._to_client = bytearray()
        self._to_upstream = bytearray()
        self._events: list[Event] = []
        self._parser = ReplyParser()
        self._queue = ReplyQueue()
        # The upstream's greeting: relayed, or (deferred connect) consumed.
        first = Slot(Verb.GREETING, Verb.GREETING, internal=opts.local_greeting is not None)
        if not first.internal:
            self._queue.owed.append(first)
        self._queue.inflight.append(first)
        self._deferred = greeting.Deferred()  # (deferred connect)
        self._possible = advance(only(self.state), Verb.GREETING)
        self._lines = LineReader(self._client_buf)
        self._body: BodyReader | None = None  # the DATA body being read
        self._chunk: ChunkReader | None = None  # the BDAT chunk being read
        self._txn = Transaction()
        self._upstream_replies = 0
        self._defences = Defences(opts.policy, self._events)
        self._syntax = ArgumentGuard(opts.policy.syntax, self._events)
        self._client_done = False
        #: Set when a policy ends the session: the reply to send once every
        #: owed reply is out (None: none), and the close reason.
        self._final: tuple[R.Reply | None, CloseReason] | None = None
        self._caps = ehlo.NO_EXTENSIONS
        #: The upstream's last EHLO reply lines (for the EHLO after STARTTLS).
        self._upstream_ehlo: Sequence[bytes] | None = None
        self._reidentify = False  # see rules.Condition.REIDENTIFY
        self._tls_pending = False  # STARTTLS answered: waiting for the handshake
        #: Why the session ended, once it has.
        self.close_reason: CloseReason | None = None

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
        events = self._events[:]
        self._events.clear()
        return events

    @property
    def closed(self) -> bool:
        """True once the session is over: flush the client bytes, then close."""
        return self.close_reason is not None

    @property
    def awaiting_upstream(self) -> bool:
        """True while the upstream owes a reply."""
        return bool(self._queue.inflight)

    @property
    def head_step(self) -> Verb | None:
        """The step whose reply the upstream owes first (for its timeout)."""
        inflight = self._queue.inflight
        return inflight[0].step if inflight else None

    @property
    def in_body(self) -> bool:
        """True while client bytes are message content (DATA body or BDAT chunk)."""
        return self._chunk is not None or self._body is not None

    @property
    def in_transaction_content(self) -> bool:
        """True while a message's content has started but not ended."""
        if self._chunk is not None or self._body is not None:
            return True
        # BDAT ... LAST fully sent: the message is complete, only its reply is due.
        return self.state.phase is Phase.BDAT and not self._queue.awaits(Verb.BDAT_LAST)

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
        return self._defences.violations

    @property
    def commands_seen(self) -> int:
        """How many replies the client has been sent or is owed (a progress counter)."""
        return self._queue.queued

    @property
    def tls_pending(self) -> bool:
        """STARTTLS was answered with 220: the I/O layer must now run the handshake."""
        return self._tls_pending

    # ------------------------------------------------------------- inputs

    def receive_client(self, data: bytes | bytearray) -> None:
        """Bytes from the client."""
        if self._ready_for_fast_path() and self._fast_command(data):
            return
        if self.close_reason is not None or self._client_done:
            return
        if self._tls_pending:
            self._injection("plaintext after STARTTLS, before the TLS handshake")
            return
        if self.state.phase is Phase.GREETING:
            if self._deferred.greeted:
                # Deferred connect: the first command decides whether the
                # upstream is needed at all.
                self._client_buf += data
                self._judge_first_line()
                return
            if not self._early_talk():
                return
        if (
            self._queue.owed
            and self._chunk is None
            and self._body is None
            and self._sent_ahead(data)
            and self.options.policy.pipelining is not _OBSERVE
        ):
            # Bytes that arrived too early: answer what is owed, then end.
            self._end_after_replies(P.SYNC_ERROR)
            return
        self._client_buf += data
        self._process_client()
        self._maybe_finish()

    def receive_upstream(self, data: bytes | bytearray) -> None:
        """Bytes from the upstream."""
        if self.close_reason is not None:
            return
        try:
            replies = self._parser.feed(data)
        except UpstreamProtocolError:
            self._fail(R.UPSTREAM_LOST, _C.UPSTREAM_ERROR)
            return
        for reply in replies:
            self._on_upstream_reply(reply)
            if self.close_reason is not None:
                return
        self._flush()
        if self._client_buf or self._queue.held is not None or self._chunk is not None:
            self._process_client()  # (nothing to do for it otherwise)
        self._maybe_finish()

    def client_eof(self) -> None:
        """The client closed its side (or vanished)."""
        if self.closed:
            return
        if self.in_transaction_content:
            # Never complete a message the client did not finish: the I/O
            # layer closes the upstream without sending anything more.
            self._events.append(MessageDone(_ABORTED, self._txn.content_bytes))
            self._to_upstream.clear()
            self.close_reason = _C.CLIENT_CLOSED
            return
        # A client may half-close after its last command (printf ... | nc -N):
        # answer what it sent, as Postfix does, then close.
        self._client_done = True
        self._maybe_finish()

    def tls_started(self) -> None:
        """The TLS handshake with the client completed; read commands again."""
        self._tls_pending = False

    def abort(self, reason: str) -> None:
        """Close at once (the client is gone or stuck): nothing more is sent upstream."""
        if self.closed:
            return
        if self.in_transaction_content:
            self._events.append(MessageDone(_ABORTED, self._txn.content_bytes))
        self._to_upstream.clear()
        self.close_reason = CloseReason(reason)

    def upstream_eof(self) -> None:
        """The upstream closed its side."""
        if self.closed:
            return
        if self.state.phase is Phase.CLOSED:
            self.close_reason = _C.QUIT
            return
        self._fail(R.UPSTREAM_LOST, _C.UPSTREAM_CLOSED)

    def refuse(self, reply: R.Reply) -> None:
        """Turn the client away before any upstream exists (limits): ``reply`` and close."""
        self._fail(reply, _C.POLICY)

    def upstream_busy(self) -> None:
        """No upstream slot came free in time (upstream_limits): 421 and close."""
        self._fail(R.UPSTREAM_BUSY, _C.UPSTREAM_BUSY)

    def upstream_refused(self) -> None:
        """The upstream could not be reached: 421 and close."""
        self._fail(R.UPSTREAM_UNAVAILABLE, _C.UPSTREAM_REFUSED)

    def client_timeout(self) -> None:
        """The client sent no complete command in time."""
        self._fail(R.CLIENT_TIMEOUT, _C.CLIENT_TIMEOUT)

    def upstream_timeout(self) -> None:
        """The upstream did not answer in time."""
        self._fail(R.UPSTREAM_TIMEOUT, _C.UPSTREAM_TIMEOUT)

    def shutdown(self) -> None:
        """The service is stopping: 421 and close."""
        self._fail(R.SHUTTING_DOWN, _C.SHUTDOWN)

    # ------------------------------------------------- deferred connect

    def greet(self) -> None:
        """Deferred connect: send smtpguard's own greeting now (after any
        greet_wait: bytes before it are early talk)."""
        assert self.options.local_greeting is not None and not self._deferred.greeted
        if self.closed:
            return
        self._deferred.greeted = True
        self._events.append(LocalReply(Verb.GREETING, 220))
        self._push(Slot(Verb.GREETING, Verb.GREETING, self.options.local_greeting))
        self._judge_first_line()

    @property
    def wants_upstream(self) -> bool:
        """Deferred connect: the client sent a command the upstream must answer
        (or, with ``non_smtp: observe``, anything that is a whole line)."""
        if self.closed or not self._deferred.greeted or self.state.phase is not Phase.GREETING:
            return False
        return greeting.wants_upstream(self._client_buf, self.options.command_line_limit)

    @property
    def upstream_banner(self) -> bytes | None:
        """Deferred connect: the text of the upstream's 2xx greeting, once
        seen (the I/O layer greets the next clients with it)."""
        return self._deferred.banner

    def _judge_first_line(self) -> None:
        """Non-SMTP clients and QUIT are settled before any upstream exists."""
        first = self._deferred.judge_once(self._client_buf, self.options.command_line_limit)
        if first is greeting.FirstLine.QUIT:
            self._client_buf.clear()
            self._local(Verb.QUIT, R.BYE)
            self.close_reason = _C.QUIT
        elif first is greeting.FirstLine.TLS:
            self._non_smtp("TLS handshake on a plaintext port")
        elif first is greeting.FirstLine.HTTP:
            self._non_smtp("HTTP request or header line as a command")

    # ---------------------------------------------------------- endings

    def _maybe_finish(self) -> None:
        queue = self._queue
        # An internal reply still owed (deferred connect: the upstream's
        # greeting) comes before anything buffered is answered.
        if queue.owed or queue.inflight or queue.held is not None or self.closed:
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
            self.abort(_C.CLIENT_CLOSED)

    def _end_after_replies(self, reply: R.Reply | None, reason: CloseReason = _C.POLICY) -> None:
        """Stop reading the client; once owed replies are out, send ``reply`` and close."""
        self._client_done = True
        self._queue.held = None  # the final reply (a 421) answers it (RFC 5321 3.8)
        self._client_buf.clear()
        if self._final is None:
            self._final = (reply, reason)
        self._maybe_finish()

    def _fail(self, reply: R.Reply, reason: CloseReason) -> None:
        """Send the replies already known, then ``reply``, then close."""
        if self.closed:
            return
        self._flush()
        if self.in_transaction_content:
            self._events.append(MessageDone(_ABORTED, self._txn.content_bytes))
        if not self._tls_pending:
            # 421s carry their enhanced code even before EHLO, as Postfix's do.
            self._to_client += reply.render(True, hostname=self.options.hostname)
            self._events.append(LocalReply(Verb.UNKNOWN, reply.code))
        # else: after "220 Ready to start TLS" the client reads TLS records:
        # a plaintext reply would be garbage to it; the session just closes.
        self._to_upstream.clear()
        self.close_reason = reason

    # --------------------------------------------------- upstream replies

    def _flush(self) -> None:
        self._queue.flush(self._to_client, self._caps.enhanced)

    def _recompute_possible(self) -> None:
        possible = only(self.state)
        for slot in self._queue.inflight:
            possible = advance(possible, slot.step)
        self._possible = possible

    def _on_upstream_reply(self, reply: UpstreamReply) -> None:
        inflight = self._queue.inflight
        how = upstream.disposition(inflight[0] if inflight else None, reply.code)
        if how is not _RELAY and how is not _INTERNAL:
            if how is _UNSOLICITED:
                self._unsolicited(reply)
            else:
                self._fail(R.UPSTREAM_LOST, _C.UPSTREAM_ERROR)
            return
        slot = inflight.popleft()
        step = slot.step
        cls = reply.code // 100
        self.state = transition(self.state, step, cls)
        self._upstream_replies += 1
        if how is _INTERNAL:
            self._internal_reply(slot, reply)
            return
        self._events.append(replied(step, reply.code))
        if cls >= 4 and reply.code != 421:
            self._count_error()
        slot.reply = self._relayed(slot, reply)
        if self.state.phase is Phase.DATA:
            self._body = BodyReader(self._defences, self._txn)
            # Nothing was sent after DATA (it waits for this 354), so the
            # header goes first in the body.
            self._to_upstream += self._annotation()
        self._recompute_possible()
        if reply.code == 421 or self.state.phase is Phase.CLOSED:
            self._flush()
            self.close_reason = _C.QUIT if step is Verb.QUIT else _C.UPSTREAM_CLOSED

    def _unsolicited(self, reply: UpstreamReply) -> None:
        """A 421 nobody asked for: relayed, and the session closes."""
        self._flush()
        if self.in_transaction_content:
            self._events.append(MessageDone(_ABORTED, self._txn.content_bytes))
        self._to_upstream.clear()
        if not self._tls_pending:  # no plaintext into a TLS handshake
            self._to_client += reply.raw
        self.close_reason = _C.UPSTREAM_CLOSED

    def _internal_reply(self, slot: Slot, reply: UpstreamReply) -> None:
        self._recompute_possible()
        if slot.step is Verb.GREETING:
            self._events.append(replied(Verb.GREETING, reply.code))
        outcome = upstream.internal(slot.step, reply, self._deferred)
        if outcome is upstream.Internal.CLOSE:
            self._to_client += reply.raw  # closing: say why, as the upstream would
            self.close_reason = _C.UPSTREAM_CLOSED
        elif outcome is upstream.Internal.BROKEN:
            self._fail(R.UPSTREAM_LOST, _C.UPSTREAM_ERROR)

    def _relayed(self, slot: Slot, reply: UpstreamReply) -> bytes:
        """What the client gets for ``reply`` (the EHLO reply is rewritten)."""
        step = slot.step
        if step is Verb.EHLO or step is Verb.HELO:
            learnt = upstream.identified(step, reply, self.options, self.state.tls)
            if learnt is not None:
                # The upstream's EHLO reply answers the EHLO after STARTTLS.
                self._upstream_ehlo = reply.lines if step is Verb.EHLO else None
                self._use(learnt[1])
                return learnt[0]
        elif step is Verb.DATA_END or step is Verb.BDAT_LAST:
            self._events.append(upstream.message_done(slot, reply.code, self._txn))
        return reply.raw

    def _use(self, caps: ehlo.Capabilities) -> None:
        """What the client was shown (and may use) from now on."""
        self._caps = caps
        self._syntax.capabilities(caps)

    # --------------------------------------------------- client framing

    def _process_client(self) -> None:
        while self.close_reason is None and self._final is None and not self._tls_pending:
            if not self._step_client():
                return

    def _step_client(self) -> bool:
        """Take one decision from the client's bytes; False: wait for more input."""
        queue = self._queue
        if queue.held is not None:
            if not self._decide(*queue.held):
                return False
            queue.held = None
            return True
        if self._chunk is not None:
            if self._client_buf:
                self._consume_chunk(self._chunk)
                return True
            if self._client_done:
                self.abort(_C.CLIENT_CLOSED)  # the chunk can never complete
            return False
        if not self._client_buf or self.state.phase is Phase.GREETING:
            return False  # (no early talking to the upstream)
        framing = framing_of(self._possible)
        if framing is Framing.BODY:
            return self._consume_body()
        if framing is Framing.COMMAND or framing is Framing.SASL:
            return self._read_line(framing is Framing.SASL)
        return False  # depends on a reply in flight, or nothing is read

    def _read_line(self, sasl: bool) -> bool:
        opts = self.options
        if len(self._queue.owed) >= opts.max_pipelined_commands:
            return False  # backpressure: wait for replies to drain
        if (
            not sasl
            and self._client_buf.startswith(P.TLS_HANDSHAKE_PREFIX)
            and self._non_smtp("TLS handshake on a plaintext port")
        ):
            return False
        taken = self._take_line(opts.max_sasl_line_bytes if sasl else opts.command_line_limit, sasl)
        if taken is None:
            return False
        line, bare = taken
        if sasl:
            if (b"\r" in line or b"\0" in line) and not self._defences.bare_sasl():
                line = b"*"  # cancel the exchange (RFC 4954 4) and relay its 501
            self._forward(Verb.AUTH, Verb.AUTH_RESPONSE, line)
        elif (bare or b"\r" in line) and not self._defences.bare_command(bare, b"\r" in line):
            self._local(Verb.UNKNOWN, P.BARE_NEWLINE_COMMAND)
        elif not self._queue.owed or self._in_sync(line):
            self._command(line)
        return True

    def _take_line(self, limit: int, sasl: bool) -> tuple[bytes, bool] | None:
        """The next complete line (see :class:`.lines.LineReader`); None if
        there is none.  Over-long lines are answered with 500 and dropped."""
        while True:
            taken = self._lines.take(limit)
            if taken is not TOO_LONG:
                return taken
            if sasl:
                # The upstream waits for a SASL response: cancel the
                # exchange (RFC 4954 4) and relay its 501.
                self._forward(Verb.AUTH, Verb.AUTH_RESPONSE, b"*")
                return None
            self._local(Verb.UNKNOWN, R.LINE_TOO_LONG)

    # -------------------------------------------------------- fast path
    #
    # A client whose command arrives alone, in sequence, with nothing owed
    # (the common case: a client that waits for each reply) is forwarded
    # here without the general machinery: no line buffer, no set algebra,
    # no policy calls.  Anything unusual (a violation, a local answer, a
    # limit, a bare CR) returns False and takes the full path, which
    # decides it from the start.

    def _ready_for_fast_path(self) -> bool:
        queue = self._queue
        return not (
            queue.owed
            or queue.inflight
            or self._client_buf
            or self._chunk is not None
            or self._body is not None
            or self.close_reason is not None
            or self._client_done
            or self._tls_pending
            or self._final is not None
            or self._lines.discarding
            or self._deferred.refusal is not None
        )

    def _fast_command(self, data: bytes | bytearray) -> bool:
        """A whole command line alone in ``data``, in sequence: passed on
        without the line buffer and the rule look-ups (False: take the full path)."""
        found = self._fast_line(data)
        if found is None:
            return False
        verb, line = found
        return self._pass_on(verb, line, None)

    def _fast_line(self, data: bytes | bytearray) -> tuple[Verb, bytes] | None:
        """``data``'s command if the fast path may take it."""
        end = len(data) - 2
        if end < 4 or end + 2 > self.options.max_line_bytes or data[end:] != b"\r\n":
            return None
        line = bytes(data[:end])
        if b"\r" in line or b"\n" in line or b"\0" in line:
            return None
        verb = VERB_BY_NAME.get(first_word(line))
        if verb is None or verb not in _FAST_VERBS or (verb in LOCAL_ANSWERS and self._reidentify):
            return None
        state = self.state
        if FRAMING[state.phase] is not Framing.COMMAND or permitted(state, verb) is not None:
            return None
        if verb in self.options.policy.refused_verbs:
            return None
        return verb, line

    # --------------------------------------------------------- commands

    def _command(self, line: bytes) -> None:
        word = first_word(line)
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
        if word in self.options.policy.refused_commands:
            self._refused_command(verb, word)
            return
        if verb is Verb.UNKNOWN:
            if (word in P.NON_SMTP_WORDS or word.endswith(b":")) and self._non_smtp(
                "HTTP request or header line as a command"
            ):
                return
            self._defences.unknown_command()
        if not self._decide(verb, line):
            self._queue.held = (verb, line)
        if verb is Verb.UNKNOWN and self._defences.too_many_unknown():
            self._end_after_replies(P.TOO_MANY_ERRORS)

    def _refused_command(self, verb: Verb, word: bytes) -> None:
        """``commands.refuse``: answered 502 5.5.1 locally, in any state."""
        self._events.append(PolicyAction(Defence.REFUSED_COMMAND, Action.REJECT, "refused verb"))
        self._local(verb, P.COMMAND_DISABLED, verb=word.decode("ascii", "replace"))

    def _decide(self, verb: Verb, line: bytes) -> bool:
        """Answer, forward or reject ``line``; False means hold it for a reply."""
        if self._deferred.refusal is not None and verb is not Verb.QUIT:
            # The upstream refused the session (554): this first command hears
            # it (counted as the upstream's greeting).
            self._push(Slot(verb, verb, self._deferred.take_refusal()))
            return True
        if verb in LOCAL_ONLY:
            self._local(verb, R.UNKNOWN_COMMAND)
            return True
        expected = verdict(self._possible, verb)
        if expected is HOLD:
            return False  # depends on a reply still in flight
        if verb is Verb.BDAT:
            return self._bdat(line, expected)
        answer = None
        if verb in LOCAL_ANSWERS:
            answer = local_answer(verb, self._facts(expected is None, verb))
        if expected is not None and not self._out_of_sequence(verb, expected):
            return True
        if answer is not None:
            if expected is not None:
                self._violation(verb, expected, _OBSERVE, local=False)
            return self._answer(verb, line, answer)
        if self._queue.inflight and not self._caps.upstream_pipelining:
            return False  # the upstream takes one command at a time (decided, and reported, later)
        return self._pass_on(verb, line, expected)

    def _pass_on(self, verb: Verb, line: bytes, observed: str | None) -> bool:
        """Judge ``line``'s argument, apply the limits and rates, and forward
        it (``observed``: it is out of sequence and the policy only observes)."""
        judged = self._syntax_checked(verb, line) if verb in SHAPE_OF else line
        if judged is None:
            return True  # refused
        if observed is not None:
            self._violation(verb, observed, _OBSERVE, local=False)
        if verb is Verb.MAIL or verb is Verb.RCPT:
            refused = None
            if observed is None:  # (the upstream answers what is only observed)
                refused = limit_refusal(
                    verb, judged, self._txn.rcpts, self._caps.upstream, self._defences
                )
            if refused is None:
                refused = rate_refusal(verb, self.options.admit)
            if refused is not None:
                self._local(verb, refused)
                return True
        if verb is Verb.MAIL:
            self._new_transaction(judged)
        elif verb is Verb.RCPT:
            self._txn.rcpts += 1
        self._forward(verb, verb, self._syntax.outgoing(verb, line, judged))
        return True

    def _syntax_checked(self, verb: Verb, line: bytes) -> bytes | None:
        """The line to forward for ``line`` after the syntax guard (None: it
        was refused locally)."""
        guard = self._syntax
        verdict = guard.judge(verb, line, self._txn.smtputf8)
        if verdict.forward is None:
            assert verdict.reply is not None
            self._local(verb, verdict.reply, **dict(verdict.reply_fields))
            return None
        return verdict.forward

    def _facts(self, in_sequence: bool, verb: Verb = Verb.UNKNOWN) -> Facts:
        """The conditions of :data:`.rules.LOCAL_ANSWERS` that hold now."""
        opts, tls = self.options, self.state.tls
        keyword = EXTENSION_OF.get(verb)
        return Facts(
            unoffered=in_sequence and keyword is not None and keyword not in self._caps.usable,
            tls_active=tls,
            no_certificate=not opts.tls_offered,
            auth_needs_tls=opts.auth_require_tls and not tls,
            reidentify=self._reidentify,
            help_local=opts.help_local,
        )

    def _out_of_sequence(self, verb: Verb, expected: str) -> bool:
        """A command out of sequence; True if the policy only observes it."""
        action = self.options.policy.sequence
        # STARTTLS is never forwarded, so there is nothing to observe:
        # answering it (and starting TLS mid-transaction) would be worse.
        if action is _OBSERVE and verb is not Verb.STARTTLS:
            return True
        action = _REJECT if action is _OBSERVE else action
        self._violation(verb, expected, action)
        if action is _DISCONNECT:
            self._end_after_replies(None)
        return False

    def _answer(self, verb: Verb, line: bytes, answer: R.Reply | Answer) -> bool:
        """Answer a command locally (see :data:`.rules.LOCAL_ANSWERS`)."""
        if isinstance(answer, R.Reply):
            self._local(verb, answer)
        elif answer is Answer.HELP:
            self._events.append(LocalReply(Verb.HELP, 214))
            self._push(Slot(Verb.HELP, Verb.HELP, local.help_reply(line, self.options)))
        elif self._queue.inflight:
            return False  # it changes the state the replies in flight apply to
        elif answer is Answer.START_TLS:
            self._start_tls()
        else:
            self._identify(verb)
        return True

    def _new_transaction(self, mail: bytes) -> None:
        """MAIL is going out: a new transaction replaces the last one."""
        if self._txn.content_bytes:
            # BDAT content of an abandoned transaction (RSET/EHLO ended it).
            self._events.append(MessageDone(_ABORTED, self._txn.content_bytes))
        self._txn = Transaction()
        self._txn.smtputf8 = b"SMTPUTF8" in mail.upper() and b"SMTPUTF8" in parameters(mail)

    def _apply_locally(self, verb: Verb) -> None:
        """A local 2xx that moves the state as the upstream's would."""
        self.state = transition(self.state, verb, 2)
        self._recompute_possible()

    def _start_tls(self) -> None:
        """STARTTLS is smtpguard's own (RFC 3207): 220, then the handshake."""
        if self._client_buf:
            # Commands pipelined behind STARTTLS in plaintext would run as if
            # they came over TLS (CVE-2011-0411): drop them.
            self._injection("plaintext pipelined after STARTTLS")
            self._client_buf.clear()
        self._local(Verb.STARTTLS, R.STARTTLS_READY)
        # The upstream's own session is untouched (it never sees STARTTLS).
        self._reidentify = self._upstream_ehlo is not None
        self._apply_locally(Verb.STARTTLS)
        self._use(ehlo.after_starttls(self._caps))
        self._tls_pending = True

    def _identify(self, verb: Verb) -> None:
        """EHLO/HELO after STARTTLS, answered from the upstream's EHLO reply."""
        assert self._upstream_ehlo is not None
        self._reidentify = False
        data, caps = local.identify(verb, self._upstream_ehlo, self.options, self.state.tls)
        self._use(caps)
        self._apply_locally(verb)
        self._events.append(LocalReply(verb, 250))
        self._push(Slot(verb, verb, data))

    # ------------------------------------------------------------- BDAT

    def _bdat(self, line: bytes, expected: str | None) -> bool:
        """Decide a BDAT line (see :func:`.bdat.decide`); False: hold it."""
        parsed = bdat.parse(line)
        answer = None
        if expected is None:
            answer = local_answer(Verb.BDAT, self._facts(True, Verb.BDAT))
        move = bdat.decide(
            parsed,
            expected,
            answer is not None,
            waits=bool(self._queue.inflight) and not self._caps.upstream_pipelining,
            observe=self.options.policy.sequence is _OBSERVE,
            client_gone=self._client_done,
            buffered=len(self._client_buf),
        )
        if move is bdat.Move.WAIT:
            return False
        if parsed is None:  # (MALFORMED)
            self._local(Verb.BDAT, R.BAD_BDAT)
            self._end_after_replies(None, _C.POLICY)
        elif move is bdat.Move.ANSWER:
            self._refuse_chunk(parsed)
            assert isinstance(answer, R.Reply)
            self._local(Verb.BDAT, answer)
        elif move is bdat.Move.OUT_OF_SEQUENCE:
            assert expected is not None
            self._refuse_chunk(parsed)
            self._out_of_sequence(Verb.BDAT, expected)
        elif move is bdat.Move.STARVED:
            self._flush()
            self.abort(_C.CLIENT_CLOSED)
        else:
            self._forward_chunk(parsed, line, expected)
        return True

    def _forward_chunk(self, parsed: bdat.Bdat, line: bytes, observed: str | None) -> None:
        """Forward a BDAT line (``observed``: out of sequence, only observed)."""
        if observed is not None:
            self._violation(Verb.BDAT, observed, _OBSERVE, local=False)
        self._chunk = self._chunk_reader(parsed.size, True)
        header = self._annotation()
        line = bdat.announced(parsed, line, header)
        self._forward(Verb.BDAT, Verb.BDAT_LAST if parsed.last else Verb.BDAT, line)
        if parsed.last:
            self._txn.last_chunk = self._queue.inflight[-1]
        self._to_upstream += header

    def _refuse_chunk(self, parsed: bdat.Bdat) -> None:
        """A BDAT answered locally: its chunk is read and dropped, and the
        transaction fails (RFC 3030 2) on the upstream too, with an RSET
        whose reply is consumed."""
        self._chunk = self._chunk_reader(parsed.size, False)
        if must_end_transaction(self._possible):
            self._to_upstream += b"RSET\r\n"
            self._queue.expect(Slot(Verb.RSET, Verb.RSET, internal=True))
            self._possible = advance(self._possible, Verb.RSET)

    def _chunk_reader(self, size: int, forward: bool) -> ChunkReader | None:
        """The reader of a chunk of ``size`` bytes (None: an empty chunk)."""
        return ChunkReader(size, forward, self._defences, self._txn) if size else None

    def _consume_chunk(self, chunk: ChunkReader) -> None:
        out, verdict = chunk.read(self._client_buf, self._caps.upstream)
        if isinstance(verdict, R.Reply):
            self._fail(verdict, _C.POLICY)
            return
        self._to_upstream += out
        if verdict is END:
            self._chunk = None

    # ------------------------------------------------------------- DATA

    def _consume_body(self) -> bool:
        """Stream DATA body bytes; True once the final dot has been passed on."""
        assert self._body is not None
        out, verdict = self._body.read(self._client_buf, self._caps.upstream)
        if isinstance(verdict, R.Reply):
            self._fail(verdict, _C.POLICY)
            return False
        self._to_upstream += out
        if verdict is MORE:
            return False
        self._body = None
        self._events.append(FORWARDED[Verb.DATA_END])
        slot, txn = Slot(Verb.DATA, Verb.DATA_END), self._txn
        # The next MAIL may follow before the reply (RFC 2920 4): the size
        # goes with the slot, not with the session.
        slot.size, txn.content_bytes = txn.content_bytes, 0
        self._queue.push(slot)
        self._queue.expect(slot)
        self._recompute_possible()
        return True

    def _annotation(self) -> bytes:
        """The header to prepend to this transaction's message, once (or b"")."""
        return annotation(self._txn, self.options, self._defences)

    # -------------------------------------------------------- defences

    def _early_talk(self) -> bool:
        """Bytes before the greeting; False if they must be dropped."""
        action = self._defences.early_talk()
        if action is _DISCONNECT:
            self._fail(P.EARLY_TALKER, _C.POLICY)
            return False
        return action is _OBSERVE

    def _injection(self, detail: str) -> None:
        self._defences.report(Defence.STARTTLS_INJECTION, _REJECT, detail)

    def _sent_ahead(self, data: bytes | bytearray) -> bool:
        """RFC 2920 3.1: are ``data`` sent before a reply they had to wait for?

        Checked when bytes arrive (a later packet) and when a line is parsed
        (the same packet); one violation is reported once per owed reply.
        """
        if data[:4].upper() == b"QUIT":
            return False  # tolerated after anything (common client behaviour)
        blocker = self._queue.blocker(self._caps.client_pipelining)
        if blocker is None:
            return False
        self._defences.sent_ahead(blocker)
        return True

    def _in_sync(self, line: bytes) -> bool:
        """A parsed line: False if the pipelining policy refuses it."""
        if not self._sent_ahead(line):
            return True
        action = self.options.policy.pipelining
        if action is _OBSERVE:
            return True
        self._local(Verb.UNKNOWN, P.SYNC_ERROR)
        if action is _DISCONNECT:
            self._end_after_replies(None)
        return False

    def _non_smtp(self, detail: str) -> bool:
        """Not an SMTP client; True if the session ends here."""
        if not self._defences.non_smtp(detail):
            return False
        if detail.startswith("TLS"):
            self.abort(_C.POLICY)  # a text reply means nothing to a TLS client
        else:
            self._fail(P.NON_SMTP_COMMAND, _C.POLICY)
        return True

    def _count_error(self) -> None:
        """Postfix's hard error limit: too many error replies end the session."""
        if self._defences.error_reply():
            self._end_after_replies(P.TOO_MANY_ERRORS)

    def _violation(self, verb: Verb, expected: str, action: Action, local: bool = True) -> None:
        """Report ``verb`` out of sequence and, if ``local``, answer it with 503."""
        # With replies in flight, report the phase the upstream will be in.
        if self.state in self._possible:
            phase = self.state.phase
        else:
            phase = min((s.phase for s in self._possible), key=lambda p: p.value)
        self._defences.violation(verb, phase, expected, action)
        if local:
            self._local(verb, R.BAD_SEQUENCE, expected=expected)

    # ---------------------------------------------------------- output

    def _local(self, verb: Verb, reply: R.Reply, /, **fields: str) -> None:
        self._events.append(LocalReply(verb, reply.code))
        self._push(Slot(verb, verb, lambda enhanced: reply.render(enhanced, **fields)))
        if reply.code >= 400 and reply.code != 421:
            self._count_error()

    def _push(self, slot: Slot) -> None:
        if self._queue.push(slot):
            self._flush()

    def _forward(self, verb: Verb, step: Verb, line: bytes) -> None:
        self._to_upstream += line + b"\r\n"
        slot = Slot(verb, step)
        self._queue.push(slot)
        self._queue.expect(slot)
        self._possible = advance(self._possible, step)
        self._events.append(FORWARDED[step])
