"""Issue 14's syntax guard end to end: the real smtpguard (a subprocess) between raw
sockets or real senders and upstreams that record what they get.

- strict mode in front of a recording upstream of our own: every line that arrives is
  canonical RFC 5321 within the limits, by the independent checker
  (``tests/support/canonical.py``); the client hears 501/553/555 for what was refused;
  the metrics count it; the log names reasons, lengths and octet classes, never an
  argument;
- strict mode in front of the legacy-like strict upstream (``tests/support/
  strict_upstream.py``), which drops the connection on anything malformed: it never
  drops, while the same corpus sent to it directly does;
- normalize mode in front of a real Postfix: nothing Postfix accepts is refused, and
  sloppy lines arrive canonical and accepted;
- real senders (smtplib, swaks, Postfix, Exim) in every mode, with SMTPUTF8, DSN and
  8BITMIME: every message arrives with its envelope and parameters;
- ``commands.refuse``: VRFY and EXPN answered 502 locally in every state, never seen by
  Postfix, gone from the EHLO reply, counted.

The malformed corpus is Postfix's probe corpus (``tests/support/postfix_probe.py``, which
holds the issue's examples) plus lines of our own (``EXTRAS``); each line goes in its own
session, after the context its probe names (``SETUP``).
"""

from __future__ import annotations

import contextlib
import re
import smtplib
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
from guard import Guard, RawClient
from mtas import EximClient, PostfixClient
from peers import CapturedMessage, Postfix, swaks
from support.canonical import session_problems
from support.postfix_probe import (
    CORPUS,
    DOMAIN256,
    HELO480,
    L300,
    LABEL64,
)
from support.postfix_probe import SETUP as PROBE_SETUP
from support.recording_upstream import RecordingUpstream
from support.strict_upstream import StrictUpstream

GuardFactory = Callable[..., Guard]
MODES = ["observe", "normalize", "strict"]
CRLF = b"\r\n"

#: What the recording upstream advertises after ``250-fake`` and PIPELINING: the
#: extensions whose parameters the guard checks, and the verbs Postfix offers.
KEYWORDS = (
    b"SIZE 10240000",
    b"VRFY",
    b"ETRN",
    b"ENHANCEDSTATUSCODES",
    b"8BITMIME",
    b"DSN",
    b"SMTPUTF8",
)

#: Commands sent before the probed line, per context (Postfix's probe contexts, and
#: ``rcpt_ok``: a transaction with a recipient, for DATA).
SETUP: dict[str, tuple[bytes, ...]] = {
    **PROBE_SETUP,
    "rcpt_ok": (*PROBE_SETUP["rcpt"], b"RCPT TO:<b@example.com>"),
}


@dataclass(frozen=True)
class Case:
    """One line of the corpus, sent after ``SETUP[context]``."""

    context: str
    line: bytes

    @property
    def verb(self) -> str:
        return self.line.split(None, 1)[0].upper().decode("ascii", "replace") if self.line else ""

    def __str__(self) -> str:
        return f"{self.context}: {self.line[:90]!r}"


#: Lines of our own beyond Postfix's corpus: framing-level refusals, free arguments,
#: DATA and QUIT arguments, literals, UTF-8 limits, local verbs.
EXTRAS = (
    Case("mail", b"MAIL FROM:<a\x00b@example.com>"),
    Case("mail", b"MAIL FROM:<a\rb@example.com>"),
    Case("mail", b"NOOP a\rb"),
    Case("rcpt", b"RCPT TO:<" + b"r" * 600 + b"@example.com>"),
    Case("mail", b"MAIL FROM:<" + b"q" * 450 + b"@example.com>"),
    Case("mail", b"MAIL FROM:<a@[IPv6:1:2:3:4:5:6:7:8:9]>"),
    Case("mail", b"MAIL FROM:<a@[ IPv6:::1]>"),
    Case("mail", b"MAIL FROM:<a@example.com> SIZE=1000 "),
    Case("mail", b"mail FROM:<A@EXAMPLE.COM>"),
    Case("mail", b"MAIL FROM:<a@example.com> SMTPUTF8 BODY=8bitmime RET=hdrs ENVID=QQ+2B"),
    Case("mail", b"MAIL FROM:<a@example.com> ENVID=" + b"x" * 100),
    Case("mail", b"MAIL FROM:<a@example.com> ENVID=a+7F"),
    Case("mail", b"MAIL FROM:<a@example.com> SIZE=" + b"1" * 20),
    Case("mail", b'MAIL FROM:<"a\\\xc3\xa9"@example.com> SMTPUTF8'),
    Case("rcpt_utf8", b"RCPT TO:<b@" + "é".encode() * 40 + b".example>"),
    Case("rcpt_utf8", b"RCPT TO:<b@example.com> NOTIFY=SUCCESS ORCPT=utf-8;\xc3\xa9@example.com"),
    Case("rcpt", b"RCPT TO:<b@example.com> ORCPT=rfc822;b@example.com ORCPT=rfc822;b@example.com"),
    Case("helo", b"EHLO " + b"a." * 130 + b"example"),
    Case("helo", b"EHLO [IPv6:::1"),
    Case("mail", b"XDEBUG on"),
    Case("mail", b"STARTTLS x"),
    Case("mail", b"ETRN \x01"),
    Case("mail", b"ETRN  example.com"),
    Case("mail", b"VRFY \xc3\xa9"),
    Case("mail", b"VRFY  b"),
    Case("mail", b"NOOP x "),
    Case("mail", b"NOOP  x"),
    Case("mail", b"HELP \x01"),
    Case("mail", b"rset"),
    Case("mail", b"RSET "),
    Case("rcpt_ok", b"DATA x"),
    Case("rcpt_ok", b"data"),
    Case("mail", b"QUIT "),
)

MALFORMED: tuple[Case, ...] = (
    *(Case(p.context, p.line) for p in CORPUS if p.config == "default"),
    *EXTRAS,
)

#: The issue's examples (and a few more), with what strict mode must answer and the
#: reason it must log.  After HELO, or before any EHLO, replies carry no enhanced code.
REFUSED_IN_STRICT: dict[Case, tuple[bytes, str]] = {
    Case("mail", b"MAIL FROM:<" + L300 + b"@example.com>"): (
        b"501 5.1.7 Bad sender address syntax",
        "local_part_too_long",
    ),
    Case("rcpt", b"RCPT TO:<\xc3\xa9@example.com>"): (
        b"553 5.6.7 Must declare SMTPUTF8 to send unicode address",
        "eight_bit",
    ),
    Case("rcpt", b"RCPT TO:<b\x01c@example.com>"): (
        b"501 5.1.3 Bad recipient address syntax",
        "control_character",
    ),
    Case("mail", b"MAIL FROM:<a@example.com> XFOO=bar"): (
        b"555 5.5.4 Unsupported option: XFOO",
        "unknown_parameter",
    ),
    Case("mail", b"MAIL FROM:garbage"): (b"501 5.1.7 Bad sender address syntax", "path_syntax"),
    Case("helo", b"HELO " + HELO480): (
        b"501 Helo command rejected: Invalid name",
        "domain_too_long",
    ),
    Case("mail", b"MAIL FROM:<a@[300.1.1.1]>"): (
        b"501 5.1.7 Bad sender address syntax",
        "bad_address_literal",
    ),
    Case("rcpt", b"RCPT TO:<b@[IPv6:zz::1]>"): (
        b"501 5.1.3 Bad recipient address syntax",
        "bad_address_literal",
    ),
    Case("mail", b"MAIL FROM:<a@" + LABEL64 + b".example>"): (
        b"501 5.1.7 Bad sender address syntax",
        "label_too_long",
    ),
    Case("mail", b"MAIL FROM:<a@" + DOMAIN256 + b">"): (
        b"501 5.1.7 Bad sender address syntax",
        "domain_too_long",
    ),
    Case("mail", b"MAIL FROM:<@a.example,b.example:a@example.com>"): (
        b"501 5.1.7 Bad sender address syntax",
        "path_syntax",
    ),
    Case("mail", b"MAIL FROM:<a@example.com> SIZE=abc"): (
        b"501 5.5.4 Bad SIZE parameter syntax",
        "bad_parameter_value",
    ),
    Case("mail", b"MAIL FROM:<a@example.com> SIZE=1 SIZE=2"): (
        b"501 5.5.4 Bad SIZE parameter syntax",
        "duplicate_parameter",
    ),
    Case("mail_helo", b"MAIL FROM:<a@example.com> SIZE=1000"): (
        b"555 Unsupported option: SIZE",
        "unknown_parameter",
    ),
    Case("mail", b"MAIL FROM:<a@example.com> NOTIFY=SUCCESS"): (
        b"555 5.5.4 Unsupported option: NOTIFY",
        "unknown_parameter",
    ),
    Case("mail", b"RSET x"): (b"501 5.5.4 Syntax: RSET", "unexpected_argument"),
    Case("rcpt_ok", b"DATA x"): (b"501 5.5.4 Syntax: DATA", "unexpected_argument"),
    Case("mail", b"NOOP \x01"): (
        b"501 5.5.4 Syntax error in parameters or arguments",
        "control_character",
    ),
    Case("mail", b"VRFY \xc3\xa9"): (
        b"501 5.5.4 Syntax error in parameters or arguments",
        "eight_bit",
    ),
}

#: Sloppy lines strict mode forwards, and the canonical form that must arrive.
CANONICAL_IN_STRICT: dict[Case, bytes] = {
    Case("mail", b"mail from:<a@example.com>"): b"MAIL FROM:<a@example.com>",
    Case("mail", b"MAIL FROM: <a@example.com>"): b"MAIL FROM:<a@example.com>",
    Case("mail", b"MAIL  FROM:<a@example.com>"): b"MAIL FROM:<a@example.com>",
    Case("mail", b"MAIL FROM:<a@example.com>  "): b"MAIL FROM:<a@example.com>",
    Case("mail", b"MAIL FROM:\t<a@example.com>"): b"MAIL FROM:<a@example.com>",
    Case("mail", b"MAIL FROM:a@example.com SIZE=100"): b"MAIL FROM:<a@example.com> SIZE=100",
    Case("mail", b"MAIL FROM:<@a.example,@b.example:a@example.com>"): (
        b"MAIL FROM:<a@example.com>"
    ),
    Case("mail", b"MAIL FROM:<a@example.com> SIZE=1000\tBODY=8BITMIME"): (
        b"MAIL FROM:<a@example.com> SIZE=1000 BODY=8BITMIME"
    ),
    Case("mail", b"MAIL FROM:<a@example.com>\x0bSIZE=1000"): b"MAIL FROM:<a@example.com> SIZE=1000",
    Case("mail", b"MAIL FROM:<a@example.com> body=8bitmime"): (
        b"MAIL FROM:<a@example.com> BODY=8BITMIME"
    ),
    Case("mail", b"MAIL FROM:<a@example.com> SMTPUTF8 BODY=8bitmime RET=hdrs ENVID=QQ+2B"): (
        b"MAIL FROM:<a@example.com> SMTPUTF8 BODY=8BITMIME RET=HDRS ENVID=QQ+2B"
    ),
    Case("mail", b"mail FROM:<A@EXAMPLE.COM>"): b"MAIL FROM:<A@EXAMPLE.COM>",
    Case("rcpt", b"rcpt to:<b@example.com>"): b"RCPT TO:<b@example.com>",
    Case("rcpt", b"RCPT TO:postmaster"): b"RCPT TO:<postmaster>",
    Case("rcpt", b"RCPT TO:<b@example.com> notify=success,failure"): (
        b"RCPT TO:<b@example.com> NOTIFY=SUCCESS,FAILURE"
    ),
    Case("rcpt", b"RCPT TO:<b@example.com> NOTIFY=SUCCESS  ORCPT=rfc822;b@example.com"): (
        b"RCPT TO:<b@example.com> NOTIFY=SUCCESS ORCPT=rfc822;b@example.com"
    ),
    Case("helo", b"helo c.example"): b"HELO c.example",
    Case("helo", b"HELO c.example\t"): b"HELO c.example",
    Case("helo", b"HELO  c.example"): b"HELO c.example",
    Case("mail", b"QUIT x"): b"QUIT",
    Case("mail", b"NOOP  x"): b"NOOP x",
    Case("mail", b"ETRN  example.com"): b"ETRN example.com",
    Case("mail", b"rset"): b"RSET",
    Case("rcpt_ok", b"data"): b"DATA",
}


def test_the_hand_labelled_cases_are_in_the_corpus() -> None:
    assert set(REFUSED_IN_STRICT) <= set(MALFORMED)
    assert set(CANONICAL_IN_STRICT) <= set(MALFORMED)
    assert len(set(MALFORMED)) == len(MALFORMED)


# --------------------------------------------------------------------------- sessions


@dataclass
class Outcome:
    """What the client saw of one corpus session."""

    case: Case
    #: The local port of the client's connection (smtpguard logs it as ``client=``).
    client_port: int
    #: The reply to each setup line, then to the corpus line (b"" once closed).
    setup: list[bytes]
    reply: bytes

    @property
    def first_line(self) -> bytes:
        return self.reply.split(CRLF, 1)[0]


def _reply(client: RawClient) -> bytes:
    try:
        return client.reply()
    except (AssertionError, OSError):
        return b""  # closed (or reset) by the peer


def _send(client: RawClient, data: bytes) -> None:
    with contextlib.suppress(OSError):
        client.send(data)


def converse(port: int, case: Case, setup: Sequence[bytes] | None = None) -> Outcome:
    """One session: greeting, the setup lines one at a time, the corpus line, QUIT."""
    with RawClient(port) as client:
        client_port = client.sock.getsockname()[1]
        _reply(client)
        replies = []
        for line in SETUP[case.context] if setup is None else setup:
            _send(client, line + CRLF)
            replies.append(_reply(client))
        _send(client, case.line + CRLF)
        reply = _reply(client)
        if reply.startswith(b"354"):
            _send(client, b"x\r\n.\r\n")
            _reply(client)
        if reply:
            _send(client, b"QUIT" + CRLF)
            _reply(client)
        return Outcome(case, client_port, replies, reply)


def forwarded(case: Case, lines: list[bytes], setup: int) -> list[bytes]:
    """The lines an upstream got for ``case``: after its setup, without our final QUIT."""
    after = lines[setup:]
    if case.verb != "QUIT" and after and after[-1] == b"QUIT":
        after = after[:-1]
    return after


def wait_log(guard: Guard, sessions: int, timeout: float = 10) -> str:
    """smtpguard's log once it has a disconnect line for each of ``sessions``."""
    deadline = time.monotonic() + timeout
    while True:
        log = guard.log()
        if log.count(" event=disconnect ") >= sessions or time.monotonic() > deadline:
            assert log.count(" event=disconnect ") == sessions, log[-3000:]
            return log
        time.sleep(0.05)


_LOGFMT = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S*)')


def syntax_events(log: str) -> list[dict[str, str]]:
    """Each ``event=syntax`` log line as a dict."""
    return [
        {k: v.strip('"') for k, v in _LOGFMT.findall(line)}
        for line in log.splitlines()
        if " event=syntax " in line
    ]


def samples(guard: Guard, name: str) -> dict[frozenset[tuple[str, str]], float]:
    """Every sample of ``name`` in a live scrape, by its label set."""
    found: dict[frozenset[tuple[str, str]], float] = {}
    for line in guard.metrics().splitlines():
        if line.startswith("#"):
            continue
        series, _, value = line.rpartition(" ")
        metric, _, labels = series.partition("{")
        if metric == name:
            pairs = re.findall(r'(\w+)="([^"]*)"', labels)
            found[frozenset(pairs)] = float(value)
    return found


#: ESMTP keywords and values, verbs and other words that are no personal data.
_NOT_PERSONAL = {
    b"SIZE", b"BODY", b"SMTPUTF8", b"8BITMIME", b"BINARYMIME", b"NOTIFY", b"SUCCESS",
    b"FAILURE", b"DELAY", b"NEVER", b"ORCPT", b"ENVID", b"RET", b"FULL", b"HDRS", b"AUTH",
    b"RFC822", b"UTF-8", b"MT-PRIORITY", b"REQUIRETLS", b"FROM", b"IPV6", b"127.0.0.1",
    b"MAIL", b"RCPT", b"HELO", b"EHLO", b"RSET", b"NOOP", b"QUIT", b"DATA",
}  # fmt: skip


def personal_tokens(case: Case) -> set[bytes]:
    """Words of ``case``'s argument long enough to identify it in a log (5 octets or more,
    not SMTP vocabulary nor the loopback address, which the log names as the client), and
    every octet outside printable ASCII."""
    argument = case.line.split(None, 1)[1] if len(case.line.split(None, 1)) > 1 else b""
    words = {
        w for w in re.findall(rb"[A-Za-z0-9._+-]{5,}", argument) if w.upper() not in _NOT_PERSONAL
    }
    odd = {bytes([o]) for o in argument if o < 0x20 or o > 0x7E}
    return words | odd


# --------------------------------------------------------------------------- 1. strict mode


def test_strict_mode_forwards_only_canonical_lines_to_a_recording_upstream(
    guard_factory: GuardFactory,
) -> None:
    with RecordingUpstream(keywords=KEYWORDS) as upstream:
        guard = guard_factory(upstream.upstream, policy={"syntax": "strict"})
        outcomes = [converse(guard.port, case) for case in MALFORMED]
        sessions = upstream.wait_closed(len(outcomes))
    assert len(sessions) == len(outcomes)
    log = wait_log(guard, len(outcomes))

    # Every session's context was set up as meant, and reached the upstream unchanged.
    for outcome, session in zip(outcomes, sessions, strict=True):
        setup = SETUP[outcome.case.context]
        assert [r[:1] for r in outcome.setup] == [b"2"] * len(setup), outcome
        assert session.lines[: len(setup)] == list(setup), outcome

    # The independent checker: every line any session got is canonical, within the limits.
    not_canonical = [
        (str(o.case), line, why)
        for o, s in zip(outcomes, sessions, strict=True)
        for line, why in session_problems(s.lines)
    ]
    assert not_canonical == []

    events = syntax_events(log)
    by_port: dict[str, list[dict[str, str]]] = {}
    for event in events:
        by_port.setdefault(event["client"].rpartition(":")[2], []).append(event)

    # What each client heard, and what reached the upstream for it.
    wrong = []
    for outcome, session in zip(outcomes, sessions, strict=True):
        case = outcome.case
        got = forwarded(case, session.lines, len(SETUP[case.context]))
        refused = [e for e in by_port.get(str(outcome.client_port), []) if e["action"] == "refused"]
        if refused:
            # Refused by the guard: nothing forwarded, 501/553/555 with the enhanced code
            # of the command (none before EHLO or after HELO: RFC 2034).
            after_ehlo = case.context not in ("helo", "mail_helo")
            shape = refusal_shape(case.verb, after_ehlo)
            if got or not shape.match(outcome.first_line) or len(refused) != 1:
                wrong.append((str(case), outcome.first_line, got, refused))
        elif got:
            # Forwarded: exactly one line, answered by the upstream, not locally.
            same_verb = len(got) == 1 and got[0].split(b" ")[0] == case.verb.encode()
            if not same_verb or outcome.first_line[:1] not in (b"2", b"3"):
                wrong.append((str(case), outcome.first_line, got))
        elif outcome.first_line[:3] in (b"501", b"553", b"555"):
            wrong.append((str(case), outcome.first_line, "a syntax refusal that was not logged"))
    assert wrong == []

    outcome_of = {o.case: o for o in outcomes}
    session_of = {o.case: s for o, s in zip(outcomes, sessions, strict=True)}
    for case, (reply, reason) in REFUSED_IN_STRICT.items():
        outcome = outcome_of[case]
        assert outcome.first_line == reply, case
        assert [e["reason"] for e in by_port[str(outcome.client_port)]] == [reason], case
        assert forwarded(case, session_of[case].lines, len(SETUP[case.context])) == [], case
    for case, canonical in CANONICAL_IN_STRICT.items():
        got = forwarded(case, session_of[case].lines, len(SETUP[case.context]))
        assert got == [canonical], case
        assert outcome_of[case].first_line[:1] in (b"2", b"3"), case

    # The metrics count what the log says, and what the upstream's record shows.
    violations = samples(guard, "smtpguard_syntax_violations_total")
    logged = Counter((e["command"], e["reason"]) for e in events)
    counted = {
        (dict(labels)["command"], dict(labels)["reason"]): value
        for labels, value in violations.items()
        if value
    }
    assert counted == dict(logged)
    assert sum(logged.values()) >= len(REFUSED_IN_STRICT)
    changed = Counter(
        case.verb
        for case, session in session_of.items()
        for line in forwarded(case, session.lines, len(SETUP[case.context]))[:1]
        if line != case.line
    )
    normalized = {
        dict(labels)["command"]: value
        for labels, value in samples(guard, "smtpguard_commands_normalized_total").items()
        if value
    }
    assert normalized == dict(changed)

    # The log: reasons, lengths and octet classes, never the argument.
    assert_log_is_free_of_arguments(log, events, outcomes)


def refusal_shape(verb: str, enhanced: bool) -> re.Pattern[bytes]:
    """The reply the guard may give when it refuses a ``verb`` line."""
    if not enhanced:
        return re.compile(rb"(501|553|555) [A-Z]")
    codes = {"MAIL": rb"5\.1\.7|5\.5\.4", "RCPT": rb"5\.1\.3|5\.5\.4"}.get(verb, rb"5\.5\.4")
    return re.compile(rb"(501 (" + codes + rb")|553 5\.6\.7|555 5\.5\.4) [A-Z]")


def assert_log_is_free_of_arguments(
    log: str, events: list[dict[str, str]], outcomes: list[Outcome]
) -> None:
    fields = {"ts", "level", "event", "conn", "client", "command", "reason", "action"}
    fields |= {"argument_bytes", "octet"}
    octets = {"control", "eight_bit", "space", "punctuation", "alphanumeric", "-"}
    for event in events:
        assert set(event) == fields, event
        assert event["argument_bytes"].isdigit() and event["octet"] in octets, event
    # argument_bytes is the length of what follows the verb and its space.
    length = {
        str(o.client_port): len(o.case.line) - len(o.case.line.split(b" ", 1)[0]) - 1
        for o in outcomes
        if b" " in o.case.line and o.case.line.count(b"\t") == 0
    }
    wrong_length = [
        e
        for e in events
        if e["action"] == "refused"
        and e["client"].rpartition(":")[2] in length
        and int(e["argument_bytes"]) != length[e["client"].rpartition(":")[2]]
    ]
    assert wrong_length == []
    raw = log.encode("utf-8", "surrogateescape")
    leaks = sorted(
        {
            (str(o.case), token)
            for o in outcomes
            for token in personal_tokens(o.case)
            if token in raw
        }
    )
    assert leaks == [], leaks
    assert "example" not in log  # every address and name of the corpus is in example.com


def test_strict_mode_scopes_smtputf8_to_its_transaction_and_answers_in_turn(
    guard_factory: GuardFactory,
) -> None:
    """8-bit addresses only inside the transaction whose MAIL carried SMTPUTF8 (not after
    RSET, a new EHLO or the next MAIL); a refusal among pipelined commands is answered in
    its turn, and only the valid commands reach the upstream."""
    utf8_rcpt = b"RCPT TO:<\xc3\xa9@example.com>"
    refused_8bit = b"553 5.6.7 Must declare SMTPUTF8 to send unicode address\r\n"
    # (what the client sends in one write, the replies it must get) per session.
    scripts: list[list[tuple[bytes, list[bytes]]]] = [
        [
            (
                b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b\x01@example.com>\r\n"
                b"RCPT TO:<c@example.com>\r\nDATA\r\n",
                [
                    b"250 2.0.0 ok\r\n",
                    b"501 5.1.3 Bad recipient address syntax\r\n",
                    b"250 2.0.0 ok\r\n",
                    b"354 go ahead\r\n",
                ],
            ),
            (b"x\r\n.\r\n", [b"250 2.0.0 queued\r\n"]),
        ],
        [
            (
                b"MAIL FROM:garbage\r\nRCPT TO:<c@example.com>\r\nDATA\r\n",
                [
                    b"501 5.1.7 Bad sender address syntax\r\n",
                    b"503 5.5.1 Error: need MAIL before RCPT\r\n",
                    b"503 5.5.1 Error: need MAIL command\r\n",
                ],
            ),
        ],
        [
            (b"MAIL FROM:<a@example.com> SMTPUTF8\r\n", [b"250 2.0.0 ok\r\n"]),
            (utf8_rcpt + CRLF, [b"250 2.0.0 ok\r\n"]),
            (b"RSET\r\n", [b"250 2.0.0 ok\r\n"]),
            (b"MAIL FROM:<b@example.com>\r\n", [b"250 2.0.0 ok\r\n"]),
            (utf8_rcpt + CRLF, [refused_8bit]),
        ],
        [
            (b"MAIL FROM:<a@example.com> SMTPUTF8\r\n" + utf8_rcpt + CRLF + b"DATA\r\n", []),
            (b"x\r\n.\r\n", [b"250 2.0.0 queued\r\n"]),
            (b"MAIL FROM:<b@example.com>\r\n", [b"250 2.0.0 ok\r\n"]),
            (utf8_rcpt + CRLF, [refused_8bit]),
        ],
        [
            (b"MAIL FROM:<a@example.com> SMTPUTF8\r\n", [b"250 2.0.0 ok\r\n"]),
            (b"EHLO c.example\r\n", []),
            (b"MAIL FROM:<b@example.com>\r\n", [b"250 2.0.0 ok\r\n"]),
            (utf8_rcpt + CRLF, [refused_8bit]),
        ],
    ]
    with RecordingUpstream(keywords=KEYWORDS) as upstream:
        guard = guard_factory(upstream.upstream, policy={"syntax": "strict"})
        for script in scripts:
            with RawClient(guard.port) as client:
                client.reply()
                client.send(b"EHLO c.example\r\n")
                client.reply()
                for data, replies in script:
                    client.send(data)
                    count = len(replies) or data.count(CRLF)
                    got = client.replies(count)
                    assert not replies or got == replies, (data, got)
                client.send(b"QUIT\r\n")
                client.reply()
        sessions = upstream.wait_closed(len(scripts))
    assert [session_problems(s.lines) for s in sessions] == [[]] * len(scripts)
    assert sessions[0].lines == [
        b"EHLO c.example",
        b"MAIL FROM:<a@example.com>",
        b"RCPT TO:<c@example.com>",
        b"DATA",
        b"QUIT",
    ]
    assert sessions[1].lines == [b"EHLO c.example", b"QUIT"]
    assert [line for s in sessions for line in s.lines if not line.isascii()] == [
        utf8_rcpt,
        utf8_rcpt,
    ]


# --------------------------------------------------------------------------- 2. legacy upstream


def test_strict_mode_never_lets_the_legacy_upstream_drop_a_connection(
    guard_factory: GuardFactory,
) -> None:
    # EXPN is no verb of the legacy appliance (it drops the connection); commands.refuse
    # is the documented remedy for a verb the upstream lacks, so it is configured here.
    with StrictUpstream() as legacy:
        guard = guard_factory(
            f"127.0.0.1:{legacy.port}",
            policy={"syntax": "strict"},
            commands={"refuse": ["EXPN"]},
        )
        outcomes = [converse(guard.port, case) for case in MALFORMED]
        records = legacy.wait_closed(len(outcomes), timeout=30)
    assert len(records) == len(outcomes)
    dropped = [
        (str(o.case), r.dropped, r.lines[-1:])
        for o, r in zip(outcomes, records, strict=True)
        if r.dropped is not None
    ]
    assert dropped == []
    # Not even a syntax or sequence error (501/503) reached it.
    errors = [
        (str(o.case), r.protocol_errors)
        for o, r in zip(outcomes, records, strict=True)
        if r.protocol_errors
    ]
    assert errors == []
    not_canonical = [
        (str(o.case), line, why)
        for o, r in zip(outcomes, records, strict=True)
        for line, why in session_problems(r.lines)
    ]
    assert not_canonical == []
    # Each client got an answer to its line: no session ended without one.
    assert [str(o.case) for o in outcomes if not o.reply] == []


def test_the_corpus_sent_directly_makes_the_legacy_upstream_drop_connections() -> None:
    # The control for the test above: without smtpguard the same corpus breaks it.
    with StrictUpstream() as legacy:
        outcomes = [converse(legacy.port, case) for case in MALFORMED]
        records = legacy.wait_closed(len(outcomes), timeout=30)
    drops = {o.case: r.dropped for o, r in zip(outcomes, records, strict=True)}
    assert sum(1 for reason in drops.values() if reason) > len(MALFORMED) // 2
    assert drops[Case("mail", b"MAIL FROM:garbage")] == "malformed MAIL"
    assert drops[Case("mail", b"MAIL FROM: <a@example.com>")] == "malformed MAIL"
    assert drops[Case("rcpt", b"RCPT TO:<\xc3\xa9@example.com>")] == "8-bit"
    assert str(drops[Case("mail", b"MAIL FROM:<a@example.com> XFOO=bar")]).startswith(
        "unknown parameter"
    )


# --------------------------------------------------------------------------- 3. normalize mode


def test_normalize_refuses_nothing_that_postfix_accepts(
    postfix: Postfix, guard_factory: GuardFactory
) -> None:
    guard = guard_factory(f"{postfix.host}:{postfix.port}", policy={"syntax": "normalize"})
    # A bare CR or a NUL in a command is policy.smuggling's to judge (normalize: 500, as
    # Postfix 3.9 does; README "smuggling"), not the syntax guard's.
    cases = [case for case in MALFORMED if b"\r" not in case.line and b"\0" not in case.line]
    direct = [converse(postfix.port, case) for case in cases]
    through = [converse(guard.port, case) for case in cases]
    # Postfix took each context's setup, so every line was judged where it was meant.
    assert [str(o.case) for o in direct if any(r[:1] != b"2" for r in o.setup)] == []
    accepted = [o for o in direct if o.first_line[:1] == b"2"]
    assert len(accepted) > 100
    false_positives = [
        (str(d.case), d.first_line, t.first_line)
        for d, t in zip(direct, through, strict=True)
        if d.first_line[:1] == b"2" and t.first_line[:1] != b"2"
    ]
    assert false_positives == [], false_positives


#: Sloppy but valid lines: (context, line, what must reach Postfix).  ``{name}`` is a
#: name unique to the session (by which Postfix's log is read).
SLOPPY: list[tuple[str, bytes, bytes]] = [
    ("helo", b"helo  {name} ", b"HELO {name}"),
    ("helo", b"ehlo {name}\t", b"EHLO {name}"),
    ("mail", b"mail from: <s1@example.com>", b"MAIL FROM:<s1@example.com>"),
    ("mail", b"MAIL  FROM:s2@example.com  size=100", b"MAIL FROM:<s2@example.com> SIZE=100"),
    ("mail", b"MAIL FROM:<@a.example,@b.example:s3@example.com>", b"MAIL FROM:<s3@example.com>"),
    (
        "mail",
        b"MAIL FROM:<s4@example.com> body=8bitmime\tret=hdrs  envid=QQ+2B",
        b"MAIL FROM:<s4@example.com> BODY=8BITMIME RET=HDRS ENVID=QQ+2B",
    ),
    (
        "mail",
        b"MAIL FROM:<\xc3\xa9@example.com>  smtputf8",
        b"MAIL FROM:<\xc3\xa9@example.com> SMTPUTF8",
    ),
    ("rcpt", b"rcpt to: b1@example.com", b"RCPT TO:<b1@example.com>"),
    ("rcpt", b"RCPT TO:postmaster", b"RCPT TO:<postmaster>"),
    (
        "rcpt",
        b"RCPT TO:<b2@example.com> notify=success,failure  ORCPT=rfc822;b2@example.com",
        b"RCPT TO:<b2@example.com> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;b2@example.com",
    ),
    ("rcpt_utf8", b"RCPT TO:<\xc3\xa9@example.com> ", b"RCPT TO:<\xc3\xa9@example.com>"),
    ("mail", b"MAIL\tFROM:<s5@example.com>", b"MAIL FROM:<s5@example.com>"),
]


def postfix_commands(
    postfix: Postfix, offset: int, name: str
) -> tuple[list[bytes], dict[str, str]]:
    """(the commands Postfix read, its ``disconnect`` counters) in the session whose
    EHLO or HELO named ``name``, once Postfix closed it (``debug_peer_list``)."""
    found = postfix.wait_for_log(
        rf"^.*: < \S+\[[^\]]+\]:(\d+): (?i:EHLO|HELO) {re.escape(name)}$", offset
    )
    port = int(found.group(1))
    counters = postfix.wait_for_disconnect(offset, client_port=port)
    text = postfix.log_since(offset)
    commands = re.findall(rf"^.*?: < \S+\[[^\]]+\]:{port}: (.*)$", text, re.MULTILINE)
    return [c.encode() for c in commands], counters


@pytest.fixture(scope="module")
def debug_postfix() -> Iterator[Postfix]:
    """A Postfix that logs every command it reads from 127.0.0.1 (offers DSN, SMTPUTF8,
    8BITMIME, VRFY: its defaults)."""
    with Postfix(extra_main_cf={"debug_peer_list": "127.0.0.1"}) as instance:
        yield instance


def test_normalize_delivers_sloppy_lines_canonical_to_postfix(
    debug_postfix: Postfix, guard_factory: GuardFactory
) -> None:
    guard = guard_factory(
        f"{debug_postfix.host}:{debug_postfix.port}", policy={"syntax": "normalize"}
    )
    offset = debug_postfix.log_offset()
    t = uuid.uuid4().hex[:8]
    results = []
    for n, (context, template, expected) in enumerate(SLOPPY):
        name = f"s{n}-{t}.sloppy.test"
        line = template.replace(b"{name}", name.encode())
        setup = [b"EHLO " + name.encode() if s.startswith(b"EHLO") else s for s in SETUP[context]]
        outcome = converse(guard.port, Case(context, line), setup)
        results.append((name, setup, expected.replace(b"{name}", name.encode()), outcome))
    wrong = []
    for name, setup, expected, outcome in results:
        commands, counters = postfix_commands(debug_postfix, offset, name)
        got = forwarded(outcome.case, commands, len(setup))
        if got != [expected] or outcome.first_line[:1] != b"2" or "/" in counters["commands"]:
            wrong.append((str(outcome.case), outcome.first_line, got, counters))
        assert session_problems(commands) == [], commands
    assert wrong == []


# --------------------------------------------------------------------------- 4. real clients


#: An 8-bit body line (UTF-8, not declared in a header: the body is just 8-bit).
EIGHT_BIT_TEXT = "ça a été reçu"


def tag() -> str:
    return uuid.uuid4().hex[:10]


def upstream_of(postfix: Postfix) -> str:
    return f"{postfix.host}:{postfix.port}"


def assert_no_syntax_findings(guard: Guard) -> None:
    assert [line for line in guard.log().splitlines() if " event=syntax " in line] == []
    assert sum(samples(guard, "smtpguard_syntax_violations_total").values()) == 0


def mail_lines(commands: list[bytes]) -> list[bytes]:
    return [c for c in commands if c[:4].upper() in (b"MAIL", b"RCPT")]


@pytest.mark.parametrize("mode", MODES)
def test_smtplib_with_smtputf8_dsn_and_8bitmime_is_unaffected(
    mode: str, debug_postfix: Postfix, guard_factory: GuardFactory
) -> None:
    guard = guard_factory(upstream_of(debug_postfix), policy={"syntax": mode})
    t = tag()
    helo = f"smtplib-{t}.test"
    offset = debug_postfix.log_offset()
    utf8_from, utf8_to = f"jörg-{t}@src.example", f"ünï-{t}@dést.example"
    dsn_from, dsn_to = f"dsn-{t}@src.example", f"r-{t}@dest.example"
    eight_from, eight_to = f"eight-{t}@src.example", f"e-{t}@dest.example"
    orcpt = f"orig-{t}@dest.example"
    utf8_message = f"Subject: ütf8 {t}\r\n\r\nGrüße\r\n".encode()
    dsn_message = f"Subject: dsn {t}\r\n\r\nbody-{t}\r\n".encode()
    full_from, full_to = f"full-{t}@src.example", f"f-{t}@dest.example"
    full_message = f"Subject: full {t}\r\n\r\nfull-body-{t}\r\n".encode()
    eight_message = f"Subject: 8bit {t}\r\n\r\n{EIGHT_BIT_TEXT}\r\n".encode()
    with smtplib.SMTP("127.0.0.1", guard.port, local_hostname=helo, timeout=20) as client:
        client.ehlo()
        for keyword in ("smtputf8", "dsn", "8bitmime", "size", "pipelining"):
            assert client.has_extn(keyword), keyword
        refused = client.sendmail(utf8_from, [utf8_to], utf8_message, mail_options=["SMTPUTF8"])
        assert refused == {}
        refused = client.sendmail(
            dsn_from,
            [dsn_to],
            dsn_message,
            mail_options=["RET=HDRS", f"ENVID=env-{t}"],
            rcpt_options=["NOTIFY=SUCCESS,FAILURE", f"ORCPT=rfc822;{orcpt}"],
        )
        assert refused == {}
        refused = client.sendmail(
            full_from,
            [full_to],
            full_message,
            mail_options=["RET=FULL", f"ENVID=full+2B{t}"],
            rcpt_options=["NOTIFY=SUCCESS"],
        )
        assert refused == {}
        refused = client.sendmail(
            eight_from, [eight_to], eight_message, mail_options=["BODY=8BITMIME"]
        )
        assert refused == {}

    # The four messages, and Postfix's success notices (NOTIFY=SUCCESS) for the DSN ones.
    arrived = debug_postfix.wait_for_messages(6, where=lambda m: t in m.text)
    envelopes = sorted((m.sender, m.recipients) for m in arrived)
    assert envelopes == sorted(
        [
            (utf8_from, [utf8_to]),
            (dsn_from, [dsn_to]),
            (full_from, [full_to]),
            (eight_from, [eight_to]),
            ("", [dsn_from]),
            ("", [full_from]),
        ]
    )
    eight = next(m for m in arrived if m.sender == eight_from)
    assert EIGHT_BIT_TEXT.encode() in eight.data
    notice = {m.recipients[0]: m for m in arrived if m.sender == ""}
    assert_success_notice(notice[dsn_from], f"env-{t}", {dsn_to: orcpt})
    # No ORCPT given: Postfix records the recipient itself; "+2B" is xtext for "+".
    assert_success_notice(notice[full_from], f"full+{t}", {full_to: full_to})

    # What Postfix read: smtplib's lines (smtplib writes "mail"/"rcpt" and "size="), which
    # observe forwards as they came and the other modes in upper case.
    commands, counters = postfix_commands(debug_postfix, offset, helo)
    mail, rcpt, size = ("mail", "rcpt", "size") if mode == "observe" else ("MAIL", "RCPT", "SIZE")
    assert mail_lines(commands) == [
        f"{mail} FROM:<{utf8_from}> {size}={len(utf8_message)} SMTPUTF8".encode(),
        f"{rcpt} TO:<{utf8_to}>".encode(),
        f"{mail} FROM:<{dsn_from}> {size}={len(dsn_message)} RET=HDRS ENVID=env-{t}".encode(),
        f"{rcpt} TO:<{dsn_to}> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;{orcpt}".encode(),
        f"{mail} FROM:<{full_from}> {size}={len(full_message)} RET=FULL ENVID=full+2B{t}".encode(),
        f"{rcpt} TO:<{full_to}> NOTIFY=SUCCESS".encode(),
        f"{mail} FROM:<{eight_from}> {size}={len(eight_message)} BODY=8BITMIME".encode(),
        f"{rcpt} TO:<{eight_to}>".encode(),
    ]
    assert "/" not in counters["commands"], counters
    assert_no_syntax_findings(guard)
    normalized = samples(guard, "smtpguard_commands_normalized_total")
    by_verb = {dict(labels)["command"]: value for labels, value in normalized.items()}
    expected = 0 if mode == "observe" else 4
    assert (by_verb.get("MAIL", 0), by_verb.get("RCPT", 0)) == (expected, expected)


def assert_success_notice(notice: CapturedMessage, envid: str, orcpts: dict[str, str]) -> None:
    """Postfix's success notice (RFC 3464) shows the ENVID (xtext decoded) and each
    recipient's ORCPT.  (RET is not observable there: Postfix returns only the headers
    in a success notice whatever RET says; Postfix's command log shows it instead.)"""
    text = notice.text
    assert f"Original-Envelope-Id: {envid}\n" in text, text
    for rcpt, orcpt in orcpts.items():
        assert f"Final-Recipient: rfc822; {rcpt}\nOriginal-Recipient: rfc822;{orcpt}\n" in text
    assert len(re.findall(r"^Action: (?:delivered|relayed)$", text, re.M)) == len(orcpts), text


@pytest.mark.parametrize("mode", MODES)
def test_swaks_is_unaffected(
    mode: str, debug_postfix: Postfix, guard_factory: GuardFactory
) -> None:
    guard = guard_factory(upstream_of(debug_postfix), policy={"syntax": mode})
    t = tag()
    helo = f"swaks-{t}.test"
    offset = debug_postfix.log_offset()
    sender, rcpts = f"sw-{t}@src.example", [f"a-{t}@dest.example", f"b-{t}@dest.example"]
    result = swaks(
        "--server", "127.0.0.1", "--port", str(guard.port), "--ehlo", helo,
        "--from", sender, "--to", ",".join(rcpts), "--pipeline",
        "--header", f"Subject: swaks {t}", "--body", EIGHT_BIT_TEXT,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    [arrived] = debug_postfix.wait_for_messages(1, where=lambda m: t in m.text)
    assert (arrived.sender, sorted(arrived.recipients)) == (sender, sorted(rcpts))
    assert EIGHT_BIT_TEXT.encode() in arrived.data
    commands, counters = postfix_commands(debug_postfix, offset, helo)
    assert mail_lines(commands) == [
        f"MAIL FROM:<{sender}>".encode(),
        *(f"RCPT TO:<{r}>".encode() for r in rcpts),
    ]
    assert "/" not in counters["commands"], counters
    assert_no_syntax_findings(guard)


@pytest.mark.parametrize("mode", MODES)
def test_postfix_as_client_with_dsn_smtputf8_and_8bitmime_is_unaffected(
    mode: str, debug_postfix: Postfix, guard_factory: GuardFactory
) -> None:
    guard = guard_factory(upstream_of(debug_postfix), policy={"syntax": mode})
    t = tag()
    helo = f"pfclient-{t}.test"
    dsn_from, dsn_to = f"pf-dsn-{t}@src.example", [f"x-{t}@dest.example", f"y-{t}@dest.example"]
    utf8_from, utf8_to = f"pf-ütf-{t}@src.example", [f"ß-{t}@dest.example"]
    offset = debug_postfix.log_offset()
    with PostfixClient(("127.0.0.1", guard.port), myhostname=helo) as client:
        client_offset = client.log_offset()
        client.submit(
            dsn_from,
            dsn_to,
            f"Subject: pf dsn {t}\n\n{EIGHT_BIT_TEXT}\n".encode(),
            options=("-N", "success,failure", "-V", f"env-{t}", "-R", "hdrs", "-B", "8BITMIME"),
        )
        client.submit(utf8_from, utf8_to, f"Subject: pf utf8 {t}\n\nbody\n".encode())
        statuses = client.wait_for_deliveries([*dsn_to, *utf8_to], client_offset)
        client_log = client.log_since(client_offset)
    assert statuses == {r: ["sent"] for r in [*dsn_to, *utf8_to]}, client_log

    # The two messages, and the upstream Postfix's success notice for the DSN one.
    arrived = debug_postfix.wait_for_messages(3, where=lambda m: t in m.text)
    envelopes = sorted((m.sender, sorted(m.recipients)) for m in arrived)
    assert envelopes == sorted([(dsn_from, sorted(dsn_to)), (utf8_from, utf8_to), ("", [dsn_from])])
    dsn_message = next(m for m in arrived if m.sender == dsn_from)
    assert EIGHT_BIT_TEXT.encode() in dsn_message.data
    notice = next(m for m in arrived if m.sender == "")
    assert_success_notice(notice, f"env-{t}", {rcpt: rcpt for rcpt in dsn_to})

    # Postfix's own client pipelines on one connection per message; read both sessions.
    sessions = wait_for_sessions(debug_postfix, offset, helo, 2)
    lines = [line for commands in sessions.values() for line in mail_lines(commands)]
    mails = [line for line in lines if line.startswith(b"MAIL")]
    rcpts = [line for line in lines if line.startswith(b"RCPT")]
    dsn_mail = next(m for m in mails if dsn_from.encode() in m)
    assert b" RET=HDRS" in dsn_mail and f" ENVID=env-{t}".encode() in dsn_mail, dsn_mail
    assert b" BODY=8BITMIME" in dsn_mail, dsn_mail
    utf8_mail = next(m for m in mails if utf8_from.encode() in m)
    assert utf8_mail.endswith(b" SMTPUTF8") or b" SMTPUTF8 " in utf8_mail, utf8_mail
    for rcpt in dsn_to:
        [line] = [r for r in rcpts if f"<{rcpt}>".encode() in r]
        assert b" NOTIFY=SUCCESS,FAILURE" in line, line
    assert_no_syntax_findings(guard)


def wait_for_sessions(
    postfix: Postfix, offset: int, helo: str, count: int, timeout: float = 20
) -> dict[int, list[bytes]]:
    """The commands of the ``count`` closed sessions (by client port) that said ``EHLO helo``."""
    deadline = time.monotonic() + timeout
    while True:
        text = postfix.log_since(offset)
        ports = [
            int(p)
            for p in re.findall(
                rf"^.*: < \S+\[[^\]]+\]:(\d+): EHLO {re.escape(helo)}$", text, re.MULTILINE
            )
        ]
        closed = [p for p in ports if re.search(rf"disconnect from \S+\[[^\]]+\]:{p} ", text)]
        if len(closed) >= count:
            return {
                port: [
                    c.encode()
                    for c in re.findall(rf"^.*?: < \S+\[[^\]]+\]:{port}: (.*)$", text, re.M)
                ]
                for port in closed
            }
        if time.monotonic() > deadline:
            raise AssertionError(f"{count} sessions with EHLO {helo} expected: {ports}")
        time.sleep(0.05)


@pytest.mark.parametrize("mode", MODES)
def test_exim_as_client_is_unaffected(
    mode: str,
    debug_postfix: Postfix,
    guard_factory: GuardFactory,
    mta_factory: Callable[..., Any],
) -> None:
    guard = guard_factory(upstream_of(debug_postfix), policy={"syntax": mode})
    t = tag()
    helo = f"exim-{t}.test"
    client: EximClient = mta_factory(EximClient, ("127.0.0.1", guard.port), helo=helo)
    offset = debug_postfix.log_offset()
    plan = [
        (f"ex1-{t}@src.example", [f"p-{t}@dest.example", f"q-{t}@dest.example"]),
        (f"ex2-{t}@src.example", [f"s-{t}@dest.example"]),
    ]
    for sender, rcpts in plan:
        body = f"Subject: exim {t}\n\n{EIGHT_BIT_TEXT}\n".encode()
        delivery = client.send(sender, rcpts, body)
        assert delivery.delivered, delivery.log
    arrived = debug_postfix.wait_for_messages(2, where=lambda m: t in m.text)
    envelopes = sorted((m.sender, sorted(m.recipients)) for m in arrived)
    assert envelopes == sorted((s, sorted(r)) for s, r in plan)
    assert all(EIGHT_BIT_TEXT.encode() in m.data for m in arrived)
    sessions = wait_for_sessions(debug_postfix, offset, helo, 2)
    got = sorted(line for commands in sessions.values() for line in mail_lines(commands))
    for sender, rcpts in plan:
        assert any(line.startswith(f"MAIL FROM:<{sender}>".encode()) for line in got), got
        for rcpt in rcpts:
            assert f"RCPT TO:<{rcpt}>".encode() in got, got
    assert_no_syntax_findings(guard)


# --------------------------------------------------------------------------- 5. commands.refuse


def test_refused_verbs_are_answered_locally_and_never_reach_postfix(
    debug_postfix: Postfix, guard_factory: GuardFactory
) -> None:
    upstream = upstream_of(debug_postfix)
    # The control: Postfix itself offers VRFY and answers it.
    with RawClient(debug_postfix.port) as direct:
        direct.reply()
        direct.send(b"EHLO direct.test\r\nVRFY postmaster\r\nQUIT\r\n")
        ehlo, vrfy, _ = direct.replies(3)
    assert b"\r\n250-VRFY\r\n" in ehlo
    assert vrfy.startswith(b"252 ")

    guard = guard_factory(upstream, commands={"refuse": ["VRFY", "EXPN"]})
    t = tag()
    offset = debug_postfix.log_offset()
    disabled = b"502 5.5.1 %s command is disabled\r\n"
    sent = 0

    def refused(client: RawClient, line: bytes, enhanced: bool = True) -> None:
        nonlocal sent
        sent += 1
        client.send(line + CRLF)
        verb = line.split(b" ")[0].upper()
        expected = disabled % verb if enhanced else b"502 %s command is disabled\r\n" % verb
        assert client.reply() == expected, line

    # Before EHLO, after EHLO, inside a transaction (after MAIL, after RCPT), after DATA.
    with RawClient(guard.port) as client:
        assert client.reply().startswith(b"220 ")
        refused(client, b"VRFY postmaster", enhanced=False)
        refused(client, b"EXPN staff", enhanced=False)
        client.send(f"EHLO one-{t}.test\r\n".encode())
        keywords = [line[4:].split(b" ")[0] for line in client.reply().splitlines()[1:]]
        assert b"VRFY" not in keywords and b"EXPN" not in keywords, keywords
        assert {b"PIPELINING", b"SIZE", b"ETRN", b"DSN", b"SMTPUTF8"} <= set(keywords), keywords
        refused(client, b"VRFY postmaster")
        client.send(f"MAIL FROM:<one-{t}@src.example>\r\n".encode())
        assert client.reply().startswith(b"250 ")
        refused(client, b"vrfy postmaster")
        client.send(f"RCPT TO:<one-{t}@dest.example>\r\n".encode())
        assert client.reply().startswith(b"250 ")
        refused(client, b"EXPN staff")
        client.send(b"DATA\r\n")
        assert client.reply().startswith(b"354 ")
        client.send(f"Subject: refuse one {t}\r\n\r\nx\r\n.\r\n".encode())
        assert client.reply().startswith(b"250 ")
        refused(client, b"VRFY")
        client.send(b"QUIT\r\n")
        assert client.reply().startswith(b"221 ")
    # After HELO: no enhanced codes (RFC 2034).
    with RawClient(guard.port) as client:
        client.reply()
        client.send(f"HELO two-{t}.test\r\n".encode())
        assert client.reply().startswith(b"250 ")
        refused(client, b"VRFY postmaster", enhanced=False)
        client.send(b"QUIT\r\n")
        client.reply()
    # Pipelined: the 502 comes in its turn among the upstream's replies.
    with RawClient(guard.port) as client:
        client.reply()
        client.send(f"EHLO three-{t}.test\r\n".encode())
        client.reply()
        client.send(
            f"MAIL FROM:<three-{t}@src.example>\r\nVRFY x\r\n"
            f"RCPT TO:<three-{t}@dest.example>\r\nEXPN y\r\nDATA\r\n".encode()
        )
        sent += 2
        mail, vrfy_reply, rcpt, expn_reply, data = client.replies(5)
        assert mail.startswith(b"250 ") and rcpt.startswith(b"250 ") and data.startswith(b"354 ")
        assert (vrfy_reply, expn_reply) == (disabled % b"VRFY", disabled % b"EXPN")
        client.send(f"Subject: refuse three {t}\r\n\r\nx\r\n.\r\nQUIT\r\n".encode())
        assert client.replies(2)[0].startswith(b"250 ")

    assert len(debug_postfix.wait_for_messages(2, where=lambda m: t in m.text)) == 2
    for name in (f"one-{t}.test", f"two-{t}.test", f"three-{t}.test"):
        commands, counters = postfix_commands(debug_postfix, offset, name)
        assert [c for c in commands if c.split(b" ")[0].upper() in (b"VRFY", b"EXPN")] == []
        assert "vrfy" not in counters and "expn" not in counters, counters
        assert "/" not in counters["commands"], counters
    assert sent == 9
    assert (
        guard.metric("smtpguard_policy_actions_total", defence="refused_command", action="reject")
        == sent
    )
    logged = [
        line
        for line in guard.log().splitlines()
        if " event=policy " in line and " defence=refused_command " in line
    ]
    assert len(logged) == sent


def ehlo_keywords(port: int) -> list[bytes]:
    """The keywords of smtpguard's EHLO reply (one session, then QUIT)."""
    with RawClient(port) as client:
        client.reply()
        client.send(b"EHLO c.example\r\n")
        keywords = [line[4:] for line in client.reply().splitlines()[1:]]
        client.send(b"QUIT\r\n")
        client.reply()
    return keywords


def test_refused_verbs_leave_the_ehlo_reply_and_the_upstream_untouched(
    guard_factory: GuardFactory,
) -> None:
    # An upstream that lists the verbs it would answer.
    keywords = (b"VRFY", b"EXPN", b"ETRN", b"8BITMIME", b"ENHANCEDSTATUSCODES")
    with RecordingUpstream(keywords=keywords) as upstream:
        # The control: without commands.refuse, smtpguard shows VRFY and EXPN.
        plain = guard_factory(upstream.upstream)
        assert {b"VRFY", b"EXPN"} <= set(ehlo_keywords(plain.port))
        guard = guard_factory(upstream.upstream, commands={"refuse": ["VRFY", "EXPN", "XDEBUG"]})
        shown = ehlo_keywords(guard.port)
        with RawClient(guard.port) as client:
            client.reply()
            client.send(b"EHLO c.example\r\n")
            client.reply()
            for line in (b"VRFY a", b"EXPN b", b"XDEBUG on", b"xdebug"):
                client.send(line + CRLF)
                verb = line.split(b" ")[0].upper()
                assert client.reply() == b"502 5.5.1 %s command is disabled\r\n" % verb
            client.send(b"ETRN example.com\r\nQUIT\r\n")
            assert client.reply().startswith(b"250 ")
        sessions = upstream.wait_closed(3)
    assert b"VRFY" not in shown and b"EXPN" not in shown, shown
    assert {b"PIPELINING", b"ETRN", b"8BITMIME", b"ENHANCEDSTATUSCODES"} <= set(shown), shown
    assert sessions[2].lines == [b"EHLO c.example", b"ETRN example.com", b"QUIT"]
    assert (
        guard.metric("smtpguard_policy_actions_total", defence="refused_command", action="reject")
        == 4
    )
