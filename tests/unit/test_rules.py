"""The rule tables, pair by pair, against an oracle written from the RFCs."""

from __future__ import annotations

import itertools

import pytest

from smtpguard.protocol import replies as R
from smtpguard.protocol.rules import (
    BROKEN,
    CLIENT_VERBS,
    GROUP_ENDERS,
    HOLD,
    LOCAL_ONLY,
    REPLY_CLASSES,
    Answer,
    Facts,
    Hold,
    Phase,
    State,
    Verb,
    advance,
    framing_of,
    local_answer,
    must_end_transaction,
    outcomes,
    permitted,
    transition,
    verdict,
)

# The oracle: one row per phase, one column per verb; "+" permitted, "." 503.
# Written by hand from RFC 5321 4.1.4 / 3.1, RFC 3030, RFC 3207, RFC 4954,
# RFC 1985 (ETRN: after EHLO, outside a transaction, as Postfix's smtpd),
# independently of rules.py.  Flags (esmtp, authenticated) are set so that
# only the phase decides here; the guards are tested below.
_COLUMNS = "HELO EHLO MAIL RCPT DATA BDAT RSET NOOP QUIT HELP VRFY EXPN AUTH STARTTLS ETRN".split()
_MATRIX = """
greeting   .    .    .    .    .    .    .    .    .    .    .    .    .    .    .
rejected   .    .    .    .    .    .    .    .    +    .    .    .    .    .    .
connected  +    +    .    .    .    .    +    +    +    +    +    +    .    +    .
ready      +    +    +    .    .    .    +    +    +    +    +    +    +    +    +
mail       +    +    .    +    .    .    +    +    +    +    +    +    .    .    .
rcpt       +    +    .    +    +    +    +    +    +    +    +    +    .    .    .
data       .    .    .    .    .    .    .    .    .    .    .    .    .    .    .
bdat       +    +    .    .    .    +    +    +    +    +    +    +    .    .    .
auth       .    .    .    .    .    .    .    .    .    .    .    .    .    .    .
closed     .    .    .    .    .    .    .    .    .    .    .    .    .    .    .
"""


def _oracle() -> dict[tuple[Phase, Verb], bool]:
    table: dict[tuple[Phase, Verb], bool] = {}
    for row in _MATRIX.strip().splitlines():
        name, *cells = row.split()
        assert len(cells) == len(_COLUMNS), row
        for col, cell in zip(_COLUMNS, cells, strict=True):
            table[Phase(name), Verb(col)] = cell == "+"
    return table


ORACLE = _oracle()
RULED_VERBS = [v for v in CLIENT_VERBS if v not in LOCAL_ONLY]


def test_oracle_covers_every_phase_and_verb() -> None:
    assert {p for p, _ in ORACLE} == set(Phase)
    assert {v for _, v in ORACLE} == set(RULED_VERBS)


@pytest.mark.parametrize(
    ("phase", "verb"), list(itertools.product(Phase, RULED_VERBS)), ids=lambda x: x.value
)
def test_every_phase_verb_pair(phase: Phase, verb: Verb) -> None:
    state = State(phase, esmtp=True, authenticated=False)
    expected = permitted(state, verb)
    assert (expected is None) == ORACLE[phase, verb]
    if expected is not None:
        assert expected.strip(), "a 503 must say what was expected"


@pytest.mark.parametrize("phase", [Phase.CONNECTED, Phase.READY, Phase.MAIL, Phase.RCPT])
@pytest.mark.parametrize(
    "verb",
    [Verb.EHLO, Verb.HELO, Verb.RSET, Verb.NOOP, Verb.HELP, Verb.VRFY, Verb.EXPN, Verb.QUIT],
)
def test_rfc5321_never_503_after_greeting(phase: Phase, verb: Verb) -> None:
    for esmtp, auth in itertools.product([False, True], repeat=2):
        assert permitted(State(phase, esmtp, auth), verb) is None


def test_auth_guards() -> None:
    assert permitted(State(Phase.READY, esmtp=False), Verb.AUTH) == "send EHLO first"
    assert permitted(State(Phase.READY, esmtp=True, authenticated=True), Verb.AUTH) == (
        "already authenticated"
    )
    assert permitted(State(Phase.READY, esmtp=True), Verb.AUTH) is None
    assert permitted(State(Phase.MAIL, esmtp=True), Verb.AUTH) == "MAIL transaction in progress"
    assert permitted(State(Phase.CONNECTED, esmtp=True), Verb.AUTH) == "send HELO/EHLO first"


def test_bdat_needs_ehlo() -> None:
    assert permitted(State(Phase.RCPT, esmtp=False), Verb.BDAT) == "send EHLO first"
    assert permitted(State(Phase.RCPT, esmtp=True), Verb.BDAT) is None


@pytest.mark.parametrize(
    ("phase", "verb", "text"),
    [
        (Phase.CONNECTED, Verb.MAIL, "send HELO/EHLO first"),
        (Phase.READY, Verb.RCPT, "need MAIL before RCPT"),
        (Phase.MAIL, Verb.MAIL, "nested MAIL command"),
        (Phase.MAIL, Verb.DATA, "need RCPT command"),
        (Phase.READY, Verb.DATA, "need MAIL command"),
        (Phase.RCPT, Verb.STARTTLS, "MAIL transaction in progress"),
        (Phase.REJECTED, Verb.EHLO, "service refused: only QUIT is accepted"),
    ],
)
def test_violation_texts_name_what_was_expected(phase: Phase, verb: Verb, text: str) -> None:
    assert permitted(State(phase, esmtp=True), verb) == text


def test_bdat_then_data_names_bdat() -> None:
    text = permitted(State(Phase.BDAT, esmtp=True), Verb.DATA)
    assert text is not None and "BDAT" in text


# Transitions: (phase before, step, reply class) -> phase after.
_T = [
    (Phase.GREETING, Verb.GREETING, 2, Phase.CONNECTED),
    (Phase.GREETING, Verb.GREETING, 5, Phase.REJECTED),
    (Phase.GREETING, Verb.GREETING, 4, Phase.CLOSED),
    (Phase.CONNECTED, Verb.EHLO, 2, Phase.READY),
    (Phase.CONNECTED, Verb.EHLO, 5, Phase.CONNECTED),
    (Phase.RCPT, Verb.EHLO, 2, Phase.READY),
    (Phase.READY, Verb.MAIL, 2, Phase.MAIL),
    (Phase.READY, Verb.MAIL, 5, Phase.READY),
    (Phase.READY, Verb.MAIL, 4, Phase.READY),
    (Phase.MAIL, Verb.RCPT, 2, Phase.RCPT),
    (Phase.MAIL, Verb.RCPT, 5, Phase.MAIL),
    (Phase.RCPT, Verb.RCPT, 5, Phase.RCPT),
    (Phase.RCPT, Verb.DATA, 3, Phase.DATA),
    (Phase.RCPT, Verb.DATA, 5, Phase.RCPT),
    (Phase.DATA, Verb.DATA_END, 2, Phase.READY),
    (Phase.DATA, Verb.DATA_END, 5, Phase.READY),
    (Phase.DATA, Verb.DATA_END, 4, Phase.READY),
    (Phase.RCPT, Verb.BDAT, 2, Phase.BDAT),
    # A refused chunk: still a BDAT transaction (failed), as Postfix keeps it.
    (Phase.RCPT, Verb.BDAT, 5, Phase.BDAT),
    (Phase.RCPT, Verb.BDAT, 4, Phase.BDAT),
    (Phase.BDAT, Verb.BDAT, 5, Phase.BDAT),
    (Phase.BDAT, Verb.BDAT_LAST, 2, Phase.READY),
    # BDAT ... LAST ends the transaction whatever the reply.
    (Phase.BDAT, Verb.BDAT_LAST, 5, Phase.READY),
    (Phase.RCPT, Verb.BDAT_LAST, 4, Phase.READY),
    (Phase.RCPT, Verb.RSET, 2, Phase.READY),
    (Phase.CONNECTED, Verb.RSET, 2, Phase.CONNECTED),
    (Phase.READY, Verb.AUTH, 3, Phase.AUTH),
    (Phase.READY, Verb.AUTH, 5, Phase.READY),
    (Phase.AUTH, Verb.AUTH_RESPONSE, 3, Phase.AUTH),
    (Phase.AUTH, Verb.AUTH_RESPONSE, 5, Phase.READY),
    (Phase.READY, Verb.STARTTLS, 2, Phase.CONNECTED),
    (Phase.READY, Verb.QUIT, 2, Phase.CLOSED),
    (Phase.MAIL, Verb.NOOP, 2, Phase.MAIL),
    (Phase.RCPT, Verb.VRFY, 2, Phase.RCPT),
]


@pytest.mark.parametrize(("before", "step", "cls", "after"), _T)
def test_transitions(before: Phase, step: Verb, cls: int, after: Phase) -> None:
    assert transition(State(before, esmtp=True), step, cls).phase is after


def test_flags_move_on_replies() -> None:
    s = transition(State(Phase.CONNECTED), Verb.EHLO, 2)
    assert s == State(Phase.READY, esmtp=True)
    s = transition(s, Verb.AUTH, 2)
    assert s.authenticated
    s = transition(State(Phase.AUTH, esmtp=True), Verb.AUTH_RESPONSE, 2)
    assert s == State(Phase.READY, esmtp=True, authenticated=True)
    # RFC 3207 4.2: TLS discards what was learnt, a new EHLO is needed.
    s = transition(State(Phase.READY, esmtp=True, authenticated=True), Verb.STARTTLS, 2)
    assert s == State(Phase.CONNECTED, esmtp=False, authenticated=False, tls=True)
    assert permitted(s, Verb.MAIL) == "send HELO/EHLO first"
    assert transition(State(Phase.CONNECTED, esmtp=True), Verb.HELO, 2).esmtp is False


def test_failed_replies_never_change_state_except_end_of_content_and_chunks() -> None:
    for phase, step in itertools.product(Phase, Verb):
        state = State(phase, esmtp=True)
        for cls in (4, 5):
            after = transition(state, step, cls)
            if step in (Verb.DATA_END, Verb.AUTH_RESPONSE, Verb.GREETING):
                continue
            if step in (Verb.BDAT, Verb.BDAT_LAST):
                continue  # a refused chunk fails the transaction (in _T above)
            assert after == state, (phase, step, cls)


def test_outcomes_cover_every_reply_class() -> None:
    state = State(Phase.READY, esmtp=True)
    assert outcomes(state, Verb.MAIL) == {state, state._replace(phase=Phase.MAIL)}
    assert len(REPLY_CLASSES) == 4


def _possible_sets() -> list[frozenset[State]]:
    """Every set of possible states the core can hold: a state, then each of
    up to two replies in flight (every step) applied to it."""
    states = [
        State(phase, esmtp, authenticated, tls)
        for phase in Phase
        for esmtp, authenticated, tls in itertools.product((False, True), repeat=3)
    ]
    sets = {frozenset({s}) for s in states}
    for _ in range(2):
        sets |= {
            frozenset(s2 for s in possible for s2 in outcomes(s, step))
            for possible in sets
            for step in Verb
        }
    return sorted(sets, key=repr)


def test_memoized_set_decisions_match_the_rules() -> None:
    """verdict/advance/framing_of (memoized, per command) against the plain
    per-state rules, over every reachable set of possible states."""
    from smtpguard.protocol import rules

    sets = _possible_sets()
    assert len(sets) > 100
    for possible in sets:
        framings = {rules.FRAMING[s.phase] for s in possible}
        assert framing_of(possible) == (framings.pop() if len(framings) == 1 else None)
        for verb in Verb:
            verdicts = {permitted(s, verb) for s in possible}
            want = verdicts.pop() if len(verdicts) == 1 else HOLD
            assert verdict(possible, verb) == want
            assert advance(possible, verb) == frozenset(
                s2 for s in possible for s2 in outcomes(s, verb)
            )


def test_memo_caches_stay_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    from smtpguard.protocol import rules

    monkeypatch.setattr(rules, "_CACHE_LIMIT", 50)
    for cache in (rules._VERDICTS, rules._ADVANCE, rules._FRAMINGS):
        cache.clear()
    for possible in _possible_sets():
        framing_of(possible)
        for verb in Verb:
            verdict(possible, verb)
            advance(possible, verb)
    for cache in (rules._VERDICTS, rules._ADVANCE, rules._FRAMINGS):
        assert 0 < len(cache) <= 50


# ---------------------------------------------------------------------------
# The full sweep: every state (every phase with every flag combination),
# every verb, every step and every reply class, against an oracle written
# here from the RFCs, independently of rules.py's tables.

ALL_STATES = [
    State(phase, esmtp, authenticated, tls)
    for phase in Phase
    for esmtp, authenticated, tls in itertools.product((False, True), repeat=3)
]


def _oracle_permitted(state: State, verb: Verb) -> bool:
    """RFC 5321 4.1.4 (the matrix above), RFC 4954 4 (AUTH after EHLO, once),
    RFC 3030 2 (BDAT only after EHLO: CHUNKING is an ESMTP extension)."""
    if not ORACLE[state.phase, verb]:
        return False
    if verb is Verb.AUTH:
        return state.esmtp and not state.authenticated
    if verb is Verb.BDAT:
        return state.esmtp
    return True


@pytest.mark.parametrize("state", ALL_STATES, ids=repr)
def test_every_state_and_verb_against_the_oracle(state: State) -> None:
    for verb in RULED_VERBS:
        expected = permitted(state, verb)
        assert (expected is None) == _oracle_permitted(state, verb), (state, verb)
        if expected is not None:
            assert expected.strip()
        # One state, no reply in flight: the set decision is the same.
        assert verdict(frozenset({state}), verb) == expected


def _oracle_transition(state: State, step: Verb, cls: int) -> State:
    """How the upstream's reply moves the session, read from the RFCs."""
    p, esmtp, auth, tls = state
    same = state
    if step is Verb.GREETING:  # RFC 5321 3.1 / 4.3.2: 220, 421, 554
        return {
            2: State(Phase.CONNECTED, esmtp, auth, tls),
            4: state._replace(phase=Phase.CLOSED),
            5: state._replace(phase=Phase.REJECTED),
        }.get(cls, same)
    if step in (Verb.EHLO, Verb.HELO):  # RFC 5321 4.1.4: resets any transaction
        return State(Phase.READY, step is Verb.EHLO, auth, tls) if cls == 2 else same
    if step is Verb.MAIL:
        return state._replace(phase=Phase.MAIL) if cls == 2 else same
    if step is Verb.RCPT:
        return state._replace(phase=Phase.RCPT) if cls == 2 else same
    if step is Verb.DATA:  # 354 starts the body
        return state._replace(phase=Phase.DATA) if cls == 3 else same
    if step is Verb.DATA_END:  # the transaction is over whatever the reply
        return state._replace(phase=Phase.READY)
    if step is Verb.BDAT:  # RFC 3030 2: a refused chunk still leaves BDAT mode
        return state._replace(phase=Phase.BDAT) if cls != 3 else same
    if step is Verb.BDAT_LAST:
        return state._replace(phase=Phase.READY) if cls != 3 else same
    if step is Verb.AUTH:  # RFC 4954: 334 starts the exchange, 235 ends it
        if cls == 2:
            return State(Phase.READY, esmtp, True, tls)
        return state._replace(phase=Phase.AUTH) if cls == 3 else same
    if step is Verb.AUTH_RESPONSE:
        if cls == 2:
            return State(Phase.READY, esmtp, True, tls)
        return state._replace(phase=Phase.AUTH if cls == 3 else Phase.READY)
    if step is Verb.STARTTLS:  # RFC 3207 4.2: everything learnt is forgotten
        return State(Phase.CONNECTED, False, False, True) if cls == 2 else same
    if step is Verb.QUIT:
        return state._replace(phase=Phase.CLOSED) if cls == 2 else same
    if step is Verb.RSET:  # RFC 5321 4.1.1.5: ends a transaction, if any
        if cls == 2 and p in (Phase.MAIL, Phase.RCPT, Phase.BDAT):
            return state._replace(phase=Phase.READY)
        return same
    return same  # NOOP, HELP, VRFY, EXPN, ETRN ...: no change


@pytest.mark.parametrize("state", ALL_STATES, ids=repr)
def test_every_state_step_and_reply_class_against_the_oracle(state: State) -> None:
    for step in Verb:
        for cls in REPLY_CLASSES:
            assert transition(state, step, cls) == _oracle_transition(state, step, cls), (
                state,
                step,
                cls,
            )
        assert outcomes(state, step) == {_oracle_transition(state, step, c) for c in REPLY_CLASSES}


def test_only_a_3xx_greeting_is_broken() -> None:
    for step in Verb:
        for cls in REPLY_CLASSES:
            assert (cls in BROKEN.get(step, ())) == (step is Verb.GREETING and cls == 3)


def test_group_enders_are_rfc2920s() -> None:
    # RFC 2920 3.1 (TURN is not relayed), RFC 3207 4 (STARTTLS), RFC 4954 4
    # (AUTH and each SASL response wait for their reply); HELO as EHLO.
    want = "EHLO HELO DATA VRFY EXPN QUIT NOOP STARTTLS AUTH AUTH_RESPONSE".split()
    assert {Verb(v) for v in want} == GROUP_ENDERS


def _oracle_local(verb: Verb, f: Facts) -> R.Reply | Answer | None:
    """What smtpguard answers itself for a command in sequence."""
    if verb is Verb.AUTH:  # RFC 5321 2.2.1, RFC 4954 4 and Postfix's texts
        if f.unoffered:
            return R.AUTH_NOT_ENABLED
        return R.AUTH_NEEDS_TLS if f.auth_needs_tls else None
    if verb in (Verb.ETRN, Verb.BDAT):
        return R.NOT_IMPLEMENTED if f.unoffered else None
    if verb is Verb.STARTTLS:  # RFC 3207: smtpguard terminates TLS itself
        if f.tls_active:
            return R.TLS_ALREADY_ACTIVE
        return R.STARTTLS_UNAVAILABLE if f.no_certificate else Answer.START_TLS
    if verb in (Verb.EHLO, Verb.HELO):
        return Answer.IDENTIFY if f.reidentify else None
    if verb is Verb.HELP:
        return Answer.HELP if f.help_local else None
    return None


def test_every_verb_and_condition_against_the_oracle() -> None:
    names = [n for n in Facts._fields if n != "always"]
    for values in itertools.product((False, True), repeat=len(names)):
        facts = Facts(**dict(zip(names, values, strict=True)))
        for verb in Verb:
            assert local_answer(verb, facts) == _oracle_local(verb, facts), (verb, facts)


def test_hold_is_a_sentinel() -> None:
    assert isinstance(HOLD, Hold) and HOLD is Hold.HOLD
    possible = frozenset({State(Phase.READY, True), State(Phase.MAIL, True)})
    assert verdict(possible, Verb.RCPT) is HOLD


@pytest.mark.parametrize("state", ALL_STATES, ids=repr)
def test_an_rset_is_needed_only_where_a_transaction_may_be_open(state: State) -> None:
    assert must_end_transaction(frozenset({state})) == (
        state.phase in (Phase.MAIL, Phase.RCPT, Phase.BDAT)
    )
