"""EHLO rewriting: from the upstream's capabilities to the client's.

A pure function of the upstream's EHLO reply, the options and whether TLS
is active.  Two rules, from "one view of the session":

- smtpguard never advertises an extension whose commands it would refuse:
  only keywords it knows how to mediate are relayed (``RELAYED``); anything
  else, including extensions that add verbs smtpguard does not know (``ATRN``,
  ``XEXCH50``, ``X-LINK2STATE`` ...) or change the session's framing
  (``PIPECONNECT``: commands before the greeting), is removed;
- smtpguard never forwards a verb whose extension the upstream did not
  advertise (``rules.EXTENSION_OF``): :attr:`Capabilities.upstream` is what
  the upstream said, kept so the session can check.

The command line limit grows with the advertised extensions, as RFC 5321
4.5.3.1.4 lets service extensions raise it (``LINE_INCREMENTS``).

:func:`rewrite` is the composition of small steps, each pure: parse the
upstream's lines (:func:`parse`), decide what is hidden (:func:`hidden`),
keep and add lines (:func:`shown`, :func:`announce_size`), and render.
It is memoized: every session to one upstream gets the same reply.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

from .options import SessionOptions
from .rules import EXTENSION_OF, Verb

#: EHLO keywords relayed to the client when the upstream advertises them:
#: extensions that only add MAIL/RCPT parameters or reply formats (the
#: parameters are forwarded as they are), and those whose verbs smtpguard
#: relays in sequence (VRFY, EXPN, HELP, ETRN, AUTH, BDAT).
RELAYED = frozenset(
    {
        b"SIZE",  # RFC 1870
        b"8BITMIME",  # RFC 6152
        b"BINARYMIME",  # RFC 3030 (needs CHUNKING: dropped with it)
        b"CHUNKING",  # RFC 3030
        b"DSN",  # RFC 3461
        b"SMTPUTF8",  # RFC 6531
        b"ENHANCEDSTATUSCODES",  # RFC 2034
        b"PIPELINING",  # RFC 2920
        b"AUTH",  # RFC 4954
        b"ETRN",  # RFC 1985
        b"VRFY",
        b"EXPN",
        b"HELP",
        b"DELIVERBY",  # RFC 2852
        b"MT-PRIORITY",  # RFC 6710
        b"REQUIRETLS",  # RFC 8689
        b"FUTURERELEASE",  # RFC 4865
        b"NO-SOLICITING",  # RFC 3865
        b"RRVS",  # RFC 7293
        b"LIMITS",  # RFC 9422
        b"SUBMITTER",  # RFC 4405
    }
)

#: How much each extension raises the command line limit, per verb
#: (RFC 1870 section 6, RFC 3461 section 5, RFC 4954 section 5, RFC 6531
#: section 3.4, RFC 6710 section 4, RFC 2852 section 4).
LINE_INCREMENTS: dict[bytes, dict[Verb, int]] = {
    b"SIZE": {Verb.MAIL: 26},
    b"DSN": {Verb.MAIL: 100, Verb.RCPT: 500},
    b"AUTH": {Verb.MAIL: 500},
    b"SMTPUTF8": {Verb.MAIL: 10},
    b"MT-PRIORITY": {Verb.MAIL: 16},
    b"DELIVERBY": {Verb.MAIL: 17},
}


class Capabilities(NamedTuple):
    """What the upstream offered, and what the client was offered."""

    #: Keywords the upstream advertised (upper case).
    upstream: frozenset[bytes] = frozenset()
    #: Keywords shown to the client (upper case).
    offered: frozenset[bytes] = frozenset()
    #: Extension keywords (``rules.EXTENSION_OF``) whose verbs the client may
    #: send: offered, or hidden by a policy that has its own refusal (AUTH
    #: before TLS gets 538, not "not enabled").
    usable: frozenset[bytes] = frozenset()
    #: Enhanced status codes (RFC 2034) are used on this session.
    enhanced: bool = False
    #: Commands may be pipelined to the upstream.
    upstream_pipelining: bool = False
    #: PIPELINING was offered to the client.
    client_pipelining: bool = False
    #: Longest command line per verb, CRLF included (others: the base limit).
    line_limits: Mapping[Verb, int] = {}


#: Before EHLO, or after HELO: no extension at all.
NO_EXTENSIONS = Capabilities()

_EXTENSION_KEYWORDS = frozenset(EXTENSION_OF.values())


def keyword(text: bytes) -> bytes:
    """The keyword of one EHLO line's text (after ``250-``), upper case."""
    parts = text.split(None, 1)
    if not parts:
        return b""
    word = parts[0].upper()
    # "AUTH=LOGIN PLAIN" is an old spelling of AUTH.
    return b"AUTH" if word.startswith(b"AUTH=") else word


def parse(lines: Sequence[bytes]) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """The greeting line's text, and ``(keyword, text)`` per extension line."""
    first = lines[0]
    greeting = first[4:] if first[3:4] in (b"-", b" ") else b"\r\n"
    texts: list[tuple[bytes, bytes]] = []
    for line in lines[1:]:
        text = line[4:]
        word = keyword(text)
        if word:
            texts.append((word, text))
    return greeting, texts


def hidden(options: SessionOptions, tls_active: bool, upstream: frozenset[bytes]) -> set[bytes]:
    """The keywords the client must not see, whatever the upstream says."""
    discard = {k.encode() for k in options.discard_keywords}
    if options.auth_require_tls and not tls_active:
        discard.add(b"AUTH")
    if not options.chunking:
        discard.add(b"CHUNKING")
    if not options.offer_pipelining:
        discard.add(b"PIPELINING")
    if b"CHUNKING" in discard or b"CHUNKING" not in upstream:
        discard.add(b"BINARYMIME")  # BODY=BINARYMIME needs BDAT (RFC 3030 3)
    return discard


def shown(
    texts: Sequence[tuple[bytes, bytes]],
    discard: set[bytes],
    options: SessionOptions,
    tls_active: bool,
) -> tuple[list[bytes], set[bytes]]:
    """The extension lines for the client, and their keywords."""
    kept: list[bytes] = []
    offered: set[bytes] = set()
    for word, text in texts:
        if word in RELAYED and word not in discard:
            offered.add(word)
            kept.append(text)
    if options.offer_pipelining and b"PIPELINING" not in offered:
        kept.append(b"PIPELINING\r\n")
        offered.add(b"PIPELINING")
    if options.tls_offered and not tls_active:
        kept.append(b"STARTTLS\r\n")
        offered.add(b"STARTTLS")
    return kept, offered


def announce_size(kept: list[bytes], offered: set[bytes], limit: int) -> None:
    """Announce our own size limit where it is lower than the upstream's."""
    for i, text in enumerate(kept):
        if keyword(text) == b"SIZE":
            value = text.split()[1:2]
            theirs = int(value[0]) if value and value[0].isdigit() else 0
            if not theirs or theirs > limit:
                kept[i] = b"SIZE %d\r\n" % limit
            return
    kept.append(b"SIZE %d\r\n" % limit)
    offered.add(b"SIZE")


def line_limits(offered: set[bytes], base: int) -> dict[Verb, int]:
    """The longest command line per verb, raised by the offered extensions."""
    limits: dict[Verb, int] = {}
    for word in offered:
        for verb, extra in LINE_INCREMENTS.get(word, {}).items():
            limits[verb] = limits.get(verb, base) + extra
    return limits


def usable(
    upstream: frozenset[bytes], offered: set[bytes], options: SessionOptions, tls_active: bool
) -> frozenset[bytes]:
    """The extension keywords whose verbs the client may send."""
    result = {k for k in _EXTENSION_KEYWORDS if k in upstream and k in offered}
    if (
        b"AUTH" in upstream
        and options.auth_require_tls
        and not tls_active
        and "AUTH" not in options.discard_keywords
    ):
        result.add(b"AUTH")  # hidden before TLS: refused 538, not "not enabled"
    return frozenset(result)


def render(code: bytes, greeting: bytes, kept: Sequence[bytes]) -> bytes:
    """A multi-line reply: ``code-`` on every line but the last."""
    lines = [greeting, *kept]
    last = len(lines) - 1
    return b"".join(code + (b" " if i == last else b"-") + text for i, text in enumerate(lines))


_CACHE: dict[tuple[object, ...], tuple[bytes, Capabilities]] = {}
_CACHE_LIMIT = 256


def rewrite(
    lines: Sequence[bytes], options: SessionOptions, tls_active: bool
) -> tuple[bytes, Capabilities]:
    """The EHLO reply for the client, and the session's capabilities.

    ``lines`` are the upstream's reply lines with their CRLF (the first is
    the greeting line).
    """
    key = (
        tuple(lines),
        tls_active,
        options.discard_keywords,
        options.auth_require_tls,
        options.chunking,
        options.offer_pipelining,
        options.upstream_pipelining,
        options.tls_offered,
        options.policy.max_message_bytes,
        options.max_line_bytes,
    )
    try:
        return _CACHE[key]
    except KeyError:
        pass
    result = _rewrite(lines, options, tls_active)
    if len(_CACHE) >= _CACHE_LIMIT:
        _CACHE.clear()
    _CACHE[key] = result
    return result


def _rewrite(
    lines: Sequence[bytes], options: SessionOptions, tls_active: bool
) -> tuple[bytes, Capabilities]:
    greeting, texts = parse(lines)
    upstream = frozenset(word for word, _ in texts)
    kept, offered = shown(texts, hidden(options, tls_active, upstream), options, tls_active)
    if options.policy.max_message_bytes:
        announce_size(kept, offered, options.policy.max_message_bytes)
    caps = Capabilities(
        upstream=upstream,
        offered=frozenset(offered),
        usable=usable(upstream, offered, options, tls_active),
        enhanced=b"ENHANCEDSTATUSCODES" in offered,
        upstream_pipelining=b"PIPELINING" in upstream and options.upstream_pipelining,
        client_pipelining=options.offer_pipelining,
        line_limits=line_limits(offered, options.max_line_bytes),
    )
    return render(lines[0][:3], greeting, kept), caps


def after_starttls(caps: Capabilities) -> Capabilities:
    """RFC 3207 4.2: the client forgets what it was offered (a new EHLO is
    due); the upstream's session, which never saw STARTTLS, is unchanged."""
    return caps._replace(
        offered=frozenset(),
        usable=frozenset(),
        enhanced=False,
        client_pipelining=False,
        line_limits={},
    )


def helo_reply(upstream_ehlo: Sequence[bytes], hostname: str) -> bytes:
    """A HELO answered locally (after STARTTLS), named as the upstream's EHLO."""
    words = upstream_ehlo[0][4:].split(None, 1)
    name = words[0] if words else hostname.encode()
    return b"250 " + name + b"\r\n"
