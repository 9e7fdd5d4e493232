"""One view of the session: after every reply, the client, smtpguard and the
upstream agree on whether a transaction is open, who its sender is and
whether the message was accepted.  Each test here is a case where they did
not (found by the differential runs against Postfix, Exim and OpenSMTPD)."""

from __future__ import annotations

from support.driver import Peer
from support.ehlo import EHLO_CHUNKING, EHLO_NO_CHUNKING, EHLO_SERIAL

from smtpguard.metrics import Metrics
from smtpguard.protocol.events import MessageDone, UpstreamReplied, Violation
from smtpguard.protocol.policy import Policy
from smtpguard.protocol.rules import Phase, Verb
from smtpguard.summary import SessionSummary


def test_bdat_answered_locally_after_a_refused_rcpt_ends_the_upstream_transaction() -> None:
    # Postfix alone: 250, 550, "554 5.5.1 no valid recipients", transaction over.
    # Before: smtpguard's 503 left Postfix's transaction open, so the next
    # MAIL got "503 nested MAIL" and the message went out under the old sender.
    p = Peer()
    p.ready(EHLO_CHUNKING)
    up, _ = p.client(
        b"MAIL FROM:<old@client.test>\r\nRCPT TO:<reject-1@dest.example>\r\nBDAT 5 LAST\r\nhello"
    )
    assert up == b"MAIL FROM:<old@client.test>\r\n"  # RCPT waits for MAIL's reply
    up, down = p.answer(b"250 2.1.0 Ok\r\n", b"550 5.1.1 rejected\r\n")
    assert down == (b"250 2.1.0 Ok\r\n550 5.1.1 rejected\r\n503 5.5.1 Error: need RCPT command\r\n")
    # The upstream's transaction ends too.
    assert up == b"RCPT TO:<reject-1@dest.example>\r\nRSET\r\n"
    up, _ = p.client(b"MAIL FROM:<new@client.test>\r\nRCPT TO:<ok@dest.example>\r\nBDAT 5 LAST\r\n")
    assert up == b""  # MAIL waits for the RSET's reply
    up, down = p.upstream(b"250 2.0.0 Ok\r\n")
    assert down == b""  # the RSET's reply is smtpguard's, not the client's
    assert up == b"MAIL FROM:<new@client.test>\r\n"
    up, down = p.answer(b"250 2.1.0 Ok\r\n", b"250 2.1.5 Ok\r\n")
    assert down == b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n"
    assert up == b"RCPT TO:<ok@dest.example>\r\nBDAT 5 LAST\r\n"
    assert p.client(b"hello")[0] == b"hello"


def test_bdat_answered_locally_in_mail_phase_fails_the_transaction() -> None:
    # Postfix alone ends the transaction and refuses the RCPT and DATA after it.
    p = Peer()
    p.ready(EHLO_CHUNKING)
    p.client(b"MAIL FROM:<a@b>\r\n")
    p.upstream(b"250 2.1.0 Ok\r\n")
    up, down = p.client(b"BDAT 3\r\nabc")
    assert down == b"503 5.5.1 Error: need RCPT command\r\n"
    assert up == b"RSET\r\n"
    p.upstream(b"250 2.0.0 Ok\r\n")
    assert p.s.state.phase is Phase.READY
    up, down = p.client(b"RCPT TO:<c@d>\r\nDATA\r\n")
    assert up == b""
    assert down == (
        b"503 5.5.1 Error: need MAIL before RCPT\r\n503 5.5.1 Error: need MAIL command\r\n"
    )


def test_bdat_is_never_forwarded_to_an_upstream_without_chunking() -> None:
    # Before: OpenSMTPD got "BDAT 33 LAST" and ran the chunk as a command.
    p = Peer()
    p.ready(EHLO_NO_CHUNKING)
    up, down = p.upstream(b"")
    p.client(b"MAIL FROM:<a@b>\r\n")
    p.upstream(b"250 2.0.0 Ok\r\n")
    p.client(b"RCPT TO:<c@d>\r\n")
    p.upstream(b"250 2.1.5 Ok\r\n")
    chunk = b"RCPT TO:<smuggled@evil.example>\r\n"
    assert len(chunk) == 33
    up, down = p.client(b"BDAT 33 LAST\r\n" + chunk)
    assert b"smuggled" not in up and b"BDAT" not in up
    assert up == b"RSET\r\n"  # the failed transaction ends upstream too (RFC 3030 2)
    assert down == b"502 5.5.1 Error: command not implemented\r\n"
    p.upstream(b"250 2.0.0 Ok\r\n")
    assert p.client(b"NOOP\r\n")[0] == b"NOOP\r\n"  # the chunk was read as a chunk


def test_chunking_switched_off_hides_it_and_refuses_bdat() -> None:
    p = Peer(chunking=False)
    p.upstream(b"220 up\r\n")
    p.client(b"EHLO c\r\n")
    _, down = p.upstream(EHLO_CHUNKING)
    assert b"CHUNKING" not in down
    p.client(b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\n")
    p.answer(b"250 ok\r\n", b"250 ok\r\n")
    up, down = p.client(b"BDAT 2 LAST\r\nhi")
    assert b"BDAT" not in up and down.startswith(b"502 ")


def test_extension_verbs_follow_what_the_upstream_advertised() -> None:
    # ETRN was relayed in the EHLO reply but answered 500 (Postfix: 250).
    p = Peer()
    p.upstream(b"220 up\r\n")
    p.client(b"EHLO c\r\n")
    _, down = p.upstream(
        b"250-up\r\n250-ETRN\r\n250-ATRN\r\n250-PIPECONNECT\r\n250-X-EXPS LOGIN\r\n"
        b"250-XEXCH50\r\n250-DSN\r\n250 ENHANCEDSTATUSCODES\r\n"
    )
    assert b"ETRN" in down and b"DSN" in down
    for hidden in (b"ATRN", b"PIPECONNECT", b"X-EXPS", b"XEXCH50"):
        assert hidden not in down  # their commands (or framing) are not mediated
    up, _ = p.client(b"ETRN dest.example\r\n")
    assert up == b"ETRN dest.example\r\n"
    assert p.upstream(b"250 Queuing started\r\n")[1] == b"250 Queuing started\r\n"
    p.client(b"MAIL FROM:<a@b>\r\n")
    p.upstream(b"250 ok\r\n")
    up, down = p.client(b"ETRN dest.example\r\n")
    assert up == b"" and down == b"503 5.5.1 Error: MAIL transaction in progress\r\n"


def test_extension_verbs_not_advertised_are_answered_locally() -> None:
    p = Peer(auth_require_tls=False)
    p.ready(EHLO_NO_CHUNKING)
    up, down = p.client(b"ETRN dest.example\r\n")
    assert up == b"" and down == b"502 5.5.1 Error: command not implemented\r\n"
    up, down = p.client(b"AUTH PLAIN AGEAYg==\r\n")
    assert up == b"" and down == b"503 5.5.1 Error: authentication not enabled\r\n"


def test_command_line_limit_grows_with_the_advertised_extensions() -> None:
    # RFC 3461 5: DSN adds 500 octets to RCPT.  Before: 500 "line too long".
    orcpt = "rfc822;" + "x" * 480 + "@dest.example"
    line = f"RCPT TO:<b@dest.example> NOTIFY=SUCCESS,FAILURE ORCPT={orcpt}".encode()
    assert 512 < len(line) + 2 <= 1012
    with_dsn = Peer()
    with_dsn.ready(EHLO_CHUNKING)
    with_dsn.client(b"MAIL FROM:<a@b>\r\n")
    with_dsn.upstream(b"250 ok\r\n")
    assert with_dsn.client(line + b"\r\n")[0] == line + b"\r\n"
    without = Peer()
    without.ready(EHLO_NO_CHUNKING)
    without.client(b"MAIL FROM:<a@b>\r\n")
    without.upstream(b"250 ok\r\n")
    up, down = without.client(line + b"\r\n")
    assert up == b"" and down == b"500 5.5.2 Error: line too long\r\n"


def test_bad_bdat_syntax_hangs_up_instead_of_reading_the_chunk_as_commands() -> None:
    p = Peer()
    p.ready(EHLO_CHUNKING)
    p.client(b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\n")
    p.answer(b"250 ok\r\n", b"250 ok\r\n")
    up, down = p.client(b"BDAT 1x\r\nRCPT TO:<smuggled@evil.example>\r\n")
    assert up == b""
    assert down == b"521 5.5.4 Syntax: BDAT count [LAST]\r\n"
    assert p.s.closed


def test_pipelined_mail_after_the_final_dot_counts_the_message_once() -> None:
    # RFC 2920 4: the next MAIL may follow the dot before its reply.
    p = Peer()
    p.ready(EHLO_CHUNKING)
    p.client(b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n")
    p.answer(b"250 ok\r\n", b"250 ok\r\n", b"354 go\r\n")
    p.s.take_events()
    p.client(b"Subject: one\r\n\r\nbody\r\n.\r\nMAIL FROM:<e@f>\r\nRCPT TO:<g@h>\r\nDATA\r\n")
    p.answer(b"250 queued\r\n", b"250 ok\r\n", b"250 ok\r\n", b"354 go\r\n")
    p.client(b"two\r\n.\r\n")
    p.upstream(b"250 queued\r\n")
    done = [e for e in p.s.take_events() if isinstance(e, MessageDone)]
    # Before: the first was counted "aborted", then "accepted" with size 0.
    assert done == [MessageDone("accepted", 25), MessageDone("accepted", 8)]


def test_pipelined_mail_after_bdat_last_counts_the_message_once() -> None:
    p = Peer()
    p.ready(EHLO_CHUNKING)
    p.client(b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\n")
    p.answer(b"250 ok\r\n", b"250 ok\r\n")
    p.s.take_events()
    p.client(b"BDAT 5 LAST\r\nhelloMAIL FROM:<e@f>\r\n")
    p.answer(b"250 queued\r\n", b"250 ok\r\n")
    done = [e for e in p.s.take_events() if isinstance(e, MessageDone)]
    assert done == [MessageDone("accepted", 5)]


def test_a_violation_is_one_event_naming_the_action_taken() -> None:
    observe = Peer(policy=Policy(sequence="observe"))
    observe.ready(EHLO_CHUNKING)
    assert observe.client(b"RCPT TO:<a@b>\r\n")[0] == b"RCPT TO:<a@b>\r\n"
    violations = [e for e in observe.s.take_events() if isinstance(e, Violation)]
    assert [v.action for v in violations] == ["observe"]
    enforce = Peer()
    enforce.ready(EHLO_CHUNKING)
    enforce.client(b"RCPT TO:<a@b>\r\n")
    violations = [e for e in enforce.s.take_events() if isinstance(e, Violation)]
    assert [v.action for v in violations] == ["reject"]


def test_bdat_last_is_counted_as_bdat() -> None:
    metrics = Metrics()
    p = Peer()
    p.ready(EHLO_CHUNKING)
    p.client(b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nBDAT 2\r\nhiBDAT 1 LAST\r\n!")
    p.answer(b"250 ok\r\n", b"250 ok\r\n")
    metrics.observe(p.s.take_events())
    metrics.flush()
    samples = {
        s.labels["command"]: s.value
        for m in metrics.registry.collect()
        if m.name == "smtpguard_commands_forwarded"
        for s in m.samples
        if s.name.endswith("_total")
    }
    assert "BDAT_LAST" not in samples
    assert samples["BDAT"] == 2  # "BDAT 2" and "BDAT 1 LAST"


def test_the_summary_line_knows_every_verb() -> None:
    # ETRN, new to the rules, crashed the summary at the end of the session.
    summary = SessionSummary()
    summary.observe([UpstreamReplied(verb, 250) for verb in Verb if verb is not Verb.GREETING])
    fields = summary.fields()
    assert fields["etrn"] == "1" and list(fields)[-3] == "quit"


def test_the_rset_after_a_refused_bdat_waits_for_a_serial_upstream() -> None:
    # An upstream without PIPELINING got "RCPT ...\r\nRSET\r\n" back to back.
    p = Peer()
    p.ready(EHLO_SERIAL)
    p.client(b"MAIL FROM:<a@b>\r\n")
    p.upstream(b"250 ok\r\n")
    p.client(b"RCPT TO:<c@d>\r\n")
    p.upstream(b"250 ok\r\n")
    up, _ = p.client(b"RCPT TO:<e@f>\r\nBDAT 3 LAST\r\nabc")
    assert up == b"RCPT TO:<e@f>\r\n"
    up, down = p.upstream(b"250 ok\r\n")
    assert up == b"RSET\r\n"
    assert down == b"250 ok\r\n502 Error: command not implemented\r\n"


def test_helo_after_starttls_with_a_nameless_upstream_ehlo_line() -> None:
    # The upstream's EHLO first line was "250-" alone: HELO after TLS raised IndexError.
    p = Peer(tls_offered=True)
    p.upstream(b"220 up\r\n")
    p.client(b"EHLO c\r\n")
    p.upstream(b"250-\r\n250 PIPELINING\r\n")
    p.client(b"STARTTLS\r\n")
    p.s.tls_started()
    up, down = p.client(b"HELO c\r\n")
    assert up == b"" and down == b"250 smtpguard\r\n"
