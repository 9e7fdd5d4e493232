"""The upstream's replies (protocol/upstream.py), alone."""

from __future__ import annotations

import pytest

from smtpguard.protocol import ehlo, upstream
from smtpguard.protocol.events import MessageDone, MessageOutcome
from smtpguard.protocol.framing import UpstreamReply
from smtpguard.protocol.greeting import Deferred
from smtpguard.protocol.options import SessionOptions
from smtpguard.protocol.queue import Slot
from smtpguard.protocol.rules import Verb
from smtpguard.protocol.transaction import Transaction
from smtpguard.protocol.upstream import Disposition, Internal

EHLO = (b"250-up.example\r\n", b"250-PIPELINING\r\n", b"250 8BITMIME\r\n")


def reply(*lines: bytes) -> UpstreamReply:
    return UpstreamReply(int(lines[0][:3]), lines)


@pytest.mark.parametrize(
    ("head", "code", "want"),
    [
        (None, 421, Disposition.UNSOLICITED),
        (None, 250, Disposition.BROKEN),
        (None, 221, Disposition.BROKEN),
        (Slot(Verb.GREETING, Verb.GREETING), 354, Disposition.BROKEN),
        (Slot(Verb.GREETING, Verb.GREETING, internal=True), 354, Disposition.BROKEN),
        (Slot(Verb.GREETING, Verb.GREETING), 220, Disposition.RELAY),
        (Slot(Verb.GREETING, Verb.GREETING, internal=True), 220, Disposition.INTERNAL),
        (Slot(Verb.RSET, Verb.RSET, internal=True), 500, Disposition.INTERNAL),
        (Slot(Verb.DATA, Verb.DATA), 354, Disposition.RELAY),
        (Slot(Verb.MAIL, Verb.MAIL), 421, Disposition.RELAY),
    ],
)
def test_disposition(head: Slot | None, code: int, want: Disposition) -> None:
    assert upstream.disposition(head, code) is want


def test_internal_greeting_records_the_banner_or_closes() -> None:
    deferred = Deferred()
    assert upstream.internal(Verb.GREETING, reply(b"220 up.example ESMTP\r\n"), deferred) is (
        Internal.CONSUMED
    )
    assert deferred.banner == b"up.example ESMTP"
    assert upstream.internal(Verb.GREETING, reply(b"421 busy\r\n"), Deferred()) is Internal.CLOSE
    refused = Deferred()
    assert upstream.internal(Verb.GREETING, reply(b"554 no\r\n"), refused) is Internal.CONSUMED
    assert refused.take_refusal() == b"554 no\r\n"


def test_internal_rset_must_succeed() -> None:
    assert upstream.internal(Verb.RSET, reply(b"250 ok\r\n"), Deferred()) is Internal.CONSUMED
    assert upstream.internal(Verb.RSET, reply(b"503 no\r\n"), Deferred()) is Internal.BROKEN


def test_identified_after_ehlo_and_helo() -> None:
    opts = SessionOptions()
    assert upstream.identified(Verb.EHLO, reply(*EHLO), opts, False) == ehlo.rewrite(
        EHLO, opts, False
    )
    helo = reply(b"250 up.example\r\n")
    assert upstream.identified(Verb.HELO, helo, opts, False) == (
        b"250 up.example\r\n",
        ehlo.NO_EXTENSIONS,
    )
    assert upstream.identified(Verb.EHLO, reply(b"502 no\r\n"), opts, False) is None
    assert upstream.identified(Verb.MAIL, reply(b"250 ok\r\n"), opts, False) is None


def test_message_done_takes_the_slot_size() -> None:
    slot, txn = Slot(Verb.DATA, Verb.DATA_END), Transaction()
    slot.size, txn.content_bytes = 10, 7  # the next message has begun
    assert upstream.message_done(slot, 250, txn) == MessageDone(MessageOutcome.ACCEPTED, 10)
    assert upstream.message_done(slot, 554, txn) == MessageDone(MessageOutcome.REJECTED, 10)
    assert txn.content_bytes == 7


def test_message_done_before_the_last_chunk_was_sent() -> None:
    slot, txn = Slot(Verb.BDAT, Verb.BDAT_LAST), Transaction()
    txn.last_chunk, txn.content_bytes = slot, 5
    assert upstream.message_done(slot, 552, txn) == MessageDone(MessageOutcome.REJECTED, 5)
    assert txn.content_bytes == 0
    assert txn.last_chunk is None
