"""The sans-I/O session: client bytes and upstream bytes in, decisions out.

Theory of operation
-------------------

The I/O layer feeds bytes with :meth:`Session.receive_client` and
:meth:`Session.receive_upstream` (and reports EOFs and timeouts), then takes
the bytes to write (:meth:`Session.take_client_bytes`,
:meth:`Session.take_upstream_bytes`) and the events for the metrics
(:meth:`Session.take_events`).  Once :attr:`Session.closed` is true it
writes what is left and closes both sides.

The session coordinates: it frames the client's bytes (command and SASL
lines, what is no line at all) and hands each piece to the part that
decides it.  The parts act on one :class:`.exchange.Exchange` (the bytes
owed to each side, the reply queue, the state): :mod:`.commands` (a command
line), :mod:`.message` (a DATA body, a BDAT chunk), :mod:`.starttls`,
:mod:`.relay` (the upstream's replies), :mod:`.lifecycle` (how the session
ends, the error limit), :mod:`.greeting` (deferred connect),
:mod:`.arguments` (the syntax guard), :mod:`.defences` (the policy's
decisions and counters).

The state moves only on the upstream's replies.  A new command is decided
against every state the replies in flight may lead to: permitted in all,
it is forwarded at once; in none, it gets a local 503; if it depends on a
reply still in flight (RCPT after a pipelined MAIL) it is held, and no
further client bytes are read, until that reply arrives.  So the upstream
never receives a command out of sequence given the replies it has sent.
The same holds for framing: after DATA or AUTH is forwarded, the next bytes
are a body or a SASL line only if the reply says so, so they wait for it.
"""

from __future__ import annotations

from . import ehlo, greeting
from . import policy as P
from . import replies as R
from .arguments import ArgumentGuard
from .commands import Commands
from .defences import Defences
from .events import CloseReason, Event, LocalReply
from .exchange import Exchange
from .framing import ReplyParser, UpstreamProtocolError
from .lifecycle import Lifecycle
from .lines import TOO_LONG, LineReader
from .message import MessageContent
from .options import SessionOptions
from .policy import Action
from .queue import Slot
from .relay import Relay
from .rules import Framing, Phase, State, Verb, framing_of
from .starttls import StartTls

__all__ = ["Session", "SessionOptions"]

_C = CloseReason


class Session:
    """One proxied SMTP session, without I/O."""

    # Slots: one Session per connection, so its size is per-connection memory.
    __slots__ = (
        "_buf",
        "_commands",
        "_defences",
        "_deferred",
        "_ex",
        "_life",
        "_lines",
        "_message",
        "_parser",
        "_relay",
        "_syntax",
        "_tls",
        "options",
    )

    def __init__(self, options: SessionOptions | None = None) -> None:
        self.options = opts = options or SessionOptions()
        self._ex = ex = Exchange(State(Phase.GREETING, tls=opts.implicit_tls))
        self._buf = bytearray()  # the client's unread bytes
        self._parser = ReplyParser()
        # The upstream's greeting: relayed, or (deferred connect) consumed.
        first = Slot(Verb.GREETING, Verb.GREETING, internal=opts.local_greeting is not None)
        if not first.internal:
            ex.queue.owed.append(first)
        ex.queue.inflight.append(first)
        ex.recompute()
        self._lines = LineReader(self._buf)
        # The parts, each acting on the exchange (see the module docstring).
        self._deferred = deferred = greeting.Deferred()  # (deferred connect)
        self._defences = defences = Defences(opts.policy, ex.events)
        self._syntax = syntax = ArgumentGuard(opts.policy.syntax, ex.events)
        self._tls = tls = StartTls(ex, opts, defences, self._use)
        self._message = message = MessageContent(ex, opts, defences)
        self._life = life = Lifecycle(
            ex, opts, defences=defences, message=message, tls=tls, buf=self._buf
        )
        self._commands = Commands(
            ex,
            opts,
            defences=defences,
            syntax=syntax,
            deferred=deferred,
            tls=tls,
            message=message,
            life=life,
            buf=self._buf,
        )
        self._relay = Relay(
            ex, opts, deferred=deferred, tls=tls, message=message, life=life, use=self._use
        )

    # ------------------------------------------------------------ outputs

    def take_client_bytes(self) -> bytes:
        """Bytes to write to the client, in order; empties the buffer."""
        return self._ex.take_client()

    def take_upstream_bytes(self) -> bytes:
        """Bytes to write to the upstream, in order; empties the buffer."""
        return self._ex.take_upstream()

    @property
    def has_client_bytes(self) -> bool:
        return bool(self._ex.to_client)

    @property
    def has_upstream_bytes(self) -> bool:
        return bool(self._ex.to_upstream)

    def take_events(self) -> list[Event]:
        """Events since the last call (for metrics and logs)."""
        return self._ex.take_events()

    @property
    def state(self) -> State:
        """The state the upstream's replies so far have brought."""
        return self._ex.state

    @property
    def close_reason(self) -> CloseReason | None:
        """Why the session ended, once it has."""
        return self._life.close_reason

    @property
    def closed(self) -> bool:
        """True once the session is over: flush the client bytes, then close."""
        return self._life.close_reason is not None

    @property
    def awaiting_upstream(self) -> bool:
        """True while the upstream owes a reply."""
        return bool(self._ex.queue.inflight)

    @property
    def head_step(self) -> Verb | None:
        """The step whose reply the upstream owes first (for its timeout)."""
        inflight = self._ex.queue.inflight
        return inflight[0].step if inflight else None

    @property
    def in_body(self) -> bool:
        """True while client bytes are message content (DATA body or BDAT chunk)."""
        return self._message.reading

    @property
    def in_transaction_content(self) -> bool:
        """True while a message's content has started but not ended."""
        return self._message.under_way

    @property
    def wants_client_bytes(self) -> bool:
        """False when the buffered client bytes are enough: stop reading (backpressure)."""
        return not self.closed and len(self._buf) < 65536

    @property
    def upstream_replies(self) -> int:
        """How many replies the upstream has sent (a progress counter)."""
        return self._relay.replies

    @property
    def violations(self) -> int:
        """Sequence violations so far (for the penalty box)."""
        return self._defences.violations

    @property
    def commands_seen(self) -> int:
        """How many replies the client has been sent or is owed (a progress counter)."""
        return self._ex.queue.queued

    @property
    def tls_pending(self) -> bool:
        """STARTTLS was answered with 220: the I/O layer must now run the handshake."""
        return self._tls.pending

    # ------------------------------------------------------------- inputs

    def receive_client(self, data: bytes | bytearray) -> None:
        """Bytes from the client."""
        if self._ready_for_fast_path():
            found = self._commands.fast_line(data)
            if found is not None:
                self._commands.pass_on(found[0], found[1], None)
                return
        life = self._life
        if life.close_reason is not None or life.client_done:
            return
        if self._tls.pending:
            self._tls.injection("plaintext after STARTTLS, before the TLS handshake")
            return
        if self._ex.state.phase is Phase.GREETING:
            if self._deferred.greeted:
                # Deferred connect: the first command decides whether the
                # upstream is needed at all.
                self._buf += data
                self._judge_first_line()
                return
            if not self._early_talk():
                return
        if (
            self._ex.queue.owed
            and not self._message.reading
            and self._commands.sent_ahead(data)
            and self.options.policy.pipelining is not Action.OBSERVE
        ):
            # Bytes that arrived too early: answer what is owed, then end.
            life.end_after_replies(P.SYNC_ERROR)
            return
        self._buf += data
        self._process_client()
        life.maybe_finish()

    def receive_upstream(self, data: bytes | bytearray) -> None:
        """Bytes from the upstream."""
        life = self._life
        if life.close_reason is not None:
            return
        try:
            replies = self._parser.feed(data)
        except UpstreamProtocolError:
            life.fail(R.UPSTREAM_LOST, _C.UPSTREAM_ERROR)
            return
        for reply in replies:
            self._relay.reply(reply)
            if life.close_reason is not None:
                return
        self._ex.flush()
        if self._buf or self._ex.queue.held is not None or self._message.chunk is not None:
            self._process_client()  # (nothing to do for it otherwise)
        life.maybe_finish()

    def client_eof(self) -> None:
        """The client closed its side (or vanished)."""
        self._life.client_eof()

    def tls_started(self) -> None:
        """The TLS handshake with the client completed; read commands again."""
        self._tls.pending = False

    def abort(self, reason: str) -> None:
        """Close at once (the client is gone or stuck): nothing more is sent upstream."""
        self._life.abort(reason)

    def upstream_eof(self) -> None:
        """The upstream closed its side."""
        self._life.upstream_eof()

    def refuse(self, reply: R.Reply) -> None:
        """Turn the client away before any upstream exists (limits): ``reply`` and close."""
        self._life.fail(reply, _C.POLICY)

    def upstream_busy(self) -> None:
        """No upstream slot came free in time (upstream_limits): 421 and close."""
        self._life.fail(R.UPSTREAM_BUSY, _C.UPSTREAM_BUSY)

    def upstream_refused(self) -> None:
        """The upstream could not be reached: 421 and close."""
        self._life.fail(R.UPSTREAM_UNAVAILABLE, _C.UPSTREAM_REFUSED)

    def client_timeout(self) -> None:
        """The client sent no complete command in time."""
        self._life.fail(R.CLIENT_TIMEOUT, _C.CLIENT_TIMEOUT)

    def upstream_timeout(self) -> None:
        """The upstream did not answer in time."""
        self._life.fail(R.UPSTREAM_TIMEOUT, _C.UPSTREAM_TIMEOUT)

    def shutdown(self) -> None:
        """The service is stopping: 421 and close."""
        self._life.fail(R.SHUTTING_DOWN, _C.SHUTDOWN)

    # ------------------------------------------------- deferred connect

    def greet(self) -> None:
        """Deferred connect: send smtpguard's own greeting now (after any
        greet_wait: bytes before it are early talk)."""
        assert self.options.local_greeting is not None and not self._deferred.greeted
        if self.closed:
            return
        self._deferred.greeted = True
        self._ex.events.append(LocalReply(Verb.GREETING, 220))
        self._ex.push(Slot(Verb.GREETING, Verb.GREETING, self.options.local_greeting))
        self._judge_first_line()

    @property
    def wants_upstream(self) -> bool:
        """Deferred connect: the client sent a command the upstream must answer
        (or, with ``non_smtp: observe``, anything that is a whole line)."""
        if self.closed or not self._deferred.greeted or self._ex.state.phase is not Phase.GREETING:
            return False
        return greeting.wants_upstream(self._buf, self.options.command_line_limit)

    @property
    def upstream_banner(self) -> bytes | None:
        """Deferred connect: the text of the upstream's 2xx greeting, once
        seen (the I/O layer greets the next clients with it)."""
        return self._deferred.banner

    def _judge_first_line(self) -> None:
        """Non-SMTP clients and QUIT are settled before any upstream exists."""
        first = self._deferred.judge_once(self._buf, self.options.command_line_limit)
        if first is greeting.FirstLine.QUIT:
            self._buf.clear()
            self._life.local(Verb.QUIT, R.BYE)
            self._life.close(_C.QUIT)
        elif first is greeting.FirstLine.TLS:
            self._life.non_smtp("TLS handshake on a plaintext port")
        elif first is greeting.FirstLine.HTTP:
            self._life.non_smtp("HTTP request or header line as a command")

    def _early_talk(self) -> bool:
        """Bytes before the greeting; False if they must be dropped."""
        action = self._defences.early_talk()
        if action is Action.DISCONNECT:
            self._life.fail(P.EARLY_TALKER, _C.POLICY)
            return False
        return action is Action.OBSERVE

    # --------------------------------------------------- upstream replies

    def _use(self, caps: ehlo.Capabilities) -> None:
        """What the client was shown (and may use) from now on."""
        self._ex.caps = caps
        self._syntax.capabilities(caps)

    # --------------------------------------------------- client framing

    def _process_client(self) -> None:
        life = self._life
        while life.close_reason is None and life.final is None and not self._tls.pending:
            if not self._step_client():
                return

    def _step_client(self) -> bool:
        """Take one decision from the client's bytes; False: wait for more input."""
        queue, message = self._ex.queue, self._message
        if queue.held is not None:
            if not self._commands.decide(*queue.held):
                return False
            queue.held = None
            return True
        if message.chunk is not None:
            if self._buf:
                refused = message.read_chunk(self._buf)
                if refused is not None:
                    self._life.fail(refused, _C.POLICY)
                return True
            if self._life.client_done:
                self._life.abort(_C.CLIENT_CLOSED)  # the chunk can never complete
            return False
        if not self._buf or self._ex.state.phase is Phase.GREETING:
            return False  # (no early talking to the upstream)
        framing = framing_of(self._ex.possible)
        if framing is Framing.BODY:
            done = message.read_body(self._buf)
            if isinstance(done, R.Reply):
                self._life.fail(done, _C.POLICY)
                return False
            return done
        if framing is Framing.COMMAND or framing is Framing.SASL:
            return self._read_line(framing is Framing.SASL)
        return False  # depends on a reply in flight, or nothing is read

    def _read_line(self, sasl: bool) -> bool:
        opts = self.options
        if len(self._ex.queue.owed) >= opts.max_pipelined_commands:
            return False  # backpressure: wait for replies to drain
        if (
            not sasl
            and self._buf.startswith(P.TLS_HANDSHAKE_PREFIX)
            and self._life.non_smtp("TLS handshake on a plaintext port")
        ):
            return False
        taken = self._take_line(opts.max_sasl_line_bytes if sasl else opts.command_line_limit, sasl)
        if taken is None:
            return False
        line, bare = taken
        if sasl:
            if (b"\r" in line or b"\0" in line) and not self._defences.bare_sasl():
                line = b"*"  # cancel the exchange (RFC 4954 4) and relay its 501
            self._ex.forward(Verb.AUTH, Verb.AUTH_RESPONSE, line)
        elif (bare or b"\r" in line) and not self._defences.bare_command(bare, b"\r" in line):
            self._life.local(Verb.UNKNOWN, P.BARE_NEWLINE_COMMAND)
        elif not self._ex.queue.owed or self._commands.in_sync(line):
            self._commands.line(line)
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
                self._ex.forward(Verb.AUTH, Verb.AUTH_RESPONSE, b"*")
                return None
            self._life.local(Verb.UNKNOWN, R.LINE_TOO_LONG)

    def _ready_for_fast_path(self) -> bool:
        """Nothing owed, nothing buffered, nothing unusual: a command alone
        on the wire may take :meth:`.commands.Commands.fast_line`."""
        queue, life = self._ex.queue, self._life
        return not (
            queue.owed
            or queue.inflight
            or self._buf
            or self._message.reading
            or life.close_reason is not None
            or life.client_done
            or self._tls.pending
            or life.final is not None
            or self._lines.discarding
            or self._deferred.refusal is not None
        )
