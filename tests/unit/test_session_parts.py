"""The session's acting parts, each alone on an Exchange: the exchange
itself, the lifecycle (how a session ends), the relay of the upstream's
replies, the message content, STARTTLS and the command desk."""

from __future__ import annotations

from smtpguard.protocol import ehlo
from smtpguard.protocol import replies as R
from smtpguard.protocol.arguments import ArgumentGuard
from smtpguard.protocol.bdat import Bdat
from smtpguard.protocol.commands import Commands
from smtpguard.protocol.defences import Defences
from smtpguard.protocol.events import (
    CloseReason,
    Forwarded,
    LocalReply,
    MessageDone,
    MessageOutcome,
    UpstreamReplied,
)
from smtpguard.protocol.exchange import Exchange
from smtpguard.protocol.framing import ReplyParser, UpstreamReply
from smtpguard.protocol.greeting import Deferred
from smtpguard.protocol.lifecycle import Lifecycle
from smtpguard.protocol.message import MessageContent
from smtpguard.protocol.options import SessionOptions
from smtpguard.protocol.policy import Policy
from smtpguard.protocol.relay import Relay
from smtpguard.protocol.rules import Phase, State, Verb
from smtpguard.protocol.session import Session
from smtpguard.protocol.starttls import StartTls

READY = State(Phase.READY, esmtp=True)


def one_reply(data: bytes) -> UpstreamReply:
    (reply,) = ReplyParser().feed(data)
    return reply


class Parts:
    """One exchange and every part on it, wired as the session wires them."""

    def __init__(self, state: State = READY, **policy: object) -> None:
        self.options = SessionOptions(policy=Policy(**policy))  # type: ignore[arg-type]
        self.ex = ex = Exchange(state)
        self.buf = bytearray()
        self.defences = Defences(self.options.policy, ex.events)
        self.syntax = ArgumentGuard(self.options.policy.syntax, ex.events)
        self.deferred = Deferred()
        self.used: list[ehlo.Capabilities] = []
        self.tls = StartTls(ex, self.options, self.defences, self.use)
        self.message = MessageContent(ex, self.options, self.defences)
        self.life = Lifecycle(
            ex,
            self.options,
            defences=self.defences,
            message=self.message,
            tls=self.tls,
            buf=self.buf,
        )
        self.commands = self.commands_with(self.options)
        self.relay = Relay(
            ex,
            self.options,
            deferred=self.deferred,
            tls=self.tls,
            message=self.message,
            life=self.life,
            use=self.use,
        )

    def commands_with(self, options: SessionOptions) -> Commands:
        return Commands(
            self.ex,
            options,
            defences=self.defences,
            syntax=self.syntax,
            deferred=self.deferred,
            tls=self.tls,
            message=self.message,
            life=self.life,
            buf=self.buf,
        )

    def use(self, caps: ehlo.Capabilities) -> None:
        self.used.append(caps)
        self.ex.caps = caps


# ------------------------------------------------------------- exchange


def test_exchange_local_reply_waits_for_the_replies_before_it() -> None:
    ex = Exchange(READY)
    ex.forward(Verb.MAIL, Verb.MAIL, b"MAIL FROM:<a@b.example>")
    ex.local_reply(Verb.NOOP, R.BAD_SEQUENCE, {"expected": "x"})
    assert ex.take_upstream() == b"MAIL FROM:<a@b.example>\r\n"
    assert ex.take_client() == b""  # the 503 waits behind MAIL's reply
    ex.queue.inflight.popleft().reply = b"250 ok\r\n"
    ex.flush()
    assert ex.take_client() == b"250 ok\r\n503 Error: x\r\n"
    assert [type(e) for e in ex.take_events()] == [Forwarded, LocalReply]
    assert ex.take_events() == []


def test_exchange_forward_moves_the_possible_states_not_the_state() -> None:
    ex = Exchange(READY)
    ex.forward(Verb.MAIL, Verb.MAIL, b"MAIL FROM:<>")
    assert ex.state == READY
    assert {s.phase for s in ex.possible} == {Phase.READY, Phase.MAIL}
    assert ex.reported_phase() is Phase.READY
    ex.replied(Verb.MAIL, 2)
    ex.queue.inflight.clear()
    ex.recompute()
    assert ex.possible == frozenset({ex.state}) and ex.state.phase is Phase.MAIL


def test_exchange_a_new_transaction_abandons_unfinished_bdat_content() -> None:
    ex = Exchange(READY)
    ex.txn.content_bytes = 7
    first = ex.txn
    assert ex.new_transaction() is not first and ex.txn.content_bytes == 0
    assert ex.take_events() == [MessageDone(MessageOutcome.ABORTED, 7)]
    ex.new_transaction()
    assert ex.take_events() == []  # nothing under way: nothing abandoned


def test_exchange_internal_command_owes_the_client_nothing() -> None:
    ex = Exchange(State(Phase.RCPT, esmtp=True))
    ex.send_internal(Verb.RSET)
    assert ex.take_upstream() == b"RSET\r\n"
    assert not ex.queue.owed and ex.queue.inflight[0].internal
    assert {s.phase for s in ex.possible} == {Phase.READY, Phase.RCPT}


# ------------------------------------------------------------ lifecycle


def test_lifecycle_end_after_replies_waits_for_every_owed_reply() -> None:
    p = Parts()
    p.ex.forward(Verb.MAIL, Verb.MAIL, b"MAIL FROM:<>")
    p.buf += b"RCPT TO:<x@y.example>\r\n"
    p.life.end_after_replies(R.SHUTTING_DOWN, CloseReason.SHUTDOWN)
    assert p.buf == b"" and p.life.client_done
    assert p.life.close_reason is None  # MAIL's reply is still owed
    p.ex.queue.inflight.popleft().reply = b"250 ok\r\n"
    p.ex.flush()
    p.life.maybe_finish()
    assert p.life.close_reason is CloseReason.SHUTDOWN
    assert p.ex.take_client().startswith(b"250 ok\r\n421 4.3.2 ")


def test_lifecycle_fail_says_nothing_into_a_tls_handshake() -> None:
    p = Parts()
    p.tls.pending = True
    p.life.fail(R.UPSTREAM_LOST, CloseReason.UPSTREAM_ERROR)
    assert p.life.close_reason is CloseReason.UPSTREAM_ERROR
    assert p.ex.take_client() == b""
    q = Parts()
    q.life.fail(R.UPSTREAM_LOST, CloseReason.UPSTREAM_ERROR)
    assert q.ex.take_client().startswith(b"421 4.4.2 ")


def test_lifecycle_abort_abandons_the_message_and_sends_nothing_more_upstream() -> None:
    p = Parts(State(Phase.DATA, esmtp=True))
    p.message.open_body()
    p.ex.txn.content_bytes = 10
    p.ex.to_upstream += b"half a body"
    p.life.client_eof()
    assert p.life.close_reason is CloseReason.CLIENT_CLOSED
    assert p.ex.to_upstream == b""
    assert MessageDone(MessageOutcome.ABORTED, 10) in p.ex.take_events()


def test_lifecycle_error_limit_ends_after_the_replies() -> None:
    p = Parts(hard_error_limit=2)
    p.life.local(Verb.QUIT, R.BYE)  # 2xx: never counted
    p.life.local(Verb.UNKNOWN, R.UNKNOWN_COMMAND)
    assert p.life.final is None
    p.life.local(Verb.UNKNOWN, R.UNKNOWN_COMMAND)
    assert p.life.final is not None and p.life.close_reason is CloseReason.POLICY
    lines = p.ex.take_client().split(b"\r\n")
    assert [line[:4] for line in lines if line] == [b"221 ", b"500 ", b"500 ", b"421 "]


def test_lifecycle_upstream_eof_after_quit_is_a_quit() -> None:
    p = Parts(State(Phase.CLOSED, esmtp=True))
    p.life.upstream_eof()
    assert p.life.close_reason is CloseReason.QUIT and p.ex.take_client() == b""


# ---------------------------------------------------------------- relay


def test_relay_moves_the_state_and_relays_in_order() -> None:
    p = Parts()
    p.ex.forward(Verb.MAIL, Verb.MAIL, b"MAIL FROM:<>")
    p.relay.reply(one_reply(b"250 2.1.0 Ok\r\n"))
    assert p.life.close_reason is None
    p.ex.flush()
    assert p.ex.take_client() == b"250 2.1.0 Ok\r\n"
    assert p.ex.state.phase is Phase.MAIL and p.relay.replies == 1
    assert UpstreamReplied(Verb.MAIL, 250) in p.ex.take_events()


def test_relay_unsolicited_421_closes_and_abandons_the_message() -> None:
    p = Parts(State(Phase.DATA, esmtp=True))
    p.message.open_body()
    p.relay.reply(one_reply(b"421 4.3.2 going down\r\n"))
    assert p.life.close_reason is CloseReason.UPSTREAM_CLOSED
    assert p.ex.take_client() == b"421 4.3.2 going down\r\n"
    assert any(isinstance(e, MessageDone) for e in p.ex.take_events())


def test_relay_a_reply_nobody_asked_for_is_a_broken_upstream() -> None:
    p = Parts()
    p.relay.reply(one_reply(b"250 what\r\n"))
    assert p.life.close_reason is CloseReason.UPSTREAM_ERROR
    assert p.ex.take_client().startswith(b"421 4.4.2 ")


def test_relay_consumes_the_reply_to_its_own_rset() -> None:
    p = Parts(State(Phase.RCPT, esmtp=True))
    p.ex.send_internal(Verb.RSET)
    p.relay.reply(one_reply(b"250 2.0.0 Ok\r\n"))
    p.ex.flush()
    assert p.life.close_reason is None
    assert p.ex.take_client() == b"" and p.ex.state.phase is Phase.READY


def test_relay_remembers_the_ehlo_reply_for_after_starttls() -> None:
    p = Parts(State(Phase.CONNECTED))
    p.ex.forward(Verb.EHLO, Verb.EHLO, b"EHLO c.example")
    reply = b"250-up.example\r\n250-PIPELINING\r\n250 8BITMIME\r\n"
    p.relay.reply(one_reply(reply))
    assert p.tls.upstream_ehlo == (
        b"250-up.example\r\n",
        b"250-PIPELINING\r\n",
        b"250 8BITMIME\r\n",
    )
    assert p.used and b"PIPELINING" in p.used[-1].offered


def test_relay_data_354_opens_the_body() -> None:
    p = Parts(State(Phase.RCPT, esmtp=True))
    p.ex.forward(Verb.DATA, Verb.DATA, b"DATA")
    p.relay.reply(one_reply(b"354 go ahead\r\n"))
    assert p.message.reading and p.message.under_way


# -------------------------------------------------------------- message


def test_message_body_end_owes_the_client_the_end_reply() -> None:
    p = Parts(State(Phase.DATA, esmtp=True))
    p.message.open_body()
    p.buf += b"Subject: x\r\n\r\nhi\r\n.\r\n"
    assert p.message.read_body(p.buf) is True
    assert not p.message.reading
    assert p.ex.take_upstream().endswith(b"hi\r\n.\r\n")
    assert p.ex.queue.inflight[-1].step is Verb.DATA_END


def test_message_refused_chunk_is_dropped_and_the_upstream_reset() -> None:
    p = Parts(State(Phase.RCPT, esmtp=True))
    p.message.refuse_chunk(Bdat(3, False))
    p.buf += b"abcRSET\r\n"
    assert p.message.read_chunk(p.buf) is None
    assert p.ex.take_upstream() == b"RSET\r\n"  # the chunk never goes up
    assert p.buf == b"RSET\r\n" and not p.message.reading


# ------------------------------------------------------------- starttls


def test_starttls_drops_plaintext_pipelined_behind_it() -> None:
    p = Parts()
    p.tls.upstream_ehlo = (b"250-up\r\n", b"250 PIPELINING\r\n")
    p.buf += b"MAIL FROM:<a@b.example>\r\n"
    p.tls.start(p.buf)
    assert p.buf == b"" and p.tls.pending and p.tls.reidentify
    assert p.ex.take_client() == b"220 Ready to start TLS\r\n"
    assert not p.ex.caps.offered  # RFC 3207 4.2: the client forgets


def test_starttls_identify_answers_from_the_upstreams_ehlo() -> None:
    p = Parts(State(Phase.CONNECTED, tls=True))
    p.tls.upstream_ehlo = (b"250-up.example\r\n", b"250 PIPELINING\r\n")
    p.tls.reidentify = True
    p.tls.identify(Verb.EHLO)
    assert not p.tls.reidentify
    assert p.ex.take_client().startswith(b"250-")
    assert p.used and p.ex.take_upstream() == b""


# ------------------------------------------------------------- commands


def test_commands_hold_what_depends_on_a_reply_in_flight() -> None:
    p = Parts()
    p.ex.caps = ehlo.rewrite((b"250-up\r\n", b"250 PIPELINING\r\n"), p.options, False)[1]
    p.commands.line(b"MAIL FROM:<a@b.example>")
    p.commands.line(b"RCPT TO:<c@d.example>")
    assert p.ex.queue.held == (Verb.RCPT, b"RCPT TO:<c@d.example>")
    assert p.ex.take_upstream() == b"MAIL FROM:<a@b.example>\r\n"


def test_commands_out_of_sequence_is_answered_here() -> None:
    p = Parts()
    p.commands.line(b"DATA")
    assert p.ex.take_upstream() == b""
    assert p.ex.take_client().startswith(b"503 ")


def test_commands_fast_line_takes_only_a_whole_line_in_sequence() -> None:
    p = Parts()
    assert p.commands.fast_line(b"MAIL FROM:<a@b.example>\r\n") == (
        Verb.MAIL,
        b"MAIL FROM:<a@b.example>",
    )
    assert p.commands.fast_line(b"RCPT TO:<c@d.example>\r\n") is None  # out of sequence
    assert p.commands.fast_line(b"MAIL FROM:<a@b.example>") is None  # no CRLF
    assert p.commands.fast_line(b"HELP\r\n") is None  # a local answer is possible


def test_commands_starttls_moves_the_state_as_the_upstreams_220_would() -> None:
    p = Parts()
    p.commands = p.commands_with(SessionOptions(tls_offered=True))
    p.ex.forward(Verb.NOOP, Verb.NOOP, b"NOOP")
    p.commands.line(b"STARTTLS")
    assert not p.tls.pending  # waits: a reply in flight applies to the old state
    assert p.ex.queue.held == (Verb.STARTTLS, b"STARTTLS")
    p.ex.queue.inflight.popleft().reply = b"250 ok\r\n"
    p.ex.recompute()
    assert p.commands.decide(Verb.STARTTLS, b"STARTTLS")
    assert p.tls.pending and p.ex.state == State(Phase.CONNECTED, tls=True)


def test_relay_quit_reply_closes_as_quit() -> None:
    p = Parts()
    p.ex.forward(Verb.QUIT, Verb.QUIT, b"QUIT")
    p.relay.reply(one_reply(b"221 2.0.0 Bye\r\n"))
    assert p.life.close_reason is CloseReason.QUIT
    assert p.ex.take_client() == b"221 2.0.0 Bye\r\n"


# --------------------------------------------------------- the wiring


def test_the_session_parts_share_one_buffer_and_one_event_list() -> None:
    # The parts hold the client buffer and the event list by reference: a
    # part that rebinds either (``buf = bytearray()``) would silently lose
    # bytes or events.
    s = Session(SessionOptions())
    buf = s._buf
    assert s._lines.buf is buf and s._life._buf is buf and s._commands._buf is buf
    events = s._ex.events
    assert s._defences.events is events and s._syntax._events is events
    s.receive_upstream(b"220 up\r\n")
    s.receive_client(b"EHLO c\r\nNOOP\r\n")
    s.client_eof()
    assert s._buf is buf and s._ex.events is events
