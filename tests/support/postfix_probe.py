#!/usr/bin/env python3
"""What a real Postfix answers to odd MAIL, RCPT, EHLO and HELO lines.

The corpus behind the ``normalize`` contract of ``smtpguard/protocol/syntax.py``:
smtpguard must never refuse a line Postfix accepts with its defaults.

Probed on 2026-12-03 from Postfix 3.7.11 (Debian 12), run as a private
instance by ``tests/e2e/peers.Postfix`` (its main.cf: Postfix's defaults for
everything syntax-related, ``strict_rfc821_envelopes = no``,
``smtputf8_enable = yes``, no SASL, relaying for 127.0.0.1).  Each line went
on a fresh connection, after its context:

- ``helo``: as the first command;
- ``mail``: after ``EHLO c.example``;
- ``mail_helo``: after ``HELO c.example``;
- ``rcpt``: after ``EHLO c.example`` and ``MAIL FROM:<s@example.com>``;
- ``rcpt_utf8``: the same with ``MAIL FROM:<s@example.com> SMTPUTF8``.

Two configurations: ``default`` (EHLO offers ``EHLO_KEYWORDS["default"]``) and
``no_extensions`` (``smtpd_discard_ehlo_keywords = dsn, smtputf8, 8bitmime,
size``).  ``reply`` is the first line of Postfix's answer.

Re-run (as root, with Postfix installed)::

    python3 tests/support/postfix_probe.py              # answers that changed
    python3 tests/support/postfix_probe.py --canonical  # also send the normalize form
                                                        # of every accepted line
    python3 tests/support/postfix_probe.py --print      # the corpus as Python source
"""

from __future__ import annotations

import socket
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

PROBED_ON = "2026-12-03"
POSTFIX_VERSION = "3.7.11"

#: main.cf settings per configuration (on top of tests/e2e/peers.Postfix's).
CONFIGS: dict[str, dict[str, str]] = {
    "default": {},
    "no_extensions": {"smtpd_discard_ehlo_keywords": "dsn, smtputf8, 8bitmime, size"},
}

#: The EHLO keywords Postfix offered in each configuration (probed).
EHLO_KEYWORDS: dict[str, tuple[str, ...]] = {
    "default": (
        "PIPELINING",
        "SIZE",
        "VRFY",
        "ETRN",
        "ENHANCEDSTATUSCODES",
        "8BITMIME",
        "DSN",
        "SMTPUTF8",
        "CHUNKING",
    ),
    "no_extensions": ("PIPELINING", "VRFY", "ETRN", "ENHANCEDSTATUSCODES", "CHUNKING"),
}

#: Commands sent before the probed line, per context.
SETUP: dict[str, tuple[bytes, ...]] = {
    "helo": (),
    "mail": (b"EHLO c.example",),
    "mail_helo": (b"HELO c.example",),
    "rcpt": (b"EHLO c.example", b"MAIL FROM:<s@example.com>"),
    "rcpt_utf8": (b"EHLO c.example", b"MAIL FROM:<s@example.com> SMTPUTF8"),
}


class Probe(NamedTuple):
    """One line sent to Postfix, and the first line of its answer."""

    config: str
    context: str
    line: bytes
    reply: str

    @property
    def accepted(self) -> bool:
        return self.reply[:1] == "2"


L64 = b"l" * 64
L65 = b"l" * 65
L300 = b"l" * 300
LABEL63 = b"d" * 63
LABEL64 = b"d" * 64
DOMAIN254 = b".".join([b"d" * 63] * 3 + [b"d" * 62])  # 254 octets
DOMAIN256 = DOMAIN254 + b"dd"
ENVID100 = b"e" * 100
ENVID101 = b"e" * 101
HELO480 = b"h" * 480

# BEGIN CORPUS
CORPUS: tuple[Probe, ...] = (
    Probe("default", "mail", b"MAIL FROM:<a@example.com>", "250 2.1.0 Ok"),
    Probe("default", "mail", b"mail from:<a@example.com>", "250 2.1.0 Ok"),
    Probe("default", "mail", b"Mail From:<a@example.com>", "250 2.1.0 Ok"),
    Probe("default", "mail", b"MAIL FROM: <a@example.com>", "250 2.1.0 Ok"),
    Probe("default", "mail", b"MAIL FROM:  <a@example.com>", "250 2.1.0 Ok"),
    Probe("default", "mail", b"MAIL  FROM:<a@example.com>", "250 2.1.0 Ok"),
    Probe(
        "default", "mail", b"MAIL FROM :<a@example.com>", "501 5.5.4 Syntax: MAIL FROM:<address>"
    ),
    Probe("default", "mail", b"MAIL FROM <a@example.com>", "501 5.5.4 Syntax: MAIL FROM:<address>"),
    Probe("default", "mail", b"MAIL FROM<a@example.com>", "501 5.5.4 Syntax: MAIL FROM:<address>"),
    Probe("default", "mail", b"MAIL <a@example.com>", "501 5.5.4 Syntax: MAIL FROM:<address>"),
    Probe("default", "mail", b"MAIL FROM:", "501 5.5.4 Syntax: MAIL FROM:<address>"),
    Probe("default", "mail", b"MAIL FROM: ", "501 5.5.4 Syntax: MAIL FROM:<address>"),
    Probe("default", "mail", b"MAIL", "501 5.5.4 Syntax: MAIL FROM:<address>"),
    Probe("default", "mail", b"MAIL TO:<a@example.com>", "501 5.5.4 Syntax: MAIL FROM:<address>"),
    Probe("default", "mail", b"MAIL FROM:<>", "250 2.1.0 Ok"),
    Probe("default", "mail", b"MAIL FROM: <>", "250 2.1.0 Ok"),
    Probe("default", "mail", b"MAIL FROM:<> SIZE=100", "250 2.1.0 Ok"),
    Probe("default", "mail", b"MAIL FROM:<a@example.com> ", "250 2.1.0 Ok"),
    Probe("default", "mail", b"MAIL FROM:<a@example.com>  ", "250 2.1.0 Ok"),
    Probe("default", "mail", b"MAIL FROM:<a@example.com>\t", "250 2.1.0 Ok"),
    Probe("default", "mail", b"MAIL\tFROM:<a@example.com>", "250 2.1.0 Ok"),
    Probe("default", "mail", b"MAIL FROM:\t<a@example.com>", "250 2.1.0 Ok"),
    Probe("default", "mail", b"MAIL FROM:a@example.com", "250 2.1.0 Ok"),
    Probe("default", "mail", b"MAIL FROM: a@example.com", "250 2.1.0 Ok"),
    Probe("default", "mail", b"MAIL FROM:a@example.com SIZE=100", "250 2.1.0 Ok"),
    Probe("default", "mail", b"MAIL FROM:garbage", "250 2.1.0 Ok"),
    Probe("default", "mail", b"MAIL FROM:<garbage>", "250 2.1.0 Ok"),
    Probe("default", "mail", b"MAIL FROM:<a>", "250 2.1.0 Ok"),
    Probe("default", "mail", b"MAIL FROM:<@a.example,@b.example:a@example.com>", "250 2.1.0 Ok"),
    Probe("default", "mail", b"MAIL FROM:<@a.example:a@example.com>", "250 2.1.0 Ok"),
    Probe("default", "mail", b"MAIL FROM:<@a.example,b.example:a@example.com>", "250 2.1.0 Ok"),
    Probe("default", "mail", b'MAIL FROM:<"john doe"@example.com>', "250 2.1.0 Ok"),
    Probe("default", "mail", b'MAIL FROM:<"a\\"b"@example.com>', "250 2.1.0 Ok"),
    Probe("default", "mail", b'MAIL FROM:<"ab"@example.com>', "250 2.1.0 Ok"),
    Probe("default", "mail", b'MAIL FROM:<"">', "250 2.1.0 Ok"),
    Probe("default", "mail", b'MAIL FROM:<""@example.com>', "250 2.1.0 Ok"),
    Probe("default", "mail", b"MAIL FROM:<a..b@example.com>", "250 2.1.0 Ok"),
    Probe("default", "mail", b"MAIL FROM:<.a@example.com>", "250 2.1.0 Ok"),
    Probe("default", "mail", b"MAIL FROM:<a.@example.com>", "250 2.1.0 Ok"),
    Probe("default", "mail", b"MAIL FROM:<a@[127.0.0.1]>", "250 2.1.0 Ok"),
    Probe("default", "mail", b"MAIL FROM:<a@[IPv6:::1]>", "250 2.1.0 Ok"),
    Probe("default", "mail", b"MAIL FROM:<a@[IPv6:2001:db8::1]>", "250 2.1.0 Ok"),
    Probe("default", "mail", b"MAIL FROM:<a@[IPv6:::ffff:127.0.0.1]>", "250 2.1.0 Ok"),
    Probe("default", "mail", b"MAIL FROM:<a@[300.1.1.1]>", "501 5.1.7 Bad sender address syntax"),
    Probe("default", "mail", b"MAIL FROM:<a@[1.2.3]>", "501 5.1.7 Bad sender address syntax"),
    Probe("default", "mail", b"MAIL FROM:<a@[garbage]>", "501 5.1.7 Bad sender address syntax"),
    Probe("default", "mail", b"MAIL FROM:<a@[x-tag:abc]>", "501 5.1.7 Bad sender address syntax"),
    Probe("default", "mail", b"MAIL FROM:<a@[]>", "501 5.1.7 Bad sender address syntax"),
    Probe("default", "mail", b"MAIL FROM:<a@-example.com>", "501 5.1.7 Bad sender address syntax"),
    Probe("default", "mail", b"MAIL FROM:<a@example-.com>", "501 5.1.7 Bad sender address syntax"),
    Probe("default", "mail", b"MAIL FROM:<a@ex_ample.com>", "250 2.1.0 Ok"),
    Probe("default", "mail", b"MAIL FROM:<a@example..com>", "501 5.1.7 Bad sender address syntax"),
    Probe("default", "mail", b"MAIL FROM:<a@.example.com>", "501 5.1.7 Bad sender address syntax"),
    Probe("default", "mail", b"MAIL FROM:<a@example.com.>", "250 2.1.0 Ok"),
    Probe("default", "mail", b"MAIL FROM:<a@>", "501 5.1.7 Bad sender address syntax"),
    Probe("default", "mail", b"MAIL FROM:<@example.com>", "250 2.1.0 Ok"),
    Probe("default", "mail", b"MAIL FROM:<@>", "501 5.1.7 Bad sender address syntax"),
    Probe("default", "mail", b"MAIL FROM:<a b@example.com>", "501 5.1.7 Bad sender address syntax"),
    Probe(
        "default",
        "mail",
        b"MAIL FROM:<a@example.com> <b@example.com>",
        "555 5.5.4 Unsupported option: <b@example.com>",
    ),
    Probe(
        "default",
        "mail",
        b"MAIL FROM:<a@example.com>,<b@example.com>",
        "501 5.1.7 Bad sender address syntax",
    ),
    Probe(
        "default",
        "mail",
        b"MAIL FROM:<a@example.com,b@example.com>",
        "501 5.1.7 Bad sender address syntax",
    ),
    Probe("default", "mail", b"MAIL FROM:<<a@example.com>>", "250 2.1.0 Ok"),
    Probe("default", "mail", b"MAIL FROM:<a@example.com", "501 5.1.7 Bad sender address syntax"),
    Probe("default", "mail", b"MAIL FROM:a@example.com>", "250 2.1.0 Ok"),
    Probe("default", "mail", b"MAIL FROM:<a@example.com>>", "250 2.1.0 Ok"),
    Probe(
        "default",
        "mail",
        b"MAIL FROM:Name <a@example.com>",
        "555 5.5.4 Unsupported option: <a@example.com>",
    ),
    Probe(
        "default",
        "mail",
        b'MAIL FROM:"Name" <a@example.com>',
        "555 5.5.4 Unsupported option: <a@example.com>",
    ),
    Probe(
        "default",
        "mail",
        b"MAIL FROM:<a@example.com> (comment)",
        "555 5.5.4 Unsupported option: (comment)",
    ),
    Probe("default", "mail", b"MAIL FROM:<a@example.com>(comment)", "250 2.1.0 Ok"),
    Probe("default", "mail", b"MAIL FROM:<a(comment)@example.com>", "250 2.1.0 Ok"),
    Probe("default", "mail", b"MAIL FROM:<a@b@example.com>", "250 2.1.0 Ok"),
    Probe("default", "mail", b"MAIL FROM:<a%b@example.com>", "250 2.1.0 Ok"),
    Probe("default", "mail", b"MAIL FROM:<a!b@example.com>", "250 2.1.0 Ok"),
    Probe(
        "default",
        "mail",
        b"MAIL FROM:<a@example.com>garbage",
        "501 5.1.7 Bad sender address syntax",
    ),
    Probe("default", "mail", b"MAIL FROM:<a;b@example.com>", "501 5.1.7 Bad sender address syntax"),
    Probe("default", "mail", b"MAIL FROM:<a\\b@example.com>", "250 2.1.0 Ok"),
    Probe(
        "default", "mail", b"MAIL FROM:<a[b]@example.com>", "501 5.1.7 Bad sender address syntax"
    ),
    Probe("default", "mail", b"MAIL FROM:<" + L64 + b"@example.com>", "250 2.1.0 Ok"),
    Probe("default", "mail", b"MAIL FROM:<" + L65 + b"@example.com>", "250 2.1.0 Ok"),
    Probe("default", "mail", b"MAIL FROM:<" + L300 + b"@example.com>", "250 2.1.0 Ok"),
    Probe("default", "mail", b"MAIL FROM:<a@" + LABEL63 + b".example>", "250 2.1.0 Ok"),
    Probe(
        "default",
        "mail",
        b"MAIL FROM:<a@" + LABEL64 + b".example>",
        "501 5.1.7 Bad sender address syntax",
    ),
    Probe("default", "mail", b"MAIL FROM:<a@" + DOMAIN254 + b">", "250 2.1.0 Ok"),
    Probe(
        "default",
        "mail",
        b"MAIL FROM:<a@" + DOMAIN256 + b">",
        "501 5.1.7 Bad sender address syntax",
    ),
    Probe("default", "mail", b"MAIL FROM:<a\x01b@example.com>", "250 2.1.0 Ok"),
    Probe("default", "mail", b"MAIL FROM:<a\x7fb@example.com>", "250 2.1.0 Ok"),
    Probe("default", "mail", b"MAIL FROM:<a\x1bb@example.com>", "250 2.1.0 Ok"),
    Probe(
        "default", "mail", b"MAIL FROM:<a@example.com>\x01", "501 5.1.7 Bad sender address syntax"
    ),
    Probe("default", "mail", b"MAIL FROM:<\xc3\xa9@example.com>", "250 2.1.0 Ok"),
    Probe("default", "mail", b"MAIL FROM:<\xc3\xa9@example.com> SMTPUTF8", "250 2.1.0 Ok"),
    Probe("default", "mail", b"MAIL FROM:<a@\xc3\xa9xample.com> SMTPUTF8", "250 2.1.0 Ok"),
    Probe(
        "default",
        "mail",
        b"MAIL FROM:<a@\xc3\xa9xample.com>",
        "501 5.1.7 Bad sender address syntax",
    ),
    Probe("default", "mail", b"MAIL FROM:<\xe9@example.com>", "500 5.5.2 Error: bad UTF-8 syntax"),
    Probe(
        "default",
        "mail",
        b"MAIL FROM:<\xe9@example.com> SMTPUTF8",
        "500 5.5.2 Error: bad UTF-8 syntax",
    ),
    Probe("default", "mail", b"MAIL FROM:<a@example.com> SIZE=1000", "250 2.1.0 Ok"),
    Probe("default", "mail", b"MAIL FROM:<a@example.com> size=1000", "250 2.1.0 Ok"),
    Probe("default", "mail", b"MAIL FROM:<a@example.com> Size=1000", "250 2.1.0 Ok"),
    Probe(
        "default",
        "mail",
        b"MAIL FROM:<a@example.com> SIZE=abc",
        "501 5.5.4 Bad message size syntax",
    ),
    Probe(
        "default", "mail", b"MAIL FROM:<a@example.com> SIZE=", "501 5.5.4 Bad message size syntax"
    ),
    Probe(
        "default", "mail", b"MAIL FROM:<a@example.com> SIZE", "555 5.5.4 Unsupported option: SIZE"
    ),
    Probe(
        "default", "mail", b"MAIL FROM:<a@example.com> SIZE=-1", "501 5.5.4 Bad message size syntax"
    ),
    Probe(
        "default", "mail", b"MAIL FROM:<a@example.com> SIZE=+1", "501 5.5.4 Bad message size syntax"
    ),
    Probe("default", "mail", b"MAIL FROM:<a@example.com> SIZE=0", "250 2.1.0 Ok"),
    Probe("default", "mail", b"MAIL FROM:<a@example.com> SIZE=0001000", "250 2.1.0 Ok"),
    Probe(
        "default",
        "mail",
        b"MAIL FROM:<a@example.com> SIZE=99999999999999999999999",
        "552 5.3.4 Message size exceeds file system imposed limit",
    ),
    Probe(
        "default",
        "mail",
        b"MAIL FROM:<a@example.com> SIZE=20000000",
        "552 5.3.4 Message size exceeds fixed limit",
    ),
    Probe("default", "mail", b"MAIL FROM:<a@example.com> SIZE=1 SIZE=2", "250 2.1.0 Ok"),
    Probe("default", "mail", b"MAIL FROM:<a@example.com> BODY=8BITMIME", "250 2.1.0 Ok"),
    Probe("default", "mail", b"MAIL FROM:<a@example.com> body=8bitmime", "250 2.1.0 Ok"),
    Probe("default", "mail", b"MAIL FROM:<a@example.com> BODY=7BIT", "250 2.1.0 Ok"),
    Probe(
        "default",
        "mail",
        b"MAIL FROM:<a@example.com> BODY=BINARYMIME",
        "555 5.5.4 Unsupported option: BODY=BINARYMIME",
    ),
    Probe(
        "default",
        "mail",
        b"MAIL FROM:<a@example.com> BODY=FOO",
        "555 5.5.4 Unsupported option: BODY=FOO",
    ),
    Probe(
        "default", "mail", b"MAIL FROM:<a@example.com> BODY=", "555 5.5.4 Unsupported option: BODY="
    ),
    Probe(
        "default", "mail", b"MAIL FROM:<a@example.com> BODY", "555 5.5.4 Unsupported option: BODY"
    ),
    Probe("default", "mail", b"MAIL FROM:<a@example.com> BODY=7BIT BODY=8BITMIME", "250 2.1.0 Ok"),
    Probe("default", "mail", b"MAIL FROM:<a@example.com> SMTPUTF8", "250 2.1.0 Ok"),
    Probe("default", "mail", b"MAIL FROM:<a@example.com> smtputf8", "250 2.1.0 Ok"),
    Probe(
        "default",
        "mail",
        b"MAIL FROM:<a@example.com> SMTPUTF8=yes",
        "555 5.5.4 Unsupported option: SMTPUTF8=yes",
    ),
    Probe("default", "mail", b"MAIL FROM:<a@example.com> SMTPUTF8 SMTPUTF8", "250 2.1.0 Ok"),
    Probe("default", "mail", b"MAIL FROM:<a@example.com> RET=FULL", "250 2.1.0 Ok"),
    Probe("default", "mail", b"MAIL FROM:<a@example.com> RET=HDRS", "250 2.1.0 Ok"),
    Probe("default", "mail", b"MAIL FROM:<a@example.com> ret=hdrs", "250 2.1.0 Ok"),
    Probe(
        "default",
        "mail",
        b"MAIL FROM:<a@example.com> RET=FOO",
        "501 5.5.4 Bad RET parameter syntax",
    ),
    Probe(
        "default", "mail", b"MAIL FROM:<a@example.com> RET=", "501 5.5.4 Bad RET parameter syntax"
    ),
    Probe("default", "mail", b"MAIL FROM:<a@example.com> RET", "555 5.5.4 Unsupported option: RET"),
    Probe(
        "default",
        "mail",
        b"MAIL FROM:<a@example.com> RET=FULL RET=HDRS",
        "501 5.5.4 Bad RET parameter syntax",
    ),
    Probe("default", "mail", b"MAIL FROM:<a@example.com> ENVID=abc", "250 2.1.0 Ok"),
    Probe("default", "mail", b"MAIL FROM:<a@example.com> ENVID=a+2Bb", "250 2.1.0 Ok"),
    Probe(
        "default",
        "mail",
        b"MAIL FROM:<a@example.com> ENVID=a+zz",
        "501 5.5.4 Bad ENVID parameter syntax",
    ),
    Probe("default", "mail", b"MAIL FROM:<a@example.com> ENVID=a+2b", "250 2.1.0 Ok"),
    Probe(
        "default",
        "mail",
        b"MAIL FROM:<a@example.com> ENVID=a+",
        "501 5.5.4 Bad ENVID parameter syntax",
    ),
    Probe("default", "mail", b"MAIL FROM:<a@example.com> ENVID=a=b", "250 2.1.0 Ok"),
    Probe(
        "default",
        "mail",
        b"MAIL FROM:<a@example.com> ENVID=",
        "501 5.5.4 Bad ENVID parameter syntax",
    ),
    Probe(
        "default", "mail", b"MAIL FROM:<a@example.com> ENVID", "555 5.5.4 Unsupported option: ENVID"
    ),
    Probe("default", "mail", b"MAIL FROM:<a@example.com> ENVID=" + ENVID100, "250 2.1.0 Ok"),
    Probe("default", "mail", b"MAIL FROM:<a@example.com> ENVID=" + ENVID101, "250 2.1.0 Ok"),
    Probe(
        "default",
        "mail",
        b"MAIL FROM:<a@example.com> ENVID=a ENVID=b",
        "501 5.5.4 Bad ENVID parameter syntax",
    ),
    Probe("default", "mail", b"MAIL FROM:<a@example.com> AUTH=<>", "250 2.1.0 Ok"),
    Probe("default", "mail", b"MAIL FROM:<a@example.com> AUTH=a@example.com", "250 2.1.0 Ok"),
    Probe(
        "default",
        "mail",
        b"MAIL FROM:<a@example.com> MT-PRIORITY=3",
        "555 5.5.4 Unsupported option: MT-PRIORITY=3",
    ),
    Probe(
        "default",
        "mail",
        b"MAIL FROM:<a@example.com> REQUIRETLS",
        "555 5.5.4 Unsupported option: REQUIRETLS",
    ),
    Probe(
        "default",
        "mail",
        b"MAIL FROM:<a@example.com> XFOO=bar",
        "555 5.5.4 Unsupported option: XFOO=bar",
    ),
    Probe(
        "default", "mail", b"MAIL FROM:<a@example.com> XFOO", "555 5.5.4 Unsupported option: XFOO"
    ),
    Probe(
        "default", "mail", b"MAIL FROM:<a@example.com> =bar", "555 5.5.4 Unsupported option: =bar"
    ),
    Probe("default", "mail", b"MAIL FROM:<a@example.com> SIZE=1000  BODY=8BITMIME", "250 2.1.0 Ok"),
    Probe("default", "mail", b"MAIL FROM:<a@example.com> SIZE=1000\tBODY=8BITMIME", "250 2.1.0 Ok"),
    Probe("default", "mail", b"MAIL FROM:<a@example.com>\tSIZE=1000", "250 2.1.0 Ok"),
    Probe(
        "default",
        "mail",
        b"MAIL FROM:<a@example.com>SIZE=1000",
        "501 5.1.7 Bad sender address syntax",
    ),
    Probe("default", "mail", b"MAIL FROM: <a@example.com> SIZE=1000", "250 2.1.0 Ok"),
    Probe(
        "default",
        "mail",
        b"MAIL FROM:<a@example.com> SIZE=1000 BODY=8BITMIME SMTPUTF8 RET=HDRS ENVID=x",
        "250 2.1.0 Ok",
    ),
    Probe(
        "default",
        "mail",
        b"MAIL FROM:<a@example.com> NOTIFY=SUCCESS",
        "555 5.5.4 Unsupported option: NOTIFY=SUCCESS",
    ),
    Probe(
        "default",
        "mail",
        b"MAIL FROM:<a@example.com> ORCPT=rfc822;a@example.com",
        "555 5.5.4 Unsupported option: ORCPT=rfc822;a@example.com",
    ),
    Probe(
        "default",
        "mail",
        b"MAIL FROM:<a@example.com> SIZE=1000\x01",
        "501 5.5.4 Bad message size syntax",
    ),
    Probe(
        "default",
        "mail",
        b"MAIL FROM:<a@example.com> ENVID=\xc3\xa9",
        "501 5.5.4 Bad ENVID parameter syntax",
    ),
    Probe("default", "mail_helo", b"MAIL FROM:<a@example.com>", "250 2.1.0 Ok"),
    Probe("default", "mail_helo", b"MAIL FROM:<a@example.com> SIZE=1000", "250 2.1.0 Ok"),
    Probe("default", "mail_helo", b"MAIL FROM:<a@example.com> BODY=8BITMIME", "250 2.1.0 Ok"),
    Probe("default", "mail_helo", b"MAIL FROM:<a@example.com> SMTPUTF8", "250 2.1.0 Ok"),
    Probe("default", "mail_helo", b"MAIL FROM:<a@example.com> RET=HDRS", "250 2.1.0 Ok"),
    Probe("default", "rcpt", b"RCPT TO:<b@example.com>", "250 2.1.5 Ok"),
    Probe("default", "rcpt", b"rcpt to:<b@example.com>", "250 2.1.5 Ok"),
    Probe("default", "rcpt", b"RCPT TO: <b@example.com>", "250 2.1.5 Ok"),
    Probe("default", "rcpt", b"RCPT TO:b@example.com", "250 2.1.5 Ok"),
    Probe("default", "rcpt", b"RCPT TO: b@example.com", "250 2.1.5 Ok"),
    Probe("default", "rcpt", b"RCPT  TO:<b@example.com>", "250 2.1.5 Ok"),
    Probe("default", "rcpt", b"RCPT TO :<b@example.com>", "501 5.5.4 Syntax: RCPT TO:<address>"),
    Probe("default", "rcpt", b"RCPT TO <b@example.com>", "501 5.5.4 Syntax: RCPT TO:<address>"),
    Probe("default", "rcpt", b"RCPT <b@example.com>", "501 5.5.4 Syntax: RCPT TO:<address>"),
    Probe("default", "rcpt", b"RCPT FROM:<b@example.com>", "501 5.5.4 Syntax: RCPT TO:<address>"),
    Probe("default", "rcpt", b"RCPT TO:<>", "501 5.1.3 Bad recipient address syntax"),
    Probe("default", "rcpt", b"RCPT TO:", "501 5.5.4 Syntax: RCPT TO:<address>"),
    Probe("default", "rcpt", b"RCPT", "501 5.5.4 Syntax: RCPT TO:<address>"),
    Probe("default", "rcpt", b"RCPT TO:<postmaster>", "250 2.1.5 Ok"),
    Probe("default", "rcpt", b"RCPT TO:<Postmaster>", "250 2.1.5 Ok"),
    Probe("default", "rcpt", b"RCPT TO:<POSTMASTER>", "250 2.1.5 Ok"),
    Probe("default", "rcpt", b"RCPT TO:<postmaster@example.com>", "250 2.1.5 Ok"),
    Probe("default", "rcpt", b"RCPT TO:<abuse>", "250 2.1.5 Ok"),
    Probe("default", "rcpt", b"RCPT TO:garbage", "250 2.1.5 Ok"),
    Probe("default", "rcpt", b"RCPT TO:<@a.example,@b.example:b@example.com>", "250 2.1.5 Ok"),
    Probe("default", "rcpt", b"RCPT TO:<b@example.com> ", "250 2.1.5 Ok"),
    Probe("default", "rcpt", b"RCPT TO:<b@example.com>\t", "250 2.1.5 Ok"),
    Probe("default", "rcpt", b'RCPT TO:<"b c"@example.com>', "250 2.1.5 Ok"),
    Probe("default", "rcpt", b"RCPT TO:<b..c@example.com>", "250 2.1.5 Ok"),
    Probe("default", "rcpt", b"RCPT TO:<b@[127.0.0.1]>", "250 2.1.5 Ok"),
    Probe("default", "rcpt", b"RCPT TO:<b@[300.0.0.1]>", "501 5.1.3 Bad recipient address syntax"),
    Probe("default", "rcpt", b"RCPT TO:<b@[IPv6:::1]>", "250 2.1.5 Ok"),
    Probe("default", "rcpt", b"RCPT TO:<b@[IPv6:zz::1]>", "501 5.1.3 Bad recipient address syntax"),
    Probe("default", "rcpt", b"RCPT TO:<b@-example.com>", "501 5.1.3 Bad recipient address syntax"),
    Probe("default", "rcpt", b"RCPT TO:<b@example..com>", "501 5.1.3 Bad recipient address syntax"),
    Probe("default", "rcpt", b"RCPT TO:<b@>", "501 5.1.3 Bad recipient address syntax"),
    Probe("default", "rcpt", b"RCPT TO:<b>", "250 2.1.5 Ok"),
    Probe("default", "rcpt", b"RCPT TO:<b@example.com", "501 5.1.3 Bad recipient address syntax"),
    Probe(
        "default",
        "rcpt",
        b"RCPT TO:<b@example.com> <c@example.com>",
        "555 5.5.4 Unsupported option: <c@example.com>",
    ),
    Probe(
        "default",
        "rcpt",
        b"RCPT TO:<b@example.com>,<c@example.com>",
        "501 5.1.3 Bad recipient address syntax",
    ),
    Probe(
        "default",
        "rcpt",
        b"RCPT TO:Name <b@example.com>",
        "555 5.5.4 Unsupported option: <b@example.com>",
    ),
    Probe("default", "rcpt", b"RCPT TO:<b\x01c@example.com>", "250 2.1.5 Ok"),
    Probe("default", "rcpt", b"RCPT TO:<b\x7f@example.com>", "250 2.1.5 Ok"),
    Probe("default", "rcpt", b"RCPT TO:<\xc3\xa9@example.com>", "250 2.1.5 Ok"),
    Probe("default", "rcpt", b"RCPT TO:<\xe9@example.com>", "500 5.5.2 Error: bad UTF-8 syntax"),
    Probe(
        "default",
        "rcpt",
        b"RCPT TO:<b@\xc3\xa9xample.com>",
        "501 5.1.3 Bad recipient address syntax",
    ),
    Probe("default", "rcpt", b"RCPT TO:<" + L64 + b"@example.com>", "250 2.1.5 Ok"),
    Probe("default", "rcpt", b"RCPT TO:<" + L65 + b"@example.com>", "250 2.1.5 Ok"),
    Probe("default", "rcpt", b"RCPT TO:<" + L300 + b"@example.com>", "250 2.1.5 Ok"),
    Probe(
        "default",
        "rcpt",
        b"RCPT TO:<b@" + LABEL64 + b".example>",
        "501 5.1.3 Bad recipient address syntax",
    ),
    Probe(
        "default",
        "rcpt",
        b"RCPT TO:<b@" + DOMAIN256 + b">",
        "501 5.1.3 Bad recipient address syntax",
    ),
    Probe("default", "rcpt", b"RCPT TO:<b@example.com> NOTIFY=SUCCESS", "250 2.1.5 Ok"),
    Probe(
        "default", "rcpt", b"RCPT TO:<b@example.com> NOTIFY=SUCCESS,FAILURE,DELAY", "250 2.1.5 Ok"
    ),
    Probe("default", "rcpt", b"RCPT TO:<b@example.com> notify=success,failure", "250 2.1.5 Ok"),
    Probe("default", "rcpt", b"RCPT TO:<b@example.com> NOTIFY=NEVER", "250 2.1.5 Ok"),
    Probe(
        "default",
        "rcpt",
        b"RCPT TO:<b@example.com> NOTIFY=NEVER,SUCCESS",
        "501 5.5.4 Error: Bad NOTIFY parameter syntax",
    ),
    Probe(
        "default",
        "rcpt",
        b"RCPT TO:<b@example.com> NOTIFY=FOO",
        "501 5.5.4 Error: Bad NOTIFY parameter syntax",
    ),
    Probe("default", "rcpt", b"RCPT TO:<b@example.com> NOTIFY=SUCCESS,", "250 2.1.5 Ok"),
    Probe("default", "rcpt", b"RCPT TO:<b@example.com> NOTIFY=SUCCESS,SUCCESS", "250 2.1.5 Ok"),
    Probe(
        "default",
        "rcpt",
        b"RCPT TO:<b@example.com> NOTIFY=",
        "501 5.5.4 Error: Bad NOTIFY parameter syntax",
    ),
    Probe(
        "default", "rcpt", b"RCPT TO:<b@example.com> NOTIFY", "555 5.5.4 Unsupported option: NOTIFY"
    ),
    Probe(
        "default",
        "rcpt",
        b"RCPT TO:<b@example.com> NOTIFY=SUCCESS NOTIFY=FAILURE",
        "501 5.5.4 Error: Bad NOTIFY parameter syntax",
    ),
    Probe("default", "rcpt", b"RCPT TO:<b@example.com> ORCPT=rfc822;b@example.com", "250 2.1.5 Ok"),
    Probe("default", "rcpt", b"RCPT TO:<b@example.com> ORCPT=RFC822;b@example.com", "250 2.1.5 Ok"),
    Probe(
        "default", "rcpt", b"RCPT TO:<b@example.com> ORCPT=rfc822;b+40example.com", "250 2.1.5 Ok"
    ),
    Probe("default", "rcpt", b"RCPT TO:<b@example.com> ORCPT=x-foo;bar", "250 2.1.5 Ok"),
    Probe(
        "default",
        "rcpt",
        b"RCPT TO:<b@example.com> ORCPT=rfc822",
        "501 5.5.4 Error: Bad ORCPT parameter syntax",
    ),
    Probe("default", "rcpt", b"RCPT TO:<b@example.com> ORCPT=rfc822;", "250 2.1.5 Ok"),
    Probe(
        "default",
        "rcpt",
        b"RCPT TO:<b@example.com> ORCPT=;b@example.com",
        "501 5.5.4 Error: Bad ORCPT parameter syntax",
    ),
    Probe(
        "default",
        "rcpt",
        b"RCPT TO:<b@example.com> ORCPT=rfc822;b+zz",
        "501 5.5.4 Error: Bad ORCPT parameter syntax",
    ),
    Probe(
        "default",
        "rcpt",
        b"RCPT TO:<b@example.com> ORCPT=",
        "501 5.5.4 Error: Bad ORCPT parameter syntax",
    ),
    Probe(
        "default",
        "rcpt",
        b"RCPT TO:<b@example.com> ORCPT=rfc822;a ORCPT=rfc822;b",
        "501 5.5.4 Error: Bad ORCPT parameter syntax",
    ),
    Probe("default", "rcpt", b"RCPT TO:<b@example.com> ORCPT=utf-8;b@example.com", "250 2.1.5 Ok"),
    Probe(
        "default",
        "rcpt",
        b"RCPT TO:<b@example.com> XFOO=bar",
        "555 5.5.4 Unsupported option: XFOO=bar",
    ),
    Probe(
        "default",
        "rcpt",
        b"RCPT TO:<b@example.com> SIZE=10",
        "555 5.5.4 Unsupported option: SIZE=10",
    ),
    Probe(
        "default",
        "rcpt",
        b"RCPT TO:<b@example.com> BODY=8BITMIME",
        "555 5.5.4 Unsupported option: BODY=8BITMIME",
    ),
    Probe(
        "default",
        "rcpt",
        b"RCPT TO:<b@example.com> RET=FULL",
        "555 5.5.4 Unsupported option: RET=FULL",
    ),
    Probe(
        "default",
        "rcpt",
        b"RCPT TO:<b@example.com> SMTPUTF8",
        "555 5.5.4 Unsupported option: SMTPUTF8",
    ),
    Probe(
        "default",
        "rcpt",
        b"RCPT TO:<b@example.com> ENVID=x",
        "555 5.5.4 Unsupported option: ENVID=x",
    ),
    Probe(
        "default",
        "rcpt",
        b"RCPT TO:<b@example.com> NOTIFY=SUCCESS  ORCPT=rfc822;b@example.com",
        "250 2.1.5 Ok",
    ),
    Probe("default", "rcpt_utf8", b"RCPT TO:<\xc3\xa9@example.com>", "250 2.1.5 Ok"),
    Probe("default", "rcpt_utf8", b"RCPT TO:<b@\xc3\xa9xample.com>", "250 2.1.5 Ok"),
    Probe(
        "default", "rcpt_utf8", b"RCPT TO:<\xe9@example.com>", "500 5.5.2 Error: bad UTF-8 syntax"
    ),
    Probe("default", "helo", b"HELO c.example", "250 upstream.smtpguard.test"),
    Probe("default", "helo", b"EHLO c.example", "250-upstream.smtpguard.test"),
    Probe("default", "helo", b"helo c.example", "250 upstream.smtpguard.test"),
    Probe("default", "helo", b"ehlo c.example", "250-upstream.smtpguard.test"),
    Probe("default", "helo", b"HELO", "501 Syntax: HELO hostname"),
    Probe("default", "helo", b"EHLO", "501 Syntax: EHLO hostname"),
    Probe("default", "helo", b"HELO ", "501 Syntax: HELO hostname"),
    Probe("default", "helo", b"EHLO ", "501 Syntax: EHLO hostname"),
    Probe("default", "helo", b"HELO  c.example", "250 upstream.smtpguard.test"),
    Probe("default", "helo", b"HELO c.example ", "250 upstream.smtpguard.test"),
    Probe("default", "helo", b"HELO c.example\t", "250 upstream.smtpguard.test"),
    Probe("default", "helo", b"HELO\tc.example", "250 upstream.smtpguard.test"),
    Probe("default", "helo", b"HELO a b", "250 upstream.smtpguard.test"),
    Probe("default", "helo", b"EHLO a b", "250-upstream.smtpguard.test"),
    Probe("default", "helo", b"HELO [127.0.0.1]", "250 upstream.smtpguard.test"),
    Probe("default", "helo", b"EHLO [IPv6:::1]", "250-upstream.smtpguard.test"),
    Probe("default", "helo", b"EHLO [300.1.1.1]", "250-upstream.smtpguard.test"),
    Probe("default", "helo", b"EHLO [garbage]", "250-upstream.smtpguard.test"),
    Probe("default", "helo", b"HELO 127.0.0.1", "250 upstream.smtpguard.test"),
    Probe("default", "helo", b"HELO -bad-", "250 upstream.smtpguard.test"),
    Probe("default", "helo", b"HELO under_score.example", "250 upstream.smtpguard.test"),
    Probe("default", "helo", b"HELO c.example.", "250 upstream.smtpguard.test"),
    Probe("default", "helo", b"HELO localhost", "250 upstream.smtpguard.test"),
    Probe("default", "helo", b'HELO "quoted"', "250 upstream.smtpguard.test"),
    Probe("default", "helo", b"HELO <c.example>", "250 upstream.smtpguard.test"),
    Probe("default", "helo", b"HELO " + HELO480, "250 upstream.smtpguard.test"),
    Probe("default", "helo", b"EHLO " + LABEL64 + b".example", "250-upstream.smtpguard.test"),
    Probe("default", "helo", b"EHLO c\x01.example", "250-upstream.smtpguard.test"),
    Probe("default", "helo", b"EHLO \xc3\xa9.example", "250-upstream.smtpguard.test"),
    Probe("default", "helo", b"EHLO \xe9.example", "500 5.5.2 Error: bad UTF-8 syntax"),
    Probe("default", "mail", b"NOOP", "250 2.0.0 Ok"),
    Probe("default", "mail", b"NOOP anything at all", "250 2.0.0 Ok"),
    Probe("default", "mail", b"NOOP \x01", "250 2.0.0 Ok"),
    Probe("default", "mail", b"RSET", "250 2.0.0 Ok"),
    Probe("default", "mail", b"RSET x", "501 5.5.4 Syntax: RSET"),
    Probe("default", "mail", b"QUIT x", "221 2.0.0 Bye"),
    Probe("default", "rcpt", b"DATA x", "554 5.5.1 Error: no valid recipients"),
    Probe("default", "mail", b"VRFY", "501 5.5.4 Syntax: VRFY address [SMTPUTF8]"),
    Probe("default", "mail", b"VRFY b@example.com", "252 2.0.0 b@example.com"),
    Probe("default", "mail", b"VRFY <b@example.com>", "252 2.0.0 <b@example.com>"),
    Probe("default", "mail", b"VRFY \x01", "252 2.0.0 \x01"),
    Probe("default", "mail", b"EXPN list", "500 5.5.2 Error: command not recognized"),
    Probe("default", "mail", b"HELP", "500 5.5.2 Error: command not recognized"),
    Probe("default", "mail", b"HELP MAIL", "500 5.5.2 Error: command not recognized"),
    Probe("default", "mail", b"ETRN example.com", "250 Queuing started"),
    Probe("default", "mail", b"ETRN", "500 Syntax: ETRN domain"),
    Probe("default", "mail", b"MAIL FROM:<a@example.com>\x0bSIZE=1000", "250 2.1.0 Ok"),
    Probe("default", "mail", b"MAIL FROM:<a@example.com> AUTH=<> AUTH=<>", "250 2.1.0 Ok"),
    Probe("default", "mail", b"MAIL FROM:<a@example.com> SIZE=1000 SIZE=1000", "250 2.1.0 Ok"),
    Probe("default", "mail", b"MAIL FROM:<a@example.com> BODY=8BITMIME SMTPUTF8", "250 2.1.0 Ok"),
    Probe(
        "default",
        "mail",
        b"MAIL FROM:<a@example.com> ENVID=a+01",
        "501 5.5.4 Bad ENVID parameter syntax",
    ),
    Probe("default", "mail", b'MAIL FROM:"a b"@example.com', "250 2.1.0 Ok"),
    Probe("default", "mail", b'MAIL FROM:<"a b"@example.com> SIZE=10', "250 2.1.0 Ok"),
    Probe("default", "mail", b"MAIL FROM:<@a.example:a@example.com> SIZE=10", "250 2.1.0 Ok"),
    Probe(
        "default",
        "mail",
        b"MAIL FROM:<a@[IPv6:1:2:3:4:5:6:7::]>",
        "501 5.1.7 Bad sender address syntax",
    ),
    Probe("default", "mail", b"MAIL FROM:<a@[IPv6:1:2:3:4:5:6:7:8]>", "250 2.1.0 Ok"),
    Probe("default", "mail", b"MAIL FROM:<a@[ipv6:::1]>", "250 2.1.0 Ok"),
    Probe("default", "mail", b"MAIL FROM:<a@[127.000.000.001]>", "250 2.1.0 Ok"),
    Probe("default", "rcpt", b"RCPT TO:<b@example.com> NOTIFY=NEVER,NEVER", "250 2.1.5 Ok"),
    Probe("default", "rcpt", b"RCPT TO:<b@example.com> ORCPT=rfc822;b\x01", "250 2.1.5 Ok"),
    Probe("default", "rcpt", b"RCPT TO:postmaster", "250 2.1.5 Ok"),
    Probe("default", "helo", b"EHLO to:x", "250-upstream.smtpguard.test"),
    Probe("no_extensions", "mail", b"MAIL FROM:<a@example.com> SIZE=1000", "250 2.1.0 Ok"),
    Probe("no_extensions", "mail", b"MAIL FROM:<a@example.com> BODY=8BITMIME", "250 2.1.0 Ok"),
    Probe("no_extensions", "mail", b"MAIL FROM:<a@example.com> BODY=7BIT", "250 2.1.0 Ok"),
    Probe(
        "no_extensions",
        "mail",
        b"MAIL FROM:<a@example.com> SMTPUTF8",
        "555 5.5.4 Unsupported option: SMTPUTF8",
    ),
    Probe(
        "no_extensions",
        "mail",
        b"MAIL FROM:<a@example.com> RET=HDRS",
        "501 5.7.1 DSN support is disabled",
    ),
    Probe(
        "no_extensions",
        "mail",
        b"MAIL FROM:<a@example.com> ENVID=x",
        "501 5.7.1 DSN support is disabled",
    ),
    Probe("no_extensions", "mail", b"MAIL FROM:<\xc3\xa9@example.com>", "250 2.1.0 Ok"),
    Probe(
        "no_extensions",
        "rcpt",
        b"RCPT TO:<b@example.com> NOTIFY=SUCCESS",
        "501 5.7.1 DSN support is disabled",
    ),
    Probe(
        "no_extensions",
        "rcpt",
        b"RCPT TO:<b@example.com> ORCPT=rfc822;b@example.com",
        "501 5.7.1 DSN support is disabled",
    ),
    Probe("no_extensions", "rcpt", b"RCPT TO:<\xc3\xa9@example.com>", "250 2.1.5 Ok"),
)
# END CORPUS


# -- the runner (needs root and Postfix; never used by the unit tests) ----------


def _reply(stream: Iterator[bytes]) -> list[bytes]:
    lines: list[bytes] = []
    for raw in stream:
        lines.append(raw.rstrip(b"\r\n"))
        if raw[3:4] != b"-":
            break
    return lines or [b"<eof>"]


def ask(address: tuple[str, int], context: str, line: bytes) -> str:
    """Send ``line`` after its context on a fresh connection; Postfix's first reply line."""
    with socket.create_connection(address, timeout=10) as sock, sock.makefile("rb") as stream:
        _reply(stream)
        for setup in SETUP[context]:
            sock.sendall(setup + b"\r\n")
            answer = _reply(stream)
            if answer[-1][:1] != b"2":
                raise RuntimeError(f"{context} setup {setup!r} refused: {answer!r}")
        sock.sendall(line + b"\r\n")
        first = _reply(stream)[0].decode("latin-1")
        try:
            sock.sendall(b"QUIT\r\n")
            _reply(stream)
        except OSError:
            pass
        return first


def ehlo_keywords(address: tuple[str, int]) -> tuple[str, ...]:
    with socket.create_connection(address, timeout=10) as sock, sock.makefile("rb") as stream:
        _reply(stream)
        sock.sendall(b"EHLO c.example\r\n")
        lines = _reply(stream)[1:]
        sock.sendall(b"QUIT\r\n")
        return tuple(line[4:].split()[0].decode() for line in lines)


def probe(
    entries: Iterable[tuple[str, str, bytes]],
) -> tuple[list[Probe], dict[str, tuple[str, ...]]]:
    """Send every (config, context, line) to a fresh private Postfix per configuration."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))
    from peers import Postfix  # the e2e fixtures' private instance

    by_config: dict[str, list[tuple[str, bytes]]] = {}
    for config, context, line in entries:
        by_config.setdefault(config, []).append((context, line))
    out: list[Probe] = []
    keywords: dict[str, tuple[str, ...]] = {}
    for config, lines in by_config.items():
        with Postfix(extra_main_cf=CONFIGS[config]) as postfix:
            keywords[config] = ehlo_keywords(postfix.address)
            for context, line in lines:
                out.append(Probe(config, context, line, ask(postfix.address, context, line)))
    return out, keywords


_NAMES = {
    L300: "L300",
    DOMAIN256: "DOMAIN256",
    DOMAIN254: "DOMAIN254",
    HELO480: "HELO480",
    ENVID101: "ENVID101",
    ENVID100: "ENVID100",
    L65: "L65",
    L64: "L64",
    LABEL64: "LABEL64",
    LABEL63: "LABEL63",
}


def source(line: bytes) -> str:
    """``line`` as a Python expression, long runs by name."""
    for value, name in _NAMES.items():
        head, found, tail = line.partition(value)
        if found:
            parts = [source(head)] if head else []
            parts.append(name)
            if tail:
                parts.append(source(tail))
            return " + ".join(parts)
    return repr(line)


def main(argv: Sequence[str]) -> int:
    entries = [(p.config, p.context, p.line) for p in CORPUS]
    probes, keywords = probe(entries)
    if "--print" in argv:
        for p in probes:
            print(f"    Probe({p.config!r}, {p.context!r}, {source(p.line)}, {p.reply!r}),")
        return 0
    changed = 0
    for config, seen in keywords.items():
        if seen != EHLO_KEYWORDS[config]:
            changed += 1
            print(f"EHLO {config}: {seen} (recorded {EHLO_KEYWORDS[config]})")
    for old, new in zip(CORPUS, probes, strict=True):
        if old.reply != new.reply:
            changed += 1
            print(
                f"{old.config} {old.context} {old.line!r}: {new.reply!r} (recorded {old.reply!r})"
            )
    if "--canonical" in argv:
        changed += _canonical()
    print(f"{len(probes)} lines probed, {changed} differences")
    return 1 if changed else 0


def _canonical() -> int:
    """Send the normalize-mode form of every accepted line: Postfix must accept it too."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from smtpguard.protocol.rules import VERB_BY_NAME, Verb
    from smtpguard.protocol.syntax import Mode, Offered, check

    entries = []
    for p in CORPUS:
        if not p.accepted:
            continue
        offered = Offered() if p.context == "mail_helo" else Offered.of(EHLO_KEYWORDS[p.config])
        verb = VERB_BY_NAME.get(p.line.split(None, 1)[0].upper(), Verb.UNKNOWN)
        verdict = check(
            verb,
            p.line,
            mode=Mode.NORMALIZE,
            offered=offered,
            smtputf8_transaction=p.context == "rcpt_utf8",
        )
        if verdict.forward is not None and verdict.forward != p.line:
            entries.append((p.config, p.context, verdict.forward))
    probes, _ = probe(entries)
    refused = [p for p in probes if not p.accepted]
    for p in refused:
        print(f"canonical form refused: {p}")
    print(f"{len(probes)} canonical forms probed, {len(refused)} refused")
    return len(refused)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
