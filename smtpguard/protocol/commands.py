"""One command line: answered here, forwarded, held, or refused.

Theory of operation
-------------------

A complete command line from the client goes through, in order:

1. the screen: a line too long for the extensions shown (RFC 5321
   4.5.3.1.4), a NUL, a verb refused by ``commands.refuse``, an HTTP line
   (the session's line reading has already answered what is not a line at
   all: a TLS record, a bare CR or LF, a line over the base limit);
2. the order (:func:`.rules.verdict` over every state the replies in flight
   may lead to): in sequence, out of sequence (503, or only observed), or
   ``HOLD`` when it depends on a reply still in flight (the caller keeps the
   line and asks again after the next reply);
3. a local answer, where :data:`.rules.LOCAL_ANSWERS` gives one (HELP,
   STARTTLS, AUTH without TLS, EHLO after STARTTLS, an unoffered extension);
4. the argument (:mod:`.arguments`, the syntax guard), then the limits and
   rates on MAIL and RCPT (:mod:`.limits`), then the line goes upstream.

BDAT is decided by :func:`.bdat.decide` and carried out by
:class:`.message.MessageContent`.  The pipelining checks (RFC 2920 3.1) are
here too: a line sent before a reply it had to wait for.

A command in sequence alone on the wire (a client that waits for each
reply, the common case) takes :meth:`Commands.fast_line`: the same
decisions for the verbs without a local answer, without the set algebra.
"""

from __future__ import annotations

from . import bdat, local
from . import policy as P
from . import replies as R
from .arguments import ArgumentGuard, parameters
from .defences import Defences
from .events import CloseReason, LocalReply, PolicyAction
from .exchange import Exchange
from .greeting import Deferred
from .lifecycle import Lifecycle
from .limits import rate_refusal
from .limits import refusal as limit_refusal
from .message import MessageContent
from .options import SessionOptions
from .policy import Action, Defence
from .queue import Slot
from .rules import (
    APPLIED_LOCALLY,
    EXTENSION_OF,
    FAST_VERBS,
    FRAMING,
    HOLD,
    LOCAL_ANSWERS,
    LOCAL_ONLY,
    VERB_BY_NAME,
    WAIT_FOR_REPLIES,
    Answer,
    Facts,
    Framing,
    Verb,
    first_word,
    local_answer,
    permitted,
    verdict,
)
from .starttls import StartTls
from .syntax import SHAPE_OF

_OBSERVE, _REJECT, _DISCONNECT = Action.OBSERVE, Action.REJECT, Action.DISCONNECT


class Commands:
    """Decides and carries out the client's command lines."""

    __slots__ = (
        "_ex",
        "_options",
        "_defences",
        "_syntax",
        "_deferred",
        "_tls",
        "_message",
        "_buf",
        "_host",
    )

    def __init__(
        self,
        ex: Exchange,
        options: SessionOptions,
        *,
        defences: Defences,
        syntax: ArgumentGuard,
        deferred: Deferred,
        tls: StartTls,
        message: MessageContent,
        life: Lifecycle,
        buf: bytearray,
    ) -> None:
        self._ex = ex
        self._options = options
        self._defences, self._syntax, self._deferred = defences, syntax, deferred
        self._tls, self._message = tls, message
        #: The session's end: local replies count toward its error limit
        #: there, and only it ends the session.
        self._host = life
        self._buf = buf  # the client's unread bytes

    # --------------------------------------------------------- the screen

    def line(self, line: bytes) -> None:
        """A complete command line (without its CRLF)."""
        word = first_word(line)
        verb = VERB_BY_NAME.get(word, Verb.UNKNOWN)
        host, options = self._host, self._options
        if verb is not Verb.AUTH and len(line) + 2 > options.max_line_bytes:
            # Service extensions raise the limit (RFC 5321 4.5.3.1.4).
            limit = self._ex.caps.line_limits.get(verb, options.max_line_bytes)
            if len(line) + 2 > limit:
                host.local(verb, R.LINE_TOO_LONG)
                return
        if b"\0" in line:
            host.local(verb, R.BAD_SYNTAX)
            return
        if word in options.policy.refused_commands:
            # ``commands.refuse``: 502 5.5.1, in any state.
            self._ex.events.append(
                PolicyAction(Defence.REFUSED_COMMAND, Action.REJECT, "refused verb")
            )
            host.local(verb, P.COMMAND_DISABLED, verb=word.decode("ascii", "replace"))
            return
        if verb is Verb.UNKNOWN:
            if (word in P.NON_SMTP_WORDS or word.endswith(b":")) and host.non_smtp(
                "HTTP request or header line as a command"
            ):
                return
            self._defences.unknown_command()
        if not self.decide(verb, line):
            self._ex.queue.held = (verb, line)
        if verb is Verb.UNKNOWN and self._defences.too_many_unknown():
            host.end_after_replies(P.TOO_MANY_ERRORS)

    def fast_line(self, data: bytes | bytearray) -> tuple[Verb, bytes] | None:
        """``data``'s command if it is one whole line, in sequence, with no
        local answer possible (None: take the full path)."""
        end = len(data) - 2
        if end < 4 or end + 2 > self._options.max_line_bytes or data[end:] != b"\r\n":
            return None
        line = bytes(data[:end])
        if b"\r" in line or b"\n" in line or b"\0" in line:
            return None
        verb = VERB_BY_NAME.get(first_word(line))
        if (
            verb is None
            or verb not in FAST_VERBS
            or (verb in LOCAL_ANSWERS and self._tls.reidentify)
        ):
            return None
        state = self._ex.state
        if FRAMING[state.phase] is not Framing.COMMAND or permitted(state, verb) is not None:
            return None
        if verb in self._options.policy.refused_verbs:
            return None
        return verb, line

    # ---------------------------------------------------------- the order

    def decide(self, verb: Verb, line: bytes) -> bool:
        """Answer, forward or reject ``line``; False means hold it for a reply."""
        ex = self._ex
        if self._deferred.refusal is not None and verb is not Verb.QUIT:
            # The upstream refused the session (554): this first command hears
            # it (counted as the upstream's greeting).
            ex.push(Slot(verb, verb, self._deferred.take_refusal()))
            return True
        if verb in LOCAL_ONLY:
            self._host.local(verb, R.UNKNOWN_COMMAND)
            return True
        expected = verdict(ex.possible, verb)
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
        if ex.queue.inflight and not ex.caps.upstream_pipelining:
            return False  # the upstream takes one command at a time (decided, and reported, later)
        return self.pass_on(verb, line, expected)

    def _facts(self, in_sequence: bool, verb: Verb) -> Facts:
        """The conditions of :data:`.rules.LOCAL_ANSWERS` that hold now."""
        opts, ex = self._options, self._ex
        tls = ex.state.tls
        keyword = EXTENSION_OF.get(verb)
        return Facts(
            unoffered=in_sequence and keyword is not None and keyword not in ex.caps.usable,
            tls_active=tls,
            no_certificate=not opts.tls_offered,
            auth_needs_tls=opts.auth_require_tls and not tls,
            reidentify=self._tls.reidentify,
            help_local=opts.help_local,
        )

    def _out_of_sequence(self, verb: Verb, expected: str) -> bool:
        """A command out of sequence; True if the policy only observes it."""
        action = self._options.policy.sequence
        # STARTTLS is never forwarded, so there is nothing to observe:
        # answering it (and starting TLS mid-transaction) would be worse.
        if action is _OBSERVE and verb is not Verb.STARTTLS:
            return True
        action = _REJECT if action is _OBSERVE else action
        self._violation(verb, expected, action)
        if action is _DISCONNECT:
            self._host.end_after_replies(None)
        return False

    def _violation(self, verb: Verb, expected: str, action: Action, local: bool = True) -> None:
        """Report ``verb`` out of sequence and, if ``local``, answer it with 503."""
        self._defences.violation(verb, self._ex.reported_phase(), expected, action)
        if local:
            self._host.local(verb, R.BAD_SEQUENCE, expected=expected)

    def _answer(self, verb: Verb, line: bytes, answer: R.Reply | Answer) -> bool:
        """Answer a command locally (see :data:`.rules.LOCAL_ANSWERS`)."""
        ex = self._ex
        if isinstance(answer, R.Reply):
            self._host.local(verb, answer)
        elif answer is Answer.HELP:
            ex.events.append(LocalReply(Verb.HELP, 214))
            ex.push(Slot(Verb.HELP, Verb.HELP, local.help_reply(line, self._options)))
        elif answer in WAIT_FOR_REPLIES and ex.queue.inflight:
            return False  # it changes the state the replies in flight apply to
        elif answer is Answer.START_TLS:
            self._tls.start(self._buf)
        else:
            self._tls.identify(verb)
        if answer in APPLIED_LOCALLY:
            ex.apply_locally(verb)
        return True

    # ------------------------------------------------------- forwarding

    def pass_on(self, verb: Verb, line: bytes, observed: str | None) -> bool:
        """Judge ``line``'s argument, apply the limits and rates, and forward
        it (``observed``: it is out of sequence and the policy only observes)."""
        judged = self._syntax_checked(verb, line) if verb in SHAPE_OF else line
        if judged is None:
            return True  # refused
        if observed is not None:
            self._violation(verb, observed, _OBSERVE, local=False)
        ex = self._ex
        if verb is Verb.MAIL or verb is Verb.RCPT:
            refused = None
            if observed is None:  # (the upstream answers what is only observed)
                refused = limit_refusal(
                    verb, judged, ex.txn.rcpts, ex.caps.upstream, self._defences
                )
            if refused is None:
                refused = rate_refusal(verb, self._options.admit)
            if refused is not None:
                self._host.local(verb, refused)
                return True
        if verb is Verb.MAIL:
            txn = ex.new_transaction()
            txn.smtputf8 = b"SMTPUTF8" in judged.upper() and b"SMTPUTF8" in parameters(judged)
        elif verb is Verb.RCPT:
            ex.txn.rcpts += 1
        ex.forward(verb, verb, self._syntax.outgoing(verb, line, judged))
        return True

    def _syntax_checked(self, verb: Verb, line: bytes) -> bytes | None:
        """The line to forward for ``line`` after the syntax guard (None: it
        was refused locally)."""
        judged = self._syntax.judge(verb, line, self._ex.txn.smtputf8)
        if judged.forward is None:
            assert judged.reply is not None
            self._host.local(verb, judged.reply, **dict(judged.reply_fields))
            return None
        return judged.forward

    def _bdat(self, line: bytes, expected: str | None) -> bool:
        """Decide a BDAT line (see :func:`.bdat.decide`); False: hold it."""
        ex, host, message = self._ex, self._host, self._message
        parsed = bdat.parse(line)
        answer = None
        if expected is None:
            answer = local_answer(Verb.BDAT, self._facts(True, Verb.BDAT))
        move = bdat.decide(
            parsed,
            expected,
            answer is not None,
            waits=bool(ex.queue.inflight) and not ex.caps.upstream_pipelining,
            observe=self._options.policy.sequence is _OBSERVE,
            client_gone=host.client_done,
            buffered=len(self._buf),
        )
        if move is bdat.Move.WAIT:
            return False
        if parsed is None:  # (MALFORMED)
            host.local(Verb.BDAT, R.BAD_BDAT)
            host.end_after_replies(None, CloseReason.POLICY)
        elif move is bdat.Move.ANSWER:
            message.refuse_chunk(parsed)
            assert isinstance(answer, R.Reply)
            host.local(Verb.BDAT, answer)
        elif move is bdat.Move.OUT_OF_SEQUENCE:
            assert expected is not None
            message.refuse_chunk(parsed)
            self._out_of_sequence(Verb.BDAT, expected)
        elif move is bdat.Move.STARVED:
            ex.flush()
            host.abort(CloseReason.CLIENT_CLOSED)
        else:
            if expected is not None:
                self._violation(Verb.BDAT, expected, _OBSERVE, local=False)
            message.forward_chunk(parsed, line)
        return True

    # ------------------------------------------------------- pipelining

    def sent_ahead(self, data: bytes | bytearray) -> bool:
        """RFC 2920 3.1: are ``data`` sent before a reply they had to wait for?

        Checked when bytes arrive (a later packet) and when a line is parsed
        (the same packet); one violation is reported once per owed reply.
        """
        if data[:4].upper() == b"QUIT":
            return False  # tolerated after anything (common client behaviour)
        blocker = self._ex.queue.blocker(self._ex.caps.client_pipelining)
        if blocker is None:
            return False
        self._defences.sent_ahead(blocker)
        return True

    def in_sync(self, line: bytes) -> bool:
        """A parsed line: False if the pipelining policy refuses it."""
        if not self.sent_ahead(line):
            return True
        action = self._options.policy.pipelining
        if action is _OBSERVE:
            return True
        self._host.local(Verb.UNKNOWN, P.SYNC_ERROR)
        if action is _DISCONNECT:
            self._host.end_after_replies(None)
        return False
