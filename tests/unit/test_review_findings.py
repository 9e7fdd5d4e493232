"""Review findings for the sans-I/O core (smtpguard.protocol.session and friends).

Every test in the first part FAILS on the reviewed code and passes once the bug
it describes is fixed; each one says what is expected and why.  The tests in
the second part ("verified OK") pin down tricky cases that behave correctly
today and that the existing suites did not cover.
"""

from __future__ import annotations

import tracemalloc

import test_session

from smtpguard.protocol.policy import Defence, Policy
from smtpguard.protocol.rules import Phase, Verb
from smtpguard.protocol.session import Forwarded, MessageDone, PolicyAction, Violation

EHLO_REPLY = (
    b"250-up.example\r\n250-PIPELINING\r\n250-ENHANCEDSTATUSCODES\r\n"
    b"250-CHUNKING\r\n250-AUTH PLAIN LOGIN\r\n250 8BITMIME\r\n"
)


class Peer(test_session.Peer):
    """test_session's driver, with this file's EHLO reply and an envelope step."""

    def ready(self, ehlo_reply: bytes = EHLO_REPLY) -> None:
        super().ready(ehlo_reply)

    def envelope(self) -> None:
        """MAIL and RCPT accepted, one at a time."""
        for line in (b"MAIL FROM:<a@b>\r\n", b"RCPT TO:<c@d>\r\n"):
            self.client(line)
            self.upstream(b"250 ok\r\n")
        assert self.s.state.phase is Phase.RCPT
        self.s.take_events()


def _policy_actions(events: list[object], defence: Defence) -> list[PolicyAction]:
    return [e for e in events if isinstance(e, PolicyAction) and e.defence is defence]


# ===================================================================== bugs


def test_hard_error_limit_reached_while_a_command_is_held_still_ends_the_session() -> None:
    # Postfix's smtpd_hard_error_limit: once reached, 421 and disconnect.  Here
    # the limit is reached by the upstream's 550 to a pipelined MAIL while the
    # RCPT behind it is held (its verdict depended on that reply).
    # _end_after_replies sets _final, and from then on _process_client never
    # decides the held RCPT (its loop stops on `_final is not None`) while
    # _maybe_finish waits for `_held is None`: nothing ever happens again, the
    # 421 is never sent and the session hangs until the client timeout.
    p = Peer(policy=Policy(hard_error_limit=1))
    p.ready()
    up, _ = p.client(b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\n")
    assert up == b"MAIL FROM:<a@b>\r\n"
    up, down = p.upstream(b"550 5.7.1 sender rejected\r\n")
    assert b"RCPT" not in up  # never out of sequence (the MAIL was refused)
    assert down.startswith(b"550 5.7.1 sender rejected\r\n")
    assert down.endswith(b"421 4.7.0 smtpguard Error: too many errors\r\n")
    assert p.s.closed and p.s.close_reason == "policy"


def test_rset_after_a_bdat_chunk_starts_the_next_message_at_size_zero() -> None:
    # RFC 3030 / RFC 5321 4.1.1.5: RSET aborts the transaction; the next
    # message is a new one.  _message_bytes is reset only when DATA_END or
    # BDAT_LAST is answered, so the 60 bytes of the abandoned BDAT message
    # count against the next one: a 60-byte message is refused with 552 under
    # a 100-byte limit and the session is dropped (and the abandoned message
    # is never reported as aborted).  The same happens after EHLO/HELO.
    p = Peer(policy=Policy(max_message_bytes=100))
    p.ready()
    p.envelope()
    p.client(b"BDAT 60\r\n" + b"x" * 60)
    assert p.upstream(b"250 2.0.0 chunk ok\r\n")[1] == b"250 2.0.0 chunk ok\r\n"
    p.client(b"RSET\r\n")
    p.upstream(b"250 2.0.0 Ok\r\n")
    p.envelope()
    up, down = p.client(b"BDAT 60 LAST\r\n" + b"y" * 60)
    assert up == b"BDAT 60 LAST\r\n" + b"y" * 60
    assert down == b""
    assert not p.s.closed
    assert p.upstream(b"250 2.0.0 queued\r\n")[1] == b"250 2.0.0 queued\r\n"
    assert MessageDone("accepted", 60) in p.s.take_events()


def test_client_eof_with_a_held_bdat_whose_chunk_is_incomplete_aborts() -> None:
    # The client pipelines RCPT and `BDAT 10 LAST` with only 3 chunk bytes,
    # then closes.  At EOF the BDAT is held (its verdict depends on the RCPT
    # reply), so client_eof sees no transaction content and only marks the
    # client done.  When the RCPT reply arrives, the held BDAT is forwarded
    # with its 3 bytes: a message cut off mid-chunk is started upstream, and
    # the session then waits for a BDAT reply the upstream can never send (it
    # waits for 7 more bytes): a hang until the upstream timeout, closed as
    # "upstream_timeout" instead of "client_closed".
    # Expected: once the client is gone, a chunk that is not all buffered is
    # never started; the session closes as client_closed.
    p = Peer()
    p.ready()
    p.client(b"MAIL FROM:<a@b>\r\n")
    p.upstream(b"250 ok\r\n")
    up, _ = p.client(b"RCPT TO:<c@d>\r\nBDAT 10 LAST\r\nhel")
    assert up == b"RCPT TO:<c@d>\r\n"
    p.s.client_eof()
    up, down = p.upstream(b"250 2.1.5 ok\r\n")
    assert down == b"250 2.1.5 ok\r\n"
    assert b"BDAT" not in up
    assert p.s.closed and p.s.close_reason == "client_closed"


def test_a_run_of_nuls_at_a_line_start_does_not_stall_the_body() -> None:
    # Line mode (entered at the first NUL) holds back a line start made only
    # of NULs ("could still become a lone dot").  The hold-back is unbounded:
    # 64 KiB of NULs are all kept in _client_buf, wants_client_bytes turns
    # False and the I/O layer stops reading, so the line break that would
    # decide the line is never read: the session stalls until the data
    # timeout.  Expected: bytes that cannot change the verdict any more are
    # passed on (normalize drops NULs anyway; a dot added in front of a line
    # that does not start with one is removed by the receiver's
    # dot-unstuffing, RFC 5321 4.5.2), so the session keeps reading.
    p = Peer()
    p.ready()
    p.envelope()
    p.client(b"DATA\r\n")
    p.upstream(b"354 go\r\n")
    p.client(b"\0" * 70000)
    assert p.s.wants_client_bytes
    p.client(b"\r\n.\r\n")
    assert p.s.awaiting_upstream  # the final dot went out
    assert p.upstream(b"250 queued\r\n")[1] == b"250 queued\r\n"


def test_bdat_chunk_split_across_reads_is_not_a_pipelining_violation() -> None:
    # PIPELINING not offered (pipelining.offer: false) and
    # policy.pipelining: disconnect (Postfix's smtpd_forbid_unauth_pipelining).
    # A BDAT chunk larger than one TCP segment arrives in several reads; its
    # later bytes are chunk data, not commands (RFC 3030 2), and RFC 2920 3.1
    # only constrains commands.  receive_client runs _sent_ahead on them: the
    # in-flight BDAT_LAST slot is taken for a reply the client had to wait
    # for, the bytes are dropped, and the session ends with 554 after the
    # reply - which never comes, since the upstream still waits for the rest
    # of the chunk.
    p = Peer(offer_pipelining=False, policy=Policy(pipelining="disconnect"))
    p.ready()
    p.envelope()
    up, _ = p.client(b"BDAT 10 LAST\r\nhello")
    assert up == b"BDAT 10 LAST\r\nhello"
    up, down = p.client(b"world")
    assert up == b"world"
    assert not p.s.closed
    assert p.upstream(b"250 2.0.0 queued\r\n")[1] == b"250 2.0.0 queued\r\n"
    assert not _policy_actions(p.s.take_events(), Defence.PIPELINING)


def test_unsolicited_421_in_the_same_read_as_a_reply_keeps_that_reply() -> None:
    # The upstream accepts the message and, in the same segment, announces its
    # own shutdown with an unsolicited 421 (RFC 5321 3.8).  _on_upstream_reply
    # fills the DATA_END slot, then handles the 421 (no reply in flight) by
    # appending it to _to_client and closing, without flushing the slots
    # first (receive_upstream returns at once on `closed`).  The client never
    # sees the 250 that accepted its message - it will retry, and the
    # message is delivered twice.  Expected: every reply owed goes out, then
    # the 421.
    p = Peer()
    p.ready()
    p.envelope()
    p.client(b"DATA\r\n")
    p.upstream(b"354 go\r\n")
    p.client(b"hi\r\n.\r\n")
    _, down = p.upstream(b"250 2.0.0 queued as X\r\n421 4.3.2 shutting down\r\n")
    assert down == b"250 2.0.0 queued as X\r\n421 4.3.2 shutting down\r\n"
    assert p.s.closed


def test_clean_crlf_split_across_reads_in_a_bdat_chunk_is_not_smuggling() -> None:
    # _consume_bdat joins the previous byte (_bdat_tail) to the new piece to
    # find bare CR/LF across reads.  When the previous piece ended with a full
    # CRLF, the tail is "\n", and the joined text starts with an LF whose CR is
    # not in it: a bare LF is "found" in a clean message.  Under
    # smuggling: reject the session is dropped with 550 (under normalize a
    # false finding is counted).  A read boundary right after a CRLF is the
    # most common split there is.
    p = Peer(policy=Policy(smuggling="reject"))
    p.ready()
    p.envelope()
    assert p.client(b"BDAT 8 LAST\r\nab\r\n")[0] == b"BDAT 8 LAST\r\nab\r\n"
    up, down = p.client(b"cdef")
    assert (up, down) == (b"cdef", b"")
    assert not p.s.closed
    assert not _policy_actions(p.s.take_events(), Defence.SMUGGLING)


def test_crlf_split_between_two_bdat_chunks_is_not_smuggling() -> None:
    # RFC 3030 lets chunk boundaries fall anywhere, including between the CR
    # and the LF of a line ending.  _bdat resets _bdat_tail at every BDAT
    # command, so the LF that starts the second chunk looks bare.
    p = Peer(policy=Policy(smuggling="reject"))
    p.ready()
    p.envelope()
    p.client(b"BDAT 4\r\nabc\r")
    p.upstream(b"250 2.0.0 chunk ok\r\n")
    up, down = p.client(b"BDAT 4 LAST\r\n\ndef")
    assert (up, down) == (b"BDAT 4 LAST\r\n\ndef", b"")
    assert not p.s.closed
    assert not _policy_actions(p.s.take_events(), Defence.SMUGGLING)


def test_half_close_after_a_complete_bdat_last_chunk_still_gets_its_reply() -> None:
    # The client sends its last chunk completely and half-closes (as with
    # DATA, where a client that sent <CRLF>.<CRLF> then EOF gets the
    # upstream's reply: tests/unit/test_session.py).  Because the first chunk
    # was accepted, state.phase is BDAT, so in_transaction_content is True and
    # client_eof treats the message as abandoned: MessageDone("aborted"), the
    # bytes still queued for the upstream are dropped and the session closes
    # at once.  But the LAST chunk is complete and may already be at the
    # upstream, which then delivers it while the client never hears the 250
    # and the metrics say "aborted".
    p = Peer()
    p.ready()
    p.envelope()
    p.client(b"BDAT 5\r\nhello")
    p.upstream(b"250 2.0.0 chunk ok\r\n")
    assert p.client(b"BDAT 5 LAST\r\nworld")[0] == b"BDAT 5 LAST\r\nworld"
    p.s.client_eof()
    assert not p.s.closed
    assert p.upstream(b"250 2.0.0 queued\r\n")[1] == b"250 2.0.0 queued\r\n"
    events = p.s.take_events()
    assert MessageDone("accepted", 10) in events
    assert not any(isinstance(e, MessageDone) and e.outcome == "aborted" for e in events)
    assert p.s.closed and p.s.close_reason == "client_closed"


def test_a_held_command_reports_its_policy_action_once() -> None:
    # Serial upstream (no PIPELINING upstream), observe-mode limits: a MAIL
    # whose SIZE is above the limit is reported by _mail_size_ok inside
    # _decide, which then holds the MAIL (RSET still in flight).  Every
    # re-decision of the held command (once more in the same _process_client
    # loop, once per upstream reply) reports it again: 3 events for one
    # command, so smtpguard_policy_actions_total overcounts.  The same root
    # cause (side effects in _decide before a hold) duplicates Violation
    # events for a STARTTLS held in observe mode and the recipients limit.
    p = Peer(
        upstream_pipelining=False,
        policy=Policy(max_message_bytes=100, observe_limits=True),
    )
    p.ready()
    p.s.take_events()
    up, _ = p.client(b"RSET\r\nMAIL FROM:<a@b> SIZE=500\r\n")
    assert up == b"RSET\r\n"
    up, _ = p.upstream(b"250 2.0.0 Ok\r\n")
    assert up == b"MAIL FROM:<a@b> SIZE=500\r\n"
    assert len(_policy_actions(p.s.take_events(), Defence.MESSAGE_SIZE)) == 1


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
    p.ready()
    p.client(b"MAIL FROM:<a@b>\r\n")
    p.upstream(b"250 ok\r\n")
    p.s.take_events()
    p.client(b"RCPT TO:<c@d>\r\nSTARTTLS\r\n")
    _, down = p.upstream(b"250 2.1.5 ok\r\n")
    assert not p.s.tls_pending
    assert down == b"250 2.1.5 ok\r\n503 5.5.1 Error: MAIL transaction in progress\r\n"
    violations = [e for e in p.s.take_events() if isinstance(e, Violation)]
    assert len(violations) == 1


def test_observe_mode_violations_do_not_grow_memory_without_bound() -> None:
    # _violations keeps one "VERB@phase" string per violation for the whole
    # session, although only their number and their (at most 20 shown) kinds
    # are ever used.  In observe mode (limits observed too) nothing ends a
    # session that keeps violating, so memory grows with every command
    # (~70 bytes each: 20000 violations cost ~1.4 MB).  Expected: a counter
    # and a bounded set of kinds.
    policy = Policy(sequence="observe", observe_limits=True)
    p = Peer(policy=policy, annotate="violations")
    p.ready()

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


def test_a_3xx_greeting_is_an_upstream_protocol_error() -> None:
    # RFC 5321 4.3.2: the greeting is 220 (or 554; 421 to refuse).  A 3xx
    # greeting has no transition, so the session stays in Phase.GREETING
    # forever, relays the 354 to the client as if it were a greeting, and
    # reads nothing more: the client's EHLO waits until the client timeout
    # (closed as "client_timeout").  Expected: like any reply that cannot be
    # an SMTP greeting, 421 and close as upstream_error.
    p = Peer()
    _, down = p.upstream(b"354 hello\r\n")
    assert p.s.closed and p.s.close_reason == "upstream_error"
    assert down.startswith(b"421 ")


def test_unsolicited_421_mid_data_reports_the_message_aborted() -> None:
    # Every other way a session ends mid-body (_fail, abort, client_eof)
    # reports MessageDone("aborted"); the unsolicited-421 branch of
    # _on_upstream_reply does not, so smtpguard_messages_total{outcome}
    # misses the message.  It also leaves _to_upstream as it is, while the
    # other paths clear it.
    p = Peer()
    p.ready()
    p.envelope()
    p.client(b"DATA\r\n")
    p.upstream(b"354 go\r\n")
    p.client(b"partial body\r\n")
    _, down = p.upstream(b"421 4.4.2 idle timeout\r\n")
    assert down == b"421 4.4.2 idle timeout\r\n"
    assert p.s.closed
    assert MessageDone("aborted", 14) in p.s.take_events()


# ============================================================= verified OK


def test_verified_ok_half_close_after_a_pipelined_data_body_completes_it() -> None:
    # Verified OK: DATA and a complete body pipelined before the 354, then
    # EOF.  The body waits for the 354, then goes out; the client gets both
    # replies and the session closes as client_closed.  A body cut short
    # before the 354 is never completed.
    p = Peer()
    p.ready()
    p.envelope()
    assert p.client(b"DATA\r\nhi\r\n.\r\n")[0] == b"DATA\r\n"
    p.s.client_eof()
    up, down = p.upstream(b"354 go\r\n")
    assert (up, down) == (b"hi\r\n.\r\n", b"354 go\r\n")
    assert p.upstream(b"250 queued\r\n")[1] == b"250 queued\r\n"
    assert p.s.closed and p.s.close_reason == "client_closed"

    q = Peer()
    q.ready()
    q.envelope()
    q.client(b"DATA\r\nhi\r\n.")
    q.s.client_eof()
    up, _ = q.upstream(b"354 go\r\n")
    assert b"." not in up + q.s.take_upstream_bytes()
    assert q.s.closed and q.s.close_reason == "client_closed"


def test_verified_ok_421_mid_pipeline_never_releases_the_held_command() -> None:
    # Verified OK: a 421 answering the pipelined MAIL closes the session; the
    # RCPT held behind it never reaches the upstream.
    p = Peer()
    p.ready()
    p.client(b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n")
    up, down = p.upstream(b"421 4.3.2 going down\r\n")
    assert up == b""
    assert down == b"421 4.3.2 going down\r\n"
    assert p.s.closed and p.s.close_reason == "upstream_closed"


def test_verified_ok_multi_line_reply_with_changing_codes_is_an_upstream_error() -> None:
    # Verified OK: RFC 5321 4.2.1 - every line of a reply has the same code.
    p = Peer()
    p.ready()
    p.client(b"NOOP\r\n")
    _, down = p.upstream(b"250-first\r\n550 second\r\n")
    assert down.startswith(b"421 4.4.2 ")
    assert p.s.closed and p.s.close_reason == "upstream_error"


def test_verified_ok_replies_split_at_every_byte_with_pipelined_auth() -> None:
    # Verified OK: upstream replies fed one byte at a time, an AUTH LOGIN
    # exchange with both SASL lines pipelined (each waits for its 334), and
    # no event carries SASL data.
    p = Peer(auth_require_tls=False)
    p.upstream(b"220 up\r\n")
    p.client(b"EHLO c\r\n")
    for i in range(len(EHLO_REPLY)):
        p.upstream(EHLO_REPLY[i : i + 1])
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


def test_verified_ok_backpressure_with_a_held_command() -> None:
    # Verified OK: max_pipelined_commands=2 with RCPT held behind MAIL: the
    # rest of the batch waits in the buffer and is released in order as
    # replies drain; every command gets exactly one reply, in order.
    p = Peer(max_pipelined_commands=2)
    p.ready()
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
