"""tests/support/canonical.py: the independent checker of canonical RFC 5321 lines."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support.canonical import is_canonical, problem, session_problems

from smtpguard.protocol import syntax

CANONICAL = [
    b"EHLO c.example",
    b"HELO c.example",
    b"EHLO [192.0.2.1]",
    b"EHLO [IPv6:2001:db8::1]",
    b"MAIL FROM:<>",
    b"MAIL FROM:<a@example.com>",
    b"MAIL FROM:<a@example.com>\r\n",
    b'MAIL FROM:<"john doe"@example.com> SIZE=100 BODY=8BITMIME',
    b"MAIL FROM:<a@[IPv6:::ffff:192.0.2.1]> RET=HDRS ENVID=x+2By",
    b"MAIL FROM:<\xc3\xa9@\xc3\xa9xample.com> SMTPUTF8",
    b"MAIL FROM:<a@example.com> AUTH=<>",
    b"RCPT TO:<b@example.com> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;b@example.com",
    b"RCPT TO:<Postmaster>",
    b"RCPT TO:<postmaster@example.com>",
    b"DATA",
    b"RSET",
    b"QUIT",
    b"NOOP",
    b"NOOP anything at  all",
    b"HELP MAIL",
    b"VRFY user",
    b"BDAT 100 LAST",
    b"AUTH PLAIN AGFiAGM=",
    b"MAIL FROM:<" + b"l" * 64 + b"@" + b".".join([b"d" * 63, b"d" * 63, b"d" * 61]) + b">",
    b"EHLO " + b".".join([b"d" * 63] * 3 + [b"d" * 63]),
]


@pytest.mark.parametrize("line", CANONICAL)
def test_canonical_lines(line: bytes) -> None:
    assert problem(line) is None
    assert is_canonical(line)


NOT_CANONICAL = [
    (b"mail FROM:<a@example.com>", "known verb"),
    (b"MAIL from:<a@example.com>", "MAIL grammar"),
    (b"MAIL FROM: <a@example.com>", "MAIL grammar"),
    (b"MAIL FROM:a@example.com", "MAIL grammar"),
    (b"MAIL FROM:<a@example.com> ", "MAIL grammar"),
    (b"MAIL FROM:<a@example.com>  SIZE=1", "MAIL grammar"),
    (b"MAIL FROM:<a@example.com> size=1", "MAIL grammar"),
    (b"MAIL FROM:<@a.example:a@example.com>", "MAIL grammar"),
    (b"MAIL FROM:<a..b@example.com>", "MAIL grammar"),
    (b"MAIL FROM:<a@example.com.>", "MAIL grammar"),
    (b"MAIL FROM:<a@-x.example>", "MAIL grammar"),
    (b"MAIL FROM:<a@[256.1.1.1]>", "MAIL grammar"),
    (b"MAIL FROM:<a@[IPv6:1:2:3:4:5:6:7::]>", "MAIL grammar"),
    (b"MAIL FROM:<a@[IPv6:1:2:3:4:5::1.2.3.4]>", "MAIL grammar"),
    (b"MAIL FROM:<a@[IPv6:zz::1]>", "MAIL grammar"),
    (b"MAIL FROM:<a@example.com> SIZE=1 SIZE=2", "twice"),
    (b"MAIL FROM:<a@example.com> SIZE=123456789012345678901", "SIZE"),
    (b"MAIL FROM:<a@example.com> BODY=8bitmime", "BODY"),
    (b"MAIL FROM:<a@example.com> RET=full", "RET"),
    (b"MAIL FROM:<a@example.com> SMTPUTF8=1", "no value"),
    (b"RCPT TO:<b@example.com> SMTPUTF8", "SMTPUTF8 outside MAIL"),
    (b"RCPT TO:<>", "RCPT grammar"),
    (b"RCPT TO:<b\x01@example.com>", "control"),
    (b"NOOP \x7f", "control"),
    (b"MAIL FROM:<\xc3\xa9@example.com>", "8-bit"),
    (b"MAIL FROM:<\xe9@example.com> SMTPUTF8", "not UTF-8"),
    (b"MAIL FROM:<\xed\xa0\x80@example.com> SMTPUTF8", "not UTF-8"),  # a surrogate
    (b"EHLO \xc3\xa9.example", "8-bit"),
    (b"VRFY \xc3\xa9", "8-bit"),
    (b"MAIL FROM:<" + b"l" * 65 + b"@example.com>", "local part"),
    (b"MAIL FROM:<a@" + b"d" * 64 + b".example>", "label"),
    (b"MAIL FROM:<a@" + b".".join([b"d" * 63] * 4) + b"d>", "domain"),
    (
        b"MAIL FROM:<" + b"l" * 64 + b"@" + b".".join([b"d" * 63, b"d" * 63, b"d" * 62]) + b">",
        "path",
    ),
    (b"EHLO " + b"h" * 480, "domain"),
    (b"EHLO a b", "EHLO/HELO grammar"),
    (b"EHLO", "EHLO/HELO grammar"),
    (b"RSET x", "no argument"),
    (b"QUIT ", "no argument"),
    (b"VRFY", "needs an argument"),
    (b"NOOP ", "white space"),
    (b"NOOP  x", "white space"),
    (b"BDAT x", "BDAT"),
    (b"XYZZY", "known verb"),
    (b"MAIL FROM:<a@example.com> ENVID=" + b"e" * 600, "over 612 octets"),
]


@pytest.mark.parametrize(("line", "why"), NOT_CANONICAL)
def test_not_canonical_lines(line: bytes, why: str) -> None:
    found = problem(line)
    assert found is not None and why in found, found
    assert not is_canonical(line)


def test_extensions_raise_the_line_limit() -> None:
    envid = b"MAIL FROM:<a@example.com> ENVID=" + b"e" * 500
    assert len(envid) + 2 > 512 and problem(envid) is None  # 512 + 100 (RFC 3461 5)
    assert problem(envid + b"e" * 100) == "command line over 612 octets"
    orcpt = b"RCPT TO:<b@example.com> ORCPT=rfc822;" + b"o" * 500
    assert problem(orcpt) is None  # 512 + 500 (RFC 3461 5)
    assert problem(orcpt + b"o" * 500) == "command line over 1012 octets"


def test_a_session_tracks_smtputf8_transactions() -> None:
    lines = [
        b"EHLO c.example\r\n",
        b"MAIL FROM:<a@example.com> SMTPUTF8\r\n",
        b"RCPT TO:<\xc3\xa9@example.com>\r\n",
        b"RSET\r\n",
        b"MAIL FROM:<a@example.com>\r\n",
        b"RCPT TO:<\xc3\xa9@example.com>\r\n",
        b"RCPT TO:<b@example.com> \r\n",
    ]
    assert session_problems(lines) == [
        (lines[5], "8-bit octet outside SMTPUTF8"),
        (lines[6], "not the RCPT grammar"),
    ]


# The IPv6 literal grammar is written twice, independently: as regexes with
# the group counts spelled out (canonical.py) and as a split-and-count
# function (syntax.py).  They must agree on every string.
ipv6_alphabet = st.lists(st.sampled_from([b"0", b"1", b"f", b"ffff", b"12345", b":", b"::", b"."]))


@settings(max_examples=1000, deadline=None)
@given(ipv6_alphabet.map(b"".join))
def test_two_ipv6_grammars_agree(text: bytes) -> None:
    line = b"EHLO [IPv6:" + text + b"]"
    assert (problem(line) is None) is syntax._ipv6(text), text


@settings(max_examples=500, deadline=None)
@given(
    st.lists(st.sampled_from([b"1", b"25", b"255", b"256", b"010", b".", b"1000"])).map(b"".join)
)
def test_two_ipv4_grammars_agree(text: bytes) -> None:
    assert (problem(b"EHLO [" + text + b"]") is None) is syntax._ipv4(text), text
