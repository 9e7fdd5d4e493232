"""protocol/syntax.py: the RFC 5321 grammar, the canonical form, the modes, Postfix's corpus."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from support.canonical import problem
from support.postfix_probe import (
    CORPUS,
    DOMAIN254,
    DOMAIN256,
    EHLO_KEYWORDS,
    L64,
    L65,
    LABEL63,
    LABEL64,
    PROBED_ON,
    Probe,
)

from smtpguard.protocol import replies as R
from smtpguard.protocol import syntax
from smtpguard.protocol.rules import VERB_BY_NAME, Verb
from smtpguard.protocol.syntax import (
    PARAMETERS,
    Mode,
    OctetClass,
    Offered,
    Reason,
    Verdict,
    check,
    words,
)

#: Every extension smtpguard has parameters for.
ALL = Offered.of(
    "SIZE 8BITMIME BINARYMIME CHUNKING SMTPUTF8 DSN AUTH MT-PRIORITY REQUIRETLS DELIVERBY "
    "FUTURERELEASE RRVS SUBMITTER NO-SOLICITING".split()
)
POSTFIX = Offered.of(EHLO_KEYWORDS["default"])


def verb_of(line: bytes) -> Verb:
    parts = line.split(None, 1)
    return VERB_BY_NAME.get(parts[0].upper(), Verb.UNKNOWN) if parts else Verb.UNKNOWN


def run(
    line: bytes,
    mode: Mode = Mode.STRICT,
    offered: Offered = ALL,
    smtputf8_transaction: bool = False,
) -> Verdict:
    return check(
        verb_of(line),
        line,
        mode=mode,
        offered=offered,
        smtputf8_transaction=smtputf8_transaction,
    )


def outcome(verdict: Verdict) -> str:
    """``forward``, or the refusal's basic and enhanced code."""
    if verdict.reply is None:
        return "forward"
    return f"{verdict.reply.code} {verdict.reply.enhanced}"


# -- the grammar: Mailbox, Local-part, Domain, address-literal (RFC 5321 4.1.2, 4.1.3)

VALID_MAILBOXES = [
    b"a@example.com",
    b"first.last@example.com",
    b"a+tag@sub.example.com",
    b"!#$%&'*+/=?^_`{|}~-@example.com",
    b'"john doe"@example.com',
    b'"a\\"b"@example.com',
    b'"a\\\\b"@example.com',
    b'""@example.com',
    b'"a@b"@example.com',
    b'"a>b"@example.com',
    b"a@localhost",
    b"a@123.example",
    b"a@a-b--c.example",
    b"a@xn--bcher-kva.example",
    b"a@EXAMPLE.COM",
    L64 + b"@example.com",
    b"a@" + LABEL63 + b".example",
    b"a@[127.0.0.1]",
    b"a@[255.255.255.255]",
    b"a@[0.0.0.0]",
    b"a@[001.002.003.004]",
    b"a@[IPv6:::1]",
    b"a@[IPv6:::]",
    b"a@[ipv6:::1]",
    b"a@[IPv6:2001:db8::1]",
    b"a@[IPv6:1:2:3:4:5:6:7:8]",
    b"a@[IPv6:1::8]",
    b"a@[IPv6:1:2:3:4:5:6::]",
    b"a@[IPv6:::2:3:4:5:6:7]",
    b"a@[IPv6:ABCD:ef01::]",
    b"a@[IPv6:::ffff:192.0.2.1]",
    b"a@[IPv6:::1.2.3.4]",
    b"a@[IPv6:1:2:3:4:5:6:192.0.2.1]",
    b"a@[IPv6:1:2:3:4::192.0.2.1]",
    b"a@[IPv6:1:2::3:4:192.0.2.1]",
]


@pytest.mark.parametrize("mailbox", VALID_MAILBOXES)
def test_valid_mailbox_passes_strict_unchanged(mailbox: bytes) -> None:
    for verb in (b"MAIL FROM:", b"RCPT TO:"):
        line = verb + b"<" + mailbox + b">"
        verdict = run(line)
        assert verdict.forward == line and verdict.reason is None, verdict
        assert not verdict.changed
        assert problem(line) is None  # the independent checker agrees


INVALID_MAILBOXES = [
    # Local-part: Dot-string / Quoted-string
    (b"a..b@example.com", Reason.PATH_SYNTAX),
    (b".a@example.com", Reason.PATH_SYNTAX),
    (b"a.@example.com", Reason.PATH_SYNTAX),
    (b"a b@example.com", Reason.PATH_SYNTAX),
    (b"a(b)@example.com", Reason.PATH_SYNTAX),
    (b"a[b]@example.com", Reason.PATH_SYNTAX),
    (b"a;b@example.com", Reason.PATH_SYNTAX),
    (b"a,b@example.com", Reason.PATH_SYNTAX),
    (b"a\\b@example.com", Reason.PATH_SYNTAX),
    (b'"a"b"@example.com', Reason.PATH_SYNTAX),
    (b'a"b"@example.com', Reason.PATH_SYNTAX),
    (b"a@b@example.com", Reason.PATH_SYNTAX),
    (b"garbage", Reason.PATH_SYNTAX),
    (b"@example.com", Reason.PATH_SYNTAX),
    (b"<a@example.com>", Reason.PATH_SYNTAX),
    # Domain: sub-domain = Let-dig [Ldh-str]
    (b"a@", Reason.BAD_DOMAIN),
    (b"a@-example.com", Reason.BAD_DOMAIN),
    (b"a@example-.com", Reason.BAD_DOMAIN),
    (b"a@ex_ample.com", Reason.BAD_DOMAIN),
    (b"a@example..com", Reason.BAD_DOMAIN),
    (b"a@.example.com", Reason.BAD_DOMAIN),
    (b"a@example.com.", Reason.BAD_DOMAIN),
    (b"a@exa mple.com", Reason.BAD_DOMAIN),
    # address-literal
    (b"a@[]", Reason.BAD_ADDRESS_LITERAL),
    (b"a@[300.1.1.1]", Reason.BAD_ADDRESS_LITERAL),
    (b"a@[1.2.3]", Reason.BAD_ADDRESS_LITERAL),
    (b"a@[1.2.3.4.5]", Reason.BAD_ADDRESS_LITERAL),
    (b"a@[1234.1.1.1]", Reason.BAD_ADDRESS_LITERAL),
    (b"a@[127.0.0.1", Reason.BAD_ADDRESS_LITERAL),
    (b"a@[garbage]", Reason.BAD_ADDRESS_LITERAL),
    (b"a@[IPv6:zz::1]", Reason.BAD_ADDRESS_LITERAL),
    (b"a@[IPv6:12345::1]", Reason.BAD_ADDRESS_LITERAL),
    (b"a@[IPv6:1::2::3]", Reason.BAD_ADDRESS_LITERAL),
    (b"a@[IPv6:1:::3]", Reason.BAD_ADDRESS_LITERAL),
    (b"a@[IPv6:1:2:3:4:5:6:7]", Reason.BAD_ADDRESS_LITERAL),
    (b"a@[IPv6:1:2:3:4:5:6:7:8:9]", Reason.BAD_ADDRESS_LITERAL),
    (b"a@[IPv6:1:2:3:4:5:6:7::]", Reason.BAD_ADDRESS_LITERAL),  # "::" is 2+ groups
    (b"a@[IPv6:::2:3:4:5:6:7:8]", Reason.BAD_ADDRESS_LITERAL),
    (b"a@[IPv6:1:2:3:4:5::1.2.3.4]", Reason.BAD_ADDRESS_LITERAL),  # v4-comp: 4 groups
    (b"a@[IPv6:1:2:3:4:5:1.2.3.4]", Reason.BAD_ADDRESS_LITERAL),
    (b"a@[IPv6:1.2.3.4]", Reason.BAD_ADDRESS_LITERAL),
    (b"a@[IPv6:::1.2.3.256]", Reason.BAD_ADDRESS_LITERAL),
    (b"a@[IPv6:::1.2.3.4:1]", Reason.BAD_ADDRESS_LITERAL),
    (b"a@[tag-:x]", Reason.BAD_ADDRESS_LITERAL),
    (b"a@[tag:]", Reason.BAD_ADDRESS_LITERAL),
    (b"a@[tag:a[b]", Reason.BAD_ADDRESS_LITERAL),
    (b"a@[tag:a b]", Reason.BAD_ADDRESS_LITERAL),
    # A general address literal needs an IANA-registered tag (RFC 5321
    # 4.1.3): IPv6 is the only one (Postfix: 501 5.1.7 too).
    (b"a@[x-tag:anything]", Reason.BAD_ADDRESS_LITERAL),
    (b"a@[tag:a!~=]", Reason.BAD_ADDRESS_LITERAL),
    # RFC 5321 4.5.3.1 limits
    (L65 + b"@example.com", Reason.LOCAL_PART_TOO_LONG),
    (b'"' + b"q" * 63 + b'"@example.com', Reason.LOCAL_PART_TOO_LONG),
    (b"a@" + LABEL64 + b".example", Reason.LABEL_TOO_LONG),
    (b"a@" + DOMAIN256, Reason.DOMAIN_TOO_LONG),
    (b"a@" + DOMAIN254, Reason.PATH_TOO_LONG),  # 1 + 1 + 254 + 2 = 258
    (L64 + b"@" + b".".join([b"d" * 63, b"d" * 63, b"d" * 62]), Reason.PATH_TOO_LONG),  # 257
]


@pytest.mark.parametrize(("mailbox", "reason"), INVALID_MAILBOXES)
def test_invalid_mailbox_refused_in_strict_with_its_reason(mailbox: bytes, reason: Reason) -> None:
    for head, reply in ((b"MAIL FROM:", R.BAD_SENDER), (b"RCPT TO:", R.BAD_RECIPIENT)):
        line = head + b"<" + mailbox + b">"
        verdict = run(line)
        assert verdict.reason is reason, (line, verdict)
        assert verdict.refused and verdict.reply is reply
        assert problem(line) is not None  # the independent checker agrees
        # normalize forwards it as it came (Postfix decides), unless a quote
        # or bracket is left open: then nobody can tell where the path ends
        (word, complete), *_ = words(line[len(head) :])
        assert run(line, Mode.NORMALIZE).forward == (line if complete else None)


def test_path_limit_boundary_is_256_octets_with_brackets() -> None:
    domain = b".".join([b"d" * 63, b"d" * 63, b"d" * 61])  # 189 octets
    line = b"MAIL FROM:<" + L64 + b"@" + domain + b">"
    assert len(line) - len(b"MAIL FROM:") == 256
    assert run(line).forward == line
    assert run(line.replace(b"@", b"l@")).reason is Reason.LOCAL_PART_TOO_LONG


def test_domain_limit_boundary_is_255_octets() -> None:
    domain255 = DOMAIN254 + b"d"
    assert run(b"EHLO " + domain255).forward == b"EHLO " + domain255
    assert run(b"EHLO " + DOMAIN256).reason is Reason.DOMAIN_TOO_LONG
    assert run(b"EHLO " + domain255 + b"d").reason is Reason.DOMAIN_TOO_LONG  # before its label


def test_null_reverse_path_and_postmaster() -> None:
    assert run(b"MAIL FROM:<>").forward == b"MAIL FROM:<>"
    for name in (b"postmaster", b"Postmaster", b"POSTMASTER"):
        line = b"RCPT TO:<" + name + b">"
        assert run(line).forward == line
    assert run(b"RCPT TO:<postmaster@example.com>").reason is None
    assert run(b"MAIL FROM:<postmaster>").reason is Reason.PATH_SYNTAX  # RCPT only
    # RCPT TO:<> is no recipient: refused unless observing (Postfix: 501 5.1.3)
    for mode in (Mode.NORMALIZE, Mode.STRICT):
        verdict = run(b"RCPT TO:<>", mode)
        assert verdict.reason is Reason.PATH_SYNTAX and verdict.reply is R.BAD_RECIPIENT
    assert run(b"RCPT TO:<>", Mode.OBSERVE).forward == b"RCPT TO:<>"


# -- control characters, 8-bit, SMTPUTF8 (RFC 5321 4.1.2, RFC 6531 3.3) ------------


@pytest.mark.parametrize("octet", [0, 1, 9, 10, 13, 27, 31, 127])
def test_control_character_in_a_path(octet: int) -> None:
    for line in (
        b"MAIL FROM:<a" + bytes([octet]) + b"b@example.com>",
        b'RCPT TO:<"a' + bytes([octet]) + b'b"@example.com>',
        b"RCPT TO:<ab@exam" + bytes([octet]) + b"ple.com>",
    ):
        verdict = run(line)
        assert verdict.reason is Reason.CONTROL_CHARACTER, line
        assert verdict.octet is OctetClass.CONTROL
        assert run(line, Mode.NORMALIZE).forward == line  # Postfix accepts most of these


def test_eight_bit_address_needs_an_smtputf8_transaction() -> None:
    mail = b"MAIL FROM:<\xc3\xa9@example.com>"
    verdict = run(mail)
    assert verdict.reason is Reason.EIGHT_BIT and verdict.octet is OctetClass.EIGHT_BIT
    assert verdict.reply is R.NON_ASCII_ADDRESS
    assert verdict.render_reply(True) == (
        b"553 5.6.7 Must declare SMTPUTF8 to send unicode address\r\n"
    )
    assert run(mail + b" SMTPUTF8").forward == mail + b" SMTPUTF8"
    assert run(b"MAIL FROM:<a@\xc3\xa9xample.com> SMTPUTF8").reason is None
    # SMTPUTF8 not offered: the parameter is refused in every mode (strict
    # mode names the path first, as Postfix checks the path before parameters)
    without = Offered.of(["SIZE"])
    for mode in (Mode.OBSERVE, Mode.NORMALIZE):
        assert run(mail + b" SMTPUTF8", mode, without).reason is Reason.UNKNOWN_PARAMETER
    assert run(mail + b" SMTPUTF8", Mode.STRICT, without).reason is Reason.EIGHT_BIT
    rcpt = b"RCPT TO:<\xc3\xa9@example.com>"
    assert run(rcpt).reason is Reason.EIGHT_BIT
    assert run(rcpt, smtputf8_transaction=True).forward == rcpt
    assert run(rcpt, offered=without, smtputf8_transaction=True).reason is Reason.EIGHT_BIT
    # normalize forwards it (Postfix 3.7 accepts an 8-bit local part without SMTPUTF8)
    assert run(rcpt, Mode.NORMALIZE).forward == rcpt


def test_bad_utf8_in_an_smtputf8_transaction() -> None:
    verdict = run(b"MAIL FROM:<\xe9@example.com> SMTPUTF8")
    assert verdict.reason is Reason.BAD_UTF8 and verdict.octet is OctetClass.EIGHT_BIT
    assert run(b"RCPT TO:<a@\xff.example>", smtputf8_transaction=True).reason is Reason.BAD_UTF8


def test_u_labels_are_measured_as_a_labels() -> None:
    # 22 CJK characters: 66 octets of UTF-8, but a short A-label
    label = ("\u4e2d" * 22).encode()
    assert len(label) > 63 and len(b"xn--" + label.decode().encode("punycode")) <= 63
    line = b"RCPT TO:<a@" + label + b".example>"
    assert run(line, smtputf8_transaction=True).forward == line
    long_label = ("\u00e9" * 60).encode()
    assert len(b"xn--" + long_label.decode().encode("punycode")) > 63
    verdict = run(b"RCPT TO:<a@" + long_label + b".example>", smtputf8_transaction=True)
    assert verdict.reason is Reason.LABEL_TOO_LONG
    hyphen = b"RCPT TO:<a@-\xc3\xa9.example>"
    assert run(hyphen, smtputf8_transaction=True).reason is Reason.BAD_DOMAIN


# -- EHLO / HELO (RFC 5321 4.1.1.1) ---------------------------------------------------

HELLO_CASES = [
    (b"EHLO c.example", None),
    (b"HELO c.example", None),
    (b"EHLO localhost", None),
    (b"EHLO [192.0.2.1]", None),
    (b"HELO [IPv6:2001:db8::1]", None),
    (b"EHLO a b", Reason.BAD_HELO),
    (b"EHLO -bad-", Reason.BAD_DOMAIN),
    (b"EHLO under_score.example", Reason.BAD_DOMAIN),
    (b"EHLO c.example.", Reason.BAD_DOMAIN),
    (b'EHLO "quoted"', Reason.BAD_DOMAIN),
    (b"EHLO <c.example>", Reason.BAD_DOMAIN),
    (b"EHLO [300.1.1.1]", Reason.BAD_ADDRESS_LITERAL),
    (b"EHLO " + b"h" * 480, Reason.DOMAIN_TOO_LONG),
    (b"EHLO " + LABEL64 + b".example", Reason.LABEL_TOO_LONG),
    (b"EHLO c\x01.example", Reason.CONTROL_CHARACTER),
    (b"EHLO \xc3\xa9.example", Reason.EIGHT_BIT),
]


@pytest.mark.parametrize(("line", "reason"), HELLO_CASES)
def test_ehlo_helo_argument(line: bytes, reason: Reason | None) -> None:
    verdict = run(line)
    assert verdict.reason is reason
    if reason is None:
        assert verdict.forward == line
    else:
        assert verdict.reply is R.BAD_HELO_NAME
        assert run(line, Mode.NORMALIZE).forward == line  # Postfix accepts them all


def test_ehlo_without_argument_is_refused_unless_observing() -> None:
    for line in (b"EHLO", b"HELO ", b"ehlo\t"):
        for mode in (Mode.NORMALIZE, Mode.STRICT):
            verdict = run(line, mode)
            assert verdict.reason is Reason.MISSING_ARGUMENT
            name = line[:4].upper()
            assert verdict.render_reply(False) == b"501 Syntax: " + name + b" hostname\r\n"
        assert run(line, Mode.OBSERVE).forward == line


# -- the canonical form (normalize) ---------------------------------------------------

CANONICAL = [
    (b"mail from:<a@example.com>", b"MAIL FROM:<a@example.com>"),
    (b"MAIL FROM: <a@example.com>", b"MAIL FROM:<a@example.com>"),
    (b"MAIL\tFROM:\t<a@example.com>\t", b"MAIL FROM:<a@example.com>"),
    (b"MAIL  FROM:  <a@example.com>  ", b"MAIL FROM:<a@example.com>"),
    (b"MAIL FROM:a@example.com", b"MAIL FROM:<a@example.com>"),
    (b"MAIL FROM: a@example.com SIZE=1", b"MAIL FROM:<a@example.com> SIZE=1"),
    (b'MAIL FROM:"a  b"@example.com', b'MAIL FROM:<"a  b"@example.com>'),
    (b"MAIL FROM: <>", b"MAIL FROM:<>"),
    (b"MAIL FROM:<@a.example,@b.example:a@example.com>", b"MAIL FROM:<a@example.com>"),
    (b"RCPT TO:<@[192.0.2.1]:b@example.com>", b"RCPT TO:<b@example.com>"),
    (
        b"MAIL FROM:<a@example.com>   size=10 \t body=8bitmime  ",
        b"MAIL FROM:<a@example.com> SIZE=10 BODY=8BITMIME",
    ),
    (b"MAIL FROM:<a@example.com>\vSIZE=10", b"MAIL FROM:<a@example.com> SIZE=10"),
    (
        b"MAIL FROM:<a@example.com> ret=hdrs envid=AbC",
        b"MAIL FROM:<a@example.com> RET=HDRS ENVID=AbC",
    ),
    (
        b"rcpt to:<b@example.com> notify=success,delay orcpt=rfc822;B@example.com",
        b"RCPT TO:<b@example.com> NOTIFY=SUCCESS,DELAY ORCPT=rfc822;B@example.com",
    ),
    (b"rcpt to:postmaster", b"RCPT TO:<postmaster>"),
    (b"ehlo  c.example ", b"EHLO c.example"),
    (b"helo\tc.example", b"HELO c.example"),
    (b"EHLO a   b", b"EHLO a b"),
    (b"quit", b"QUIT"),
    (b"QUIT bye now", b"QUIT"),
    (b"rset", b"RSET"),
    (b"data ", b"DATA"),
    (b"noop  hello   world  ", b"NOOP hello   world"),
    (b"vrfy user", b"VRFY user"),
    (b"help", b"HELP"),
    # kept as sent: Postfix accepts these and the grammar cannot read them
    (b"MAIL FROM:garbage", b"MAIL FROM:garbage"),
    (b"MAIL FROM: <a@example.com>(comment)", b"MAIL FROM:<a@example.com>(comment)"),
    (b"mail from:<<a@example.com>>", b"MAIL FROM:<<a@example.com>>"),
    # the line ending is kept
    (b"mail from:<a@example.com>\r\n", b"MAIL FROM:<a@example.com>\r\n"),
    (b"ehlo c.example \r\n", b"EHLO c.example\r\n"),
]


@pytest.mark.parametrize(("line", "canonical"), CANONICAL)
def test_normalize_forwards_the_canonical_form(line: bytes, canonical: bytes) -> None:
    verdict = run(line, Mode.NORMALIZE)
    assert verdict.forward == canonical == verdict.canonical
    assert verdict.changed is (canonical != line)
    again = run(canonical, Mode.NORMALIZE)
    assert again.forward == canonical and not again.changed  # a fixed point
    observed = run(line, Mode.OBSERVE)
    assert observed.forward == line and observed.canonical == canonical


def test_auth_parameter_is_dropped_when_auth_was_not_offered() -> None:
    line = b"MAIL FROM:<a@example.com> AUTH=<> SIZE=10"
    assert run(line, Mode.NORMALIZE, POSTFIX).forward == b"MAIL FROM:<a@example.com> SIZE=10"
    assert run(line, Mode.OBSERVE, POSTFIX).forward == line
    strict = run(line, Mode.STRICT, POSTFIX)
    assert strict.reason is Reason.UNKNOWN_PARAMETER and strict.reply is R.UNSUPPORTED_PARAMETER
    assert run(line, Mode.STRICT, ALL).forward == line


def test_opaque_verbs_are_returned_unchanged() -> None:
    for verb, line in (
        (Verb.AUTH, b"auth plain AGFiAGM=\r\n"),
        (Verb.BDAT, b"bdat  10 last"),
        (Verb.UNKNOWN, b"XYZZY \x01\xff"),
        (Verb.XCLIENT, b"XCLIENT ADDR=1.2.3.4"),
    ):
        for mode in Mode:
            verdict = check(verb, line, mode=mode)
            assert verdict.forward == verdict.canonical == line
            assert not verdict.changed and verdict.reason is None


# -- the modes ------------------------------------------------------------------------

# line, offered, (observe, normalize, strict), reason
MODES = [
    (b"MAIL FROM:<a@example.com> XFOO=1", ALL, ("555 5.5.4",) * 3, Reason.UNKNOWN_PARAMETER),
    (b"MAIL FROM:<a@example.com> SIZE=abc", ALL, ("501 5.5.4",) * 3, Reason.BAD_PARAMETER_VALUE),
    (
        b"MAIL FROM:<a@example.com> RET=FULL RET=HDRS",
        ALL,
        ("501 5.5.4",) * 3,
        Reason.DUPLICATE_PARAMETER,
    ),
    (
        b"MAIL FROM <a@example.com>",
        ALL,
        ("forward", "501 5.5.4", "501 5.5.4"),
        Reason.MISSING_FROM_TO,
    ),
    (b"MAIL FROM:", ALL, ("forward", "501 5.5.4", "501 5.5.4"), Reason.MISSING_ARGUMENT),
    (b"MAIL FROM:<a@example.com", ALL, ("forward", "501 5.1.7", "501 5.1.7"), Reason.PATH_SYNTAX),
    (b"RCPT TO:<b@example.com", ALL, ("forward", "501 5.1.3", "501 5.1.3"), Reason.PATH_SYNTAX),
    (
        b"MAIL FROM:<a\x01b@example.com>",
        ALL,
        ("forward", "forward", "501 5.1.7"),
        Reason.CONTROL_CHARACTER,
    ),
    (b"MAIL FROM:garbage", ALL, ("forward", "forward", "501 5.1.7"), Reason.PATH_SYNTAX),
    (b"RSET x", ALL, ("forward", "forward", "501 5.5.4"), Reason.UNEXPECTED_ARGUMENT),
    (b"QUIT x", ALL, ("forward",) * 3, Reason.UNEXPECTED_ARGUMENT),
    (b"VRFY", ALL, ("forward", "forward", "501 5.5.4"), Reason.MISSING_ARGUMENT),
    (b"NOOP \x1b[1m", ALL, ("forward", "forward", "501 5.5.4"), Reason.CONTROL_CHARACTER),
    (
        b"MAIL FROM:<a@example.com> SIZE=1 SIZE=2",
        ALL,
        ("forward", "forward", "501 5.5.4"),
        Reason.DUPLICATE_PARAMETER,
    ),
    (
        b"MAIL FROM:<a@example.com> BODY=8BITMIME",
        Offered.of(["SIZE"]),
        ("forward", "forward", "555 5.5.4"),
        Reason.UNKNOWN_PARAMETER,
    ),
    (
        b"MAIL FROM:<a@example.com> BODY=BINARYMIME",
        Offered.of(["8BITMIME"]),
        ("555 5.5.4",) * 3,
        Reason.UNKNOWN_PARAMETER,
    ),
    (
        b"MAIL FROM:<a@example.com> ENVID=a+2b",  # lower-case hex: Postfix accepts
        ALL,
        ("forward", "forward", "501 5.5.4"),
        Reason.BAD_PARAMETER_VALUE,
    ),
]


@pytest.mark.parametrize(("line", "offered", "expected", "reason"), MODES)
def test_what_each_mode_does(
    line: bytes, offered: Offered, expected: tuple[str, str, str], reason: Reason
) -> None:
    for mode, want in zip((Mode.OBSERVE, Mode.NORMALIZE, Mode.STRICT), expected, strict=True):
        verdict = run(line, mode, offered)
        assert outcome(verdict) == want, (mode, verdict)
        assert verdict.reason is reason, (mode, verdict)
        if want == "forward":
            assert verdict.forward == (line if mode is Mode.OBSERVE else verdict.canonical)
        else:
            assert verdict.forward is None and verdict.refused


# -- ESMTP parameters (RFC 5321 4.1.2 esmtp-param, and each extension's RFC) ----------

# line (after the path), reason in strict mode, reason outside strict mode (None: passes)
PARAMETER_CASES = [
    (b"MAIL| SIZE=0", None, None),
    (b"MAIL| SIZE=12345678901234567890", None, None),
    (b"MAIL| SIZE=123456789012345678901", Reason.BAD_PARAMETER_VALUE, None),
    (b"MAIL| SIZE=", Reason.BAD_PARAMETER_VALUE, Reason.BAD_PARAMETER_VALUE),
    (b"MAIL| SIZE", Reason.BAD_PARAMETER_VALUE, Reason.BAD_PARAMETER_VALUE),
    (b"MAIL| SIZE=-1", Reason.BAD_PARAMETER_VALUE, Reason.BAD_PARAMETER_VALUE),
    (b"MAIL| BODY=7BIT", None, None),
    (b"MAIL| BODY=binarymime", None, None),
    (b"MAIL| BODY=FOO", Reason.BAD_PARAMETER_VALUE, Reason.BAD_PARAMETER_VALUE),
    (b"MAIL| SMTPUTF8", None, None),
    (b"MAIL| SMTPUTF8=yes", Reason.BAD_PARAMETER_VALUE, Reason.BAD_PARAMETER_VALUE),
    (b"MAIL| RET=FULL", None, None),
    (b"MAIL| RET=NONE", Reason.BAD_PARAMETER_VALUE, Reason.BAD_PARAMETER_VALUE),
    (b"MAIL| ENVID=QQ+2B" + b"e" * 95, None, None),
    (b"MAIL| ENVID=" + b"e" * 101, Reason.BAD_PARAMETER_VALUE, None),
    (b"MAIL| ENVID=a+zz", Reason.BAD_PARAMETER_VALUE, Reason.BAD_PARAMETER_VALUE),
    (b"MAIL| ENVID=a=b", Reason.BAD_PARAMETER_VALUE, None),
    (b"MAIL| ENVID=a+01", Reason.BAD_PARAMETER_VALUE, Reason.BAD_PARAMETER_VALUE),
    (b"MAIL| AUTH=<>", None, None),
    (b"MAIL| AUTH=a+2Bb@example.com", None, None),
    (b"MAIL| AUTH=a b", Reason.UNKNOWN_PARAMETER, Reason.UNKNOWN_PARAMETER),  # "b" is a word
    (b"MAIL| MT-PRIORITY=-9", None, None),
    (b"MAIL| MT-PRIORITY=10", Reason.BAD_PARAMETER_VALUE, None),
    (b"MAIL| REQUIRETLS", None, None),
    (b"MAIL| REQUIRETLS=yes", Reason.BAD_PARAMETER_VALUE, Reason.BAD_PARAMETER_VALUE),
    (b"MAIL| BY=120;R", None, None),
    (b"MAIL| BY=120", Reason.BAD_PARAMETER_VALUE, None),
    (b"MAIL| HOLDFOR=3600", None, None),
    (b"MAIL| HOLDUNTIL=2026-12-03T10:00:00Z", None, None),
    (b"MAIL| HOLDUNTIL=tomorrow", Reason.BAD_PARAMETER_VALUE, None),
    (b"MAIL| SUBMITTER=a@example.com", None, None),
    (b"MAIL| SOLICIT=org.example:x", None, None),
    (b"MAIL| NOTIFY=SUCCESS", Reason.UNKNOWN_PARAMETER, Reason.UNKNOWN_PARAMETER),
    (b"MAIL| XFOO=bar", Reason.UNKNOWN_PARAMETER, Reason.UNKNOWN_PARAMETER),
    (b"MAIL| =bar", Reason.UNKNOWN_PARAMETER, Reason.UNKNOWN_PARAMETER),
    (b"MAIL| <b@example.com>", Reason.UNKNOWN_PARAMETER, Reason.UNKNOWN_PARAMETER),
    (b"MAIL| SIZE=1\x01", Reason.BAD_PARAMETER_VALUE, Reason.BAD_PARAMETER_VALUE),
    (b"MAIL| AUTH=a\x7fb", Reason.CONTROL_CHARACTER, None),
    (b"MAIL| AUTH=\xc3\xa9", Reason.EIGHT_BIT, None),
    (b"MAIL| AUTH=<> AUTH=<>", Reason.DUPLICATE_PARAMETER, Reason.DUPLICATE_PARAMETER),
    (b"MAIL| SMTPUTF8 SMTPUTF8", Reason.DUPLICATE_PARAMETER, None),
    (b"RCPT| NOTIFY=NEVER", None, None),
    (b"RCPT| NOTIFY=SUCCESS,FAILURE,DELAY", None, None),
    (b"RCPT| NOTIFY=NEVER,SUCCESS", Reason.BAD_PARAMETER_VALUE, Reason.BAD_PARAMETER_VALUE),
    (b"RCPT| NOTIFY=SUCCESS,", Reason.BAD_PARAMETER_VALUE, None),
    (b"RCPT| NOTIFY=SUCCESS,SUCCESS", Reason.BAD_PARAMETER_VALUE, None),
    (b"RCPT| NOTIFY=", Reason.BAD_PARAMETER_VALUE, Reason.BAD_PARAMETER_VALUE),
    (b"RCPT| ORCPT=rfc822;b+40example.com", None, None),
    (b"RCPT| ORCPT=rfc822", Reason.BAD_PARAMETER_VALUE, Reason.BAD_PARAMETER_VALUE),
    (b"RCPT| ORCPT=;b", Reason.BAD_PARAMETER_VALUE, Reason.BAD_PARAMETER_VALUE),
    (b"RCPT| ORCPT=rfc 822;b", Reason.BAD_PARAMETER_VALUE, Reason.BAD_PARAMETER_VALUE),
    (b"RCPT| ORCPT=rfc822;" + b"o" * 500, Reason.BAD_PARAMETER_VALUE, None),
    (
        b"RCPT| ORCPT=rfc822;a ORCPT=rfc822;b",
        Reason.DUPLICATE_PARAMETER,
        Reason.DUPLICATE_PARAMETER,
    ),
    (b"RCPT| RRVS=2014-04-03T23:01:00Z;C", None, None),
    (b"RCPT| SIZE=10", Reason.UNKNOWN_PARAMETER, Reason.UNKNOWN_PARAMETER),
    (b"RCPT| RET=FULL", Reason.UNKNOWN_PARAMETER, Reason.UNKNOWN_PARAMETER),
]


@pytest.mark.parametrize(("spec", "strict_reason", "lenient_reason"), PARAMETER_CASES)
def test_parameters(
    spec: bytes, strict_reason: Reason | None, lenient_reason: Reason | None
) -> None:
    verb, _, params = spec.partition(b"|")
    head = b"MAIL FROM:<a@example.com>" if verb == b"MAIL" else b"RCPT TO:<b@example.com>"
    line = head + params
    strict = run(line, Mode.STRICT)
    assert strict.reason is strict_reason, strict
    assert strict.refused is (strict_reason is not None)
    for mode in (Mode.OBSERVE, Mode.NORMALIZE):
        lenient = run(line, mode)
        if lenient_reason is None:
            assert not lenient.refused, (mode, lenient)
            assert lenient.reason is strict_reason  # reported, not refused
        else:
            assert lenient.refused and lenient.reason is lenient_reason, (mode, lenient)
    if strict_reason is None:
        assert problem(strict.canonical) is None


#: A valid example of each parameter.
EXAMPLES = {
    b"SIZE": b"SIZE=1",
    b"BODY": b"BODY=8BITMIME",
    b"SMTPUTF8": b"SMTPUTF8",
    b"RET": b"RET=FULL",
    b"ENVID": b"ENVID=x",
    b"NOTIFY": b"NOTIFY=NEVER",
    b"ORCPT": b"ORCPT=rfc822;x",
    b"AUTH": b"AUTH=<>",
    b"MT-PRIORITY": b"MT-PRIORITY=1",
    b"REQUIRETLS": b"REQUIRETLS",
    b"BY": b"BY=10;R",
    b"HOLDFOR": b"HOLDFOR=10",
    b"HOLDUNTIL": b"HOLDUNTIL=2026-12-03T10:00:00Z",
    b"RRVS": b"RRVS=2026-12-03T10:00:00Z",
    b"SUBMITTER": b"SUBMITTER=x",
    b"SOLICIT": b"SOLICIT=x",
}


def test_every_parameter_needs_its_extension() -> None:
    assert set(EXAMPLES) == set(PARAMETERS)
    for keyword, rule in PARAMETERS.items():
        head = (
            b"MAIL FROM:<a@example.com> " if rule.verb is Verb.MAIL else b"RCPT TO:<b@x.example> "
        )
        assert run(head + EXAMPLES[keyword]).forward == head + EXAMPLES[keyword]
        offered = Offered(ALL.keywords - {rule.extension})
        verdict = run(head + EXAMPLES[keyword], Mode.STRICT, offered)
        assert verdict.reason is Reason.UNKNOWN_PARAMETER, keyword
        assert verdict.reply is R.UNSUPPORTED_PARAMETER
        assert verdict.render_reply(True) == (b"555 5.5.4 Unsupported option: " + keyword + b"\r\n")


def test_parameter_keywords_are_case_insensitive_and_upper_cased() -> None:
    line = b"MAIL FROM:<a@example.com> sIzE=10 Body=8bitmime smtpUTF8 Ret=hdrs"
    verdict = run(line)
    assert verdict.forward == b"MAIL FROM:<a@example.com> SIZE=10 BODY=8BITMIME SMTPUTF8 RET=HDRS"


def test_replies_name_the_parameter_but_never_echo_the_argument() -> None:
    verdict = run(b"MAIL FROM:<secret@example.com> XFOO=secret")
    assert verdict.render_reply(True) == b"555 5.5.4 Unsupported option: XFOO\r\n"
    verdict = run(b"MAIL FROM:<secret@example.com> <secret@example.com>")
    assert verdict.render_reply(False) == b"555 Unsupported option: (malformed)\r\n"
    verdict = run(b"RCPT TO:<b@example.com> NOTIFY=FOO")
    assert verdict.render_reply(True) == b"501 5.5.4 Bad NOTIFY parameter syntax\r\n"
    verdict = run(b"MAIL FROM:<secret@example.com> BODY=BINARYMIME", offered=POSTFIX)
    assert verdict.render_reply(True) == b"555 5.5.4 Unsupported option: BODY=BINARYMIME\r\n"
    with pytest.raises(ValueError):
        run(b"MAIL FROM:<a@example.com>").render_reply(True)


def test_log_fields_give_length_and_octet_class() -> None:
    verdict = run(b"MAIL FROM:<a b@example.com>  ")
    assert verdict.argument_bytes == len(b"FROM:<a b@example.com>  ")
    assert verdict.reason is Reason.PATH_SYNTAX and verdict.octet is OctetClass.SPACE
    assert run(b"MAIL FROM:<a@ex_ample.com>").octet is OctetClass.PUNCTUATION
    assert run(b"MAIL FROM:<a@[1.2.3.a]>").octet is None  # all octets allowed there
    assert run(b"RCPT TO:<\x01@x.example>").octet is OctetClass.CONTROL
    assert run(b"EHLO a b").octet is OctetClass.SPACE
    assert run(b"MAIL FROM:<a@example.com> SIZE=1 SIZE=2").octet is None
    assert run(b"MAIL FROM:<a@example.com>").argument_bytes == 20


def test_words_cut_like_postfix_smtpd_token() -> None:
    assert words(b'FROM:<a b@c> "x y"z w') == [
        (b"FROM:", True),
        (b"<a b@c>", True),
        (b'"x y"z', True),
        (b"w", True),
    ]
    assert words(b"from:to:x") == [(b"from:", True), (b"to:", True), (b"x", True)]
    assert words(b"from:x", colon_ends=False) == [(b"from:x", True)]
    assert words(b'<<a>> <"a>"> <a\\>>') == [(b"<<a>>", True), (b'<"a>">', True), (b"<a\\>>", True)]
    assert words(b"<a b") == [(b"<a b", False)]
    assert words(b'"a') == [(b'"a', False)]
    assert words(b"a\\ b\tc\vd") == [(b"a\\ b", True), (b"c", True), (b"d", True)]
    assert words(b"  ") == []


# -- the Postfix corpus (tests/support/postfix_probe.py) ------------------------------

#: Lines Postfix 3.7 accepts that smtpguard refuses on purpose, and why.
BY_DESIGN: dict[tuple[str, str, bytes], str] = {
    ("default", "mail_helo", b"MAIL FROM:<a@example.com> SIZE=1000"): (
        "RFC 5321 4.1.1.11: parameters only for extensions the EHLO reply offered"
    ),
    ("default", "mail_helo", b"MAIL FROM:<a@example.com> SMTPUTF8"): "as above",
    ("default", "mail_helo", b"MAIL FROM:<a@example.com> RET=HDRS"): "as above",
    ("no_extensions", "mail", b"MAIL FROM:<a@example.com> SIZE=1000"): (
        "SIZE not advertised: 555 (issue 14); Postfix takes SIZE= even when it hides SIZE"
    ),
}


def corpus_offered(probe: Probe) -> Offered:
    return Offered() if probe.context == "mail_helo" else Offered.of(EHLO_KEYWORDS[probe.config])


def corpus_check(probe: Probe, mode: Mode) -> Verdict:
    return run(probe.line, mode, corpus_offered(probe), probe.context == "rcpt_utf8")


def test_the_corpus_was_probed_from_a_real_postfix() -> None:
    assert PROBED_ON == "2026-12-03"
    assert len(CORPUS) > 300
    assert sum(p.accepted for p in CORPUS) > 150
    assert sum(not p.accepted for p in CORPUS) > 100


ACCEPTED = [p for p in CORPUS if p.accepted]


@pytest.mark.parametrize("probe", ACCEPTED, ids=lambda p: repr(p.line[:48]))
def test_normalize_never_refuses_what_postfix_accepts(probe: Probe) -> None:
    key = (probe.config, probe.context, probe.line)
    for mode in (Mode.OBSERVE, Mode.NORMALIZE):
        verdict = corpus_check(probe, mode)
        if key in BY_DESIGN:
            assert verdict.refused and verdict.reason is Reason.UNKNOWN_PARAMETER
        else:
            assert not verdict.refused, (mode, verdict)


def test_by_design_differences_are_in_the_corpus() -> None:
    accepted = {(p.config, p.context, p.line) for p in ACCEPTED}
    assert set(BY_DESIGN) <= accepted


@pytest.mark.parametrize("probe", [p for p in CORPUS if p.reply.startswith("555")], ids=repr)
def test_what_postfix_calls_unsupported_is_refused_in_every_mode(probe: Probe) -> None:
    for mode in Mode:
        verdict = corpus_check(probe, mode)
        assert verdict.refused, (mode, verdict)
        if mode is not Mode.STRICT:  # strict mode may name a bad path first
            assert verdict.reason in (Reason.UNKNOWN_PARAMETER, Reason.BAD_PARAMETER_VALUE)


@pytest.mark.parametrize(
    "probe",
    [
        p
        for p in CORPUS
        if "Syntax: " in p.reply and p.line[:4].upper() in (b"MAIL", b"RCPT", b"EHLO", b"HELO")
    ],
    ids=repr,
)
def test_postfix_syntax_errors_of_the_command_are_refused_too(probe: Probe) -> None:
    verdict = corpus_check(probe, Mode.NORMALIZE)
    assert verdict.refused and verdict.reply is not None and verdict.reply.code == 501


@pytest.mark.parametrize("probe", CORPUS, ids=lambda p: repr(p.line[:48]))
def test_corpus_canonical_forms_are_fixed_points(probe: Probe) -> None:
    for mode in (Mode.NORMALIZE, Mode.STRICT):
        verdict = corpus_check(probe, mode)
        if verdict.forward is None:
            continue
        again = run(verdict.forward, mode, corpus_offered(probe), probe.context == "rcpt_utf8")
        assert again.forward == verdict.forward and not again.changed
        if mode is Mode.STRICT:
            assert problem(verdict.forward, smtputf8=probe.context == "rcpt_utf8") is None


# -- Hypothesis: valid lines from the ABNF, and mutations -----------------------------

ATEXT = b"abcxyzABCXYZ0123456789!#$%&'*+/=?^_`{|}~-"
QTEXT = bytes(c for c in range(32, 127) if c not in (34, 92))
atoms = st.binary(min_size=1, max_size=8).map(lambda b: bytes(ATEXT[c % len(ATEXT)] for c in b))
dot_strings = st.lists(atoms, min_size=1, max_size=4).map(b".".join)
quoted_strings = st.lists(
    st.one_of(
        st.sampled_from(list(QTEXT)).map(lambda c: bytes([c])),
        st.integers(32, 126).map(lambda c: b"\\" + bytes([c])),
    ),
    max_size=10,
).map(lambda parts: b'"' + b"".join(parts) + b'"')
local_parts = st.one_of(dot_strings, dot_strings, quoted_strings).filter(lambda lp: len(lp) <= 64)
labels = st.from_regex(rb"\A[A-Za-z0-9](?:[A-Za-z0-9-]{0,20}[A-Za-z0-9])?\Z")
domains = st.lists(labels, min_size=1, max_size=5).map(b".".join)
hex_groups = st.integers(0, 0xFFFF).map(lambda i: b"%x" % i) | st.integers(0, 0xFFFF).map(
    lambda i: b"%04X" % i
)
ipv4s = st.tuples(*[st.integers(0, 255)] * 4).map(lambda t: b"%d.%d.%d.%d" % t)


@st.composite
def ipv6s(draw: st.DrawFn) -> bytes:
    """IPv6-addr, from the four ABNF forms."""
    form = draw(st.sampled_from(["full", "comp", "v4full", "v4comp"]))
    if form == "full":
        return b":".join(draw(st.lists(hex_groups, min_size=8, max_size=8)))
    if form == "v4full":
        return b":".join(draw(st.lists(hex_groups, min_size=6, max_size=6))) + b":" + draw(ipv4s)
    most = 6 if form == "comp" else 4
    left = draw(st.lists(hex_groups, max_size=most))
    right = draw(st.lists(hex_groups, max_size=most - len(left)))
    text = b":".join(left) + b"::" + b":".join(right)
    if form == "v4comp":
        text += (b":" if right else b"") + draw(ipv4s)
    return text


# Valid in strict mode: IPv4 and IPv6 literals only (other tags need IANA registration).
literals = st.one_of(ipv4s, ipv6s().map(lambda a: b"IPv6:" + a)).map(lambda x: b"[" + x + b"]")
mailboxes = st.tuples(local_parts, st.one_of(domains, domains, literals)).map(
    lambda t: t[0] + b"@" + t[1]
)

# xchar, without what Postfix's tokenizer takes as grouping (< > " and \\)
XTEXT = bytes(c for c in range(33, 127) if c not in (43, 61, 60, 62, 34, 92))
xtexts = st.lists(
    st.one_of(
        st.sampled_from(list(XTEXT)).map(lambda c: bytes([c])),
        st.integers(0x20, 0x7E).map(lambda c: b"+%02X" % c),  # decodes to printable ASCII
    ),
    min_size=1,
    max_size=10,
).map(b"".join)
MAIL_PARAMETERS: dict[bytes, st.SearchStrategy[bytes | None]] = {
    b"SIZE": st.integers(0, 10**15).map(lambda i: b"%d" % i),
    b"BODY": st.sampled_from([b"7BIT", b"8BITMIME", b"BINARYMIME"]),
    b"SMTPUTF8": st.none(),
    b"RET": st.sampled_from([b"FULL", b"HDRS"]),
    b"ENVID": xtexts,
    b"AUTH": st.one_of(st.just(b"<>"), xtexts),
    b"MT-PRIORITY": st.integers(-9, 9).map(lambda i: b"%d" % i),
    b"REQUIRETLS": st.none(),
    b"HOLDFOR": st.integers(0, 999999999).map(lambda i: b"%d" % i),
}
RCPT_PARAMETERS: dict[bytes, st.SearchStrategy[bytes | None]] = {
    b"NOTIFY": st.one_of(
        st.just(b"NEVER"),
        st.lists(st.sampled_from([b"SUCCESS", b"FAILURE", b"DELAY"]), min_size=1, unique=True).map(
            b",".join
        ),
    ),
    b"ORCPT": xtexts.map(lambda x: b"rfc822;" + x),
}


@st.composite
def parameter_lists(
    draw: st.DrawFn, table: dict[bytes, st.SearchStrategy[bytes | None]]
) -> list[bytes]:
    keys = draw(st.lists(st.sampled_from(sorted(table)), unique=True, max_size=4))
    out = []
    for key in keys:
        value = draw(table[key])
        out.append(key if value is None else key + b"=" + value)
    return out


def scramble_case(draw: st.DrawFn, word: bytes) -> bytes:
    flips = draw(st.lists(st.booleans(), min_size=len(word), max_size=len(word)))
    return bytes(
        c ^ 32 if flip and chr(c).isalpha() else c for c, flip in zip(word, flips, strict=True)
    )


SPACES = st.sampled_from([b" ", b"  ", b"\t", b" \t "])
OPTIONAL_SPACES = st.sampled_from([b"", b" ", b"\t", b"  "])


@st.composite
def transactions(draw: st.DrawFn) -> tuple[bytes, bytes]:
    """(a MAIL or RCPT line as a sloppy client sends it, its canonical form)."""
    rcpt = draw(st.booleans())
    mailbox = draw(mailboxes)
    canonical_path = b"<" + mailbox + b">"
    params = draw(parameter_lists(RCPT_PARAMETERS if rcpt else MAIL_PARAMETERS))
    head = b"RCPT TO:" if rcpt else b"MAIL FROM:"
    canonical = head + canonical_path + b"".join(b" " + p for p in params)
    assume(
        len(canonical) <= 500
        and len(mailbox) + 2 <= 256
        and len(mailbox.rpartition(b"@")[2]) <= 255
    )
    route = draw(st.lists(domains, max_size=2))
    sent_path = (
        b"<" + b",".join(b"@" + d for d in route) + (b":" if route else b"") + mailbox + b">"
    )
    if not route and draw(st.booleans()):
        sent_path = mailbox  # a bare address
    verb, keyword = head.split(b" ")
    sent_params = b"".join(
        draw(SPACES) + scramble_case(draw, p.partition(b"=")[0]) + p[len(p.partition(b"=")[0]) :]
        for p in params
    )
    line = (
        scramble_case(draw, verb)
        + draw(SPACES)
        + scramble_case(draw, keyword)
        + draw(OPTIONAL_SPACES)
        + sent_path
        + sent_params
        + draw(OPTIONAL_SPACES)
    )
    return line, canonical


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(transactions())
def test_valid_lines_become_their_canonical_form_in_every_mode(case: tuple[bytes, bytes]) -> None:
    line, canonical = case
    for mode in (Mode.NORMALIZE, Mode.STRICT):
        verdict = run(line, mode)
        assert verdict.forward == canonical and verdict.reason is None, (mode, verdict)
        assert verdict.changed is (line != canonical)
    assert run(line, Mode.OBSERVE).forward == line
    again = run(canonical)
    assert again.forward == canonical and not again.changed
    assert problem(canonical) is None, problem(canonical)


@settings(max_examples=200, deadline=None)
@given(st.one_of(domains, literals), st.sampled_from([b"EHLO", b"HELO", b"ehlo"]), OPTIONAL_SPACES)
def test_valid_ehlo_names_pass(name: bytes, verb: bytes, trailing: bytes) -> None:
    assume(len(name) <= 255)
    canonical = verb.upper() + b" " + name
    verdict = run(verb + b" " + name + trailing)
    assert verdict.forward == canonical and verdict.reason is None
    assert problem(canonical) is None


def _insert(
    draw: st.DrawFn, text: bytes, piece: bytes, lo: int = 0, hi: int | None = None
) -> bytes:
    at = draw(st.integers(lo, len(text) if hi is None else hi))
    return text[:at] + piece + text[at:]


@st.composite
def mutations(draw: st.DrawFn) -> tuple[bytes, Reason, bool]:
    """(a line with one fault, the reason strict mode must give, refused in every mode)."""
    local = draw(dot_strings.filter(lambda lp: len(lp) <= 40))
    domain = draw(domains.filter(lambda d: len(d) <= 60))
    kind = draw(
        st.sampled_from(
            [
                "control",
                "eight_bit",
                "bad_utf8",
                "local_long",
                "label_long",
                "domain_long",
                "path_long",
                "bad_ipv4",
                "bad_ipv6",
                "bad_label",
                "unknown_param",
                "duplicate",
                "bad_value",
            ]
        )
    )
    head, params = b"MAIL FROM:", b""
    always = False
    if kind == "control":
        ctl = bytes([draw(st.sampled_from([*range(0, 32), 127]))])
        local = _insert(draw, local, ctl)
        reason = Reason.CONTROL_CHARACTER
    elif kind == "eight_bit":
        local = _insert(
            draw, local, draw(st.sampled_from(["\u00e9", "\u4e2d", "\U0001f600"])).encode()
        )
        reason = Reason.EIGHT_BIT
    elif kind == "bad_utf8":
        local = _insert(draw, local, bytes([draw(st.sampled_from([0x80, 0xBF, 0xC0, 0xF5, 0xFF]))]))
        params = b" SMTPUTF8"
        reason = Reason.BAD_UTF8
    elif kind == "local_long":
        local = local + b"x" * draw(st.integers(65 - len(local), 120))
        reason = Reason.LOCAL_PART_TOO_LONG
    elif kind == "label_long":
        domain = b"x" * draw(st.integers(64, 120)) + b"." + domain
        reason = Reason.LABEL_TOO_LONG
    elif kind == "domain_long":
        count = draw(st.integers(5, 8))
        domain = b".".join([b"d" * 60] * count)
        reason = Reason.DOMAIN_TOO_LONG
    elif kind == "path_long":
        local = b"p" * 64
        domain = b".".join([b"d" * 63, b"d" * 63]) + b"." + b"e" * draw(st.integers(62, 63))
        reason = Reason.PATH_TOO_LONG
    elif kind == "bad_ipv4":
        octets = draw(st.lists(st.integers(0, 255), min_size=4, max_size=4))
        octets[draw(st.integers(0, 3))] = draw(st.integers(256, 999))
        domain = b"[%d.%d.%d.%d]" % tuple(octets)
        reason = Reason.BAD_ADDRESS_LITERAL
    elif kind == "bad_ipv6":
        groups = draw(st.lists(hex_groups, min_size=9, max_size=12))
        domain = b"[IPv6:" + b":".join(groups) + b"]"
        reason = Reason.BAD_ADDRESS_LITERAL
    elif kind == "bad_label":
        bad = draw(st.sampled_from([b"-x", b"x-", b"x_y", b""]))
        domain = bad + b"." + domain
        reason = Reason.BAD_DOMAIN
    elif kind == "unknown_param":
        keyword = draw(st.from_regex(rb"\AX-[A-Z0-9]{1,8}\Z"))
        params = b" " + keyword + draw(st.sampled_from([b"", b"=1"]))
        reason, always = Reason.UNKNOWN_PARAMETER, True
    elif kind == "duplicate":
        param = draw(st.sampled_from([b"RET=FULL", b"ENVID=x", b"AUTH=<>"]))
        params = b" " + param + b" " + param
        reason, always = Reason.DUPLICATE_PARAMETER, True
    else:
        params = b" " + draw(st.sampled_from([b"SIZE=1x", b"RET=ALL", b"BODY=9BIT", b"SMTPUTF8=1"]))
        reason, always = Reason.BAD_PARAMETER_VALUE, True
    if draw(st.booleans()) and not params:
        head = b"RCPT TO:"
    return head + b"<" + local + b"@" + domain + b">" + params, reason, always


@settings(max_examples=400, deadline=None)
@given(mutations())
def test_mutated_lines_are_refused_in_strict_mode_with_the_right_reason(
    case: tuple[bytes, Reason, bool],
) -> None:
    line, reason, always = case
    verdict = run(line, Mode.STRICT)
    assert verdict.refused and verdict.reason is reason, verdict
    if reason is not Reason.UNKNOWN_PARAMETER:  # the checker cannot know what was offered
        assert problem(line) is not None  # the independent checker sees a fault too
    for mode in (Mode.OBSERVE, Mode.NORMALIZE):
        lenient = run(line, mode)
        assert lenient.refused is always, (mode, lenient)
        assert lenient.reason is reason


VERBS = [b"MAIL FROM:", b"RCPT TO:", b"EHLO", b"HELO", b"RSET", b"NOOP", b"VRFY", b"QUIT", b"DATA"]


@settings(max_examples=500, deadline=None)
@given(
    st.sampled_from(VERBS),
    st.sampled_from([b"", b" ", b"\t"]),
    st.binary(max_size=80),
    st.sampled_from(list(Mode)),
    st.booleans(),
)
def test_any_bytes_give_a_consistent_verdict(
    verb: bytes, separator: bytes, junk: bytes, mode: Mode, utf8: bool
) -> None:
    line = verb + separator + junk
    assume(verb_of(line) is not Verb.UNKNOWN)  # opaque: the session answers unknown verbs
    verdict = run(line, mode, ALL, utf8)
    assert (verdict.forward is None) is (verdict.reply is not None)
    if verdict.forward is None:
        assert verdict.reason is not None
        verdict.render_reply(True)  # every refusal renders
        return
    if mode is Mode.OBSERVE:
        assert verdict.forward == line
        return
    assert verdict.forward == verdict.canonical
    again = run(verdict.forward, mode, ALL, utf8)
    assert again.forward == verdict.forward, (verdict, again)
    if mode is Mode.STRICT:
        # what strict mode forwards is canonical for the independent checker
        assert problem(verdict.forward, smtputf8=utf8) is None, problem(
            verdict.forward, smtputf8=utf8
        )


FAST_PATHS = [
    b"<a@b.example>",
    b"<>",
    b"<" + L64 + b"@x.example>",
    b"<" + L65 + b"@x.example>",
    b"<a.b@c-d.example>",
    b"<a..b@c>",
    b"<a@-c>",
    b"<a@" + LABEL63 + b">",
    b"<a@" + LABEL64 + b">",
    b"<a@[192.0.2.1]>",
    b'<"a"@b>',
]
FAST_KEYWORDS = [b"SIZE", b"BODY", b"RET", b"ENVID", b"NOTIFY", b"ORCPT", b"AUTH", b"SMTPUTF8"]
FAST_VALUES = st.lists(st.sampled_from(list(b'1aZ=+2B;<>"\\,FULL8BITMIME')), max_size=6).map(bytes)


@settings(max_examples=500, deadline=None)
@given(
    st.sampled_from([b"MAIL FROM:", b"RCPT TO:"]),
    st.sampled_from(FAST_PATHS),
    st.lists(
        st.tuples(st.sampled_from([*FAST_KEYWORDS, b"XFOO", b"size"]), st.none() | FAST_VALUES),
        max_size=4,
    ),
    st.sampled_from([ALL, POSTFIX, Offered()]),
)
def test_the_fast_path_judges_like_the_long_way(
    head: bytes, path: bytes, params: list[tuple[bytes, bytes | None]], offered: Offered
) -> None:
    line = head + path + b"".join(b" " + k + (b"" if v is None else b"=" + v) for k, v in params)
    verb = Verb.MAIL if head == b"MAIL FROM:" else Verb.RCPT
    fast = syntax._fast_transaction(verb, line, offered)
    slow = syntax._transaction(verb, line[5:], offered, False)  # after "MAIL " / "RCPT "
    if fast is not None:
        assert fast == slow


def test_plain_canonical_lines_take_the_fast_path() -> None:
    for verb, line in (
        (Verb.MAIL, b"MAIL FROM:<a@b.example> SIZE=1 BODY=8BITMIME"),
        (Verb.MAIL, b"MAIL FROM:<>"),
        (Verb.RCPT, b"RCPT TO:<" + L64 + b"@x.example> NOTIFY=NEVER"),
    ):
        assert syntax._fast_transaction(verb, line, ALL) == (line, [])
    for verb, line in (
        (Verb.RCPT, b"RCPT TO:<>"),
        (Verb.RCPT, b"RCPT TO:<" + L65 + b"@x.example>"),
        (Verb.MAIL, b'MAIL FROM:<a@b> ENVID="x'),
        (Verb.MAIL, b"mail FROM:<a@b>"),
    ):
        assert syntax._fast_transaction(verb, line, ALL) is None
