"""Play a script (``scripts.py``) as a conforming client, and record what happened.

The runner is the same for both runs of a session: directly against the
upstream, and through smtpguard.  It adapts to what it is offered, as a real
client does: commands are pipelined only when the EHLO reply offers
PIPELINING (and a group ends at every command RFC 2920 3.1 says must be
last: EHLO, DATA, VRFY, EXPN, NOOP, QUIT, and the others whose outcome
changes what comes next); STARTTLS is used only when offered; a DATA body
is sent only after a 354.

It records, per step, the replies it got (code and enhanced code), and the
client's view of the session after each reply: the sender of the open
transaction, its accepted recipients, and the messages whose end got a 2xx.
"""

from __future__ import annotations

import contextlib
import re
import socket
import ssl
from dataclasses import dataclass, field

from scripts import Step

#: Replies the client reads before it gives up on the server (seconds).
REPLY_TIMEOUT_SECONDS = 15.0
#: Verbs after which a pipelining client waits for the replies (RFC 2920 3.1).
GROUP_ENDERS = frozenset(
    {"EHLO", "HELO", "DATA", "VRFY", "EXPN", "NOOP", "QUIT", "HELP", "ETRN", "RAW", "STARTTLS"}
)
_ENHANCED = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}$")


@dataclass(frozen=True)
class Reply:
    code: int
    enhanced: str  #: "" when the reply has no enhanced code
    text: str

    @property
    def ok(self) -> bool:
        return self.code < 400


#: Stands for "no reply": the connection closed (or timed out) first.
CLOSED = Reply(0, "", "connection closed")


@dataclass
class StepResult:
    index: int
    verb: str
    replies: list[Reply] = field(default_factory=list)
    #: Not played: not offered (STARTTLS), or the connection was gone.
    skipped: bool = False
    #: The client's view when the first reply came: greeted? sender?
    greeted: bool = False
    esmtp: bool = False
    sender: str | None = None


@dataclass
class Accepted:
    """A message the client was told was accepted (2xx to its end)."""

    marker: bytes
    sender: str
    recipients: tuple[str, ...]


@dataclass
class Transcript:
    greeting: Reply | None = None
    steps: list[StepResult] = field(default_factory=list)
    accepted: list[Accepted] = field(default_factory=list)
    tls: bool = False
    pipelined: bool = False


def _address(argument: str) -> str:
    match = re.search(r"<([^>]*)>", argument)
    return match.group(1) if match else argument.split(":", 1)[-1].strip()


class _Conn:
    def __init__(self, address: tuple[str, int]) -> None:
        self.sock: socket.socket | ssl.SSLSocket = socket.create_connection(
            address, timeout=REPLY_TIMEOUT_SECONDS
        )
        self.buf = b""
        self.closed = False

    def send(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            self.sock.sendall(data)
        except OSError:
            self.closed = True

    def reply(self) -> Reply:
        lines: list[str] = []
        while not self.closed:
            end = self.buf.find(b"\n")
            if end < 0:
                try:
                    chunk = self.sock.recv(65536)
                except (OSError, ssl.SSLError):
                    chunk = b""
                if not chunk:
                    self.closed = True
                    break
                self.buf += chunk
                continue
            line = self.buf[:end].rstrip(b"\r").decode("utf-8", "replace")
            self.buf = self.buf[end + 1 :]
            lines.append(line)
            if line[3:4] != "-":
                break
        if not lines or not lines[-1][:3].isdigit() or self.closed and lines[-1][3:4] == "-":
            return CLOSED
        last = lines[-1]
        words = last[4:].split(" ", 1)
        enhanced = words[0] if words and _ENHANCED.match(words[0]) else ""
        return Reply(int(last[:3]), enhanced, "\n".join(lines))

    def close(self) -> None:
        self.closed = True
        with contextlib.suppress(OSError):
            self.sock.close()


class _Player:
    """Plays one script; see the module docstring."""

    def __init__(
        self,
        address: tuple[str, int],
        steps: list[Step],
        session: int,
        run: str,
        tls_context: ssl.SSLContext | None,
    ) -> None:
        self.conn = _Conn(address)
        self.steps = steps
        self.session = session
        self.run = run
        self.tls_context = tls_context
        self.out = Transcript()
        self.keywords: set[str] = set()
        self.greeted = False
        self.sender: str | None = None
        self.recipients: list[str] = []
        #: Replies owed, in order: (result, kind, argument).
        self.owed: list[tuple[StepResult, str, object]] = []

    # -- the client's view, updated reply by reply
    def _end_transaction(self) -> None:
        self.sender = None
        self.recipients = []

    def _apply(self, kind: str, arg: object, reply: Reply) -> None:
        if kind == "RAW":
            # A malformed line may still be a command to the server ("mail from:<a@b>").
            word, _, rest = str(arg).partition(" ")
            if word.upper() in ("MAIL", "RCPT", "RSET", "EHLO", "HELO"):
                kind, arg = word.upper(), rest
        if kind in ("EHLO", "HELO"):
            if reply.ok:
                self.greeted = True
                self._end_transaction()
                if kind == "EHLO":
                    self.keywords = {
                        line[4:].split(" ", 1)[0].upper() for line in reply.text.split("\n")[1:]
                    }
                else:
                    self.keywords = set()
        elif kind == "MAIL" and reply.ok:
            self.sender = _address(str(arg))
            self.recipients = []
        elif kind == "RCPT" and reply.ok:
            self.recipients.append(_address(str(arg)))
        elif kind == "RSET" and reply.ok:
            self._end_transaction()
        elif kind in ("DATA_END", "BDAT_LAST"):
            if reply.ok and self.sender is not None:
                assert isinstance(arg, bytes)
                recipients = tuple(sorted(set(self.recipients)))
                self.out.accepted.append(Accepted(arg, self.sender, recipients))
            self._end_transaction()
        elif kind == "BDAT" and not reply.ok:
            pass  # the transaction failed; the client follows with RSET or LAST

    def _read_owed(self) -> None:
        while self.owed:
            result, kind, arg = self.owed.pop(0)
            if not result.replies:
                result.greeted, result.sender = self.greeted, self.sender
                result.esmtp = bool(self.keywords)
            reply = self.conn.reply()
            result.replies.append(reply)
            if reply is CLOSED:
                for later, _, _ in self.owed:
                    later.replies.append(CLOSED)
                self.owed.clear()
                return
            self._apply(kind, arg, reply)

    def _owe(self, result: StepResult, kind: str, arg: object = None) -> None:
        self.owed.append((result, kind, arg))

    @property
    def pipelining(self) -> bool:
        return "PIPELINING" in self.keywords

    def play(self) -> Transcript:
        greeting = self.conn.reply()
        self.out.greeting = greeting
        if greeting.code != 220:
            for index, step in enumerate(self.steps):
                self.out.steps.append(StepResult(index, str(step[0]), skipped=True))
            self.conn.close()
            return self.out
        for index, step in enumerate(self.steps):
            kind = str(step[0])
            result = StepResult(index, kind)
            self.out.steps.append(result)
            if self.conn.closed:
                result.skipped = True
                continue
            if kind == "GROUP":
                self._read_owed()
                continue
            if kind == "STARTTLS":
                self._read_owed()
                if "STARTTLS" not in self.keywords or self.tls_context is None:
                    result.skipped = True
                    continue
                self._starttls(result)
                continue
            if kind == "CLOSE":
                self._read_owed()
                break
            if kind in ("DATA", "CLOSE_IN_DATA"):
                body = step[1]
                assert isinstance(body, bytes)
                body = body.replace(b"-?-", b"-%s-" % self.run.encode(), 1)
                mark = _marker_of(body)
                self.conn.send(b"DATA\r\n")
                self._owe(result, "DATA")
                self._read_owed()
                if result.replies and result.replies[-1].code == 354:
                    if kind == "CLOSE_IN_DATA":
                        self.conn.send(_stuff(body))
                        break
                    self.conn.send(_stuff(body) + b".\r\n")
                    self._owe(result, "DATA_END", mark)
                    self._read_owed()
                elif kind == "CLOSE_IN_DATA":
                    break
                continue
            if kind == "BDAT":
                chunks, last = step[1], step[2]
                assert isinstance(chunks, list)
                if "CHUNKING" not in self.keywords:
                    result.skipped = True
                    continue
                data = b"".join(chunks).replace(b"-?-", b"-%s-" % self.run.encode(), 1)
                mark = _marker_of(data)
                sizes = [len(c) for c in chunks]
                offset = 0
                for n, size in enumerate(sizes):
                    final = last and n == len(sizes) - 1
                    piece = data[offset : offset + size]
                    offset += size
                    self.conn.send(b"BDAT %d%s\r\n" % (size, b" LAST" if final else b"") + piece)
                    self._owe(result, "BDAT_LAST" if final else "BDAT", mark)
                    if not self.pipelining:
                        self._read_owed()
                continue
            line = _line(step)
            self.conn.send(line + b"\r\n")
            self._owe(result, kind, step[1] if len(step) > 1 else None)
            if not self.pipelining or kind in GROUP_ENDERS:
                self._read_owed()
            if kind == "QUIT":
                break
            if self.pipelining and not self.greeted and kind not in GROUP_ENDERS:
                self._read_owed()  # no PIPELINING before EHLO
        self._read_owed()
        self.out.pipelined = self.pipelining
        self.conn.close()
        for result in self.out.steps:
            if not result.replies and not result.skipped and result.verb != "GROUP":
                result.skipped = True
        return self.out

    def _starttls(self, result: StepResult) -> None:
        self.conn.send(b"STARTTLS\r\n")
        self._owe(result, "STARTTLS")
        self._read_owed()
        if not result.replies or result.replies[-1].code != 220:
            return
        assert self.tls_context is not None
        try:
            self.conn.sock = self.tls_context.wrap_socket(
                self.conn.sock, server_hostname="localhost"
            )
        except (OSError, ssl.SSLError):
            self.conn.closed = True
            result.replies.append(CLOSED)
            return
        self.out.tls = True
        self.greeted = False
        self.keywords = set()
        self._end_transaction()
        self.conn.send(b"EHLO tls.client.test\r\n")
        self._owe(result, "EHLO")
        self._read_owed()


def _marker_of(content: bytes) -> bytes:
    match = re.search(rb"X-Marker: (\S+)", content)
    return match.group(1) if match else b"none"


def _line(step: Step) -> bytes:
    kind = str(step[0])
    if kind == "RAW":
        return str(step[1]).encode()
    if len(step) > 1 and step[1] is not None:
        return f"{kind} {step[1]}".encode()
    return kind.encode()


def _stuff(body: bytes) -> bytes:
    """Dot-stuffing (RFC 5321 4.5.2)."""
    lines = body.split(b"\r\n")
    return b"\r\n".join(b"." + line if line.startswith(b".") else line for line in lines)


def play(
    address: tuple[str, int],
    steps: list[Step],
    session: int,
    run: str,
    tls_context: ssl.SSLContext | None = None,
) -> Transcript:
    """Play ``steps`` against ``address`` as session ``session`` of run ``run`` ("d"/"g")."""
    try:
        player = _Player(address, steps, session, run, tls_context)
    except OSError as exc:
        out = Transcript(greeting=Reply(0, "", f"connect failed: {exc}"))
        return out
    try:
        return player.play()
    finally:
        player.conn.close()
