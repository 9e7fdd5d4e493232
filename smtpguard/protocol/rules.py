"""The SMTP command-order rules, as data.

Theory of operation
-------------------

A session is in one :class:`Phase` plus three flags (ESMTP negotiated,
authenticated, TLS active); together they form a :class:`State`.  Two tables
decide everything:

``PERMITTED``
    which verbs a client may send in each phase.  A verb absent from a
    phase's set is out of sequence there and is answered locally with
    ``503 5.5.1``; ``VIOLATION_TEXT`` says what was expected instead.
    ``GUARDS`` adds the few rules that depend on a flag rather than on the
    phase (AUTH once, AUTH only after EHLO, STARTTLS only once).

``TRANSITIONS``
    how the *upstream's reply* moves the state: per step (a verb, or one of
    the pseudo-steps such as the greeting or the end of DATA) and per reply
    class (2, 3, 4, 5), the phase it moves to.  A step or class that is not
    listed leaves the phase alone: a MAIL rejected with 550 leaves the
    session where it was (RFC 5321 4.1.4).

The state never moves on the client's command, only on the reply to it, so
the proxy can always tell what the upstream believes.

``FRAMING`` says how client bytes are read in a phase: as command lines,
as a DATA body, or as SASL response lines.  When an in-flight reply could
change the framing (DATA, AUTH) the proxy stops reading until it arrives.

Around those two tables, the rest of the order is data too:

``ONLY_FROM``
    the phases a step moves from at all (RSET ends a transaction only where
    one is open; elsewhere its 250 is a no-op).
``BROKEN``
    reply classes that are not SMTP for a step (a 3xx greeting): the
    upstream is broken and the session ends.
``LOCAL_ANSWERS``
    commands smtpguard answers itself, by :class:`Condition` (facts that are
    not part of the :class:`State`: what the client was offered, whether
    smtpguard has a certificate, whether AUTH needs TLS ...), checked in
    order; the first condition that holds decides.  ``APPLIED_LOCALLY``
    lists the answers (:class:`Answer`) whose local 2xx moves the state as the
    upstream's would; ``WAIT_FOR_REPLIES`` those that wait until no reply
    is in flight (they change the state the replies would apply to).
``FAST_VERBS``
    the verbs a command alone on the wire may be forwarded with by the fast
    path, which checks the order (``permitted``) and REIDENTIFY only: so
    they are the client verbs whose only local answer is REIDENTIFY.
``GROUP_ENDERS``
    commands after which a pipelining client must wait (RFC 2920 3.1).

:func:`verdict`, :func:`advance` and :func:`framing_of` apply the tables to
the *set* of states the replies in flight could lead to; :data:`HOLD` says
the answer depends on a reply still in flight.

Sources: RFC 5321 4.1.1 and 4.1.4 (order; EHLO, HELO, RSET, NOOP, HELP,
VRFY, EXPN and QUIT must not get 503), RFC 5321 3.1 (after a 554 greeting
only QUIT), RFC 2920 (pipelining), RFC 3030 (BDAT; DATA inside a BDAT
transaction is 503), RFC 3207 (after STARTTLS the session starts over and
needs a new EHLO), RFC 4954 (AUTH after EHLO, not in a transaction, only
once).  Reply texts follow Postfix's where Postfix has one.
"""

from __future__ import annotations

import enum
from typing import Final, NamedTuple

from . import replies as R
from .replies import Reply


class FastEnum(enum.Enum):
    """An enum hashed by identity.

    Members are singletons compared by identity, so identity is a valid
    hash; enum's own ``__hash__`` is Python code, and the core hashes verbs,
    phases and states (tuples of them) in every table look-up.
    """

    __hash__ = object.__hash__


class Verb(FastEnum):
    """A client command, or a pseudo-step the upstream replies to."""

    #: Real SMTP verbs.
    HELO = "HELO"
    EHLO = "EHLO"
    MAIL = "MAIL"
    RCPT = "RCPT"
    DATA = "DATA"
    BDAT = "BDAT"
    RSET = "RSET"
    NOOP = "NOOP"
    QUIT = "QUIT"
    HELP = "HELP"
    VRFY = "VRFY"
    EXPN = "EXPN"
    AUTH = "AUTH"
    STARTTLS = "STARTTLS"
    #: RFC 1985: start the queue for a domain (only if the upstream offers it).
    ETRN = "ETRN"
    #: Identity commands meant for trusted proxies only; never forwarded.
    XCLIENT = "XCLIENT"
    XFORWARD = "XFORWARD"
    #: Anything we do not know: answered locally with 500.
    UNKNOWN = "UNKNOWN"
    #: Pseudo-step: the upstream's greeting (no client command).
    GREETING = "GREETING"
    #: Pseudo-step: the final dot of a DATA body.
    DATA_END = "DATA_END"
    #: Pseudo-step: a ``BDAT n LAST`` chunk.
    BDAT_LAST = "BDAT_LAST"
    #: Pseudo-step: a SASL response line inside an AUTH exchange.
    AUTH_RESPONSE = "AUTH_RESPONSE"


#: Verbs a client can type: the closed label set for metrics.
CLIENT_VERBS: tuple[Verb, ...] = tuple(
    v for v in Verb if v not in (Verb.GREETING, Verb.DATA_END, Verb.BDAT_LAST, Verb.AUTH_RESPONSE)
)

#: Look-up from the upper-cased command word to the verb.
VERB_BY_NAME: dict[bytes, Verb] = {
    v.value.encode("ascii"): v for v in CLIENT_VERBS if v is not Verb.UNKNOWN
}


def first_word(line: bytes) -> bytes:
    """The verb of a command line, upper case: its first word, ended by any
    white space (a TAB too, as Postfix's smtpd_token reads it)."""
    words = line.split(None, 1)
    return words[0].upper() if words else b""


class Phase(FastEnum):
    """Where the session stands."""

    #: Waiting for the upstream's greeting; nothing may be sent yet.
    GREETING = "greeting"
    #: The greeting was 554: only QUIT is accepted (RFC 5321 3.1).
    REJECTED = "rejected"
    #: Greeted (or TLS just started): EHLO/HELO needed.
    CONNECTED = "connected"
    #: EHLO/HELO done, no mail transaction.
    READY = "ready"
    #: MAIL accepted, no recipient accepted yet.
    MAIL = "mail"
    #: At least one RCPT accepted.
    RCPT = "rcpt"
    #: Receiving a DATA body (between 354 and the final dot).
    DATA = "data"
    #: Inside a BDAT transaction (a non-LAST chunk was accepted).
    BDAT = "bdat"
    #: Inside a SASL exchange (AUTH got 334).
    AUTH = "auth"
    #: QUIT accepted or the session was closed.
    CLOSED = "closed"


class Framing(FastEnum):
    """How client bytes are read."""

    #: Command lines.
    COMMAND = "command"
    #: A DATA body, up to ``<CRLF>.<CRLF>``.
    BODY = "body"
    #: SASL response lines.
    SASL = "sasl"
    #: Nothing is read (greeting pending, or closed).
    NONE = "none"


class State(NamedTuple):
    """The full session state: a phase plus the flags the rules consult."""

    phase: Phase
    esmtp: bool = False
    authenticated: bool = False
    tls: bool = False


#: Always permitted once greeted (RFC 5321 4.1.4: must not get 503).
_ANYTIME = frozenset(
    {Verb.EHLO, Verb.HELO, Verb.RSET, Verb.NOOP, Verb.HELP, Verb.VRFY, Verb.EXPN, Verb.QUIT}
)
#: Verbs that never reach the rule table: answered by their own handlers.
LOCAL_ONLY = frozenset({Verb.UNKNOWN, Verb.XCLIENT, Verb.XFORWARD})

PERMITTED: dict[Phase, frozenset[Verb]] = {
    Phase.GREETING: frozenset(),
    Phase.REJECTED: frozenset({Verb.QUIT}),
    Phase.CONNECTED: _ANYTIME | {Verb.STARTTLS},
    Phase.READY: _ANYTIME | {Verb.MAIL, Verb.AUTH, Verb.STARTTLS, Verb.ETRN},
    Phase.MAIL: _ANYTIME | {Verb.RCPT},
    Phase.RCPT: _ANYTIME | {Verb.RCPT, Verb.DATA, Verb.BDAT},
    Phase.DATA: frozenset(),
    Phase.BDAT: _ANYTIME | {Verb.BDAT},
    Phase.AUTH: frozenset(),
    Phase.CLOSED: frozenset(),
}

FRAMING: dict[Phase, Framing] = {
    Phase.GREETING: Framing.NONE,
    Phase.REJECTED: Framing.COMMAND,
    Phase.CONNECTED: Framing.COMMAND,
    Phase.READY: Framing.COMMAND,
    Phase.MAIL: Framing.COMMAND,
    Phase.RCPT: Framing.COMMAND,
    Phase.DATA: Framing.BODY,
    Phase.BDAT: Framing.COMMAND,
    Phase.AUTH: Framing.SASL,
    Phase.CLOSED: Framing.NONE,
}

# What a client should have sent instead, per (phase, verb); the fallback is
# per phase.  Texts follow Postfix's smtpd where it has one.
_NEED_EHLO = "send HELO/EHLO first"
PHASE_EXPECTATION: dict[Phase, str] = {
    Phase.GREETING: "wait for the greeting",
    Phase.REJECTED: "service refused: only QUIT is accepted",
    Phase.CONNECTED: _NEED_EHLO,
    Phase.READY: "need MAIL command",
    Phase.MAIL: "need RCPT command",
    Phase.RCPT: "need DATA or BDAT command",
    Phase.DATA: "data in progress",
    Phase.BDAT: "need BDAT command (DATA not allowed after BDAT)",
    Phase.AUTH: "authentication in progress",
    Phase.CLOSED: "session closed",
}
VIOLATION_TEXT: dict[tuple[Phase, Verb], str] = {
    (Phase.READY, Verb.RCPT): "need MAIL before RCPT",
    (Phase.READY, Verb.DATA): "need MAIL command",
    (Phase.READY, Verb.BDAT): "need MAIL command",
    (Phase.CONNECTED, Verb.RCPT): _NEED_EHLO,
    (Phase.MAIL, Verb.MAIL): "nested MAIL command",
    (Phase.RCPT, Verb.MAIL): "nested MAIL command",
    (Phase.BDAT, Verb.MAIL): "nested MAIL command",
    (Phase.MAIL, Verb.DATA): "need RCPT command",
    (Phase.MAIL, Verb.BDAT): "need RCPT command",
    (Phase.MAIL, Verb.AUTH): "MAIL transaction in progress",
    (Phase.RCPT, Verb.AUTH): "MAIL transaction in progress",
    (Phase.BDAT, Verb.AUTH): "MAIL transaction in progress",
    (Phase.MAIL, Verb.STARTTLS): "MAIL transaction in progress",
    (Phase.RCPT, Verb.STARTTLS): "MAIL transaction in progress",
    (Phase.BDAT, Verb.STARTTLS): "MAIL transaction in progress",
    (Phase.MAIL, Verb.ETRN): "MAIL transaction in progress",
    (Phase.RCPT, Verb.ETRN): "MAIL transaction in progress",
    (Phase.BDAT, Verb.ETRN): "MAIL transaction in progress",
    (Phase.BDAT, Verb.DATA): "DATA not allowed after BDAT; send BDAT ... LAST",
    (Phase.BDAT, Verb.RCPT): "RCPT after BDAT; send BDAT ... LAST or RSET",
}

#: Flag-based rules: (verb, predicate name, text when the predicate fails).
#: Checked after ``PERMITTED``; kept as data so tests can enumerate them.
GUARDS: dict[Verb, tuple[tuple[str, bool, str], ...]] = {
    Verb.AUTH: (
        ("esmtp", True, "send EHLO first"),
        ("authenticated", False, "already authenticated"),
    ),
    Verb.BDAT: (("esmtp", True, "send EHLO first"),),
}

#: Verbs of a service extension: forwarded only when the upstream advertised
#: the keyword in its EHLO reply (and smtpguard relayed it), else answered
#: locally.  RFC 5321 2.2.1: a client uses an extension only once offered.
EXTENSION_OF: dict[Verb, bytes] = {
    Verb.BDAT: b"CHUNKING",
    Verb.ETRN: b"ETRN",
    Verb.AUTH: b"AUTH",
}


# Reply-driven transitions: step -> {reply class -> phase}.  ``None`` in a
# phase slot means "keep the current phase".  Entries that also set a flag
# are in ``FLAG_EFFECTS``.
TRANSITIONS: dict[Verb, dict[int, Phase]] = {
    Verb.GREETING: {2: Phase.CONNECTED, 4: Phase.CLOSED, 5: Phase.REJECTED},
    Verb.EHLO: {2: Phase.READY},
    Verb.HELO: {2: Phase.READY},
    Verb.MAIL: {2: Phase.MAIL},
    Verb.RCPT: {2: Phase.RCPT},
    Verb.DATA: {3: Phase.DATA},
    # A 3xx to the final dot is an upstream bug; the transaction is over anyway.
    Verb.DATA_END: {2: Phase.READY, 3: Phase.READY, 4: Phase.READY, 5: Phase.READY},
    # A chunk refused (4xx/5xx) fails the transaction but leaves it in BDAT
    # mode: only more BDAT (discarded by the server until LAST) or RSET may
    # follow, RCPT and DATA may not; BDAT ... LAST ends it whatever the reply
    # (RFC 3030 2; Postfix's smtpd: "RCPT after BDAT", "need MAIL command").
    Verb.BDAT: {2: Phase.BDAT, 4: Phase.BDAT, 5: Phase.BDAT},
    Verb.BDAT_LAST: {2: Phase.READY, 4: Phase.READY, 5: Phase.READY},
    Verb.AUTH: {2: Phase.READY, 3: Phase.AUTH},
    Verb.AUTH_RESPONSE: {2: Phase.READY, 3: Phase.AUTH, 4: Phase.READY, 5: Phase.READY},
    Verb.STARTTLS: {2: Phase.CONNECTED},
    Verb.QUIT: {2: Phase.CLOSED},
}
#: RSET ends a transaction only where one is open; elsewhere it is a no-op.
RSET_ENDS: frozenset[Phase] = frozenset({Phase.MAIL, Phase.RCPT, Phase.BDAT})
TRANSITIONS[Verb.RSET] = {2: Phase.READY}

#: Steps that move the phase only from some phases (elsewhere: no change).
ONLY_FROM: dict[Verb, frozenset[Phase]] = {Verb.RSET: RSET_ENDS}

#: Reply classes that are not SMTP for a step: the upstream is broken and
#: the session ends (RFC 5321 4.3.2: a greeting is 220, 554 or 421).
BROKEN: dict[Verb, frozenset[int]] = {Verb.GREETING: frozenset({3})}

#: Flags set by a successful (2xx) reply: step -> (esmtp, authenticated, tls);
#: ``None`` keeps the flag.
FLAG_EFFECTS: dict[Verb, tuple[bool | None, bool | None, bool | None]] = {
    Verb.EHLO: (True, None, None),
    Verb.HELO: (False, None, None),
    Verb.AUTH: (None, True, None),
    Verb.AUTH_RESPONSE: (None, True, None),
    # RFC 3207 4.2: after TLS everything learnt before is discarded.
    Verb.STARTTLS: (False, False, True),
}

#: RFC 2920 3.1 (and RFC 3207, RFC 4954): commands that must end a group:
#: a client sends nothing more until their reply, even with PIPELINING.
GROUP_ENDERS: frozenset[Verb] = frozenset(
    {
        Verb.EHLO,
        Verb.HELO,
        Verb.DATA,
        Verb.VRFY,
        Verb.EXPN,
        Verb.QUIT,
        Verb.NOOP,
        Verb.STARTTLS,
        Verb.AUTH,
        Verb.AUTH_RESPONSE,
    }
)

#: Reply classes an upstream may send.
REPLY_CLASSES = (2, 3, 4, 5)


class Condition(FastEnum):
    """A fact besides the :class:`State` that decides a local answer.

    The value names the :class:`Facts` field that holds it.
    """

    #: Always true (the last row of a verb's answers).
    ALWAYS = "always"
    #: The verb's extension (``EXTENSION_OF``) was not offered to the client.
    UNOFFERED = "unoffered"
    #: TLS is active on the client's side.
    TLS_ACTIVE = "tls_active"
    #: smtpguard has no certificate: it cannot start TLS.
    NO_CERTIFICATE = "no_certificate"
    #: AUTH requires TLS (``auth_require_tls``) and the session is plaintext.
    AUTH_NEEDS_TLS = "auth_needs_tls"
    #: STARTTLS ended the client's EHLO state but not the upstream's.
    REIDENTIFY = "reidentify"
    #: HELP is answered locally (``help_local``).
    HELP_LOCAL = "help_local"


class Facts(NamedTuple):
    """The conditions that hold now (see :class:`Condition`)."""

    always: bool = True
    unoffered: bool = False
    tls_active: bool = False
    no_certificate: bool = False
    auth_needs_tls: bool = False
    reidentify: bool = False
    help_local: bool = False


class Answer(FastEnum):
    """A local answer that is more than a fixed reply."""

    #: 220, then the TLS handshake; the STARTTLS transition is applied
    #: locally (the upstream never sees STARTTLS: smtpguard terminates TLS).
    START_TLS = "start_tls"
    #: EHLO/HELO after STARTTLS: the client must greet again (RFC 3207 4.2),
    #: but the upstream already has its greeting and may refuse a second one
    #: (OpenSMTPD: "503 5.5.1 Already identified").  Answered from the
    #: upstream's last EHLO reply; the transition is applied locally.
    IDENTIFY = "identify"
    #: 214 with the configured help text.
    HELP = "help"


#: Commands in sequence that smtpguard answers itself: per verb, the
#: conditions in order; the first that holds decides (a fixed reply, or an
#: :class:`Answer`).  A verb whose conditions all fail is forwarded.
LOCAL_ANSWERS: dict[Verb, tuple[tuple[Condition, Reply | Answer], ...]] = {
    # RFC 5321 2.2.1: an extension's verbs only once it was offered.
    Verb.AUTH: (
        (Condition.UNOFFERED, R.AUTH_NOT_ENABLED),
        # RFC 4954 4, Postfix's smtpd_tls_auth_only.
        (Condition.AUTH_NEEDS_TLS, R.AUTH_NEEDS_TLS),
    ),
    Verb.ETRN: ((Condition.UNOFFERED, R.NOT_IMPLEMENTED),),
    # Chunking switched off, or not offered by the upstream.
    Verb.BDAT: ((Condition.UNOFFERED, R.NOT_IMPLEMENTED),),
    Verb.STARTTLS: (
        (Condition.TLS_ACTIVE, R.TLS_ALREADY_ACTIVE),
        (Condition.NO_CERTIFICATE, R.STARTTLS_UNAVAILABLE),
        (Condition.ALWAYS, Answer.START_TLS),
    ),
    Verb.EHLO: ((Condition.REIDENTIFY, Answer.IDENTIFY),),
    Verb.HELO: ((Condition.REIDENTIFY, Answer.IDENTIFY),),
    Verb.HELP: ((Condition.HELP_LOCAL, Answer.HELP),),
}

#: The fast path's verbs (see the module docstring): the client verbs that
#: are forwarded when in sequence, but for EHLO/HELO after STARTTLS
#: (REIDENTIFY).  The others need the facts of :data:`LOCAL_ANSWERS` or are
#: never forwarded.
FAST_VERBS: frozenset[Verb] = frozenset(
    verb
    for verb in CLIENT_VERBS
    if verb not in LOCAL_ONLY
    and all(cond is Condition.REIDENTIFY for cond, _ in LOCAL_ANSWERS.get(verb, ()))
)

#: Local answers whose 2xx moves the state as the upstream's would.
APPLIED_LOCALLY: frozenset[Answer] = frozenset({Answer.START_TLS, Answer.IDENTIFY})

#: Local answers that wait until no reply is in flight (they change the
#: state the replies in flight would be applied to).
WAIT_FOR_REPLIES: frozenset[Answer] = frozenset({Answer.START_TLS, Answer.IDENTIFY})

_ANSWERS: dict[tuple[Verb, Facts], Reply | Answer | None] = {}


def local_answer(verb: Verb, facts: Facts) -> Reply | Answer | None:
    """How smtpguard answers ``verb`` itself given ``facts``; None: forward it."""
    key = (verb, facts)
    try:
        return _ANSWERS[key]
    except KeyError:
        pass
    result: Reply | Answer | None = None
    for condition, answer in LOCAL_ANSWERS.get(verb, ()):
        if getattr(facts, condition.value):
            result = answer
            break
    _ANSWERS[key] = result  # bounded: verbs x 2**6 fact combinations
    return result


def must_end_transaction(possible: frozenset[State]) -> bool:
    """A transaction failed on a reply of smtpguard's (a BDAT refused
    locally, RFC 3030 2): True if the upstream may still have one open, so
    that an RSET (whose reply is consumed) must end it too."""
    return any(transition(s, Verb.RSET, 2) != s for s in possible)


_PERMITTED_CACHE: dict[tuple[State, Verb], str | None] = {}
_OUTCOMES_CACHE: dict[tuple[State, Verb], frozenset[State]] = {}


def permitted(state: State, verb: Verb) -> str | None:
    """Return ``None`` if ``verb`` is in sequence in ``state``, else what was expected."""
    # Pure and over a small finite domain: memoized (it runs per command).
    key = (state, verb)
    try:
        return _PERMITTED_CACHE[key]
    except KeyError:
        result = _PERMITTED_CACHE[key] = _permitted(state, verb)
        return result


def _permitted(state: State, verb: Verb) -> str | None:
    phase = state.phase
    if verb not in PERMITTED[phase]:
        return VIOLATION_TEXT.get((phase, verb), PHASE_EXPECTATION[phase])
    for flag, wanted, text in GUARDS.get(verb, ()):
        if getattr(state, flag) is not wanted:
            return text
    return None


_TRANSITION_CACHE: dict[tuple[State, Verb, int], State] = {}


def transition(state: State, step: Verb, reply_class: int) -> State:
    """The state after the upstream answered ``step`` with ``reply_class``."""
    key = (state, step, reply_class)
    try:
        return _TRANSITION_CACHE[key]
    except KeyError:
        result = _TRANSITION_CACHE[key] = _transition(state, step, reply_class)
        return result


def _transition(state: State, step: Verb, reply_class: int) -> State:
    phase = TRANSITIONS.get(step, {}).get(reply_class)
    if phase is None or state.phase not in ONLY_FROM.get(step, (state.phase,)):
        return state
    if reply_class == 2 and step in FLAG_EFFECTS:
        esmtp, authenticated, tls = FLAG_EFFECTS[step]
        return State(
            phase,
            state.esmtp if esmtp is None else esmtp,
            state.authenticated if authenticated is None else authenticated,
            state.tls if tls is None else tls,
        )
    return state._replace(phase=phase)


def outcomes(state: State, step: Verb) -> frozenset[State]:
    """Every state the upstream's reply to ``step`` could lead to (memoized)."""
    key = (state, step)
    try:
        return _OUTCOMES_CACHE[key]
    except KeyError:
        result = _OUTCOMES_CACHE[key] = frozenset(transition(state, step, c) for c in REPLY_CLASSES)
        return result


# Decisions over a *set* of possible states (the states the replies in flight
# could lead to; one state when none is in flight).  The core asks these per
# command; each is memoized on its arguments, which are hashable and drawn
# from a small finite domain.  The caches are emptied if they ever grow past
# _CACHE_LIMIT entries, so no client can make them grow without bound.


class Hold(enum.Enum):
    """The type of :data:`HOLD` (a sentinel, compared by identity)."""

    #: The verdict depends on a reply still in flight: hold the command.
    HOLD = "hold"


HOLD: Final = Hold.HOLD

#: What :func:`verdict` says: ``None`` (in sequence), what was expected
#: instead (out of sequence), or :data:`HOLD`.
Verdict = str | None | Hold

_CACHE_LIMIT = 4096
_VERDICTS: dict[tuple[frozenset[State], Verb], Verdict] = {}
_ADVANCE: dict[tuple[frozenset[State], Verb], frozenset[State]] = {}
_FRAMINGS: dict[frozenset[State], Framing | None] = {}


_SINGLETONS: dict[State, frozenset[State]] = {}


def only(state: State) -> frozenset[State]:
    """``frozenset({state})``, made once per state (the possible states when
    no reply is in flight: every reply recomputes them)."""
    try:
        return _SINGLETONS[state]
    except KeyError:
        result = _SINGLETONS[state] = frozenset({state})
        return result


def verdict(possible: frozenset[State], verb: Verb) -> Verdict:
    """:func:`permitted` in every state of ``possible``: ``None`` if in sequence
    in all, the expectation text if out of sequence in all (the same text),
    :data:`HOLD` if that depends on which state the upstream's replies bring."""
    key = (possible, verb)
    try:
        return _VERDICTS[key]
    except KeyError:
        pass
    verdicts = {permitted(s, verb) for s in possible}
    result: Verdict = verdicts.pop() if len(verdicts) == 1 else HOLD
    if len(_VERDICTS) >= _CACHE_LIMIT:
        _VERDICTS.clear()
    _VERDICTS[key] = result
    return result


def advance(possible: frozenset[State], step: Verb) -> frozenset[State]:
    """The possible states once the upstream has also answered ``step``."""
    key = (possible, step)
    try:
        return _ADVANCE[key]
    except KeyError:
        pass
    result = frozenset(s2 for s in possible for s2 in outcomes(s, step))
    if len(_ADVANCE) >= _CACHE_LIMIT:
        _ADVANCE.clear()
    _ADVANCE[key] = result
    return result


def framing_of(possible: frozenset[State]) -> Framing | None:
    """How the next client bytes are framed in every state of ``possible``;
    ``None`` if that depends on a reply in flight (or nothing is read yet)."""
    try:
        return _FRAMINGS[possible]
    except KeyError:
        pass
    framings = {FRAMING[s.phase] for s in possible}
    result = framings.pop() if len(framings) == 1 else None
    if len(_FRAMINGS) >= _CACHE_LIMIT:
        _FRAMINGS.clear()
    _FRAMINGS[possible] = result
    return result
