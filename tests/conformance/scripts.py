"""Seeded client sessions for the differential runs.

A script is a list of steps.  The runner (``runner.py``) plays a script the
way a conforming client would against whatever it talks to: it pipelines
only when PIPELINING is offered, uses STARTTLS only when offered, and sends
a DATA body only after a 354.  So the same script runs unchanged directly
against an upstream and through smtpguard in front of it.

Steps (tuples, first item the kind):

- ``("EHLO", name)``, ``("HELO", name)``, ``("MAIL", argument)``,
  ``("RCPT", argument)``, ``("RSET",)``, ``("NOOP",)``, ``("VRFY", text)``,
  ``("EXPN", text)``, ``("HELP",)``, ``("ETRN", domain)``, ``("QUIT",)``,
  ``("RAW", line)``: one command line each, one reply each;
- ``("DATA", content)``: DATA, then (after 354) the content, dot-stuffed,
  and the final dot; ends a pipelined group;
- ``("BDAT", chunks, last)``: one ``BDAT n [LAST]`` per chunk with the
  chunk after it (RFC 3030);
- ``("STARTTLS",)``: STARTTLS, the handshake and a new EHLO, if offered;
- ``("GROUP",)``: the end of a pipelined group (read the replies owed);
- ``("CLOSE",)``: close the connection without QUIT;
- ``("CLOSE_IN_DATA", content)``: DATA, part of the content, then close.

Every message's content carries ``X-Marker: sNNNN-R-MM`` (R is the run:
``d`` direct, ``g`` through smtpguard), so deliveries can be matched to the
transaction that sent them; both runs use same-length markers.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

Step = tuple[object, ...]

#: Commands out of order for some phase (each should get 503 from a server).
_STRAY = (
    ("RCPT", "TO:<stray@dest.example>"),
    ("DATA", None),
    ("MAIL", "FROM:<nested@client.test>"),
)
#: Lines that are not valid commands.
_MALFORMED = (
    "XYZZY",
    "MAIL FROM:",
    "RCPT TO:",
    "HELO",
    "mail from:<lower@client.test>",
    "NOOP with an argument",
    "VRFY",
)


@dataclass(frozen=True)
class Capabilities:
    """What the upstream offers directly (its EHLO keywords, upper case)."""

    keywords: frozenset[str]

    @property
    def chunking(self) -> bool:
        return "CHUNKING" in self.keywords

    @property
    def etrn(self) -> bool:
        return "ETRN" in self.keywords

    @property
    def eightbit(self) -> bool:
        return "8BITMIME" in self.keywords

    @property
    def dsn(self) -> bool:
        return "DSN" in self.keywords

    @property
    def size(self) -> bool:
        return "SIZE" in self.keywords


def content(session: int, message: int, rnd: random.Random) -> bytes:
    """A message whose marker has ``?`` for the run letter (same length for both runs)."""
    lines = [
        b"X-Marker: s%04d-?-%02d" % (session, message),
        b"From: <sender@client.test>",
        b"To: <rcpt@dest.example>",
        b"Date: Thu, 03 Dec 2026 12:00:00 +0000",
        b"Message-ID: <s%04d.%02d@client.test>" % (session, message),
        b"Subject: conformance %d/%d" % (session, message),
        b"",
    ]
    for i in range(rnd.randint(1, 12)):
        kind = rnd.random()
        if kind < 0.15:
            lines.append(b"." * rnd.randint(1, 3) + b" leading dots %d" % i)
        elif kind < 0.2:
            lines.append(b"")
        else:
            lines.append(b"line %d " % i + b"x" * rnd.randint(0, 120))
    return b"\r\n".join(lines) + b"\r\n"


def _chunks(data: bytes, rnd: random.Random) -> list[bytes]:
    if len(data) < 4 or rnd.random() < 0.5:
        return [data]
    cut = sorted(rnd.sample(range(1, len(data)), rnd.randint(1, min(3, len(data) - 1))))
    bounds = [0, *cut, len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


def _mail_argument(session: int, n: int, caps: Capabilities, rnd: random.Random) -> str:
    arg = f"FROM:<from{n}.s{session:04d}@client.test>"
    if caps.size and rnd.random() < 0.3:
        arg += f" SIZE={rnd.randint(100, 5000)}"
    if caps.eightbit and rnd.random() < 0.2:
        arg += " BODY=8BITMIME"
    if caps.dsn and rnd.random() < 0.2:
        arg += " RET=HDRS ENVID=s" + str(session)
    return arg


def _rcpt_argument(rnd: random.Random, index: int, caps: Capabilities) -> str:
    local = f"reject-{index}" if rnd.random() < 0.2 else f"rcpt{index}"
    arg = f"TO:<{local}@dest.example>"
    if caps.dsn and rnd.random() < 0.15:
        arg += " NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;" + local + "@dest.example"
    return arg


def _noise(rnd: random.Random, caps: Capabilities, session: int, number: int) -> Step:
    choice = rnd.random()
    if choice < 0.2:
        return ("NOOP",)
    if choice < 0.3:
        return ("RSET",)
    if choice < 0.4:
        return ("VRFY", "rcpt1@dest.example")
    if choice < 0.45:
        return ("EXPN", "list")
    if choice < 0.55:
        return ("HELP",)
    if choice < 0.62 and caps.etrn:
        return ("ETRN", "dest.example")
    if choice < 0.8:
        return ("RAW", rnd.choice(_MALFORMED))
    kind, arg = rnd.choice(_STRAY)
    if kind == "DATA":
        return ("DATA", content(session, 50 + number, rnd))
    return (kind, arg)


def generate(session: int, caps: Capabilities, seed: int) -> list[Step]:
    """The script of session number ``session`` (deterministic in ``seed``)."""
    rnd = random.Random(seed * 100_003 + session)
    steps: list[Step] = []
    roll = rnd.random()
    if roll < 0.85:
        steps.append(("EHLO", f"client{session}.test"))
    elif roll < 0.95:
        steps.append(("HELO", f"client{session}.test"))
    if rnd.random() < 0.12:
        steps += [("GROUP",), ("STARTTLS",)]
    for messages in range(rnd.randint(1, 3)):
        if rnd.random() < 0.3:
            steps.append(_noise(rnd, caps, session, len(steps)))
        if rnd.random() < 0.3:
            steps.append(("GROUP",))
        steps.append(("MAIL", _mail_argument(session, messages, caps, rnd)))
        for i in range(rnd.randint(1, 3)):
            steps.append(("RCPT", _rcpt_argument(rnd, i, caps)))
            if rnd.random() < 0.08:
                steps.append(_noise(rnd, caps, session, len(steps)))
        body = content(session, messages, rnd)
        end = rnd.random()
        if end < 0.1:
            steps.append(("RSET",))
        elif end < 0.15:
            steps.append(("CLOSE_IN_DATA", body[: rnd.randint(0, len(body) - 1)]))
            return steps
        elif caps.chunking and end < 0.5:
            if rnd.random() < 0.1:
                steps += [("BDAT", _chunks(body, rnd), False), ("RSET",)]  # abandoned
            else:
                steps.append(("BDAT", _chunks(body, rnd), True))
        else:
            steps.append(("DATA", body))
        if rnd.random() < 0.5:
            steps.append(("GROUP",))
    roll = rnd.random()
    if roll < 0.85:
        steps.append(("QUIT",))
    else:
        steps.append(("CLOSE",))
    return steps
