"""The limits and rates on MAIL and RCPT (protocol/limits.py), alone."""

from __future__ import annotations

from smtpguard.protocol import limits
from smtpguard.protocol import policy as P
from smtpguard.protocol.defences import Defences
from smtpguard.protocol.events import Event, PolicyAction
from smtpguard.protocol.policy import Action, Defence, Policy
from smtpguard.protocol.rules import Verb

NONE: frozenset[bytes] = frozenset()


def _defences(**policy: object) -> tuple[Defences, list[Event]]:
    events: list[Event] = []
    return Defences(Policy(**policy), events), events  # type: ignore[arg-type]


def test_nothing_is_refused_by_default() -> None:
    d, events = _defences()
    assert limits.refusal(Verb.MAIL, b"MAIL FROM:<a@b> SIZE=99999999", 0, NONE, d) is None
    assert limits.refusal(Verb.RCPT, b"RCPT TO:<a@b>", 50, NONE, d) is None
    assert limits.refusal(Verb.NOOP, b"NOOP", 10**6, NONE, d) is None
    assert events == []


def test_declared_eight_bit_is_refused_only_without_upstream_8bitmime() -> None:
    d, events = _defences(reject_eight_bit=True)
    mail = b"MAIL FROM:<a@b> body=8bitmime"
    assert limits.refusal(Verb.MAIL, mail, 0, NONE, d) is P.EIGHT_BIT_REFUSED
    assert events == [PolicyAction(Defence.EIGHT_BIT, Action.REJECT, "BODY=8BITMIME")]
    assert limits.refusal(Verb.MAIL, mail, 0, frozenset({b"8BITMIME"}), d) is None
    assert not limits.declares_eight_bit(mail, NONE, Policy())


def test_declared_size_and_recipients() -> None:
    d, events = _defences(max_message_bytes=100, max_recipients=2)
    assert limits.refusal(Verb.MAIL, b"MAIL FROM:<a@b> SIZE=101", 0, NONE, d) is P.MESSAGE_TOO_BIG
    assert limits.refusal(Verb.MAIL, b"MAIL FROM:<a@b> SIZE=100", 0, NONE, d) is None
    assert limits.refusal(Verb.RCPT, b"RCPT TO:<a@b>", 1, NONE, d) is None
    assert limits.refusal(Verb.RCPT, b"RCPT TO:<a@b>", 2, NONE, d) is P.TOO_MANY_RECIPIENTS
    assert [e.defence for e in events if isinstance(e, PolicyAction)] == [
        Defence.MESSAGE_SIZE,
        Defence.RECIPIENTS,
    ]


def test_observe_mode_reports_but_refuses_nothing() -> None:
    d, events = _defences(max_recipients=1, observe_limits=True)
    assert limits.refusal(Verb.RCPT, b"RCPT TO:<a@b>", 1, NONE, d) is None
    assert len(events) == 1


def test_rates_ask_admit_for_the_kind() -> None:
    asked: list[str] = []

    def admit(kind: str) -> bool:
        asked.append(kind)
        return False

    assert limits.rate_refusal(Verb.MAIL, None) is None
    assert limits.rate_refusal(Verb.MAIL, admit) is P.TOO_MUCH_MAIL
    assert limits.rate_refusal(Verb.RCPT, admit) is P.RCPT_RATE
    assert limits.rate_refusal(Verb.RCPT, lambda _kind: True) is None
    assert asked == ["message", "recipient"]
