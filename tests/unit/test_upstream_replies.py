"""What the upstream says, in the core: replies split anywhere, a 421 it
sends unasked, replies that cannot be SMTP (a 3xx greeting, a multi-line
reply whose code changes)."""

from __future__ import annotations

from support.driver import Peer
from support.ehlo import EHLO_AUTH

from smtpguard.protocol.events import MessageDone


def test_unsolicited_421_in_the_same_read_as_a_reply_keeps_that_reply() -> None:
    # The upstream accepts the message and, in the same segment, announces its
    # own shutdown with an unsolicited 421 (RFC 5321 3.8).  Relay.reply
    # fills the DATA_END slot, then handles the 421 (no reply in flight) by
    # appending it to the client bytes and closing, without flushing the slots
    # first (receive_upstream returns at once on `closed`).  The client never
    # sees the 250 that accepted its message - it will retry, and the
    # message is delivered twice.  Expected: every reply owed goes out, then
    # the 421.
    p = Peer()
    p.ready(EHLO_AUTH)
    p.envelope()
    p.client(b"DATA\r\n")
    p.upstream(b"354 go\r\n")
    p.client(b"hi\r\n.\r\n")
    _, down = p.upstream(b"250 2.0.0 queued as X\r\n421 4.3.2 shutting down\r\n")
    assert down == b"250 2.0.0 queued as X\r\n421 4.3.2 shutting down\r\n"
    assert p.s.closed


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
    # Every other way a session ends mid-body (fail, abort, client_eof)
    # reports MessageDone("aborted"); the unsolicited-421 branch of
    # Relay.reply does not, so smtpguard_messages_total{outcome}
    # misses the message.  It also left the upstream bytes as they were, while the
    # other paths clear it.
    p = Peer()
    p.ready(EHLO_AUTH)
    p.envelope()
    p.client(b"DATA\r\n")
    p.upstream(b"354 go\r\n")
    p.client(b"partial body\r\n")
    _, down = p.upstream(b"421 4.4.2 idle timeout\r\n")
    assert down == b"421 4.4.2 idle timeout\r\n"
    assert p.s.closed
    assert MessageDone("aborted", 14) in p.s.take_events()


def test_421_mid_pipeline_never_releases_the_held_command() -> None:
    # Verified OK: a 421 answering the pipelined MAIL closes the session; the
    # RCPT held behind it never reaches the upstream.
    p = Peer()
    p.ready(EHLO_AUTH)
    p.client(b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n")
    up, down = p.upstream(b"421 4.3.2 going down\r\n")
    assert up == b""
    assert down == b"421 4.3.2 going down\r\n"
    assert p.s.closed and p.s.close_reason == "upstream_closed"


def test_multi_line_reply_with_changing_codes_is_an_upstream_error() -> None:
    # Verified OK: RFC 5321 4.2.1 - every line of a reply has the same code.
    p = Peer()
    p.ready(EHLO_AUTH)
    p.client(b"NOOP\r\n")
    _, down = p.upstream(b"250-first\r\n550 second\r\n")
    assert down.startswith(b"421 4.4.2 ")
    assert p.s.closed and p.s.close_reason == "upstream_error"
