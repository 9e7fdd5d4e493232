"""The line reader alone: lines, bare LFs, over-long lines dropped in bounded memory."""

from __future__ import annotations

from smtpguard.protocol.lines import TOO_LONG, LineReader


def test_lines_come_out_without_their_ending() -> None:
    buf = bytearray(b"NOOP\r\nRSET\nQU")
    r = LineReader(buf)
    assert r.take(100) == (b"NOOP", False)
    assert r.take(100) == (b"RSET", True)  # bare LF
    assert r.take(100) is None
    assert buf == b"QU"


def test_a_line_fed_one_byte_at_a_time() -> None:
    buf = bytearray()
    r = LineReader(buf)
    for byte in b"EHLO x\r":
        buf.append(byte)
        assert r.take(100) is None
    buf += b"\n"
    assert r.take(100) == (b"EHLO x", False)


def test_an_over_long_line_is_dropped_as_it_arrives() -> None:
    buf = bytearray()
    r = LineReader(buf)
    for _ in range(10):
        buf += b"x" * 64
        assert r.take(16) is None
        assert len(buf) == 0  # never more than the limit is kept
        assert r.discarding
    buf += b"tail\r\nNOOP\r\n"
    assert r.take(16) is TOO_LONG  # once, at its end
    assert not r.discarding
    assert r.take(16) == (b"NOOP", False)


def test_a_complete_line_at_the_limit_is_too_long() -> None:
    buf = bytearray(b"x" * 16 + b"\r\nNOOP\r\n")
    r = LineReader(buf)
    assert r.take(16) is TOO_LONG
    assert r.take(16) == (b"NOOP", False)
    assert LineReader(bytearray(b"x" * 14 + b"\r\n")).take(16) == (b"x" * 14, False)
