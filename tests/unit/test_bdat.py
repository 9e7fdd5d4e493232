"""BDAT (RFC 3030) in the core: chunks relayed byte for byte, split across
reads and chunk boundaries anywhere, a refused chunk, RSET and EOF around a
chunk."""

from __future__ import annotations

import pytest
from support.driver import Peer, policy_actions
from support.ehlo import EHLO_AUTH

from smtpguard.protocol import bdat
from smtpguard.protocol.events import MessageDone
from smtpguard.protocol.policy import Defence, Policy
from smtpguard.protocol.rules import Phase


def test_bdat_chunks_are_relayed_byte_exact() -> None:
    p = Peer()
    p.ready()
    for line in (b"MAIL FROM:<a@b>\r\n", b"RCPT TO:<c@d>\r\n"):
        p.client(line)
        p.upstream(b"250 ok\r\n")
    chunk1 = b"Subject: x\r\n\r\nQUIT\r\n.\r\n"
    chunk2 = b"\x00\xffend\r\n"
    data = b"BDAT %d\r\n" % len(chunk1) + chunk1 + b"BDAT %d LAST\r\n" % len(chunk2) + chunk2
    up, _ = p.client(data)
    assert up == data
    _, down = p.upstream(b"250 2.0.0 chunk\r\n250 2.0.0 queued\r\n")
    assert down == b"250 2.0.0 chunk\r\n250 2.0.0 queued\r\n"
    assert p.s.state.phase is Phase.READY


def test_data_after_bdat_and_rejected_bdat_chunk_is_discarded() -> None:
    p = Peer()
    p.ready()
    for line in (b"MAIL FROM:<a@b>\r\n", b"RCPT TO:<c@d>\r\n"):
        p.client(line)
        p.upstream(b"250 ok\r\n")
    p.client(b"BDAT 3\r\nabc")
    p.upstream(b"250 ok\r\n")
    up, down = p.client(b"DATA\r\n")
    assert up == b""
    assert down.startswith(b"503 5.5.1 Error: DATA not allowed after BDAT")
    q = Peer()
    q.ready()
    up, down = q.client(b"BDAT 9\r\nQUIT\r\nxyzNOOP\r\n")
    assert up == b"NOOP\r\n"  # the 9-byte chunk was read and dropped
    assert down == b"503 5.5.1 Error: need MAIL command\r\n"


def test_rset_after_a_bdat_chunk_starts_the_next_message_at_size_zero() -> None:
    # RFC 3030 / RFC 5321 4.1.1.5: RSET aborts the transaction; the next
    # message is a new one.  _message_bytes is reset only when DATA_END or
    # BDAT_LAST is answered, so the 60 bytes of the abandoned BDAT message
    # count against the next one: a 60-byte message is refused with 552 under
    # a 100-byte limit and the session is dropped (and the abandoned message
    # is never reported as aborted).  The same happens after EHLO/HELO.
    p = Peer(policy=Policy(max_message_bytes=100))
    p.ready(EHLO_AUTH)
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
    p.ready(EHLO_AUTH)
    p.client(b"MAIL FROM:<a@b>\r\n")
    p.upstream(b"250 ok\r\n")
    up, _ = p.client(b"RCPT TO:<c@d>\r\nBDAT 10 LAST\r\nhel")
    assert up == b"RCPT TO:<c@d>\r\n"
    p.s.client_eof()
    up, down = p.upstream(b"250 2.1.5 ok\r\n")
    assert down == b"250 2.1.5 ok\r\n"
    assert b"BDAT" not in up
    assert p.s.closed and p.s.close_reason == "client_closed"


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
    p.ready(EHLO_AUTH)
    p.envelope()
    up, _ = p.client(b"BDAT 10 LAST\r\nhello")
    assert up == b"BDAT 10 LAST\r\nhello"
    up, down = p.client(b"world")
    assert up == b"world"
    assert not p.s.closed
    assert p.upstream(b"250 2.0.0 queued\r\n")[1] == b"250 2.0.0 queued\r\n"
    assert not policy_actions(p.s.take_events(), Defence.PIPELINING)


def test_clean_crlf_split_across_reads_in_a_bdat_chunk_is_not_smuggling() -> None:
    # _consume_bdat joins the previous byte (_bdat_tail) to the new piece to
    # find bare CR/LF across reads.  When the previous piece ended with a full
    # CRLF, the tail is "\n", and the joined text starts with an LF whose CR is
    # not in it: a bare LF is "found" in a clean message.  Under
    # smuggling: reject the session is dropped with 550 (under normalize a
    # false finding is counted).  A read boundary right after a CRLF is the
    # most common split there is.
    p = Peer(policy=Policy(smuggling="reject"))
    p.ready(EHLO_AUTH)
    p.envelope()
    assert p.client(b"BDAT 8 LAST\r\nab\r\n")[0] == b"BDAT 8 LAST\r\nab\r\n"
    up, down = p.client(b"cdef")
    assert (up, down) == (b"cdef", b"")
    assert not p.s.closed
    assert not policy_actions(p.s.take_events(), Defence.SMUGGLING)


def test_crlf_split_between_two_bdat_chunks_is_not_smuggling() -> None:
    # RFC 3030 lets chunk boundaries fall anywhere, including between the CR
    # and the LF of a line ending.  _bdat resets _bdat_tail at every BDAT
    # command, so the LF that starts the second chunk looks bare.
    p = Peer(policy=Policy(smuggling="reject"))
    p.ready(EHLO_AUTH)
    p.envelope()
    p.client(b"BDAT 4\r\nabc\r")
    p.upstream(b"250 2.0.0 chunk ok\r\n")
    up, down = p.client(b"BDAT 4 LAST\r\n\ndef")
    assert (up, down) == (b"BDAT 4 LAST\r\n\ndef", b"")
    assert not p.s.closed
    assert not policy_actions(p.s.take_events(), Defence.SMUGGLING)


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
    p.ready(EHLO_AUTH)
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


# ------------------------------------------------ the BDAT decision, alone

_IN_SEQUENCE = {"waits": False, "observe": False, "client_gone": False, "buffered": 0}


@pytest.mark.parametrize(
    ("parsed", "expected", "answered", "changes", "want"),
    [
        (None, None, False, {}, bdat.Move.MALFORMED),
        (None, "need MAIL", True, {"waits": True}, bdat.Move.MALFORMED),
        (bdat.Bdat(5, False), None, False, {"waits": True}, bdat.Move.WAIT),
        (bdat.Bdat(5, False), None, True, {}, bdat.Move.ANSWER),
        (bdat.Bdat(5, False), "need MAIL", False, {}, bdat.Move.OUT_OF_SEQUENCE),
        (bdat.Bdat(5, False), "need MAIL", False, {"observe": True}, bdat.Move.FORWARD),
        (bdat.Bdat(5, True), None, False, {}, bdat.Move.FORWARD),
        (bdat.Bdat(5, True), None, False, {"client_gone": True, "buffered": 4}, bdat.Move.STARVED),
        (bdat.Bdat(5, True), None, False, {"client_gone": True, "buffered": 5}, bdat.Move.FORWARD),
        (bdat.Bdat(5, True), None, False, {"buffered": 0}, bdat.Move.FORWARD),
    ],
)
def test_bdat_decide(
    parsed: bdat.Bdat | None,
    expected: str | None,
    answered: bool,
    changes: dict[str, object],
    want: bdat.Move,
) -> None:
    known = {**_IN_SEQUENCE, **changes}
    assert bdat.decide(parsed, expected, answered, **known) is want  # type: ignore[arg-type]


def test_bdat_announced_counts_the_header() -> None:
    assert bdat.announced(bdat.Bdat(5, False), b"bdat 5", b"") == b"bdat 5"
    assert bdat.announced(bdat.Bdat(5, False), b"bdat 5", b"X: y\r\n") == b"BDAT 11"
    assert bdat.announced(bdat.Bdat(0, True), b"BDAT 0 last", b"X: y\r\n") == b"BDAT 6 LAST"
