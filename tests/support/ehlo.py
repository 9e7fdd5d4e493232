"""The upstream EHLO replies the tests feed smtpguard, each named for the
upstream it imitates.  One place, so two tests that mean the same upstream
use the same reply, and a test that needs another says which."""

from __future__ import annotations


def ehlo_reply(name: bytes, *keywords: bytes) -> bytes:
    """A multi-line ``250`` EHLO reply: ``name`` first, then one line per keyword."""
    lines = (name, *keywords)
    return b"".join(
        b"250" + (b" " if i == len(lines) - 1 else b"-") + line + b"\r\n"
        for i, line in enumerate(lines)
    )


#: Offers everything smtpguard mediates, and some it must hide (XCLIENT)
#: or answer itself (STARTTLS).
EHLO_FULL = ehlo_reply(
    b"up.example",
    b"PIPELINING",
    b"SIZE 1000",
    b"STARTTLS",
    b"ENHANCEDSTATUSCODES",
    b"XCLIENT NAME ADDR",
    b"CHUNKING",
    b"AUTH PLAIN",
    b"8BITMIME",
)
#: Postfix-like with AUTH: pipelining, chunking, two SASL mechanisms.
EHLO_AUTH = ehlo_reply(
    b"up.example",
    b"PIPELINING",
    b"ENHANCEDSTATUSCODES",
    b"CHUNKING",
    b"AUTH PLAIN LOGIN",
    b"8BITMIME",
)
#: Postfix-like with DSN and CHUNKING, no AUTH.
EHLO_CHUNKING = ehlo_reply(
    b"up.example",
    b"PIPELINING",
    b"ENHANCEDSTATUSCODES",
    b"DSN",
    b"CHUNKING",
    b"8BITMIME",
)
#: OpenSMTPD-like: no PIPELINING, no CHUNKING.
EHLO_NO_CHUNKING = ehlo_reply(b"up.example", b"8BITMIME", b"ENHANCEDSTATUSCODES", b"SIZE 36700160")
#: A serial upstream: no PIPELINING, a SIZE limit.
EHLO_SERIAL = ehlo_reply(b"up.example", b"SIZE 1000")
#: The smallest pipelining, chunking upstream with enhanced status codes.
EHLO_MINIMAL = ehlo_reply(b"up", b"PIPELINING", b"ENHANCEDSTATUSCODES", b"CHUNKING")
#: Pipelining, a 100000-octet SIZE limit (the policy tests' limits).
EHLO_SIZE = ehlo_reply(b"up", b"PIPELINING", b"SIZE 100000", b"ENHANCEDSTATUSCODES")
#: STARTTLS and AUTH both ways of writing it (``AUTH=`` is the old form).
EHLO_TLS_AUTH = ehlo_reply(
    b"up",
    b"PIPELINING",
    b"STARTTLS",
    b"AUTH PLAIN LOGIN",
    b"AUTH=PLAIN LOGIN",
    b"ENHANCEDSTATUSCODES",
)
