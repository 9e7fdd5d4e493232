"""Is a command line canonical RFC 5321, within the limits?  An independent checker.

Written apart from ``smtpguard/protocol/syntax.py``, as regular expressions
assembled straight from the ABNF (RFC 5321 4.1.1, 4.1.2, 4.1.3; RFC 5234 core
rules; RFC 3629 UTF-8; RFC 6531 3.3 for SMTPUTF8), so that the two can check
each other.  Used on every line a recording upstream received.

"Canonical" means: the verb in upper case; exactly the grammar's single SPs;
``MAIL FROM:<path>`` / ``RCPT TO:<path>`` with no source route; parameter
keywords in upper case, none twice; no control character anywhere; 8-bit
octets only as UTF-8 in the MAIL and RCPT lines of an SMTPUTF8 transaction; and
the limits of RFC 5321 4.5.3.1: local part 64 octets, domain 255, path 256
(brackets included), a label 63 (for a U-label, its A-label), and the command
line 512 octets with CRLF, plus what the extensions of the parameters used
add (RFC 1870 6, RFC 3461 5, RFC 4954 5, RFC 6531 3.4, RFC 6710, RFC 2852).

Two choices follow smtpguard's strict mode rather than the bare ABNF: HELO
may carry an address literal like EHLO (common practice), and the free
argument of NOOP, HELP, VRFY, EXPN and ETRN is only checked for its octets.

Use :func:`problem` for one line, :func:`session_problems` for the lines of a
session in order (a MAIL with ``SMTPUTF8`` makes the RCPTs after it SMTPUTF8).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

# RFC 3629: UTF8-non-ascii = UTF8-2 / UTF8-3 / UTF8-4
_TAIL = rb"[\x80-\xbf]"
UTF8_NON_ASCII = (
    rb"(?:[\xc2-\xdf]" + _TAIL
    + rb"|\xe0[\xa0-\xbf]" + _TAIL
    + rb"|[\xe1-\xec\xee\xef]" + _TAIL + rb"{2}"
    + rb"|\xed[\x80-\x9f]" + _TAIL
    + rb"|\xf0[\x90-\xbf]" + _TAIL + rb"{2}"
    + rb"|[\xf1-\xf3]" + _TAIL + rb"{3}"
    + rb"|\xf4[\x80-\x8f]" + _TAIL + rb"{2})"
)  # fmt: skip


def _grammar(utf8: bool) -> dict[str, bytes]:
    """The RFC 5321 4.1.2 / 4.1.3 rules as regex source, with RFC 6531's additions."""
    u = b"|" + UTF8_NON_ASCII if utf8 else b""
    g: dict[str, bytes] = {}
    g["atext"] = rb"(?:[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]" + u + b")"
    g["Atom"] = g["atext"] + b"+"
    g["Dot-string"] = g["Atom"] + rb"(?:\." + g["Atom"] + b")*"
    g["qtextSMTP"] = rb"(?:[\x20\x21\x23-\x5b\x5d-\x7e]" + u + b")"
    g["quoted-pairSMTP"] = rb"\\[\x20-\x7e]"
    g["Quoted-string"] = rb'"(?:' + g["qtextSMTP"] + b"|" + g["quoted-pairSMTP"] + rb')*"'
    g["Local-part"] = b"(?:" + g["Dot-string"] + b"|" + g["Quoted-string"] + b")"
    g["Let-dig"] = rb"[A-Za-z0-9]"
    g["Ldh-str"] = rb"[A-Za-z0-9-]*[A-Za-z0-9]"
    ascii_sub = g["Let-dig"] + b"(?:" + g["Ldh-str"] + b")?"
    if utf8:  # sub-domain =/ U-label: letters, digits, inner hyphens, UTF-8
        uchar = rb"(?:[A-Za-z0-9]|" + UTF8_NON_ASCII + b")"
        g["sub-domain"] = b"(?:" + uchar + rb"(?:(?:" + uchar + rb"|-)*" + uchar + b")?)"
    else:
        g["sub-domain"] = b"(?:" + ascii_sub + b")"
    g["Domain"] = g["sub-domain"] + rb"(?:\." + g["sub-domain"] + b")*"
    g["Snum"] = rb"(?:25[0-5]|2[0-4][0-9]|[01]?[0-9]?[0-9])"
    g["IPv4-address-literal"] = g["Snum"] + rb"(?:\." + g["Snum"] + b"){3}"
    g["IPv6-addr"] = _ipv6_addr(g["IPv4-address-literal"])
    g["General-address-literal"] = (
        rb"(?![Ii][Pp][Vv]6:)" + g["Ldh-str"] + rb":[\x21-\x5a\x5e-\x7e]+"
    )
    # A General-address-literal's Standardized-tag MUST be registered with
    # IANA (RFC 5321 4.1.3) and IPv6 is the only one: canonical literals are
    # IPv4 and IPv6 (the grammar rule above stays, for reference).
    g["address-literal"] = (
        rb"\[(?:" + g["IPv4-address-literal"] + rb"|[Ii][Pp][Vv]6:" + g["IPv6-addr"] + rb")\]"
    )
    g["Mailbox"] = (
        b"(?P<local>"
        + g["Local-part"]
        + b")@(?P<domain>"
        + g["Domain"]
        + b"|"
        + g["address-literal"]
        + b")"
    )
    g["esmtp-keyword"] = rb"[A-Z0-9][A-Z0-9-]*"  # upper case: canonical
    g["esmtp-value"] = rb"(?:[\x21-\x3c\x3e-\x7e]" + u + b")+"
    g["esmtp-param"] = g["esmtp-keyword"] + b"(?:=" + g["esmtp-value"] + b")?"
    g["parameters"] = b"(?: " + g["esmtp-param"] + b")*"
    return g


def _ipv6_addr(ipv4: bytes) -> bytes:
    """IPv6-addr = IPv6-full / IPv6-comp / IPv6v4-full / IPv6v4-comp, counts spelled out."""
    h = rb"[0-9A-Fa-f]{1,4}"

    def run(n: int) -> bytes:  # exactly n groups joined by ":"
        return h + (b"(?::" + h + b"){%d}" % (n - 1) if n > 1 else b"") if n else b""

    forms = [run(8), run(6) + b":" + ipv4]
    for total, tail in ((6, b""), (4, ipv4)):
        for left in range(total + 1):
            for right in range(total - left + 1):
                before_tail = run(right) + b":" if right and tail else run(right)
                forms.append(run(left) + b"::" + before_tail + tail)
    longest_first = sorted(set(forms), key=lambda form: -len(form))
    return b"(?:" + b"|".join(longest_first) + b")"


_ASCII = _grammar(False)
_UTF8 = _grammar(True)


def _compile(g: dict[str, bytes]) -> dict[str, re.Pattern[bytes]]:
    path = b"<" + g["Mailbox"] + b">"
    params = b"(?P<params>" + g["parameters"] + rb")\Z"
    name = b"(?P<domain>" + g["Domain"] + b"|" + g["address-literal"] + rb")\Z"
    return {
        "MAIL": re.compile(b"MAIL FROM:(?P<path><>|" + path + b")" + params),
        "RCPT": re.compile(
            b"RCPT TO:(?P<path><[Pp][Oo][Ss][Tt][Mm][Aa][Ss][Tt][Ee][Rr]>|" + path + b")" + params
        ),
        "HELLO": re.compile(b"(?:EHLO|HELO) " + name),
    }


_PATTERNS = {False: _compile(_ASCII), True: _compile(_UTF8)}

#: Verbs that take nothing, and verbs with a free argument (octets checked only).
NO_ARGUMENT = frozenset({b"DATA", b"RSET", b"QUIT", b"STARTTLS"})
FREE_ARGUMENT = {b"NOOP": False, b"HELP": False, b"VRFY": True, b"EXPN": True, b"ETRN": True}
_BDAT = re.compile(rb"BDAT [0-9]+(?: LAST)?\Z")  # RFC 3030 2
_AUTH = re.compile(rb"AUTH [A-Z0-9_-]{1,20}(?: (?:[A-Za-z0-9+/]+={0,2}|=))?\Z")  # RFC 4954 4
_CTL = re.compile(rb"[\x00-\x1f\x7f]")
_VALID_UTF8 = re.compile(b"(?:[\x00-\x7f]|" + UTF8_NON_ASCII + rb")*\Z")

#: RFC 5321 4.5.3.1.4 and what each extension's parameters add (by keyword).
LINE_OCTETS = 512
_INCREMENT = {
    (b"MAIL", b"SIZE"): 26,
    (b"MAIL", b"RET"): 100,
    (b"MAIL", b"ENVID"): 100,
    (b"RCPT", b"NOTIFY"): 500,
    (b"RCPT", b"ORCPT"): 500,
    (b"MAIL", b"AUTH"): 500,
    (b"MAIL", b"SMTPUTF8"): 10,
    (b"MAIL", b"MT-PRIORITY"): 16,
    (b"MAIL", b"BY"): 17,
}
#: Parameters that share one increment (DSN's).
_SHARED = {(b"MAIL", b"ENVID"): (b"MAIL", b"RET"), (b"RCPT", b"ORCPT"): (b"RCPT", b"NOTIFY")}


def _label_problem(domain: bytes) -> str | None:
    if domain.startswith(b"["):
        return None
    for label in domain.split(b"."):
        if label.isascii():
            if len(label) > 63:
                return "label over 63 octets"
        elif len(b"xn--" + label.decode("utf-8").encode("punycode")) > 63:
            return "A-label over 63 octets"
    return None


def _params_problem(verb: bytes, params: bytes) -> tuple[str | None, int]:
    """Problems in the parameters, and how much they raise the line limit."""
    seen: set[bytes] = set()
    extra: dict[tuple[bytes, bytes], int] = {}
    for param in params.split(b" ")[1:]:
        keyword, _, value = param.partition(b"=")
        if keyword in seen:
            return f"parameter {keyword.decode()} twice", 0
        seen.add(keyword)
        key = (verb, keyword)
        if key in _INCREMENT:
            extra[_SHARED.get(key, key)] = _INCREMENT[key]
        if keyword == b"SIZE" and not re.fullmatch(rb"[0-9]{1,20}", value):
            return "SIZE is not 1*20DIGIT", 0
        if keyword == b"BODY" and value not in (b"7BIT", b"8BITMIME", b"BINARYMIME"):
            return "BODY value not canonical", 0
        if keyword == b"RET" and value not in (b"FULL", b"HDRS"):
            return "RET value not canonical", 0
        if keyword in (b"SMTPUTF8", b"REQUIRETLS") and value:
            return f"{keyword.decode()} takes no value", 0
        if keyword == b"SMTPUTF8" and verb != b"MAIL":
            return "SMTPUTF8 outside MAIL", 0
    return None, sum(extra.values())


_SMTPUTF8_WORD = re.compile(rb" SMTPUTF8(?: |\Z)")


def _mail_smtputf8(body: bytes) -> bool:
    """Does this MAIL line carry the SMTPUTF8 parameter?"""
    m = _PATTERNS[True]["MAIL"].match(body)
    if m is not None:
        return b"SMTPUTF8" in m["params"].split(b" ")
    # Not the grammar (say, broken UTF-8 in the path): look for the word.
    return _SMTPUTF8_WORD.search(body) is not None


def problem(line: bytes, *, smtputf8: bool = False) -> str | None:
    """Why ``line`` is not canonical RFC 5321 within the limits, or None.

    ``line`` may end with CRLF.  ``smtputf8``: the line belongs to an
    SMTPUTF8 transaction (a MAIL line with the ``SMTPUTF8`` parameter is one
    by itself).
    """
    body = line[:-2] if line.endswith(b"\r\n") else line
    if _CTL.search(body):
        return "control character"
    verb, _, argument = body.partition(b" ")
    if verb == b"MAIL":
        smtputf8 = _mail_smtputf8(body)
    eight_bit = not body.isascii()
    if eight_bit and (not smtputf8 or verb not in (b"MAIL", b"RCPT")):
        return "8-bit octet outside SMTPUTF8"
    if eight_bit and not _VALID_UTF8.match(body):
        return "8-bit octets that are not UTF-8"
    patterns = _PATTERNS[eight_bit]
    limit = LINE_OCTETS
    if verb in (b"MAIL", b"RCPT"):
        m = patterns[verb.decode()].match(body)
        if m is None:
            return f"not the {verb.decode()} grammar"
        why, extra = _params_problem(verb, m["params"])
        if why:
            return why
        limit += extra
        local, domain = m["local"], m["domain"]
        if local is not None and domain is not None:
            if len(local) > 64:
                return "local part over 64 octets"
            if len(domain) > 255:
                return "domain over 255 octets"
            why = _label_problem(domain)
            if why:
                return why
            if len(m["path"]) > 256:
                return "path over 256 octets"
    elif verb in (b"EHLO", b"HELO"):
        m = patterns["HELLO"].match(body)
        if m is None:
            return "not the EHLO/HELO grammar"
        if len(m["domain"]) > 255:
            return "domain over 255 octets"
        why = _label_problem(m["domain"])
        if why:
            return why
    elif verb in NO_ARGUMENT:
        if body != verb:
            return f"{verb.decode()} takes no argument"
    elif verb in FREE_ARGUMENT:
        if FREE_ARGUMENT[verb] and not argument:
            return f"{verb.decode()} needs an argument"
        if body != verb and argument.strip(b" ") != argument or body.endswith(b" "):
            return "white space around the argument"
    elif verb == b"BDAT":
        if not _BDAT.match(body):
            return "not the BDAT grammar"
    elif verb == b"AUTH":
        if not _AUTH.match(body):
            return "not the AUTH grammar"
    else:
        return "not a known verb in upper case"
    if len(body) + 2 > limit:
        return f"command line over {limit} octets"
    return None


def is_canonical(line: bytes, *, smtputf8: bool = False) -> bool:
    """True if :func:`problem` finds nothing."""
    return problem(line, smtputf8=smtputf8) is None


def session_problems(lines: Iterable[bytes]) -> list[tuple[bytes, str]]:
    """Every (line, problem) of a session's command lines, in order.

    A MAIL with ``SMTPUTF8`` makes the RCPTs after it SMTPUTF8, until the next
    MAIL, RSET, EHLO or HELO.
    """
    found: list[tuple[bytes, str]] = []
    utf8 = False
    for line in lines:
        verb = line.split(b" ", 1)[0].rstrip(b"\r\n")
        if verb == b"MAIL":
            utf8 = _mail_smtputf8(line.removesuffix(b"\r\n"))
        elif verb in (b"RSET", b"EHLO", b"HELO"):
            utf8 = False
        why = problem(line, smtputf8=utf8)
        if why:
            found.append((line, why))
    return found
