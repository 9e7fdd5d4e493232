"""The DATA body filter: one real end, and no message smuggled for any reader."""

from __future__ import annotations

import re

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from smtpguard.protocol.body import BodyFilter

TERMINATOR = b"\r\n.\r\n"


def run(chunks: list[bytes], action: str) -> tuple[bytes, bytes, set[str]]:
    """Feed chunks; return (bytes sent upstream, bytes left over after the end, findings)."""
    f = BodyFilter(action)
    buf = bytearray()
    out = bytearray()
    ended = False
    for chunk in chunks:
        buf += chunk
        while buf and not ended:
            sent, used, ended = f.feed(buf)
            out += sent
            del buf[:used]
            if not used and not ended:
                break
    assert ended, (bytes(out), bytes(buf))
    return bytes(out), bytes(buf), f.findings


# Readers a lenient upstream might be: each returns where it thinks the
# body ends (index just past the end-of-data line), or None.
def _reader(breaks: bytes, strip_nul: bool) -> object:
    pattern = re.compile(breaks)

    def end(data: bytes) -> int | None:
        pos = 0
        for m in pattern.finditer(data):
            line = data[pos : m.start()]
            if strip_nul:
                line = line.replace(b"\0", b"")
            if line == b".":
                return m.end()
            pos = m.end()
        return None

    return end


READERS = {
    "strict": _reader(rb"\r\n", False),
    "lf": _reader(rb"\r?\n", False),
    "any-break": _reader(rb"\r\n|\r|\n", False),
    "any-break-nul": _reader(rb"\r\n|\r|\n", True),
    "cr-cr-lf": _reader(rb"\r*\n|\r", True),
}

TOKENS = st.sampled_from([b"a", b".", b"\r", b"\n", b"\0", b"\r\n", b"MAIL FROM:<x@y>"])


@st.composite
def hostile_bodies(draw: st.DrawFn) -> bytes:
    body = b"".join(draw(st.lists(TOKENS, max_size=40)))
    # The body must not contain the real end before its end.
    body = body.replace(b"\r\n.\r\n", b"\r\n..\r\n")
    full = b"\r\n" + body + TERMINATOR
    assume(full.find(TERMINATOR) == len(full) - len(TERMINATOR))
    return body


@settings(max_examples=400, deadline=None)
@given(hostile_bodies(), st.integers(1, 9), st.sampled_from(["normalize", "observe"]))
def test_no_reader_sees_an_end_before_the_real_one(body: bytes, step: int, action: str) -> None:
    full = b"\r\n" + body + TERMINATOR  # the DATA line's CRLF starts the body
    chunks = [full[2:][i : i + step] for i in range(0, len(full) - 2, step)]
    out, rest, findings = run(chunks, action)
    assert rest == b""
    assert out.endswith(TERMINATOR) or out == b".\r\n"
    seen = b"\r\n" + out
    for name, reader in READERS.items():
        assert reader(seen) == len(seen), (name, seen)  # type: ignore[operator]
    if action == "normalize":
        inner = seen[:-3]
        assert inner.count(b"\n") == inner.count(b"\r\n") == inner.count(b"\r")
        assert b"\0" not in out
    if not any(c in body for c in b"\r\n\0") or (
        action == "observe" and not re.search(rb"(^|[\r\n])\0*\.", body)
    ):
        # Nothing to defuse: the bytes pass unchanged.
        assert out == body + TERMINATOR


@given(st.binary(max_size=200), st.integers(1, 13))
def test_clean_bodies_pass_byte_exact_in_any_chunking(data: bytes, step: int) -> None:
    body = b"x" + re.sub(rb"[\r\n\0]", b"x", data) + b"\r\n..dot\r\n"
    full = body + TERMINATOR
    out, rest, findings = run([full[i : i + step] for i in range(0, len(full), step)], "normalize")
    assert out == full and rest == b"" and findings == set()


@pytest.mark.parametrize(
    ("variant", "finding"),
    [
        (b"\n.\n", "bare_lf"),
        (b"\n.\r\n", "bare_lf"),
        (b"\r.\r\n", "bare_cr"),
        (b"\r\n.\rX", "bare_cr"),
        (b"\r\n\0.\r\n", "nul"),
        (b"\r\n.\0\r\n", "nul"),
        (b"\r\r\n.\r\r\n", "bare_cr"),
    ],
)
@pytest.mark.parametrize("action", ["normalize", "observe"])
def test_smuggling_variants_are_defused(variant: bytes, finding: str, action: str) -> None:
    smuggled = b"MAIL FROM:<evil@x>\r\nRCPT TO:<victim@y>\r\nDATA\r\nevil\r\n"
    body = b"Subject: first\r\n\r\nhello" + variant + smuggled
    out, rest, findings = run([body + TERMINATOR + b"QUIT\r\n"], action)
    assert rest == b"QUIT\r\n"
    assert finding in findings
    assert "end_lookalike" in findings or variant == b"\r\n.\rX"
    seen = b"\r\n" + out
    for name, reader in READERS.items():
        assert reader(seen) == len(seen), name  # type: ignore[operator]
    assert smuggled.split(b"\r\n")[0] in out  # the rest stays content of the first message


def test_normalize_rewrites_breaks_and_stuffs_new_line_starts() -> None:
    out, _, findings = run([b"a\nb\r.c\r\n" + TERMINATOR], "normalize")
    assert out == b"a\r\nb\r\n..c\r\n" + TERMINATOR
    assert findings == {"bare_lf", "bare_cr"}


def test_trailing_cr_waits_for_the_next_byte() -> None:
    f = BodyFilter()
    buf = bytearray(b"abc\r")
    sent, used, ended = f.feed(buf)
    assert (sent, used, ended) == (b"abc", 3, False)
