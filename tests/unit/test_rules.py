"""The rule tables, pair by pair, against an oracle written from the RFCs."""

from __future__ import annotations

import itertools

import pytest

from smtpguard.protocol.rules import (
    CLIENT_VERBS,
    HOLD,
    LOCAL_ONLY,
    REPLY_CLASSES,
    Phase,
    State,
    Verb,
    advance,
    framing_of,
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
