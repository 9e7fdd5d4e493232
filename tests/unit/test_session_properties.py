"""Hypothesis over random sessions: random commands, replies, chunking and timing.

A model client (pipelining, waiting only where RFC 2920 says it must: after
DATA and AUTH) talks through the session to a model upstream that answers
each command with a randomly drawn reply and checks every command it
receives against its own, independently written idea of SMTP order.

Invariants:
- the client gets exactly one reply per command, in command order (upstream
  replies echo the command, so each reply is matched to its command);
- the upstream never receives a command out of sequence given the replies
  it has already sent, and when it does not offer PIPELINING it never
  receives a command while one of its replies is still unread;
- the session ends (QUIT -> 221 -> closed) with nothing left pending.
"""

from __future__ import annotations

import re

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.upstream import Body, Chunk, Framing

from smtpguard.protocol import Session, SessionOptions
from smtpguard.protocol.policy import Policy

LOCAL_CODES = {b"214", b"500", b"501", b"502", b"503"}

COMMANDS = [
    "EHLO",
    "HELO",
    "MAIL",
    "RCPT",
    "DATA",
    "BDAT",
    "BDATLAST",
    "RSET",
    "NOOP",
    "HELP",
    "VRFY",
    "AUTH",
    "STARTTLS",
    "FOO",
    "XCLIENT",
]


def command_line(kind: str, i: int) -> bytes:
    return {
        "EHLO": b"EHLO c%d",
        "HELO": b"HELO c%d",
        "MAIL": b"MAIL FROM:<s%d@x>",
        "RCPT": b"RCPT TO:<r%d@x>",
        "DATA": b"DATA",
        "BDAT": b"BDAT 5",
        "BDATLAST": b"BDAT 5 LAST",
        "RSET": b"RSET",
        "NOOP": b"NOOP %d",
        "HELP": b"HELP %d",
        "VRFY": b"VRFY v%d",
        "AUTH": b"AUTH PLAIN",
        "STARTTLS": b"STARTTLS",
        "FOO": b"FOO %d",
        "XCLIENT": b"XCLIENT ADDR=10.0.0.%d",
    }[kind].replace(b"%d", str(i).encode())


class ModelUpstream:
    """A strict SMTP server model with randomly drawn outcomes."""

    def __init__(self, draw: st.DrawFn, pipelining: bool) -> None:
        self.draw = draw
        self.pipelining = pipelining
        self.framing = Framing()  # bodies and chunks are framed as the kit does
        self.out = bytearray()  # replies not yet read by the session
        self.errors: list[str] = []
        self.helo = self.esmtp = self.mail = self.authed = self.bdat = False
        self.rcpts = 0
        self.sasl = False  # the next line is a SASL response
        self.chunk_last = False
        self.out += b"220 model ESMTP\r\n"

    def ok(self, p: float = 0.75) -> bool:
        return self.draw(st.floats(0, 1)) < p

    def reply(self, text: bytes) -> None:
        self.out += text + b"\r\n"

    def feed(self, data: bytes) -> None:
        commands_this_batch = 0
        for unit in self.framing.feed(data):
            if isinstance(unit, Chunk):
                # As Postfix: a refused chunk leaves the transaction in BDAT
                # mode (failed: RCPT and DATA are out of sequence); LAST ends
                # it whatever the reply.
                self.bdat = not self.chunk_last
                if self.chunk_last:
                    self.mail, self.rcpts = False, 0
                if self.ok():
                    self.reply(b"250 echo %s" % unit.line)
                else:
                    self.reply(b"554 echo %s" % unit.line)
            elif isinstance(unit, Body):
                self.mail, self.rcpts = False, 0
                self.reply(b"250 echo END" if self.ok() else b"554 echo END")
            elif self.sasl:
                self.sasl = False
                self.reply(b"501 echo " + unit.line)
            else:
                commands_this_batch += 1
                if not self.pipelining and (commands_this_batch > 1 or self.out):
                    self.errors.append(f"pipelined to a serial upstream: {unit.line!r}")
                self.command(unit.line)

    def violation(self, line: bytes, why: str) -> None:
        self.errors.append(f"{line!r}: {why}")
        self.reply(b"503 model saw out-of-sequence " + line)

    def command(self, line: bytes) -> None:
        verb = line.split()[0]
        echo = b"echo " + line
        if verb in (b"EHLO", b"HELO"):
            if self.ok(0.9):
                self.helo, self.esmtp = True, verb == b"EHLO"
                self.mail, self.rcpts, self.bdat = False, 0, False
                if verb == b"EHLO":
                    caps = b"250-PIPELINING\r\n" if self.pipelining else b""
                    caps += b"250-CHUNKING\r\n250 AUTH PLAIN\r\n"
                    self.out += b"250-" + echo + b"\r\n" + caps
                else:
                    self.reply(b"250 " + echo)
            else:
                self.reply(b"501 " + echo)
        elif verb == b"MAIL":
            if not self.helo or self.mail:
                return self.violation(line, "MAIL without HELO or nested")
            if self.ok():
                self.mail = True
                self.reply(b"250 " + echo)
            else:
                self.reply(b"550 " + echo)
        elif verb == b"RCPT":
            if not self.mail or self.bdat:
                return self.violation(line, "RCPT without MAIL or after BDAT")
            if self.ok():
                self.rcpts += 1
                self.reply(b"250 " + echo)
            else:
                self.reply(b"550 " + echo)
        elif verb == b"DATA":
            if not self.rcpts or self.bdat:
                return self.violation(line, "DATA without recipients or after BDAT")
            if self.ok():
                self.framing.expect_body()
                self.reply(b"354 " + echo)
            else:
                self.reply(b"554 " + echo)
        elif verb == b"BDAT":
            if not self.rcpts or not self.esmtp:
                self.errors.append(f"{line!r}: BDAT without recipients")
            parts = line.split()
            self.chunk_last = len(parts) == 3
            self.framing.expect_chunk(line, int(parts[1]))
        elif verb == b"RSET":
            self.mail, self.rcpts, self.bdat = False, 0, False
            self.reply(b"250 " + echo)
        elif verb == b"AUTH":
            if not self.esmtp or self.mail or self.authed:
                return self.violation(line, "AUTH out of sequence")
            if self.ok(0.5):
                self.sasl = True
                self.reply(b"334 " + echo)
            else:
                self.reply(b"535 " + echo)
        elif verb == b"QUIT":
            self.reply(b"221 " + echo)
        elif verb in (b"NOOP", b"HELP", b"VRFY"):
            if not self.helo and verb != b"NOOP" and self.ok(0.1):
                self.reply(b"503 " + echo)
            else:
                self.reply(b"250 " + echo)
        else:
            self.errors.append(f"unexpected command reached upstream: {line!r}")
            self.reply(b"500 " + echo)


_REPLY_RE = re.compile(rb"(\d{3})[ -]")


def split_replies(data: bytes) -> list[bytes]:
    """Client-side reply parser: whole replies, multi-line joined."""
    replies, current = [], b""
    for line in data.split(b"\r\n")[:-1]:
        current += line + b"\r\n"
        if line[3:4] != b"-":
            replies.append(current)
            current = b""
    assert current == b"", current
    return replies


@st.composite
def sessions(draw: st.DrawFn) -> tuple[list[str], bool, bool, st.DrawFn]:
    kinds = draw(st.lists(st.sampled_from(COMMANDS), min_size=0, max_size=25))
    # Most sessions start properly so that deep states get reached.
    if draw(st.booleans()):
        kinds = ["EHLO", "MAIL", "RCPT", *kinds]
    return kinds, draw(st.booleans()), draw(st.booleans()), draw


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sessions())
def test_random_sessions_keep_order_and_never_send_out_of_sequence(
    case: tuple[list[str], bool, bool, st.DrawFn],
) -> None:
    kinds, upstream_pipelining, help_local, draw = case
    # Limits off: this test is about order (the error limits have their own tests).
    limits = Policy(hard_error_limit=10**6, max_unknown_commands=10**6)
    session = Session(SessionOptions(help_local=help_local, auth_require_tls=False, policy=limits))
    upstream = ModelUpstream(draw, upstream_pipelining)
    lines = [command_line(k, i) for i, k in enumerate(kinds)] + [b"QUIT"]
    expected: list[bytes] = [b"GREETING"]  # what each reply answers, in order
    client_out = bytearray()
    received = bytearray()
    next_cmd = 0
    waiting_for = -1  # index in `expected` of a reply the client waits for

    def client_sends() -> None:
        nonlocal next_cmd, waiting_for
        while next_cmd < len(lines) and waiting_for < 0:
            line = lines[next_cmd]
            next_cmd += 1
            client_out.extend(line + b"\r\n")
            if line.startswith(b"BDAT"):
                client_out.extend(b"Q\r\n.\r")  # 5 bytes of chunk: not commands
            expected.append(line)
            if line in (b"DATA", b"AUTH PLAIN"):
                waiting_for = len(expected) - 1

    client_sends()
    for _ in range(5000):
        replies = split_replies(bytes(received))
        if waiting_for >= 0 and len(replies) > waiting_for:
            code = replies[waiting_for][:3]
            waiting_for = -1
            if code == b"354":
                client_out.extend(b"Subject: t\r\n\r\nbody\r\n.\r\n")
                expected.append(b"END")
            elif code == b"334":
                client_out.extend(b"*\r\n")
                expected.append(b"*")
            client_sends()
        choices = []
        if client_out:
            choices.append("client")
        if upstream.out:
            choices.append("upstream")
        if not choices:
            break
        side = draw(st.sampled_from(choices))
        source = client_out if side == "client" else upstream.out
        n = draw(st.integers(1, len(source)))
        chunk = bytes(source[:n])
        del source[:n]
        if side == "client":
            session.receive_client(chunk)
        else:
            session.receive_upstream(chunk)
        upstream.feed(session.take_upstream_bytes())
        received += session.take_client_bytes()
    else:
        raise AssertionError("session did not finish")

    assert upstream.errors == []
    replies = split_replies(bytes(received))
    assert len(replies) == len(expected), (replies, expected)
    assert replies[0] == b"220 model ESMTP\r\n"
    for reply, command in zip(replies[1:], expected[1:], strict=True):
        code = reply[:3]
        if code in LOCAL_CODES and b"echo" not in reply:
            verb = command.split()[0]
            assert verb not in (b"END", b"*", b"QUIT"), (reply, command)
            if verb in (b"FOO", b"XCLIENT"):
                assert code == b"500"
            if code == b"503":
                assert b"Error: " in reply
            continue
        assert re.match(rb"\d{3}[ -]echo " + re.escape(command) + rb"\r\n", reply), (
            reply,
            command,
        )
    assert replies[-1].startswith(b"221 echo QUIT")
    assert session.closed and session.close_reason == "quit"


@given(st.binary(min_size=0, max_size=300), st.integers(1, 7))
def test_byte_at_a_time_equals_one_write(body: bytes, step: int) -> None:
    """Framing does not depend on how the bytes are split."""
    body = b"x" + body.replace(b"\r\n.\r\n", b"\r\n..\r\n")  # never starts with ".\r\n"
    script = (
        b"EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n"
        + body
        + b"\r\n.\r\nBDAT 3 LAST\r\nxyzNOOP\r\nQUIT\r\n"
    )

    def run(chunks: list[bytes]) -> tuple[bytes, bytes]:
        s = Session()
        s.receive_upstream(b"220 up\r\n")
        up_log, down_log = bytearray(), bytearray()
        replies = iter(
            [b"250-up\r\n250 PIPELINING\r\n", b"250 ok\r\n", b"250 ok\r\n", b"354 go\r\n"]
            + [b"250 queued\r\n", b"503 bdat\r\n", b"250 ok\r\n", b"221 bye\r\n"]
        )
        for chunk in chunks:
            s.receive_client(chunk)
            while True:
                up = s.take_upstream_bytes()
                up_log += up
                if not s.awaiting_upstream:
                    break
                s.receive_upstream(next(replies))
            down_log += s.take_client_bytes()
        return bytes(up_log), bytes(down_log)

    whole = run([script])
    pieces = run([script[i : i + step] for i in range(0, len(script), step)])
    assert whole == pieces
    if not any(c in body for c in b"\r\n\0"):
        assert body + b"\r\n.\r\n" in whole[0]  # clean bodies pass byte for byte
