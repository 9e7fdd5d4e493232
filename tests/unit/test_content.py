"""The content readers alone: a DATA body and a BDAT chunk, side by side."""

from __future__ import annotations

from typing import Any

from smtpguard.protocol import policy as P
from smtpguard.protocol.content import END, MORE, BodyReader, ChunkReader, annotation
from smtpguard.protocol.defences import Defences
from smtpguard.protocol.events import Event, PolicyAction
from smtpguard.protocol.options import AnnotateMode, SessionOptions
from smtpguard.protocol.policy import Action, Defence, Policy
from smtpguard.protocol.queue import Slot
from smtpguard.protocol.rules import Verb
from smtpguard.protocol.transaction import Transaction

NO_EXTENSIONS: frozenset[bytes] = frozenset()


def _parts(**policy: Any) -> tuple[Defences, Transaction, list[Event]]:
    events: list[Event] = []
    return Defences(Policy(**policy), events), Transaction(), events


def test_a_body_streams_to_its_final_dot() -> None:
    defences, txn, _ = _parts()
    reader = BodyReader(defences, txn)
    buf = bytearray(b"Subject: x\r\n\r\nhello\r\n")
    assert reader.read(buf, NO_EXTENSIONS) == (b"Subject: x\r\n\r\nhello\r\n", MORE)
    assert buf == b""
    buf += b".\r\nQUIT\r\n"
    assert reader.read(buf, NO_EXTENSIONS) == (b".\r\n", END)
    assert buf == b"QUIT\r\n"  # the next command stays for the line reader
    assert txn.content_bytes == len(b"Subject: x\r\n\r\nhello\r\n.\r\n")


def test_a_body_refused_sends_nothing() -> None:
    defences, txn, _ = _parts(smuggling=Action.REJECT)
    out, verdict = BodyReader(defences, txn).read(bytearray(b"a\nb\r\n"), NO_EXTENSIONS)
    assert (out, verdict) == (b"", P.BARE_NEWLINE)
    defences, txn, _ = _parts(max_text_line_bytes=10)
    out, verdict = BodyReader(defences, txn).read(bytearray(b"x" * 20 + b"\r\n"), NO_EXTENSIONS)
    assert (out, verdict) == (b"", P.TEXT_LINE_TOO_LONG)
    defences, txn, _ = _parts(max_message_bytes=5)
    out, verdict = BodyReader(defences, txn).read(bytearray(b"123456\r\n"), NO_EXTENSIONS)
    assert (out, verdict) == (b"", P.MESSAGE_TOO_BIG)


def test_eight_bit_is_refused_only_without_8bitmime_upstream() -> None:
    defences, txn, events = _parts(reject_eight_bit=True)
    body = b"caf\xc3\xa9\r\n"
    assert BodyReader(defences, txn).read(bytearray(body), frozenset({b"8BITMIME"}))[1] is MORE
    assert BodyReader(defences, txn).read(bytearray(body), NO_EXTENSIONS) == (
        b"",
        P.EIGHT_BIT_REFUSED,
    )
    assert events == [PolicyAction(Defence.EIGHT_BIT, Action.REJECT, "8-bit content")]
    defences, txn, _ = _parts(reject_eight_bit=True)
    chunk = ChunkReader(len(body), True, defences, txn)
    assert chunk.read(bytearray(body), NO_EXTENSIONS) == (b"", P.EIGHT_BIT_REFUSED)


def test_a_chunk_is_read_to_its_size_and_hands_over_the_message_size() -> None:
    defences, txn, _ = _parts()
    last = Slot(Verb.BDAT, Verb.BDAT_LAST)
    txn.last_chunk = last
    reader = ChunkReader(6, True, defences, txn)
    buf = bytearray(b"abc")
    assert reader.read(buf, NO_EXTENSIONS) == (b"abc", MORE)
    buf += b"defQUIT\r\n"
    assert reader.read(buf, NO_EXTENSIONS) == (b"def", END)
    assert buf == b"QUIT\r\n"
    assert (last.size, txn.content_bytes, txn.last_chunk) == (6, 0, None)


def test_a_refused_chunk_is_read_and_dropped() -> None:
    defences, txn, events = _parts()
    reader = ChunkReader(4, False, defences, txn)
    buf = bytearray(b"a\nbcRSET\r\n")
    assert reader.read(buf, NO_EXTENSIONS) == (b"", END)
    assert buf == b"RSET\r\n" and txn.content_bytes == 0 and events == []


def test_bare_breaks_in_chunks_are_reported_once() -> None:
    defences, txn, events = _parts()
    reader = ChunkReader(8, True, defences, txn)
    assert reader.read(bytearray(b"a\nb\r"), NO_EXTENSIONS) == (b"a\nb\r", MORE)
    assert reader.read(bytearray(b"c\nd\n"), NO_EXTENSIONS) == (b"c\nd\n", END)
    assert [e for e in events if isinstance(e, PolicyAction)] == [
        PolicyAction(Defence.SMUGGLING, Action.NORMALIZE, "bare_lf_or_cr")
    ]
    defences, txn, _ = _parts(smuggling=Action.REJECT)
    reader = ChunkReader(3, True, defences, txn)
    assert reader.read(bytearray(b"a\rb"), NO_EXTENSIONS) == (b"", P.BARE_NEWLINE)


def test_the_annotation_goes_once_per_transaction() -> None:
    defences, txn, _ = _parts()
    opts = SessionOptions(annotate=AnnotateMode.ALWAYS)
    first = annotation(txn, opts, defences)
    assert first.endswith(b"\r\n") and txn.annotated
    assert annotation(txn, opts, defences) == b""
    assert annotation(Transaction(), SessionOptions(), defences) == b""
