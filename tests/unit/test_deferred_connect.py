"""Deferred upstream connect in the core: smtpguard greets, the first line
decides whether an upstream is needed, and the upstream's own greeting is
consumed (or, refusing, answers the client's first command)."""

from __future__ import annotations

from smtpguard.protocol import Session, SessionOptions, greeting
from smtpguard.protocol.framing import ReplyParser, UpstreamReply
from smtpguard.protocol.policy import Policy
from smtpguard.protocol.rules import Phase

BANNER = b"220 mx.example ESMTP Postfix\r\n"


def deferred(**options: object) -> Session:
    s = Session(SessionOptions(local_greeting=BANNER, **options))  # type: ignore[arg-type]
    s.greet()
    assert s.take_client_bytes() == BANNER
    return s


def test_the_first_command_asks_for_the_upstream_and_waits_for_it() -> None:
    s = deferred()
    s.receive_client(b"EH")
    assert not s.wants_upstream  # an incomplete line spends no upstream slot
    s.receive_client(b"LO client.test\r\nMAIL FROM:<a@b>\r\n")
    assert s.wants_upstream
    assert s.take_upstream_bytes() == b""  # nothing before the upstream greets
    s.receive_upstream(b"220 mx.example ESMTP Postfix\r\n")
    assert s.take_client_bytes() == b""  # its greeting is consumed: the client had ours
    assert s.upstream_banner == b"mx.example ESMTP Postfix"
    assert s.take_upstream_bytes() == b"EHLO client.test\r\n"
    s.receive_upstream(b"250-mx.example\r\n250 PIPELINING\r\n")
    assert s.take_upstream_bytes() == b"MAIL FROM:<a@b>\r\n"
    assert s.take_client_bytes().startswith(b"250-mx.example\r\n")


def test_quit_first_is_answered_without_an_upstream() -> None:
    s = deferred()
    s.receive_client(b"QUIT\r\n")
    assert not s.wants_upstream
    assert s.take_client_bytes() == b"221 Bye\r\n"
    assert s.closed and s.close_reason == "quit"


def test_non_smtp_clients_are_judged_before_any_upstream() -> None:
    http = deferred()
    http.receive_client(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert http.closed and not http.wants_upstream
    assert http.take_client_bytes().startswith(b"521 5.7.0 ")
    tls = deferred()
    tls.receive_client(b"\x16\x03\x01\x00\xa5\x01\x00")
    assert tls.closed and not tls.wants_upstream
    assert tls.take_client_bytes() == b""  # a text reply means nothing to a TLS client


def test_an_upstream_refusing_with_554_answers_the_first_command() -> None:
    s = deferred()
    s.receive_client(b"EHLO client.test\r\n")
    s.receive_upstream(b"554 5.7.1 mx.example: no service for you\r\n")
    assert s.take_upstream_bytes() == b""
    assert s.take_client_bytes() == b"554 5.7.1 mx.example: no service for you\r\n"
    assert s.state.phase is Phase.REJECTED
    s.receive_client(b"MAIL FROM:<a@b>\r\nQUIT\r\n")
    assert s.take_client_bytes().startswith(b"503 ")
    assert s.take_upstream_bytes() == b"QUIT\r\n"


def test_an_upstream_greeting_421_is_relayed_and_closes() -> None:
    s = deferred()
    s.receive_client(b"EHLO client.test\r\n")
    s.receive_upstream(b"421 4.3.2 mx.example busy\r\n")
    assert s.take_client_bytes() == b"421 4.3.2 mx.example busy\r\n"
    assert s.closed and s.take_upstream_bytes() == b""


def test_bytes_before_our_greeting_are_early_talk() -> None:
    s = Session(SessionOptions(local_greeting=BANNER, policy=Policy(early_talk="disconnect")))
    s.receive_client(b"EHLO early\r\n")  # greet_wait: not greeted yet
    assert s.closed
    assert s.take_client_bytes().startswith(b"521 ")


def test_a_client_over_its_message_or_recipient_rate_gets_450() -> None:
    asked: list[str] = []
    budget = {"message": 1, "recipient": 1}

    def admit(kind: str) -> bool:
        asked.append(kind)
        budget[kind] -= 1
        return budget[kind] >= 0

    s = Session(SessionOptions(admit=admit))
    s.receive_upstream(b"220 up\r\n")
    s.receive_client(b"EHLO c\r\n")
    s.receive_upstream(b"250-up\r\n250 ENHANCEDSTATUSCODES\r\n")
    s.take_client_bytes()
    s.take_upstream_bytes()
    s.receive_client(b"MAIL FROM:<a@b>\r\n")
    s.receive_upstream(b"250 2.1.0 ok\r\n")
    s.receive_client(b"RCPT TO:<c@d>\r\n")
    s.receive_upstream(b"250 2.1.5 ok\r\n")
    s.receive_client(b"RCPT TO:<e@f>\r\n")
    assert s.take_upstream_bytes() == b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\n"
    assert s.take_client_bytes().endswith(
        b"450 4.7.1 Error: too many recipients from you, try again later\r\n"
    )
    s.receive_client(b"RSET\r\n")
    s.receive_upstream(b"250 2.0.0 ok\r\n")
    s.take_client_bytes()
    s.receive_client(b"MAIL FROM:<a@b>\r\n")
    assert s.take_upstream_bytes() == b"RSET\r\n"  # the second MAIL never went out
    assert s.take_client_bytes() == (
        b"450 4.7.1 Error: too much mail from you, try again later\r\n"
    )
    assert asked == ["message", "recipient", "recipient", "message"]


def test_non_smtp_in_observe_mode_goes_to_the_upstream_once_judged() -> None:
    # Before: it was neither closed nor sent on: buffered without bound.
    s = deferred(policy=Policy(non_smtp="observe"))
    s.receive_client(b"GET / HTTP/1.0\r\n")
    assert s.wants_upstream and not s.closed
    for _ in range(50):
        s.receive_client(b"X-Header: value\r\n")
    judged = [e for e in s.take_events() if type(e).__name__ == "PolicyAction"]
    assert len(judged) == 1


def test_a_client_half_closing_after_its_commands_still_gets_answers() -> None:
    # printf 'EHLO c\r\nQUIT\r\n' | nc -N: before, only the 220 came back.
    s = deferred()
    s.receive_client(b"EHLO c\r\nQUIT\r\n")
    s.client_eof()
    assert not s.closed and s.wants_upstream
    s.receive_upstream(b"220 up\r\n")
    assert s.take_upstream_bytes() == b"EHLO c\r\n"
    s.receive_upstream(b"250 up\r\n")
    assert s.take_upstream_bytes() == b"QUIT\r\n"
    s.receive_upstream(b"221 bye\r\n")
    answers = s.take_client_bytes()
    assert answers.startswith(b"250-up\r\n") and answers.endswith(b"\r\n221 bye\r\n")
    assert s.closed and s.close_reason == "quit"


# ------------------------------------------------- the part alone


def _reply(raw: bytes) -> UpstreamReply:
    (reply,) = ReplyParser().feed(raw)
    return reply


def test_deferred_judges_the_first_line_once() -> None:
    d = greeting.Deferred()
    assert d.judge_once(b"EHL", 512) is None  # incomplete: not judged yet
    assert not d.judged
    assert d.judge_once(b"QUIT\r\n", 512) is greeting.FirstLine.QUIT
    assert d.judge_once(b"GET / HTTP/1.0\r\n", 512) is None  # once only


def test_deferred_upstream_greetings() -> None:
    d = greeting.Deferred()
    assert not d.upstream_greeted(_reply(b"220 mx.example ESMTP\r\n"))
    assert d.banner == b"mx.example ESMTP" and d.refusal is None
    assert greeting.Deferred().upstream_greeted(_reply(b"421 busy\r\n"))
    assert greeting.Deferred().upstream_greeted(_reply(b"450 later\r\n"))
    refused = greeting.Deferred()
    assert not refused.upstream_greeted(_reply(b"554 go away\r\n"))
    assert refused.take_refusal() == b"554 go away\r\n"
    assert refused.take_refusal() is None  # one command hears it


def test_wants_upstream_for_commands_only() -> None:
    assert greeting.wants_upstream(b"EHLO x\r\n", 512)
    assert not greeting.wants_upstream(b"EHLO x", 512)
    assert not greeting.wants_upstream(b"QUIT\r\n", 512)
    assert greeting.wants_upstream(b"x" * 512, 512)  # too long for a command: answered 500
