"""STARTTLS terminated by smtpguard, STARTTLS injection, and AUTH sequencing (core)."""

from __future__ import annotations

from support.driver import Peer
from support.ehlo import EHLO_AUTH, EHLO_TLS_AUTH

from smtpguard.protocol import Session, SessionOptions
from smtpguard.protocol.events import Forwarded, PolicyAction, Violation
from smtpguard.protocol.policy import Defence, Policy
from smtpguard.protocol.rules import Verb


def greeted(**options: object) -> Session:
    s = Session(SessionOptions(tls_offered=True, **options))  # type: ignore[arg-type]
    s.receive_upstream(b"220 up\r\n")
    s.take_client_bytes()
    return s


def ehlo(s: Session, name: bytes = b"c") -> bytes:
    s.receive_client(b"EHLO " + name + b"\r\n")
    assert s.take_upstream_bytes() == b"EHLO " + name + b"\r\n"
    s.receive_upstream(EHLO_TLS_AUTH)
    return s.take_client_bytes()


def ehlo_after_tls(s: Session, name: bytes = b"again") -> bytes:
    """The EHLO_TLS_AUTH after STARTTLS: answered from the upstream's capabilities,
    never forwarded (the upstream, which never saw STARTTLS, has had its
    EHLO; OpenSMTPD refuses a second one)."""
    s.receive_client(b"EHLO " + name + b"\r\n")
    assert s.take_upstream_bytes() == b""
    return s.take_client_bytes()


def injections(s: Session) -> int:
    return sum(
        1
        for e in s.take_events()
        if isinstance(e, PolicyAction) and e.defence is Defence.STARTTLS_INJECTION
    )


def test_ehlo_offers_our_starttls_and_hides_auth_on_plaintext() -> None:
    s = greeted()
    reply = ehlo(s)
    assert reply == (b"250-up\r\n250-PIPELINING\r\n250-ENHANCEDSTATUSCODES\r\n250 STARTTLS\r\n")


def test_starttls_then_a_new_ehlo_is_needed_and_auth_is_offered() -> None:
    s = greeted()
    ehlo(s)
    s.receive_client(b"STARTTLS\r\n")
    assert s.take_upstream_bytes() == b""  # the upstream never sees STARTTLS
    assert s.take_client_bytes() == b"220 2.0.0 Ready to start TLS\r\n"
    assert s.tls_pending
    s.tls_started()
    s.receive_client(b"MAIL FROM:<a@b>\r\n")
    assert s.take_upstream_bytes() == b""
    assert s.take_client_bytes() == b"503 Error: send HELO/EHLO first\r\n"
    reply = ehlo_after_tls(s)
    assert reply.startswith(b"250-up\r\n")
    assert b"STARTTLS" not in reply
    assert b"250-AUTH PLAIN LOGIN\r\n" in reply and b"AUTH=PLAIN" in reply
    s.receive_client(b"STARTTLS\r\n")
    assert s.take_client_bytes() == b"554 5.5.1 Error: TLS already active\r\n"


def test_plaintext_pipelined_after_starttls_is_discarded() -> None:
    s = greeted()
    ehlo(s)
    s.take_events()
    s.receive_client(b"STARTTLS\r\nRSET\r\nMAIL FROM:<evil@x>\r\n")
    assert s.take_client_bytes() == b"220 2.0.0 Ready to start TLS\r\n"
    assert s.take_upstream_bytes() == b""
    assert injections(s) == 1
    # Bytes arriving before the handshake are plaintext too: dropped.
    s.receive_client(b"RCPT TO:<x@y>\r\n")
    assert s.take_upstream_bytes() == b"" and s.take_client_bytes() == b""
    assert injections(s) == 1
    s.tls_started()
    s.receive_client(b"EHLO c\r\nNOOP\r\n")
    assert s.take_upstream_bytes() == b"NOOP\r\n"  # nothing injected went before it


def test_starttls_waits_for_replies_in_flight() -> None:
    s = greeted()
    ehlo(s)
    s.receive_client(b"NOOP\r\nSTARTTLS\r\n")
    assert s.take_upstream_bytes() == b"NOOP\r\n"
    assert not s.tls_pending
    s.receive_upstream(b"250 ok\r\n")
    assert s.take_client_bytes() == b"250 ok\r\n220 2.0.0 Ready to start TLS\r\n"
    assert s.tls_pending


def test_starttls_inside_a_transaction_and_without_tls_configured() -> None:
    s = greeted()
    ehlo(s)
    s.receive_client(b"MAIL FROM:<a@b>\r\n")
    s.receive_upstream(b"250 ok\r\n")
    s.take_client_bytes()
    s.receive_client(b"STARTTLS\r\n")
    assert s.take_client_bytes() == b"503 5.5.1 Error: MAIL transaction in progress\r\n"
    plain = Session(SessionOptions(tls_offered=False))
    plain.receive_upstream(b"220 up\r\n")
    plain.take_client_bytes()
    plain.receive_client(b"STARTTLS\r\n")
    assert plain.take_client_bytes() == b"502 Error: command not implemented\r\n"


def test_auth_requires_tls_by_default() -> None:
    s = greeted()
    ehlo(s)
    s.receive_client(b"AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n")
    assert s.take_upstream_bytes() == b""
    assert s.take_client_bytes() == (
        b"538 5.7.11 Encryption required for requested authentication mechanism\r\n"
    )


def test_auth_after_tls_is_relayed_and_sequenced() -> None:
    s = greeted()
    ehlo(s)
    s.receive_client(b"STARTTLS\r\n")
    s.tls_started()
    ehlo_after_tls(s)
    s.receive_client(b"AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n")
    assert s.take_upstream_bytes() == b"AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n"
    s.receive_upstream(b"235 2.7.0 Authentication successful\r\n")
    assert s.state.authenticated
    s.receive_client(b"AUTH LOGIN\r\n")
    assert s.take_client_bytes().endswith(b"503 5.5.1 Error: already authenticated\r\n")


def test_implicit_tls_sessions_offer_auth_but_not_starttls() -> None:
    s = greeted(implicit_tls=True)
    reply = ehlo(s)
    assert b"STARTTLS" not in reply and b"AUTH PLAIN LOGIN" in reply
    s.receive_client(b"STARTTLS\r\n")
    assert s.take_client_bytes() == b"554 5.5.1 Error: TLS already active\r\n"


def test_sasl_cancel_is_relayed() -> None:
    s = greeted(auth_require_tls=False)
    ehlo(s)
    s.receive_client(b"AUTH LOGIN\r\n*\r\n")
    assert s.take_upstream_bytes() == b"AUTH LOGIN\r\n"
    s.receive_upstream(b"334 VXNlcm5hbWU6\r\n")
    assert s.take_upstream_bytes() == b"*\r\n"
    s.receive_upstream(b"501 5.7.0 Authentication aborted\r\n")
    assert s.take_client_bytes().endswith(b"501 5.7.0 Authentication aborted\r\n")
    s.receive_client(b"MAIL FROM:<a@b>\r\n")
    assert s.take_upstream_bytes() == b"MAIL FROM:<a@b>\r\n"


def smuggling(s: Session) -> list[tuple[str, str]]:
    return [
        (e.action, e.detail)
        for e in s.take_events()
        if isinstance(e, PolicyAction) and e.defence is Defence.SMUGGLING
    ]


def test_sasl_response_with_a_bare_cr_or_nul_cancels_the_exchange() -> None:
    """Found by fuzzing: command lines with a bare CR were refused, SASL lines
    were forwarded as they were. An upstream that ends lines at a bare CR would
    read ``RCPT TO:<x@y>`` below as a command smtpguard never checked."""
    for response in (b"dXNl\rRCPT TO:<x@y>", b"dXNl\0cg=="):
        s = greeted(auth_require_tls=False)
        ehlo(s)
        s.receive_client(b"AUTH LOGIN\r\n")
        assert s.take_upstream_bytes() == b"AUTH LOGIN\r\n"
        s.receive_upstream(b"334 VXNlcm5hbWU6\r\n")
        s.take_client_bytes()
        s.take_events()
        s.receive_client(response + b"\r\n")
        assert s.take_upstream_bytes() == b"*\r\n"
        assert smuggling(s) == [("reject", "bare <CR> or NUL in an AUTH response")]
        s.receive_upstream(b"501 5.7.0 Authentication aborted\r\n")
        assert s.take_client_bytes() == b"501 5.7.0 Authentication aborted\r\n"
        s.receive_client(b"MAIL FROM:<a@b>\r\n")
        assert s.take_upstream_bytes() == b"MAIL FROM:<a@b>\r\n"


def test_sasl_response_with_a_bare_cr_in_observe_mode_goes_on_unchanged() -> None:
    s = greeted(auth_require_tls=False, policy=Policy(smuggling="observe"))
    ehlo(s)
    s.receive_client(b"AUTH LOGIN\r\n")
    s.take_upstream_bytes()
    s.receive_upstream(b"334 VXNlcm5hbWU6\r\n")
    s.take_events()
    s.receive_client(b"dXNl\rcg==\r\n")
    assert s.take_upstream_bytes() == b"dXNl\rcg==\r\n"
    assert smuggling(s) == [("observe", "bare <CR> or NUL in an AUTH response")]


def test_observe_mode_does_not_start_tls_inside_a_transaction() -> None:
    # policy.mode: observe means "count and forward as before".  STARTTLS is
    # never forwarded, so "as before" is what the upstream would have said:
    # Postfix answers STARTTLS inside a transaction with 503 5.5.1.  Instead
    # smtpguard answers 220 itself and switches to TLS while the upstream keeps
    # the plaintext MAIL/RCPT: after the handshake, DATA reaches the upstream
    # and the message goes out with an envelope given in plaintext - the
    # CVE-2011-0411 situation that RFC 3207 4.2 forbids (the server must
    # discard what it learnt before TLS).  The held STARTTLS is also counted
    # as a violation three times (see the test above).
    p = Peer(policy=Policy(sequence="observe"), tls_offered=True)
    p.ready(EHLO_AUTH)
    p.client(b"MAIL FROM:<a@b>\r\n")
    p.upstream(b"250 ok\r\n")
    p.s.take_events()
    p.client(b"RCPT TO:<c@d>\r\nSTARTTLS\r\n")
    _, down = p.upstream(b"250 2.1.5 ok\r\n")
    assert not p.s.tls_pending
    assert down == b"250 2.1.5 ok\r\n503 5.5.1 Error: MAIL transaction in progress\r\n"
    violations = [e for e in p.s.take_events() if isinstance(e, Violation)]
    assert len(violations) == 1


def test_replies_split_at_every_byte_with_pipelined_auth() -> None:
    # Verified OK: upstream replies fed one byte at a time, an AUTH LOGIN
    # exchange with both SASL lines pipelined (each waits for its 334), and
    # no event carries SASL data.
    p = Peer(auth_require_tls=False)
    p.upstream(b"220 up\r\n")
    p.client(b"EHLO c\r\n")
    for i in range(len(EHLO_AUTH)):
        p.upstream(EHLO_AUTH[i : i + 1])
    assert p.client(b"AUTH LOGIN\r\ndXNlcg==\r\ncGFzcw==\r\n")[0] == b"AUTH LOGIN\r\n"
    sent = bytearray()
    received = bytearray()
    for reply in (b"334 VXNlcm5hbWU6\r\n", b"334 UGFzc3dvcmQ6\r\n", b"235 2.7.0 ok\r\n"):
        for i in range(len(reply)):
            up, down = p.upstream(reply[i : i + 1])
            sent += up
            received += down
    assert bytes(sent) == b"dXNlcg==\r\ncGFzcw==\r\n"
    assert bytes(received) == b"334 VXNlcm5hbWU6\r\n334 UGFzc3dvcmQ6\r\n235 2.7.0 ok\r\n"
    assert p.s.state.authenticated
    events = p.s.take_events()
    assert "dXNlcg" not in repr(events) and "cGFzcw" not in repr(events)
    assert events.count(Forwarded(Verb.AUTH_RESPONSE)) == 2
