"""The sans-I/O session, scenario by scenario (no sockets, no trio)."""

from __future__ import annotations

import pytest
from support.driver import Peer
from support.ehlo import EHLO_AUTH, EHLO_FULL

from smtpguard.protocol.events import LocalReply, MessageDone, Violation
from smtpguard.protocol.rules import Phase, Verb


def test_nothing_is_forwarded_before_the_greeting() -> None:
    p = Peer()
    assert p.client(b"EHLO early\r\n") == (b"", b"")
    assert p.upstream(b"220 up\r\n") == (b"EHLO early\r\n", b"220 up\r\n")


def test_554_greeting_allows_only_quit() -> None:
    p = Peer()
    p.upstream(b"554 5.7.1 go away\r\n")
    up, down = p.client(b"EHLO x\r\nMAIL FROM:<a@b>\r\nNOOP\r\nQUIT\r\n")
    assert up == b"QUIT\r\n"
    assert down.count(b"503 Error: service refused: only QUIT is accepted\r\n") == 3
    assert p.upstream(b"221 bye\r\n")[1] == b"221 bye\r\n"
    assert p.s.closed and p.s.close_reason == "quit"


def test_421_greeting_is_relayed_and_closes() -> None:
    p = Peer()
    assert p.upstream(b"421 4.3.2 busy\r\n")[1] == b"421 4.3.2 busy\r\n"
    assert p.s.closed


def test_ehlo_keywords_filtered_and_enhanced_codes_used() -> None:
    p = Peer(discard_keywords=frozenset({"SIZE"}))
    p.upstream(b"220 up\r\n")
    p.client(b"EHLO c\r\n")
    _, down = p.upstream(EHLO_FULL)
    assert down == (
        b"250-up.example\r\n250-PIPELINING\r\n250-ENHANCEDSTATUSCODES\r\n"
        b"250-CHUNKING\r\n250 8BITMIME\r\n"
    )
    assert p.client(b"RCPT TO:<a@b>\r\n")[1] == b"503 5.5.1 Error: need MAIL before RCPT\r\n"


def test_chunking_removed_and_pipelining_added_when_configured() -> None:
    p = Peer(chunking=False)
    p.upstream(b"220 up\r\n")
    p.client(b"EHLO c\r\n")
    _, down = p.upstream(b"250-up\r\n250-CHUNKING\r\n250 SIZE\r\n")
    assert down == b"250-up\r\n250-SIZE\r\n250 PIPELINING\r\n"
    # Without ENHANCEDSTATUSCODES the 503 has no enhanced code.
    assert p.client(b"DATA\r\n")[1] == b"503 Error: need MAIL command\r\n"


def test_pipelined_batch_holds_rcpt_until_mail_reply() -> None:
    p = Peer()
    p.ready()
    up, down = p.client(b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nRCPT TO:<e@f>\r\nDATA\r\n")
    assert (up, down) == (b"MAIL FROM:<a@b>\r\n", b"")
    up, down = p.upstream(b"250 2.1.0 Ok\r\n")
    assert up == b"RCPT TO:<c@d>\r\nRCPT TO:<e@f>\r\n"
    assert down == b"250 2.1.0 Ok\r\n"
    up, down = p.upstream(b"550 5.1.1 no\r\n250 2.1.5 Ok\r\n")
    assert (up, down) == (b"DATA\r\n", b"550 5.1.1 no\r\n250 2.1.5 Ok\r\n")


def test_rcpt_after_rejected_mail_is_answered_locally_never_forwarded() -> None:
    p = Peer()
    p.ready()
    p.client(b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\nQUIT\r\n")
    up, down = p.upstream(b"550 5.7.1 sender rejected\r\n")
    assert up == b"QUIT\r\n"
    assert down == (
        b"550 5.7.1 sender rejected\r\n"
        b"503 5.5.1 Error: need MAIL before RCPT\r\n"
        b"503 5.5.1 Error: need MAIL command\r\n"
    )
    events = p.s.take_events()
    violations = [e for e in events if isinstance(e, Violation)]
    assert [(v.verb, v.phase) for v in violations] == [
        (Verb.RCPT, Phase.READY),
        (Verb.DATA, Phase.READY),
    ]


def test_data_after_all_rcpts_rejected_is_out_of_sequence() -> None:
    p = Peer()
    p.ready()
    p.client(b"MAIL FROM:<a@b>\r\n")
    p.upstream(b"250 ok\r\n")
    p.client(b"RCPT TO:<x@y>\r\nRCPT TO:<z@y>\r\nDATA\r\n")
    up, down = p.upstream(b"550 no\r\n550 no\r\n")
    assert up == b""
    assert down.endswith(b"503 5.5.1 Error: need RCPT command\r\n")


def test_local_503_waits_behind_pending_upstream_reply() -> None:
    p = Peer()
    p.ready()
    p.client(b"MAIL FROM:<a@b>\r\n")
    p.upstream(b"250 ok\r\n")
    # NOOP is forwarded; the nested MAIL is refused at once but must be
    # answered after NOOP's reply.
    up, down = p.client(b"NOOP\r\nMAIL FROM:<x@y>\r\n")
    assert (up, down) == (b"NOOP\r\n", b"")
    assert p.upstream(b"250 2.0.0 Ok\r\n")[1] == (
        b"250 2.0.0 Ok\r\n503 5.5.1 Error: nested MAIL command\r\n"
    )


def test_data_body_streams_and_only_crlf_dot_crlf_ends_it() -> None:
    p = Peer()
    p.ready()
    p.client(b"MAIL FROM:<a@b>\r\n")
    p.upstream(b"250 ok\r\n")
    p.client(b"RCPT TO:<c@d>\r\n")
    p.upstream(b"250 ok\r\n")
    p.client(b"DATA\r\n")
    assert p.upstream(b"354 go\r\n")[1] == b"354 go\r\n"
    body = b"Subject: x\r\n\r\n..stuffed\r\nRCPT TO:<evil@x>\r\n. \r\n\xff\x01 bin\r\n.\r"
    # The last ".<CR>" waits: only the next byte tells an end from content.
    assert p.client(body) == (body[:-2], b"")
    assert p.s.in_body
    up, down = p.client(b"\nQUIT\r\n")
    assert up == b".\r\nQUIT\r\n"  # the dot ends the body; QUIT pipelines after it
    assert not p.s.in_body
    p.upstream(b"250 2.0.0 queued\r\n")
    done = [e for e in p.s.take_events() if isinstance(e, MessageDone)]
    assert done == [MessageDone("accepted", len(body) + 1)]


def test_empty_body_ends_at_once() -> None:
    p = Peer()
    p.ready()
    for line in (b"MAIL FROM:<>\r\n", b"RCPT TO:<a@b>\r\n"):
        p.client(line)
        p.upstream(b"250 ok\r\n")
    p.client(b"DATA\r\n")
    p.upstream(b"354 go\r\n")
    assert p.client(b".\r\nNOOP\r\n")[0] == b".\r\nNOOP\r\n"


def test_body_sent_before_354_waits_and_becomes_commands_if_refused() -> None:
    p = Peer()
    p.ready()
    for line in (b"MAIL FROM:<a@b>\r\n", b"RCPT TO:<c@d>\r\n"):
        p.client(line)
        p.upstream(b"250 ok\r\n")
    up, _ = p.client(b"DATA\r\nMAIL FROM:<smuggled@x>\r\n.\r\n")
    assert up == b"DATA\r\n"
    up, down = p.upstream(b"554 5.5.1 no valid recipients\r\n")
    # Refused DATA: what followed is read as commands, and a nested MAIL
    # and a lone dot never reach the upstream.
    assert up == b""
    assert b"503 5.5.1 Error: nested MAIL command" in down
    assert b"500 5.5.2 Error: command not recognized" in down


def test_client_eof_mid_data_never_completes_message() -> None:
    p = Peer()
    p.ready()
    for line in (b"MAIL FROM:<a@b>\r\n", b"RCPT TO:<c@d>\r\n"):
        p.client(line)
        p.upstream(b"250 ok\r\n")
    p.client(b"DATA\r\n")
    p.upstream(b"354 go\r\n")
    p.client(b"partial line\r\n.")
    p.s.client_eof()
    assert p.s.closed and p.s.close_reason == "client_closed"
    assert p.s.take_upstream_bytes() == b""
    assert MessageDone("aborted", 14) in p.s.take_events()  # the lone dot was held back


def test_client_half_close_still_gets_replies() -> None:
    p = Peer()
    p.ready()
    p.client(b"RCPT TO:<a@b>\r\nNOOP\r\n")
    p.s.client_eof()
    assert not p.s.closed  # NOOP's reply is still owed
    _, down = p.upstream(b"250 ok\r\n")
    assert down == b"250 ok\r\n"
    assert p.s.closed and p.s.close_reason == "client_closed"


def test_upstream_close_mid_session_gives_421() -> None:
    p = Peer(hostname="guard.example")
    p.ready()
    p.client(b"MAIL FROM:<a@b>\r\n")
    p.s.upstream_eof()
    assert p.s.take_client_bytes() == (
        b"421 4.4.2 guard.example Error: lost connection to mail server\r\n"
    )
    assert p.s.closed and p.s.close_reason == "upstream_closed"


def test_malformed_upstream_reply_gives_421() -> None:
    p = Peer()
    p.ready()
    p.client(b"NOOP\r\n")
    p.upstream(b"HTTP/1.1 200 OK\r\n")
    assert p.s.closed and p.s.close_reason == "upstream_error"


def test_unknown_and_identity_commands_never_forwarded() -> None:
    p = Peer()
    p.ready()
    up, down = p.client(b"XCLIENT ADDR=1.2.3.4\r\nXFORWARD ADDR=1.2.3.4\r\nFOO bar\r\n")
    assert up == b""
    assert down == b"500 5.5.2 Error: command not recognized\r\n" * 3


def test_help_local_and_forwarded() -> None:
    p = Peer(help_local=True, help_topics={"MAIL": ("MAIL FROM:<addr>",)})
    p.ready()
    assert p.client(b"HELP MAIL\r\n") == (
        b"",
        b"214-2.0.0 MAIL FROM:<addr>\r\n214 2.0.0 End of HELP info\r\n",
    )
    assert LocalReply(Verb.HELP, 214) in p.s.take_events()
    q = Peer(help_local=False)
    q.ready()
    assert q.client(b"HELP\r\n") == (b"HELP\r\n", b"")


def test_starttls_is_refused_locally_without_tls() -> None:
    p = Peer()
    p.ready()
    assert p.client(b"STARTTLS\r\n") == (b"", b"502 5.5.1 Error: command not implemented\r\n")


def test_long_line_gets_500_and_memory_stays_bounded() -> None:
    p = Peer(max_line_bytes=512, max_sasl_line_bytes=1024)
    p.ready()
    for _ in range(100):
        p.client(b"A" * 1000)
        assert len(p.s._buf) <= 1024
    up, down = p.client(b"\r\nNOOP\r\n")
    assert down == b"500 5.5.2 Error: line too long\r\n"
    assert up == b"NOOP\r\n"
    p.upstream(b"250 ok\r\n")
    up, down = p.client(b"MAIL FROM:<" + b"a" * 600 + b">\r\n")
    assert up == b""
    assert down == b"500 5.5.2 Error: line too long\r\n"


def test_serial_upstream_gets_one_command_at_a_time() -> None:
    p = Peer()
    p.ready(b"250-up\r\n250 8BITMIME\r\n")  # no PIPELINING upstream
    up, down = p.client(b"NOOP\r\nNOOP\r\nVRFY x\r\n")
    assert up == b"NOOP\r\n"
    assert p.upstream(b"250 ok\r\n")[0] == b"NOOP\r\n"
    assert p.upstream(b"250 ok\r\n")[0] == b"VRFY x\r\n"


def test_pipelining_offered_but_upstream_serial_by_config() -> None:
    p = Peer(upstream_pipelining=False)
    p.upstream(b"220 up\r\n")
    p.client(b"EHLO c\r\n")
    assert b"PIPELINING" in p.upstream(EHLO_FULL)[1]
    assert p.client(b"NOOP\r\nNOOP\r\n")[0] == b"NOOP\r\n"


def test_auth_exchange_is_relayed_and_sequenced() -> None:
    p = Peer(auth_require_tls=False)
    p.ready()
    up, _ = p.client(b"AUTH LOGIN\r\nbm9ib2R5\r\n")
    assert up == b"AUTH LOGIN\r\n"  # the response waits for the 334
    up, down = p.upstream(b"334 VXNlcm5hbWU6\r\n")
    assert (up, down) == (b"bm9ib2R5\r\n", b"334 VXNlcm5hbWU6\r\n")
    p.upstream(b"334 UGFzc3dvcmQ6\r\n")
    assert p.client(b"c2VjcmV0\r\n")[0] == b"c2VjcmV0\r\n"
    p.upstream(b"235 2.7.0 Authentication successful\r\n")
    assert p.s.state.authenticated
    assert p.client(b"AUTH PLAIN AGFAYg==\r\n")[1] == (
        b"503 5.5.1 Error: already authenticated\r\n"
    )


def test_auth_before_ehlo_and_in_transaction() -> None:
    p = Peer(auth_require_tls=False)
    p.upstream(b"220 up\r\n")
    assert p.client(b"AUTH PLAIN AGFAYg==\r\n")[1] == b"503 Error: send HELO/EHLO first\r\n"
    p.client(b"EHLO c\r\n")
    p.upstream(EHLO_FULL)
    p.client(b"MAIL FROM:<a@b>\r\n")
    p.upstream(b"250 ok\r\n")
    assert p.client(b"AUTH PLAIN AGFAYg==\r\n")[1] == (
        b"503 5.5.1 Error: MAIL transaction in progress\r\n"
    )


@pytest.mark.parametrize(
    "reason_call",
    ["client_timeout", "upstream_timeout", "shutdown"],
)
def test_timeouts_and_shutdown_answer_421(reason_call: str) -> None:
    p = Peer(hostname="g")
    p.ready()
    getattr(p.s, reason_call)()
    out = p.s.take_client_bytes()
    assert out.startswith(b"421 4.")
    assert p.s.closed


def test_too_many_pipelined_commands_apply_backpressure() -> None:
    p = Peer(max_pipelined_commands=5)
    p.ready()
    up, _ = p.client(b"NOOP\r\n" * 20)
    assert up == b"NOOP\r\n" * 5
    up, _ = p.upstream(b"250 ok\r\n" * 5)
    assert up == b"NOOP\r\n" * 5


def test_local_replies_pipelined_behind_ehlo_use_the_codes_it_negotiates() -> None:
    p = Peer(help_local=True)
    p.upstream(b"220 up\r\n")
    assert p.client(b"EHLO c\r\nFOO\r\nHELP\r\n") == (b"EHLO c\r\n", b"")
    _, down = p.upstream(EHLO_FULL)
    assert b"500 5.5.2 Error: command not recognized\r\n" in down
    assert down.endswith(b"214 2.0.0 End of HELP info\r\n")


def test_a_run_of_nuls_at_a_line_start_does_not_stall_the_body() -> None:
    # Line mode (entered at the first NUL) holds back a line start made only
    # of NULs ("could still become a lone dot").  The hold-back is unbounded:
    # 64 KiB of NULs are all kept in the client buffer, wants_client_bytes turns
    # False and the I/O layer stops reading, so the line break that would
    # decide the line is never read: the session stalls until the data
    # timeout.  Expected: bytes that cannot change the verdict any more are
    # passed on (normalize drops NULs anyway; a dot added in front of a line
    # that does not start with one is removed by the receiver's
    # dot-unstuffing, RFC 5321 4.5.2), so the session keeps reading.
    p = Peer()
    p.ready(EHLO_AUTH)
    p.envelope()
    p.client(b"DATA\r\n")
    p.upstream(b"354 go\r\n")
    p.client(b"\0" * 70000)
    assert p.s.wants_client_bytes
    p.client(b"\r\n.\r\n")
    assert p.s.awaiting_upstream  # the final dot went out
    assert p.upstream(b"250 queued\r\n")[1] == b"250 queued\r\n"


def test_half_close_after_a_pipelined_data_body_completes_it() -> None:
    # Verified OK: DATA and a complete body pipelined before the 354, then
    # EOF.  The body waits for the 354, then goes out; the client gets both
    # replies and the session closes as client_closed.  A body cut short
    # before the 354 is never completed.
    p = Peer()
    p.ready(EHLO_AUTH)
    p.envelope()
    assert p.client(b"DATA\r\nhi\r\n.\r\n")[0] == b"DATA\r\n"
    p.s.client_eof()
    up, down = p.upstream(b"354 go\r\n")
    assert (up, down) == (b"hi\r\n.\r\n", b"354 go\r\n")
    assert p.upstream(b"250 queued\r\n")[1] == b"250 queued\r\n"
    assert p.s.closed and p.s.close_reason == "client_closed"

    q = Peer()
    q.ready(EHLO_AUTH)
    q.envelope()
    q.client(b"DATA\r\nhi\r\n.")
    q.s.client_eof()
    up, _ = q.upstream(b"354 go\r\n")
    assert b"." not in up + q.s.take_upstream_bytes()
    assert q.s.closed and q.s.close_reason == "client_closed"


def test_backpressure_with_a_held_command() -> None:
    # Verified OK: max_pipelined_commands=2 with RCPT held behind MAIL: the
    # rest of the batch waits in the buffer and is released in order as
    # replies drain; every command gets exactly one reply, in order.
    p = Peer(max_pipelined_commands=2)
    p.ready(EHLO_AUTH)
    up, _ = p.client(b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nNOOP\r\nRCPT TO:<e@f>\r\nNOOP\r\n")
    assert up == b"MAIL FROM:<a@b>\r\n"
    replies = bytearray()
    sent = bytearray()
    for reply in (b"250 m\r\n", b"250 r1\r\n", b"250 n1\r\n", b"250 r2\r\n", b"250 n2\r\n"):
        up, down = p.upstream(reply)
        sent += up
        replies += down
    assert bytes(sent) == b"RCPT TO:<c@d>\r\nNOOP\r\nRCPT TO:<e@f>\r\nNOOP\r\n"
    assert bytes(replies) == b"250 m\r\n250 r1\r\n250 n1\r\n250 r2\r\n250 n2\r\n"
