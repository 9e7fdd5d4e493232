"""Command arguments: parse with the RFC 5321 grammar, give the canonical form or a reason.

Theory of operation
-------------------

:func:`check` takes one command line (with or without its CRLF) and returns a
:class:`Verdict`: the canonical form of the line, whether it differs from the
input, the :class:`Reason` if something is wrong, and the local reply when
the line must not reach the upstream.  It is a pure function: no I/O, no
state; the caller says which extensions were offered (:class:`Offered`) and
whether the transaction's MAIL carried ``SMTPUTF8``.

What a verb's argument must look like is data (``SHAPE_OF``):

``MAIL`` / ``RCPT``
    ``MAIL FROM:`` Reverse-path, ``RCPT TO:`` Forward-path (or
    ``<Postmaster>``), then ESMTP parameters (RFC 5321 4.1.2, RFC 6531 3.3).
``EHLO`` / ``HELO``
    a Domain or an address literal (RFC 5321 4.1.1.1).
``RSET`` ``DATA`` ``QUIT`` ``STARTTLS``
    no argument.
``NOOP`` ``VRFY`` ``EXPN`` ``HELP`` ``ETRN``
    a free argument, left as sent.
anything else (``AUTH``, ``BDAT``, ``XCLIENT``, unknown verbs)
    opaque: returned unchanged.  ``AUTH`` carries credentials and ``BDAT``
    is framing; neither is this module's business.

The line is first cut the way Postfix's ``smtpd_token()`` cuts it: white space
separates words, except inside ``<...>`` (nested) and ``"..."`` groups, and a
backslash protects the next octet; ``FROM:`` and ``TO:`` end a word.  So the
path and the parameters are the words Postfix would see, and rewriting the
space between words never changes what Postfix reads.

Canonical form (what ``normalize`` and ``strict`` forward):

- the verb in upper case, one SP before the argument, no trailing white space;
- ``MAIL FROM:<path>`` / ``RCPT TO:<path>``: no space after the colon, angle
  brackets added around a bare address, a source route (``<@a,@b:u@c>``)
  dropped (RFC 5321 4.1.1.3 and appendix C allow it);
- words separated by one SP; parameter keywords in upper case, and the values
  of ``BODY``, ``RET`` and ``NOTIFY`` (keywords from a closed set);
- a path the grammar cannot read is kept as sent (Postfix accepts many:
  see the table below), and so is the inside of a quoted string or of a
  free argument;
- ``QUIT`` loses a stray argument (Postfix ignores it).

Each finding has a *level*, and the :class:`Mode` decides which levels refuse:

=====================================  =========  ===========  ========
finding                                observe    normalize    strict
=====================================  =========  ===========  ========
parameter of an extension not offered  555        555          555
known parameter, bad value (Postfix's  501        501          501
rules) or repeated where Postfix
refuses a repeat
no ``FROM:`` / ``TO:``, no path, an    forwarded  501          501
unterminated ``<`` or ``"``,
``RCPT TO:<>``, EHLO/HELO without
argument
path or EHLO name outside the RFC      forwarded  forwarded    501
5321 grammar; control character;
8-bit octet outside SMTPUTF8 (553);
RFC 5321 4.5.3.1 limits; LDH labels
over 63 octets; an RSET/DATA/STARTTLS
argument; VRFY/EXPN/ETRN without one;
a parameter value outside its RFC
grammar; any repeated parameter
``QUIT`` with an argument (dropped)    forwarded  forwarded    forwarded
=====================================  =========  ===========  ========

``observe`` forwards the line as it came; the other modes forward the
canonical form.  Two parameters bend the "not offered: 555" rule outside
``strict``, because Postfix 3.7 accepts them unadvertised
(``Unadvertised``): ``BODY=7BIT``/``BODY=8BITMIME`` without ``8BITMIME``
pass (the ``body.eight_bit`` policy decides), and ``AUTH=`` without ``AUTH``
is dropped from the canonical form (RFC 4954 5: a server that does not trust
the client behaves as if ``AUTH=<>`` were given, so nothing is lost).

Limits (``strict``): local part 64 octets, domain 255, path 256 including
the brackets (RFC 5321 4.5.3.1.1-3), measured on the canonical path (a
dropped source route does not count); LDH labels of at most 63 octets (RFC
1035 2.3.4), for a U-label its A-label (RFC 5890 2.3.2.1).  8-bit octets in a
path or a parameter value only when the transaction is SMTPUTF8 (MAIL
carried ``SMTPUTF8`` and the upstream offered it), and then valid UTF-8; the
EHLO/HELO name and free arguments are ASCII.  Octets that group words for
``smtpd_token()`` (``<``, ``>``, ``"``, ``\\``) cannot be used unquoted in a
parameter value or a general address literal: Postfix could not read them
either.

What Postfix accepts (the ``normalize`` contract)
-------------------------------------------------

Probed on 2026-12-03 against Postfix 3.7.11 with its defaults
(``strict_rfc821_envelopes = no``, ``smtputf8_enable = yes``, no SASL),
after ``EHLO``; the full corpus, with every answer, is
``tests/support/postfix_probe.py``.  ``normalize`` refuses none of the
accepted lines.

===============================================  =========================================
line (after MAIL FROM: / RCPT TO: / EHLO)        Postfix 3.7
===============================================  =========================================
``MAIL FROM: <a@x>``, ``MAIL FROM:a@x``,         250 (any white space after the colon, a
``mail from:<a@x>``, ``MAIL FROM:<a@x>  ``       bare address, any case, trailing space)
``MAIL FROM:garbage``, ``<garbage>``, ``<a>``,   250: no domain, no ``@``, a route, a
``<@x>``, ``<@a,@b:u@x>``, ``<a..b@x>``,         dotted local part out of the grammar,
``<.a@x>``, ``<a@b@x>``, ``<a(c)@x>``,            comments, doubled brackets, a trailing
``<<a@x>>``, ``a@x>``, ``<a@x>(c)``,             dot, ``_`` in a domain
``<a@x.>``, ``<a@ex_ample.com>``
``<a\\x01b@x>``, ``<a\\x7fb@x>``                   250: control characters in a local part
``<\\xc3\\xa9@x>`` without SMTPUTF8                 250 (8-bit UTF-8 local part)
local part of 65 or 300 octets                   250 (no length limit on local parts)
``SIZE=1 SIZE=2``, ``BODY=7BIT BODY=8BITMIME``,  250 (repeats accepted)
``SMTPUTF8 SMTPUTF8``, ``NOTIFY=SUCCESS,``,
``NOTIFY=SUCCESS,SUCCESS``, ``ORCPT=rfc822;``,
``ENVID=a=b``, ``ENVID=`` of 101 octets,
``SIZE=0001000``, ``<a@x>\vSIZE=1`` (VT)
``AUTH=<>``, twice (AUTH not advertised)         250 (ignored)
``EHLO a b``, ``HELO [300.1.1.1]``, ``HELO -b-``, 250 (no HELO checks by default)
480-octet HELO, ``EHLO c\\x01.x``,
``EHLO \\xc3\\xa9.x``, ``HELO "q"``, ``HELO <c>``
``MAIL ... SIZE=1`` / ``BODY`` / ``SMTPUTF8`` /  250 after HELO (smtpguard: 555, the
``RET=HDRS`` after HELO                          extensions were not offered)
``VRFY \\x01``, ``NOOP \\x01``, ``QUIT x``          252, 250, 221
``MAIL FROM :<a@x>``, ``FROM <a@x>``,            501 5.5.4 Syntax: MAIL FROM:<address>
``FROM<a@x>``, ``MAIL <a@x>``, ``MAIL FROM:``
``<a@x``, ``<a@x>garbage``, ``<a@x>SIZE=1``,     501 5.1.7 Bad sender address syntax
``<a@x>,<b@x>``, ``<a b@x>``, ``<a;b@x>``,       (5.1.3 for RCPT)
``<a[b]@x>``, ``<a@-x.com>``, ``<a@x..com>``,
``<a@>``, ``<@>``, label of 64, domain of 256,
``[300.1.1.1]``, ``[1.2.3]``, ``[x-tag:abc]``,
``[IPv6:zz::1]``, ``[IPv6:1:2:3:4:5:6:7::]``,
``ENVID=a+01`` (a NUL), UTF-8 domain without
SMTPUTF8, ``RCPT TO:<>``
invalid UTF-8 anywhere (also in EHLO)            500 5.5.2 Error: bad UTF-8 syntax
``<a@x> <b@x>``, ``Name <a@x>``, ``XFOO=bar``,   555 5.5.4 Unsupported option: ...
``SIZE``, ``BODY=FOO``, ``BODY=BINARYMIME``,
``SMTPUTF8=yes``, ``MT-PRIORITY=3``,
``REQUIRETLS``, ``NOTIFY=`` on MAIL, ``SIZE=``
on RCPT, ``SMTPUTF8`` when not advertised
``SIZE=abc``, ``SIZE=``, ``SIZE=-1``,            501 5.5.4 Bad message size syntax / Bad
``RET=FOO``, ``RET=FULL RET=HDRS``,              RET / ENVID parameter syntax / Error: Bad
``ENVID=a+zz``, ``ENVID=``, ``ENVID=\\xc3\\xa9``,   NOTIFY / ORCPT parameter syntax
``NOTIFY=NEVER,SUCCESS``, ``NOTIFY=FOO``,
repeated NOTIFY/ORCPT/ENVID, ``ORCPT=rfc822``,
``ORCPT=;a``
DSN parameters with DSN not advertised           501 5.7.1 DSN support is disabled
``SIZE=`` / ``BODY=8BITMIME`` with SIZE /        250 (smtpguard: 555 for SIZE, BODY passes)
8BITMIME not advertised
``RSET x``                                       501 5.5.4 Syntax: RSET
``SIZE=`` of 23 digits, ``SIZE=20000000``        552 5.3.4 (a size, not a syntax matter:
                                                 forwarded)
===============================================  =========================================

The canonical form of every line of the corpus that Postfix accepted was
sent to Postfix too (``postfix_probe.py --canonical``): all 49 that differ
from the line as sent were accepted.

smtpguard's answers differ from Postfix's on purpose in three places: a
parameter value or a refused line gets 501 where Postfix says 555 (``SIZE``
with no value, ``BODY=FOO``): both refuse; parameters after ``HELO`` are
refused (RFC 5321 2.2.1 and 4.1.1.11: only extensions the EHLO reply
offered), where Postfix accepts ``SIZE``, ``BODY``, ``SMTPUTF8`` and
``RET``; ``SIZE`` when the upstream hid ``SIZE``
(``smtpd_discard_ehlo_keywords``) gets 555.

Logging: the fields meant for logs and metrics (``reason``,
``argument_bytes``, ``octet``) never carry the argument itself, because
addresses are personal data.  ``forward`` and ``canonical`` are the line:
send them, do not log them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from . import replies as R
from .replies import Reply
from .rules import FastEnum, Verb


class Mode(FastEnum):
    """What ``policy.syntax`` does with a line (see the table above)."""

    #: Judge and report, forward the line as it came (parameters are still checked).
    OBSERVE = "observe"
    #: Forward the canonical form; refuse only what cannot be parsed at all.
    NORMALIZE = "normalize"
    #: As normalize, and refuse anything outside the RFC 5321 grammar and limits.
    STRICT = "strict"


class Reason(FastEnum):
    """What is wrong with a line: the closed label set of ``reason``."""

    #: MAIL without ``FROM:``, RCPT without ``TO:`` (also ``FROM :``, ``FROM<``).
    MISSING_FROM_TO = "missing_from_to"
    #: MAIL/RCPT without a path, EHLO/HELO without a name.
    MISSING_ARGUMENT = "missing_argument"
    #: RSET, DATA, QUIT or STARTTLS with an argument.
    UNEXPECTED_ARGUMENT = "unexpected_argument"
    #: Not a Path: brackets, route, local part or ``@`` (also ``RCPT TO:<>``).
    PATH_SYNTAX = "path_syntax"
    #: A local part over 64 octets (RFC 5321 4.5.3.1.1).
    LOCAL_PART_TOO_LONG = "local_part_too_long"
    #: A domain over 255 octets (RFC 5321 4.5.3.1.2).
    DOMAIN_TOO_LONG = "domain_too_long"
    #: A path over 256 octets, brackets included (RFC 5321 4.5.3.1.3).
    PATH_TOO_LONG = "path_too_long"
    #: A domain label over 63 octets (RFC 1035 2.3.4; A-label of a U-label).
    LABEL_TOO_LONG = "label_too_long"
    #: A domain label that is not letters, digits and inner hyphens, or empty.
    BAD_DOMAIN = "bad_domain"
    #: ``[...]`` that is no IPv4, ``IPv6:`` or general address literal.
    BAD_ADDRESS_LITERAL = "bad_address_literal"
    #: An EHLO/HELO argument of more than one word.
    BAD_HELO = "bad_helo"
    #: An octet 0-31 or 127 in an argument.
    CONTROL_CHARACTER = "control_character"
    #: An octet over 127 outside an SMTPUTF8 transaction (RFC 6531).
    EIGHT_BIT = "eight_bit"
    #: 8-bit octets that are not UTF-8 (RFC 6531 3.3).
    BAD_UTF8 = "bad_utf8"
    #: A parameter of no extension offered, or malformed, or on the wrong verb.
    UNKNOWN_PARAMETER = "unknown_parameter"
    #: A known parameter with a missing, extra or malformed value.
    BAD_PARAMETER_VALUE = "bad_parameter_value"
    #: The same parameter twice in one command.
    DUPLICATE_PARAMETER = "duplicate_parameter"


class OctetClass(FastEnum):
    """The kind of octet at fault, for logs (never the octet itself)."""

    #: 0-31 or 127.
    CONTROL = "control"
    #: 128-255.
    EIGHT_BIT = "eight_bit"
    #: SP.
    SPACE = "space"
    #: Printable ASCII that is not a letter or digit.
    PUNCTUATION = "punctuation"
    #: A letter or a digit (e.g. in an IPv4 literal).
    ALPHANUMERIC = "alphanumeric"


class Shape(FastEnum):
    """What a verb's argument looks like."""

    #: ``FROM:`` Reverse-path, then ESMTP parameters.
    MAIL = "mail"
    #: ``TO:`` Forward-path, then ESMTP parameters.
    RCPT = "rcpt"
    #: A Domain or an address literal.
    HELLO = "hello"
    #: Nothing.
    NO_ARGUMENT = "no_argument"
    #: Anything; only its octets are judged.
    FREE = "free"
    #: Not judged at all (credentials, framing, verbs we do not know).
    OPAQUE = "opaque"


#: The shape of each verb's argument; verbs absent here are opaque.
SHAPE_OF: dict[Verb, Shape] = {
    Verb.MAIL: Shape.MAIL,
    Verb.RCPT: Shape.RCPT,
    Verb.EHLO: Shape.HELLO,
    Verb.HELO: Shape.HELLO,
    Verb.RSET: Shape.NO_ARGUMENT,
    Verb.DATA: Shape.NO_ARGUMENT,
    Verb.QUIT: Shape.NO_ARGUMENT,
    Verb.STARTTLS: Shape.NO_ARGUMENT,
    Verb.NOOP: Shape.FREE,
    Verb.VRFY: Shape.FREE,
    Verb.EXPN: Shape.FREE,
    Verb.HELP: Shape.FREE,
    Verb.ETRN: Shape.FREE,
}

#: No-argument verbs whose stray argument is dropped: nothing else can be meant.
ARGUMENT_DROPPED = frozenset({Verb.QUIT})

#: Free-argument verbs whose argument the grammar requires (RFC 5321 4.1.1.6,
#: 4.1.1.7, RFC 1985): refused without one in strict mode (Postfix: 501).
ARGUMENT_REQUIRED = frozenset({Verb.VRFY, Verb.EXPN, Verb.ETRN})


@dataclass(frozen=True, slots=True)
class Offered:
    """The ESMTP extensions a client may use: EHLO keywords in upper case.

    Pass the keywords the client was shown that the upstream also
    advertised (with ``ehlo.Capabilities``: ``Offered(caps.offered &
    caps.upstream)``); after HELO, nothing (``Offered()``).
    """

    keywords: frozenset[bytes] = frozenset()

    @classmethod
    def of(cls, keywords: Iterable[bytes | str]) -> Offered:
        """From EHLO keywords in any case, as bytes or str."""
        return cls(
            frozenset((k.encode("ascii") if isinstance(k, str) else k).upper() for k in keywords)
        )

    def __contains__(self, keyword: object) -> bool:
        return keyword in self.keywords


class Unadvertised(FastEnum):
    """What happens to a parameter whose extension was not offered."""

    #: Refused with 555 in every mode (the rule).
    REFUSE = "refuse"
    #: Forwarded in observe and normalize, refused in strict.
    PASS = "pass"
    #: Left out of the canonical form in normalize, refused in strict.
    DROP = "drop"


@dataclass(frozen=True, slots=True)
class Parameter:
    """One MAIL/RCPT parameter: its extension, verb and value rules."""

    #: The EHLO keyword that makes it valid.
    extension: bytes
    #: MAIL or RCPT.
    verb: Verb
    #: ``KEYWORD=value`` (True) or a bare ``KEYWORD`` (False).
    has_value: bool
    #: Values Postfix 3.7 accepts (outside strict mode a value must pass this).
    lenient: Callable[[bytes], bool]
    #: Values the RFC grammar allows (strict mode); called after ``lenient``.
    strict: Callable[[bytes], bool]
    #: The value is a keyword from a closed set: upper-cased in the canonical form.
    upper: bool = False
    #: Postfix refuses a repeat: refused in every mode (others only in strict).
    once: bool = False
    #: What happens when ``extension`` was not offered.
    unadvertised: Unadvertised = Unadvertised.REFUSE


def _anything(value: bytes) -> bool:
    return True


_DIGITS = re.compile(rb"[0-9]+\Z")
# RFC 3461 4: xtext = *( xchar / hexchar ), hexchar with upper-case hex digits.
_XTEXT = re.compile(rb"(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-F]{2})*\Z")
# Postfix's xtext_unquote(): any octet; "+" must be followed by two hex digits.
_XTEXT_LENIENT = re.compile(rb"(?:[^+]|\+[0-9A-Fa-f]{2})*\Z", re.S)
_HEXCHAR = re.compile(rb"\+([0-9A-Fa-f]{2})")
# RFC 5322 atom (ORCPT's addr-type).
_ATOM = re.compile(rb"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+\Z")
# RFC 3339 date-time (FUTURERELEASE, RRVS).
_DATE_TIME = (
    rb"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt][0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]+)?"
    rb"(?:[Zz]|[+-][0-9]{2}:[0-9]{2})"
)


def _size(value: bytes) -> bool:
    return _DIGITS.match(value) is not None


def _size_strict(value: bytes) -> bool:
    return len(value) <= 20  # RFC 1870: size-value = 1*20DIGIT


def _body(value: bytes) -> bool:
    return value.upper() in (b"7BIT", b"8BITMIME", b"BINARYMIME")


def _ret(value: bytes) -> bool:
    return value.upper() in (b"FULL", b"HDRS")


def _envid(value: bytes) -> bool:
    # Postfix: xtext that decodes to printable ASCII, not empty.
    if not value or _XTEXT_LENIENT.match(value) is None:
        return False
    decoded = _HEXCHAR.sub(lambda m: bytes([int(m[1], 16)]), value)
    return all(0x20 <= c <= 0x7E for c in decoded)


def _envid_strict(value: bytes) -> bool:
    return len(value) <= 100 and _XTEXT.match(value) is not None  # RFC 3461 4.4


_NOTIFY_WORDS = frozenset({b"SUCCESS", b"FAILURE", b"DELAY"})


def _notify(value: bytes) -> bool:
    # Postfix's dsn_notify_mask(): empty items are skipped, NEVER stands alone.
    words = [w for w in value.upper().split(b",") if w]
    if not words:
        return False
    if b"NEVER" in words:
        return all(w == b"NEVER" for w in words)
    return all(w in _NOTIFY_WORDS for w in words)


def _notify_strict(value: bytes) -> bool:
    words = value.upper().split(b",")
    if words == [b"NEVER"]:
        return True
    return all(w in _NOTIFY_WORDS for w in words) and len(set(words)) == len(words)


def _orcpt(value: bytes) -> bool:
    kind, semicolon, address = value.partition(b";")
    return bool(semicolon and kind) and _XTEXT_LENIENT.match(address) is not None


def _orcpt_strict(value: bytes) -> bool:
    # RFC 3461 4.2: addr-type ";" xtext, at most 500 characters; RFC 6533
    # utf-8 addresses are xtext-like, or raw UTF-8 in an SMTPUTF8 transaction
    # (the octet rules have already decided whether 8-bit may appear).
    kind, _, address = value.partition(b";")
    if len(value) > 500 or _ATOM.match(kind) is None:
        return False
    return _XTEXT.match(bytes(c for c in address if c < 0x80)) is not None


def _auth_strict(value: bytes) -> bool:
    return value == b"<>" or _XTEXT.match(value) is not None  # RFC 4954 5


def _pattern(regex: bytes) -> Callable[[bytes], bool]:
    compiled = re.compile(regex + rb"\Z")

    def match(value: bytes) -> bool:
        return compiled.match(value) is not None

    return match


#: Every MAIL/RCPT parameter smtpguard knows, by upper-case keyword.  Only the
#: extensions ``ehlo.RELAYED`` passes to clients have parameters here.
PARAMETERS: dict[bytes, Parameter] = {
    # RFC 1870.  Postfix accepts SIZE unadvertised, but the rule holds.
    b"SIZE": Parameter(b"SIZE", Verb.MAIL, True, _size, _size_strict),
    # RFC 6152 / RFC 3030; BINARYMIME needs its own keyword (VALUE_EXTENSION).
    b"BODY": Parameter(
        b"8BITMIME", Verb.MAIL, True, _body, _anything, upper=True, unadvertised=Unadvertised.PASS
    ),
    # RFC 6531 3.4.
    b"SMTPUTF8": Parameter(b"SMTPUTF8", Verb.MAIL, False, _anything, _anything),
    # RFC 3461 4.3, 4.4, 4.1, 4.2.
    b"RET": Parameter(b"DSN", Verb.MAIL, True, _ret, _anything, upper=True, once=True),
    b"ENVID": Parameter(b"DSN", Verb.MAIL, True, _envid, _envid_strict, once=True),
    b"NOTIFY": Parameter(b"DSN", Verb.RCPT, True, _notify, _notify_strict, upper=True, once=True),
    b"ORCPT": Parameter(b"DSN", Verb.RCPT, True, _orcpt, _orcpt_strict, once=True),
    # RFC 4954 5.
    b"AUTH": Parameter(
        b"AUTH", Verb.MAIL, True, _anything, _auth_strict, once=True, unadvertised=Unadvertised.DROP
    ),
    # RFC 6710 3 (priority -9 to 9), RFC 8689 4.
    b"MT-PRIORITY": Parameter(b"MT-PRIORITY", Verb.MAIL, True, _anything, _pattern(rb"[+-]?[0-9]")),
    b"REQUIRETLS": Parameter(b"REQUIRETLS", Verb.MAIL, False, _anything, _anything),
    # RFC 2852 4, RFC 4865 3, RFC 7293 3, RFC 4405 4, RFC 3865 3.
    b"BY": Parameter(
        b"DELIVERBY", Verb.MAIL, True, _anything, _pattern(rb"[+-]?[0-9]{1,9};[NRnr][Tt]?")
    ),
    b"HOLDFOR": Parameter(b"FUTURERELEASE", Verb.MAIL, True, _anything, _pattern(rb"[0-9]{1,9}")),
    b"HOLDUNTIL": Parameter(b"FUTURERELEASE", Verb.MAIL, True, _anything, _pattern(_DATE_TIME)),
    b"RRVS": Parameter(
        b"RRVS", Verb.RCPT, True, _anything, _pattern(_DATE_TIME + rb"(?:;[CRcr])?")
    ),
    b"SUBMITTER": Parameter(b"SUBMITTER", Verb.MAIL, True, _anything, _auth_strict),
    b"SOLICIT": Parameter(b"NO-SOLICITING", Verb.MAIL, True, _anything, _anything),
}

#: Parameter values that need an extension of their own (RFC 3030 3).
VALUE_EXTENSION: dict[tuple[bytes, bytes], bytes] = {(b"BODY", b"BINARYMIME"): b"BINARYMIME"}


class _Level(FastEnum):
    """How bad a finding is; the mode decides which levels refuse."""

    NOTE = "note"  # never refused
    STRICT = "strict"  # refused in strict mode
    FATAL = "fatal"  # cannot be parsed: refused in normalize and strict
    ALWAYS = "always"  # refused in every mode


_REFUSING: dict[Mode, frozenset[_Level]] = {
    Mode.OBSERVE: frozenset({_Level.ALWAYS}),
    Mode.NORMALIZE: frozenset({_Level.ALWAYS, _Level.FATAL}),
    Mode.STRICT: frozenset({_Level.ALWAYS, _Level.FATAL, _Level.STRICT}),
}

Fields = tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class _Finding:
    reason: Reason
    level: _Level
    reply: Reply
    fields: Fields = ()
    octet: OctetClass | None = None


@dataclass(frozen=True, slots=True)
class Verdict:
    """What to do with one command line."""

    #: What to send upstream (the input in observe mode, else the canonical
    #: form), or None when the line is refused.
    forward: bytes | None
    #: The canonical form, ending like the input (CRLF or nothing).
    canonical: bytes
    #: The canonical form differs from the input.
    changed: bool
    #: Why the line was refused, or what is suspect in a forwarded line.
    reason: Reason | None = None
    #: The local reply when refused (render with :meth:`render_reply`).
    reply: Reply | None = None
    #: Fields of the reply's text template.
    reply_fields: Fields = ()
    #: Length of the argument (after the verb) in octets, for logs.
    argument_bytes: int = 0
    #: The kind of octet at fault, for logs.
    octet: OctetClass | None = None

    @property
    def refused(self) -> bool:
        """The line must be answered locally and not forwarded."""
        return self.forward is None

    def render_reply(self, enhanced: bool) -> bytes:
        """The local reply on the wire; only for a refused line."""
        if self.reply is None:
            raise ValueError("the line was not refused")
        return self.reply.render(enhanced, **dict(self.reply_fields))


# -- octets ------------------------------------------------------------------

#: White space that separates words (Postfix's ISSPACE).
_SEPARATORS = b" \t\n\v\f\r"
_SEPARATOR_SET = frozenset(_SEPARATORS)
_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")
_HIGH = re.compile(rb"[\x80-\xff]")


def octet_class(octet: int) -> OctetClass:
    """The class of one octet."""
    if octet >= 0x80:
        return OctetClass.EIGHT_BIT
    if octet < 0x20 or octet == 0x7F:
        return OctetClass.CONTROL
    if octet == 0x20:
        return OctetClass.SPACE
    if chr(octet).isalnum():
        return OctetClass.ALPHANUMERIC
    return OctetClass.PUNCTUATION


def _octets(data: bytes, eight_bit_ok: bool) -> tuple[Reason, OctetClass] | None:
    """Control characters, then 8-bit octets (not allowed, or not UTF-8)."""
    if _CONTROL.search(data) is not None:
        return Reason.CONTROL_CHARACTER, OctetClass.CONTROL
    if data.isascii():
        return None
    if not eight_bit_ok:
        return Reason.EIGHT_BIT, OctetClass.EIGHT_BIT
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return Reason.BAD_UTF8, OctetClass.EIGHT_BIT
    return None


def _first_outside(data: bytes, allowed: re.Pattern[bytes]) -> OctetClass | None:
    """The class of the first octet that ``allowed`` (one-octet class) rejects."""
    for octet in data:
        if allowed.match(bytes((octet,))) is None:
            return octet_class(octet)
    return None


# -- words (Postfix's smtpd_token) -------------------------------------------


def _group(data: bytes, i: int, last: int) -> tuple[int, bool]:
    """Skip a ``<...>`` or ``"..."`` group from ``i`` (after its opener)."""
    wanted = [last]
    n = len(data)
    while i < n:
        c = data[i]
        i += 1
        if c == 0x5C:  # backslash: the next octet is protected
            if i >= n:
                return i, False
            i += 1
        elif c == wanted[-1]:
            if len(wanted) == 1:
                return i, True
            wanted.pop()
        elif c == 0x22:
            wanted.append(0x22)  # a quote inside anything
        elif c == 0x3C and wanted[-1] == 0x3E:
            wanted.append(0x3E)  # nested brackets
    return i, False


def words(data: bytes, colon_ends: bool = True) -> list[tuple[bytes, bool]]:
    """Cut ``data`` into words as Postfix's ``smtpd_token()`` does.

    Returns each word as sent, and whether its groups were all closed.  With
    ``colon_ends``, ``FROM:`` and ``TO:`` (any case) end a word.
    """
    out: list[tuple[bytes, bool]] = []
    i, n = 0, len(data)
    while True:
        while i < n and data[i] in _SEPARATOR_SET:
            i += 1
        if i >= n:
            return out
        start, complete = i, True
        while i < n:
            c = data[i]
            if c in _SEPARATOR_SET:
                break
            i += 1
            if c == 0x3C or c == 0x22:
                i, closed = _group(data, i, 0x3E if c == 0x3C else 0x22)
                complete = complete and closed
            elif c == 0x5C:
                i = min(i + 1, n)
            elif c == 0x3A and colon_ends and data[start:i].lower() in (b"from:", b"to:"):
                break
        out.append((data[start:i], complete))


# -- the grammar (RFC 5321 4.1.2, 4.1.3; RFC 6531 3.3) ------------------------

_ATEXT = rb"A-Za-z0-9!#$%&'*+/=?^_`{|}~\-"
_DOT_STRING = re.compile(rb"[%s\x80-\xff]+(?:\.[%s\x80-\xff]+)*\Z" % (_ATEXT, _ATEXT))
_QUOTED_STRING = re.compile(rb'"(?:[\x20\x21\x23-\x5b\x5d-\x7e\x80-\xff]|\\[\x20-\x7e])*"\Z')
_LOCAL_OCTET = re.compile(rb'[%s.\x80-\xff"\\ ]' % _ATEXT)
_DOT_OCTET = re.compile(rb"[%s.\x80-\xff]" % _ATEXT)
_QUOTED_PART = re.compile(rb'"(?:[^"\\]|\\.)*"', re.S)
_LDH_LABEL = re.compile(rb"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\Z")
_U_LABEL = re.compile(rb"[A-Za-z0-9\x80-\xff](?:[A-Za-z0-9\x80-\xff-]*[A-Za-z0-9\x80-\xff])?\Z")
_LABEL_OCTET = re.compile(rb"[A-Za-z0-9\x80-\xff]")
_LITERAL_OCTET = re.compile(rb"[\x21-\x5a\x5e-\x7e]")
_IPV4 = re.compile(rb"([0-9]{1,3})\.([0-9]{1,3})\.([0-9]{1,3})\.([0-9]{1,3})\Z")
_IPV6_HEX = re.compile(rb"[0-9A-Fa-f]{1,4}\Z")
_LDH_STR = re.compile(rb"[A-Za-z0-9-]*[A-Za-z0-9]\Z")
_DCONTENT = re.compile(rb"[\x21-\x5a\x5e-\x7e]+\Z")
_KEYWORD = re.compile(rb"[A-Za-z0-9][A-Za-z0-9-]*\Z")
_KEYWORD_OCTET = re.compile(rb"[A-Za-z0-9-]")
_ESMTP_VALUE = re.compile(rb"[\x21-\x3c\x3e-\x7e\x80-\xff]+\Z")
_ROUTE = re.compile(rb"@(?:\[[^\]]*\]|[^,:@\[\]]*)(?:,@(?:\[[^\]]*\]|[^,:@\[\]]*))*:")

LOCAL_PART_MAX_OCTETS = 64  # RFC 5321 4.5.3.1.1
DOMAIN_MAX_OCTETS = 255  # RFC 5321 4.5.3.1.2
PATH_MAX_OCTETS = 256  # RFC 5321 4.5.3.1.3, brackets included
LABEL_MAX_OCTETS = 63  # RFC 1035 2.3.4


def _ipv4(text: bytes) -> bool:
    """IPv4-address-literal: Snum 3("." Snum), each Snum 0-255."""
    m = _IPV4.match(text)
    return m is not None and all(int(g) <= 255 for g in m.groups())


def _hex_groups(text: bytes, most: int) -> list[bytes] | None:
    """``IPv6-hex *(":" IPv6-hex)`` with at most ``most`` groups ("" is none)."""
    if not text:
        return []
    groups = text.split(b":")
    if len(groups) > most or not all(_IPV6_HEX.match(g) for g in groups):
        return None
    return groups


def _ipv6(text: bytes) -> bool:
    """IPv6-addr: IPv6-full / IPv6-comp / IPv6v4-full / IPv6v4-comp.

    A trailing IPv4 part counts as two groups: then IPv6v4-full is IPv6-full
    (8 groups) and IPv6v4-comp's "at most 4 groups besides :: and the IPv4
    part" is IPv6-comp's "at most 6 groups besides ::".
    """
    if b"." in text:
        head, colon, tail = text.rpartition(b":")
        if not colon or not _ipv4(tail):
            return False
        text = head + b":0:0"
    left, double, right = text.partition(b"::")
    if not double:
        groups = _hex_groups(text, 8)
        return groups is not None and len(groups) == 8
    lg = _hex_groups(left, 6)
    rg = _hex_groups(right, 6)
    return lg is not None and rg is not None and len(lg) + len(rg) <= 6


def _literal(text: bytes) -> bool:
    """address-literal, brackets included (RFC 5321 4.1.3)."""
    if len(text) < 3 or text[0] != 0x5B or text[-1] != 0x5D:
        return False
    inner = text[1:-1]
    if _ipv4(inner):
        return True
    tag, colon, rest = inner.partition(b":")
    if not colon:
        return False
    if tag.upper() == b"IPV6":
        return _ipv6(rest)
    # A General-address-literal's tag must be registered with IANA (RFC 5321
    # 4.1.3), and IPv6 is the only one: any other is refused in strict mode
    # (Postfix refuses it too: 501 5.1.7).
    return False


def _domain_fault(domain: bytes) -> tuple[Reason, OctetClass | None] | None:
    """Is ``domain`` a Domain (LDH labels, or U-labels) or an address literal?"""
    if domain.startswith(b"["):
        if _literal(domain):
            return None
        return Reason.BAD_ADDRESS_LITERAL, _first_outside(domain[1:-1], _LITERAL_OCTET)
    if not domain:
        return Reason.BAD_DOMAIN, None
    for label in domain.split(b"."):
        pattern = _LDH_LABEL if label.isascii() else _U_LABEL
        if pattern.match(label) is None:
            return Reason.BAD_DOMAIN, (
                _first_outside(label, _LABEL_OCTET) if label else OctetClass.PUNCTUATION
            )
    return None


def _domain_limits(domain: bytes) -> Reason | None:
    """RFC 5321 4.5.3.1.2 and the label limit, for a domain that parsed."""
    if len(domain) > DOMAIN_MAX_OCTETS:
        return Reason.DOMAIN_TOO_LONG
    if domain.startswith(b"["):
        return None
    for label in domain.split(b"."):
        if label.isascii():
            if len(label) > LABEL_MAX_OCTETS:
                return Reason.LABEL_TOO_LONG
        else:
            try:
                a_label = b"xn--" + label.decode("utf-8").encode("punycode")
            except UnicodeError:
                return Reason.BAD_UTF8
            if len(a_label) > LABEL_MAX_OCTETS:
                return Reason.LABEL_TOO_LONG
    return None


def _split_mailbox(mailbox: bytes) -> tuple[bytes, bytes] | None:
    """Local part and domain, split at the ``@`` after the local part."""
    if mailbox.startswith(b'"'):
        i, n = 1, len(mailbox)
        while i < n and mailbox[i] != 0x22:
            i += 2 if mailbox[i] == 0x5C else 1
        if i >= n or mailbox[i + 1 : i + 2] != b"@":
            return None
        return mailbox[: i + 1], mailbox[i + 2 :]
    # A Dot-string holds no "@": the first one ends it (a general address
    # literal may hold more).  "a@b@c" is no Mailbox at all.
    local, at, domain = mailbox.partition(b"@")
    if not at or (b"@" in domain and not domain.startswith(b"[")):
        return None
    return local, domain


@dataclass(frozen=True, slots=True)
class _Path:
    """A path that parsed: its canonical form, and its parts for the limits."""

    canonical: bytes
    local: bytes = b""
    domain: bytes = b""


def _parse_path(word: bytes, rcpt: bool) -> _Path | tuple[Reason, OctetClass | None, bool]:
    """Parse a MAIL/RCPT path (brackets optional).

    Returns the parsed path, or (reason, octet class, fatal).
    """
    bracketed = word.startswith(b"<") and word.endswith(b">") and len(word) >= 2
    inner = word[1:-1] if bracketed else word
    unquoted = _QUOTED_PART.sub(b"", inner)
    if b"<" in unquoted or b">" in unquoted:
        return Reason.PATH_SYNTAX, OctetClass.PUNCTUATION, False
    if not inner:
        if rcpt:  # RCPT TO:<>: no recipient at all (Postfix refuses it too)
            return Reason.PATH_SYNTAX, None, True
        return _Path(b"<>")
    if rcpt and inner.lower() == b"postmaster":
        return _Path(b"<" + inner + b">")
    if inner.startswith(b"@"):
        route = _ROUTE.match(inner)
        if route is None:
            return Reason.PATH_SYNTAX, OctetClass.PUNCTUATION, False
        for hop in route.group()[1:-1].split(b",@"):
            if _domain_fault(hop) is not None:
                return Reason.PATH_SYNTAX, OctetClass.PUNCTUATION, False
        inner = inner[route.end() :]
    parts = _split_mailbox(inner)
    if parts is None:
        return Reason.PATH_SYNTAX, _first_outside(inner, _LOCAL_OCTET), False
    local, domain = parts
    if local.startswith(b'"'):
        if _QUOTED_STRING.match(local) is None:
            return Reason.PATH_SYNTAX, _first_outside(local, _LOCAL_OCTET), False
    elif _DOT_STRING.match(local) is None:
        bad = _first_outside(local, _DOT_OCTET)
        return Reason.PATH_SYNTAX, bad or OctetClass.PUNCTUATION, False
    fault = _domain_fault(domain)
    if fault is not None:
        return fault[0], fault[1], False
    return _Path(b"<" + local + b"@" + domain + b">", local, domain)


def _path_limits(path: _Path) -> Reason | None:
    if not path.domain:
        return None  # <> and <Postmaster>
    if len(path.local) > LOCAL_PART_MAX_OCTETS:
        return Reason.LOCAL_PART_TOO_LONG
    reason = _domain_limits(path.domain)
    if reason is not None:
        return reason
    if len(path.canonical) > PATH_MAX_OCTETS:
        return Reason.PATH_TOO_LONG
    return None


# -- the verbs ----------------------------------------------------------------


def _parameters(
    found: list[tuple[bytes, bool]], verb: Verb, offered: Offered, eight_bit_ok: bool
) -> tuple[list[bytes], list[_Finding]]:
    """Judge ESMTP parameters; return their canonical forms and the findings."""
    out: list[bytes] = []
    findings: list[_Finding] = []
    seen: set[bytes] = set()
    for word, _complete in found:
        canonical, finding = _parameter(word, verb, offered, eight_bit_ok, seen)
        if finding is not None:
            findings.append(finding)
        if canonical:
            out.append(canonical)
    return out, findings


def _parameter(
    word: bytes, verb: Verb, offered: Offered, eight_bit_ok: bool, seen: set[bytes]
) -> tuple[bytes, _Finding | None]:
    """One parameter: its canonical form (empty: left out) and its finding."""
    keyword, eq, value = word.partition(b"=")
    if _KEYWORD.match(keyword) is None:
        octet = _first_outside(keyword, _KEYWORD_OCTET)
        malformed = (("option", "(malformed)"),)
        return word, _Finding(
            Reason.UNKNOWN_PARAMETER, _Level.ALWAYS, R.UNSUPPORTED_PARAMETER, malformed, octet
        )
    name = keyword.upper()
    rule = PARAMETERS.get(name)
    if rule is None or rule.verb is not verb:
        unknown = (("option", name.decode("ascii")),)
        return name + eq + value, _Finding(
            Reason.UNKNOWN_PARAMETER, _Level.ALWAYS, R.UNSUPPORTED_PARAMETER, unknown
        )
    shown = value.upper() if rule.upper else value
    canonical = name + eq + shown
    needs = VALUE_EXTENSION.get((name, shown), rule.extension)
    finding: _Finding | None = None
    policy = None
    if needs not in offered:
        policy = rule.unadvertised if needs == rule.extension else Unadvertised.REFUSE
        option = name.decode("ascii") + ("=" + shown.decode() if needs != rule.extension else "")
        level = _Level.ALWAYS if policy is Unadvertised.REFUSE else _Level.STRICT
        finding = _Finding(
            Reason.UNKNOWN_PARAMETER, level, R.UNSUPPORTED_PARAMETER, (("option", option),)
        )
        if policy is Unadvertised.DROP:
            canonical = b""  # never forwarded: its value does not matter
    if policy is None or policy is Unadvertised.PASS:
        found = _value_finding(rule, name, eq, value, seen)
        if found is not None:
            finding = found
        elif finding is None and eq:
            finding = _strict_value_finding(rule, name, value, eight_bit_ok)
    seen.add(name)
    return canonical, finding


def _value_finding(
    rule: Parameter, name: bytes, eq: bytes, value: bytes, seen: set[bytes]
) -> _Finding | None:
    """A known parameter's value Postfix refuses too, or its repetition."""
    bad_value = R.BAD_PARAMETER, (("keyword", name.decode("ascii")),)
    if bool(eq) != rule.has_value or (rule.has_value and not rule.lenient(value)):
        return _Finding(Reason.BAD_PARAMETER_VALUE, _Level.ALWAYS, *bad_value)
    if name in seen:
        level = _Level.ALWAYS if rule.once else _Level.STRICT
        return _Finding(Reason.DUPLICATE_PARAMETER, level, *bad_value)
    return None


def _strict_value_finding(
    rule: Parameter, name: bytes, value: bytes, eight_bit_ok: bool
) -> _Finding | None:
    """A value outside the RFC grammar (refused in strict mode only)."""
    bad_value = R.BAD_PARAMETER, (("keyword", name.decode("ascii")),)
    octets = _octets(value, eight_bit_ok)
    if octets is not None:
        return _Finding(octets[0], _Level.STRICT, *bad_value, octets[1])
    if _ESMTP_VALUE.match(value) is None or not rule.strict(value):
        return _Finding(Reason.BAD_PARAMETER_VALUE, _Level.STRICT, *bad_value)
    return None


# The common case, already canonical: a plain ASCII path and plain parameters
# (no octet that groups words for smtpd_token: " < \\; no 8-bit).  Limits: the
# local part is measured below; a path of at most 256 octets keeps the domain
# under 255.  It must judge exactly as the long way (a property test checks).
_LABEL = rb"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_FAST = re.compile(
    rb"(?:MAIL FROM:|RCPT TO:)(<(?:([%s]+(?:\.[%s]+)*)@%s(?:\.%s)*)?>)"
    rb"((?: [A-Z0-9][A-Z0-9-]*(?:=[\x21\x23-\x3b\x3d-\x5b\x5d-\x7e]+)?)*)\Z"
    % (_ATEXT, _ATEXT, _LABEL, _LABEL)
)


def _fast_transaction(
    verb: Verb, text: bytes, offered: Offered
) -> tuple[bytes, list[_Finding]] | None:
    """A canonical MAIL/RCPT line with a plain path, or None (take the long way)."""
    m = _FAST.match(text)
    if m is None or text[0] != (0x52 if verb is Verb.RCPT else 0x4D):
        return None
    path, local, params = m.group(1, 2, 3)
    if len(path) > PATH_MAX_OCTETS or (local is not None and len(local) > LOCAL_PART_MAX_OCTETS):
        return None
    if local is None and verb is Verb.RCPT:
        return None  # RCPT TO:<>
    found = [(w, True) for w in params.split(b" ")[1:]]
    eight_bit_ok = False  # nothing 8-bit here
    shown, findings = _parameters(found, verb, offered, eight_bit_ok)
    return text[: m.end(1)] + b"".join(b" " + p for p in shown), findings


def _transaction(
    verb: Verb, argument: bytes, offered: Offered, smtputf8_transaction: bool
) -> tuple[bytes, list[_Finding]]:
    rcpt = verb is Verb.RCPT
    prefix = b"TO:" if rcpt else b"FROM:"
    head = b"RCPT TO:" if rcpt else b"MAIL FROM:"
    syntax = R.RCPT_SYNTAX if rcpt else R.MAIL_SYNTAX
    bad_path = R.BAD_RECIPIENT if rcpt else R.BAD_SENDER
    if argument[: len(prefix)].upper() != prefix:
        rest = argument.rstrip(_SEPARATORS)
        return head[:4] + (b" " + rest if rest else b""), [
            _Finding(Reason.MISSING_FROM_TO, _Level.FATAL, syntax)
        ]
    found = words(argument[len(prefix) :])
    if not found:
        return head, [_Finding(Reason.MISSING_ARGUMENT, _Level.FATAL, syntax)]
    (path_word, complete), params = found[0], found[1:]
    if rcpt:
        eight_bit_ok = smtputf8_transaction and b"SMTPUTF8" in offered
    else:
        eight_bit_ok = b"SMTPUTF8" in offered and any(w.upper() == b"SMTPUTF8" for w, _ in params)
    shown, param_findings = _parameters(params, verb, offered, eight_bit_ok)
    parsed = _parse_path(path_word, rcpt) if complete else (Reason.PATH_SYNTAX, None, True)
    path, finding = _path_finding(path_word, parsed, _octets(path_word, eight_bit_ok), bad_path)
    line = head + path + b"".join(b" " + p for p in shown)
    return line, ([finding] if finding is not None else []) + param_findings


def _path_finding(
    word: bytes,
    parsed: _Path | tuple[Reason, OctetClass | None, bool],
    octets: tuple[Reason, OctetClass] | None,
    bad_path: R.Reply,
) -> tuple[bytes, _Finding | None]:
    """The path to forward and what is wrong with it (as Postfix checks: the
    syntax first, then the octets, then the limits)."""
    if isinstance(parsed, _Path):
        path, fault = parsed.canonical, _path_limits(parsed)
        if octets is None:
            return path, _Finding(fault, _Level.STRICT, bad_path) if fault is not None else None
    else:
        path = word
        reason, octet, fatal = parsed
        if fatal:
            return path, _Finding(reason, _Level.FATAL, bad_path, (), octet)
        if octets is None:
            return path, _Finding(reason, _Level.STRICT, bad_path, (), octet)
    reply = R.NON_ASCII_ADDRESS if octets[0] is Reason.EIGHT_BIT else bad_path
    return path, _Finding(octets[0], _Level.STRICT, reply, (), octets[1])


def _hello(verb: Verb, argument: bytes) -> tuple[bytes, list[_Finding]]:
    name = verb.value
    found = words(argument, colon_ends=False)
    if not found:
        return name.encode(), [
            _Finding(Reason.MISSING_ARGUMENT, _Level.FATAL, R.HELO_SYNTAX, (("verb", name),))
        ]
    joined = b" ".join(w for w, _ in found)
    line = name.encode() + b" " + joined
    octets = _octets(joined, False)
    if octets is not None:
        return line, [_Finding(octets[0], _Level.STRICT, R.BAD_HELO_NAME, (), octets[1])]
    if len(found) > 1:
        return line, [
            _Finding(Reason.BAD_HELO, _Level.STRICT, R.BAD_HELO_NAME, (), OctetClass.SPACE)
        ]
    fault = _domain_fault(joined)
    if fault is not None:
        return line, [_Finding(fault[0], _Level.STRICT, R.BAD_HELO_NAME, (), fault[1])]
    limit = _domain_limits(joined)
    if limit is not None:
        return line, [_Finding(limit, _Level.STRICT, R.BAD_HELO_NAME)]
    return line, []


def _no_argument(verb: Verb, argument: bytes) -> tuple[bytes, list[_Finding]]:
    name = verb.value.encode()
    rest = argument.rstrip(_SEPARATORS)
    if not rest:
        return name, []
    if verb in ARGUMENT_DROPPED:
        return name, [_Finding(Reason.UNEXPECTED_ARGUMENT, _Level.NOTE, R.ARGUMENT_SYNTAX)]
    finding = _Finding(
        Reason.UNEXPECTED_ARGUMENT, _Level.STRICT, R.NO_ARGUMENT_SYNTAX, (("verb", verb.value),)
    )
    return name + b" " + rest, [finding]


def _free(verb: Verb, argument: bytes) -> tuple[bytes, list[_Finding]]:
    rest = argument.rstrip(_SEPARATORS)
    line = verb.value.encode() + (b" " + rest if rest else b"")
    if not rest and verb in ARGUMENT_REQUIRED:
        return line, [_Finding(Reason.MISSING_ARGUMENT, _Level.STRICT, R.ARGUMENT_SYNTAX)]
    octets = _octets(rest, False)
    if octets is None:
        return line, []
    return line, [_Finding(octets[0], _Level.STRICT, R.ARGUMENT_SYNTAX, (), octets[1])]


def check(
    verb: Verb,
    line: bytes,
    *,
    mode: Mode = Mode.NORMALIZE,
    offered: Offered = Offered(),  # noqa: B008 - frozen, shared safely
    smtputf8_transaction: bool = False,
) -> Verdict:
    """Judge one command line of ``verb`` (its first word), with or without CRLF.

    ``offered``: the extensions the client may use; ``smtputf8_transaction``:
    the transaction's MAIL carried ``SMTPUTF8`` (for RCPT).
    """
    shape = SHAPE_OF.get(verb, Shape.OPAQUE)
    end = b"\r\n" if line.endswith(b"\r\n") else b""
    text = line[: len(line) - len(end)]
    i, n = 0, len(text)
    while i < n and text[i] not in _SEPARATOR_SET:
        i += 1
    argument = text[i:].lstrip(_SEPARATORS)
    if shape is Shape.OPAQUE:
        return Verdict(line, line, False, argument_bytes=len(argument))
    if shape is Shape.MAIL or shape is Shape.RCPT:
        fast = _fast_transaction(verb, text, offered)
        if fast is None:
            fast = _transaction(verb, argument, offered, smtputf8_transaction)
        body, findings = fast
    elif shape is Shape.HELLO:
        body, findings = _hello(verb, argument)
    elif shape is Shape.NO_ARGUMENT:
        body, findings = _no_argument(verb, argument)
    else:
        body, findings = _free(verb, argument)
    canonical = body + end
    refusing = _REFUSING[mode]
    refused = next((f for f in findings if f.level in refusing), None)
    shown = refused if refused is not None else (findings[0] if findings else None)
    forward = None if refused is not None else line if mode is Mode.OBSERVE else canonical
    return Verdict(
        forward=forward,
        canonical=canonical,
        changed=canonical != line,
        reason=shown.reason if shown is not None else None,
        reply=refused.reply if refused is not None else None,
        reply_fields=refused.fields if refused is not None else (),
        argument_bytes=len(argument),
        octet=shown.octet if shown is not None else None,
    )
