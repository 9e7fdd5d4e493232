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

Sources: RFC 5321 4.1.1 and 4.1.4 (order; EHLO, HELO, RSET, NOOP, HELP,
VRFY, EXPN and QUIT must not get 503), RFC 5321 3.1 (after a 554 greeting
only QUIT), RFC 2920 (pipelining), RFC 3030 (BDAT; DATA inside a BDAT
transaction is 503), RFC 3207 (after STARTTLS the session starts over and
needs a new EHLO), RFC 4954 (AUTH after EHLO, not in a transaction, only
once).  Reply texts follow Postfix's where Postfix has one.
"""

from __future__ import annotations

import enum
from typing import NamedTuple


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

#: Steps after which the next client bytes cannot be framed until the reply
#: is known (a 354 turns them into a body, a 334 into a SASL line).
FRAMING_DEPENDS: frozenset[Verb] = frozenset(
    {Verb.DATA, Verb.AUTH, Verb.AUTH_RESPONSE, Verb.STARTTLS, Verb.GREETING}
)

#: Reply classes an upstream may send.
REPLY_CLASSES = (2, 3, 4, 5)


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
    if step is Verb.RSET:
        if reply_class == 2 and state.phase in RSET_ENDS:
            return state._replace(phase=Phase.READY)
        return state
    target = TRANSITIONS.get(step)
    if target is None:
        return state
    phase = target.get(reply_class)
    if phase is None:
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

#: A verdict that depends on a reply still in flight: hold the command.
HOLD = "\0hold"

_CACHE_LIMIT = 4096
_VERDICTS: dict[tuple[frozenset[State], Verb], str | None] = {}
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


def verdict(possible: frozenset[State], verb: Verb) -> str | None:
    """:func:`permitted` in every state of ``possible``: ``None`` if in sequence
    in all, the expectation text if out of sequence in all (the same text),
    :data:`HOLD` if that depends on which state the upstream's replies bring."""
    key = (possible, verb)
    try:
        return _VERDICTS[key]
    except KeyError:
        pass
    verdicts = {permitted(s, verb) for s in possible}
    result = verdicts.pop() if len(verdicts) == 1 else HOLD
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
