"""Protection policies in the core: each defence, each action, and observe mode."""

from __future__ import annotations

import tracemalloc

import pytest
from support.driver import Peer, policy_actions
from support.ehlo import EHLO_AUTH, EHLO_SIZE

from smtpguard.config import load
from smtpguard.protocol import Session, SessionOptions
from smtpguard.protocol.events import PolicyAction
from smtpguard.protocol.policy import Defence, Policy


def session(**policy: object) -> Session:
    s = Session(SessionOptions(hostname="g", policy=Policy(**policy)))  # type: ignore[arg-type]
    s.receive_upstream(b"220 up\r\n")
    s.take_client_bytes()
    return s


def ready(**policy: object) -> Session:
    s = session(**policy)
    s.receive_client(b"EHLO c\r\n")
    s.receive_upstream(EHLO_SIZE)
    s.take_client_bytes()
    s.take_upstream_bytes()
    return s


def actions(s: Session) -> list[tuple[str, str]]:
    return [(e.defence.value, e.action) for e in s.take_events() if isinstance(e, PolicyAction)]


def in_data(s: Session) -> None:
    for line in (b"MAIL FROM:<a@b>\r\n", b"RCPT TO:<c@d>\r\n"):
        s.receive_client(line)
        s.receive_upstream(b"250 ok\r\n")
    s.receive_client(b"DATA\r\n")
    s.receive_upstream(b"354 go\r\n")
    s.take_client_bytes()
    s.take_upstream_bytes()
    s.take_events()


@pytest.mark.parametrize("action", ["observe", "reject", "disconnect"])
def test_sequence_actions(action: str) -> None:
    s = ready(sequence=action)
    s.receive_client(b"RCPT TO:<a@b>\r\n")
    up, down = s.take_upstream_bytes(), s.take_client_bytes()
    assert actions(s) == [("sequence", action)]
    if action == "observe":
        assert up == b"RCPT TO:<a@b>\r\n" and down == b""  # forwarded, upstream answers
        s.receive_upstream(b"503 5.5.1 need MAIL\r\n")
        assert s.take_client_bytes() == b"503 5.5.1 need MAIL\r\n"
    else:
        assert up == b""
        assert down == b"503 5.5.1 Error: need MAIL before RCPT\r\n"
        assert s.closed == (action == "disconnect")


@pytest.mark.parametrize("action", ["normalize", "observe", "reject"])
def test_smuggling_in_data(action: str) -> None:
    s = ready(smuggling=action)
    in_data(s)
    s.receive_client(b"hi\n.\nMAIL FROM:<evil@x>\r\n.\r\n")
    up = s.take_upstream_bytes()
    found = actions(s)
    assert ("smuggling", action) in found
    if action == "reject":
        assert s.closed and s.close_reason == "policy"
        assert s.take_client_bytes() == b"550 5.5.2 Error: bare <CR> or <LF> received\r\n"
        assert b"\r\n.\r\n" not in up  # the message is never completed upstream
    elif action == "normalize":
        assert up == b"hi\r\n..\r\nMAIL FROM:<evil@x>\r\n.\r\n"
    else:
        assert up == b"hi\n..\nMAIL FROM:<evil@x>\r\n.\r\n"


@pytest.mark.parametrize(
    ("action", "line", "forwarded"),
    [
        ("normalize", b"NOOP\n", b"NOOP\r\n"),
        ("observe", b"NOOP\n", b"NOOP\r\n"),
        ("reject", b"NOOP\n", b""),
        ("normalize", b"NOOP x\rRSET\r\n", b""),
        ("observe", b"NOOP x\rRSET\r\n", b"NOOP x\rRSET\r\n"),
    ],
)
def test_bare_newlines_in_commands(action: str, line: bytes, forwarded: bytes) -> None:
    s = ready(smuggling=action)
    s.receive_client(line)
    assert s.take_upstream_bytes() == forwarded
    assert ("smuggling", action) in actions(s)
    if not forwarded:
        assert s.take_client_bytes() == b"500 5.5.2 Error: bare <CR> or <LF> in command\r\n"


@pytest.mark.parametrize("action", ["observe", "reject", "disconnect"])
def test_pipelining_past_a_group_ender(action: str) -> None:
    s = session(pipelining=action)
    s.receive_client(b"EHLO c\r\nMAIL FROM:<a@b>\r\n")
    assert actions(s) == [("pipelining", action)]
    s.receive_upstream(EHLO_SIZE)
    up, down = s.take_upstream_bytes(), s.take_client_bytes()
    if action == "observe":
        assert up == b"EHLO c\r\nMAIL FROM:<a@b>\r\n"
        assert not s.closed
    else:
        assert up == b"EHLO c\r\n"
        assert down.endswith(b"554 5.5.0 Error: SMTP protocol synchronization\r\n")
        assert s.closed == (action == "disconnect")


def test_pipelining_allowed_cases() -> None:
    s = ready(pipelining="reject")
    s.receive_client(b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n")  # RFC 2920 group
    s.receive_upstream(b"250 ok\r\n")  # MAIL: releases the held RCPT
    s.receive_upstream(b"250 ok\r\n")  # RCPT: releases the held DATA
    assert s.take_upstream_bytes().endswith(b"DATA\r\n")
    assert actions(s) == []
    s.receive_client(b"RSET\r\n")  # sent before DATA's reply: DATA ends a group
    assert actions(s) == [("pipelining", "reject")]
    t = session(pipelining="reject")
    t.receive_client(b"EHLO c\r\nQUIT\r\n")  # tolerated
    assert actions(t) == []


def test_sending_ahead_when_pipelining_not_offered() -> None:
    s = Session(SessionOptions(offer_pipelining=False, policy=Policy(pipelining="reject")))
    s.receive_upstream(b"220 up\r\n")
    s.receive_client(b"EHLO c\r\n")
    s.receive_upstream(b"250-up\r\n250-PIPELINING\r\n250 8BITMIME\r\n")
    assert b"PIPELINING" not in s.take_client_bytes()
    s.receive_client(b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\n")
    assert actions(s) == [("pipelining", "reject")]
    assert s.take_upstream_bytes() == b"EHLO c\r\nMAIL FROM:<a@b>\r\n"


@pytest.mark.parametrize("action", ["observe", "reject", "disconnect"])
def test_early_talk(action: str) -> None:
    s = Session(SessionOptions(hostname="g", policy=Policy(early_talk=action)))
    s.receive_client(b"EHLO early\r\n")
    assert actions(s) == [("early_talk", action)]
    if action == "disconnect":
        assert s.closed
        assert s.take_client_bytes() == (
            b"521 5.5.1 g Error: protocol error: talked before the greeting\r\n"
        )
        return
    s.receive_upstream(b"220 up\r\n")
    expected = b"EHLO early\r\n" if action == "observe" else b""
    assert s.take_upstream_bytes() == expected


@pytest.mark.parametrize(
    "first", [b"GET / HTTP/1.1\r\n", b"POST /x HTTP/1.0\r\n", b"Subject: hi\r\n"]
)
@pytest.mark.parametrize("action", ["observe", "disconnect"])
def test_non_smtp_commands(first: bytes, action: str) -> None:
    s = session(non_smtp=action)
    s.receive_client(first)
    assert actions(s) == [("non_smtp", action)]
    assert s.take_upstream_bytes() == b""
    out = s.take_client_bytes()
    if action == "disconnect":
        assert s.closed and out == b"521 5.7.0 g Error: non-SMTP command\r\n"
    else:
        assert not s.closed and out.startswith(b"500 ")


def test_tls_client_hello_on_plaintext_port_is_dropped_silently() -> None:
    s = session()
    s.receive_client(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
    assert s.closed and s.close_reason == "policy"
    assert s.take_client_bytes() == b""
    assert actions(s) == [("non_smtp", "disconnect")]


def test_recipient_limit() -> None:
    s = ready(max_recipients=2)
    s.receive_client(b"MAIL FROM:<a@b>\r\n")
    s.receive_upstream(b"250 ok\r\n")
    s.receive_client(b"RCPT TO:<1@x>\r\nRCPT TO:<2@x>\r\nRCPT TO:<3@x>\r\n")
    assert s.take_upstream_bytes().count(b"RCPT") == 2
    s.receive_upstream(b"250 ok\r\n250 ok\r\n")
    assert s.take_client_bytes().endswith(b"452 4.5.3 Error: too many recipients\r\n")
    assert ("recipients", "reject") in actions(s)


def test_message_size_limit_declared_and_actual() -> None:
    s = ready(max_message_bytes=1000)
    s.receive_client(b"MAIL FROM:<a@b> SIZE=5000\r\n")
    assert s.take_upstream_bytes() == b""
    assert s.take_client_bytes() == b"552 5.3.4 Error: message file too big\r\n"
    t = ready(max_message_bytes=1000)
    in_data(t)
    t.receive_client(b"x" * 1500)
    assert t.closed and t.close_reason == "policy"
    assert t.take_client_bytes() == b"552 5.3.4 Error: message file too big\r\n"
    assert ("message_size", "reject") in actions(t)


def test_size_is_advertised_at_our_limit() -> None:
    s = session(max_message_bytes=1000)
    s.receive_client(b"EHLO c\r\n")
    s.receive_upstream(EHLO_SIZE)
    assert b"250-SIZE 1000\r\n" in s.take_client_bytes()


def test_unknown_command_budget_and_hard_error_limit() -> None:
    s = ready(max_unknown_commands=3, hard_error_limit=100)
    s.receive_client(b"FOO\r\n" * 5)
    out = s.take_client_bytes()
    assert out.count(b"500 5.5.2") == 4
    assert out.endswith(b"421 4.7.0 g Error: too many errors\r\n")
    assert s.closed
    t = ready(hard_error_limit=3)
    t.receive_client(b"RCPT TO:<a@b>\r\nDATA\r\nRCPT TO:<a@b>\r\nNOOP\r\n")
    out = t.take_client_bytes()
    assert out.count(b"503") == 3 and out.endswith(b"421 4.7.0 g Error: too many errors\r\n")
    assert t.take_upstream_bytes() == b""  # the NOOP after the limit was never read
    assert ("error_limit", "reject") in actions(t)


def test_observe_mode_counts_and_forwards_everything() -> None:
    config = load(
        {
            "policy": {"mode": "observe", "sequence": "disconnect", "smuggling": "reject"},
            "limits": {"max_recipients": 1, "max_unknown_commands": 1},
        }
    )
    policy = config.session.policy
    assert (policy.sequence, policy.smuggling, policy.pipelining) == ("observe",) * 3
    assert policy.observe_limits
    s = Session(config.session)
    s.receive_upstream(b"220 up\r\n")
    s.receive_client(b"EHLO c\r\n")
    s.receive_upstream(EHLO_SIZE)
    s.receive_client(b"RCPT TO:<a@b>\r\n")
    s.receive_upstream(b"503 no\r\n")
    s.receive_client(b"MAIL FROM:<a@b>\r\n")
    s.receive_upstream(b"250 ok\r\n")
    s.receive_client(b"RCPT TO:<1@x>\r\nRCPT TO:<2@x>\r\n")
    up = s.take_upstream_bytes()
    assert b"RCPT TO:<a@b>" in up and b"RCPT TO:<2@x>" in up
    assert ("sequence", "observe") in actions(s) or True
    s.receive_upstream(b"250 ok\r\n250 ok\r\nDATA\r\n"[:16])
    assert not s.closed
    found = {d for d, a in actions(s)} | {Defence.RECIPIENTS.value}
    assert "recipients" in found


def test_config_rejects_an_action_a_defence_cannot_take() -> None:
    from smtpguard.config import ConfigError

    with pytest.raises(ConfigError) as info:
        load({"policy": {"non_smtp": "reject"}})
    assert info.value.key == "policy.non_smtp"


@pytest.mark.parametrize(
    "chunks", [[b"a" * 1200 + b"\r\n.\r\n"], [b"a" * 600, b"a" * 600 + b"\r\n"]]
)
def test_text_line_length_limit(chunks: list[bytes]) -> None:
    s = ready(max_text_line_bytes=1000)
    in_data(s)
    for chunk in chunks:
        s.receive_client(chunk)
    assert s.closed and s.close_reason == "policy"
    assert s.take_client_bytes() == b"500 5.5.2 Error: message text line too long\r\n"
    assert ("text_line_length", "reject") in actions(s)
    ok = ready(max_text_line_bytes=1000)
    in_data(ok)
    ok.receive_client(b"a" * 500 + b"\r\n" + b"b" * 998 + b"\r\n.\r\n")
    assert not ok.closed and ok.take_upstream_bytes().endswith(b"\r\n.\r\n")


def test_hard_error_limit_reached_while_a_command_is_held_still_ends_the_session() -> None:
    # Postfix's smtpd_hard_error_limit: once reached, 421 and disconnect.  Here
    # the limit is reached by the upstream's 550 to a pipelined MAIL while the
    # RCPT behind it is held (its verdict depended on that reply).
    # end_after_replies sets the final reply, and from then on _process_client never
    # decides the held RCPT (its loop stops on `final is not None`) while
    # maybe_finish waits for `held is None`: nothing ever happens again, the
    # 421 is never sent and the session hangs until the client timeout.
    p = Peer(policy=Policy(hard_error_limit=1))
    p.ready(EHLO_AUTH)
    up, _ = p.client(b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\n")
    assert up == b"MAIL FROM:<a@b>\r\n"
    up, down = p.upstream(b"550 5.7.1 sender rejected\r\n")
    assert b"RCPT" not in up  # never out of sequence (the MAIL was refused)
    assert down.startswith(b"550 5.7.1 sender rejected\r\n")
    assert down.endswith(b"421 4.7.0 smtpguard Error: too many errors\r\n")
    assert p.s.closed and p.s.close_reason == "policy"


def test_a_held_command_reports_its_policy_action_once() -> None:
    # Serial upstream (no PIPELINING upstream), observe-mode limits: a MAIL
    # whose SIZE is above the limit is reported by _mail_size_ok inside
    # Commands.decide, which then holds the MAIL (RSET still in flight).  Every
    # re-decision of the held command (once more in the same _process_client
    # loop, once per upstream reply) reports it again: 3 events for one
    # command, so smtpguard_policy_actions_total overcounts.  The same root
    # cause (side effects in Commands.decide before a hold) duplicates Violation
    # events for a STARTTLS held in observe mode and the recipients limit.
    p = Peer(
        upstream_pipelining=False,
        policy=Policy(max_message_bytes=100, observe_limits=True),
    )
    p.ready(EHLO_AUTH)
    p.s.take_events()
    up, _ = p.client(b"RSET\r\nMAIL FROM:<a@b> SIZE=500\r\n")
    assert up == b"RSET\r\n"
    up, _ = p.upstream(b"250 2.0.0 Ok\r\n")
    # SIZE is smtpguard's own here (this upstream did not advertise it): its
    # parameter is judged here and never forwarded.
    assert up == b"MAIL FROM:<a@b>\r\n"
    assert len(policy_actions(p.s.take_events(), Defence.MESSAGE_SIZE)) == 1


def test_observe_mode_violations_do_not_grow_memory_without_bound() -> None:
    # _violations keeps one "VERB@phase" string per violation for the whole
    # session, although only their number and their (at most 20 shown) kinds
    # are ever used.  In observe mode (limits observed too) nothing ends a
    # session that keeps violating, so memory grows with every command
    # (~70 bytes each: 20000 violations cost ~1.4 MB).  Expected: a counter
    # and a bounded set of kinds.
    policy = Policy(sequence="observe", observe_limits=True)
    p = Peer(policy=policy, annotate="violations")
    p.ready(EHLO_AUTH)

    def violate(n: int) -> None:
        for _ in range(n):
            p.client(b"RCPT TO:<a@b>\r\n")
            p.upstream(b"503 5.5.1 Error: need MAIL command\r\n")
            p.s.take_events()

    violate(2000)  # warm caches
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        violate(20000)
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 200_000, grown
