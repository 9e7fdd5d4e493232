#!/usr/bin/env python3
"""A minimal, strict SMTP server standing in for a fragile legacy appliance.

Used as the upstream behind smtpguard in differential conformance tests: whatever
smtpguard forwards must be plain, sequential, RFC 5321 SMTP, or this server drops the
connection and records why.  Standard library only (socket + threading).

In process::

    from support.strict_upstream import StrictUpstream

    with StrictUpstream() as upstream:          # binds a free port on 127.0.0.1
        ...connect to ("127.0.0.1", upstream.port)...
        upstream.wait_closed(1)                 # sessions finish in their own threads
        [session] = upstream.sessions()
        assert session.dropped is None

As a script (prints ``listening on 127.0.0.1:PORT`` once ready, runs until SIGINT/SIGTERM)::

    python3 tests/support/strict_upstream.py --port N --record FILE

Exact rules
===========

Replies
-------
* Greeting: ``220 legacy.test ESMTP``.
* ``EHLO <domain>``: ``250-legacy.test``, ``250-SIZE 10485760``,
  ``250-ENHANCEDSTATUSCODES``, ``250 HELP``.  Nothing else is offered: no PIPELINING,
  CHUNKING, 8BITMIME, STARTTLS, AUTH, DSN, SMTPUTF8.  ``HELO <domain>``: ``250 legacy.test``.
  Both may be repeated and reset any transaction.  Without an argument:
  ``501 5.5.4 Syntax: EHLO hostname`` (or HELO), a protocol error.
* ``MAIL FROM:<path>[ SIZE=digits]``: ``250 2.1.0 Ok``; SIZE above 10485760 gets
  ``552 5.3.4 Message size exceeds fixed limit``.
* ``RCPT TO:<path>``: ``250 2.1.5 Ok``; a local part starting with ``reject``
  (case-insensitive) gets ``550 5.1.1 <addr>: Recipient address rejected``.
* ``DATA``: ``354 End data with <CR><LF>.<CR><LF>``; the body is read up to
  ``CRLF.CRLF`` (lines are split on CRLF only; a bare CR or LF in the body is data, not a
  line end), dot-unstuffed (a leading ``.`` removed from each line), then
  ``250 2.0.0 Ok: queued as N`` (N counts messages across the server, from 1).  A body
  over 10485760 octets gets ``552 5.3.4 Message size exceeds fixed limit`` instead.
  Either way the transaction ends.  The body is not otherwise checked: 8-bit octets,
  bare CR/LF, NUL and long lines are recorded as received.
* ``RSET`` / ``NOOP``: ``250 2.0.0 Ok``; ``HELP``: ``214 2.0.0 ...``;
  ``VRFY``: ``252 2.0.0 ...``; ``QUIT``: ``221 2.0.0 Bye``, then the server closes.
  ``DATA``, ``RSET`` and ``QUIT`` take no argument (else ``501 5.5.4 Syntax error``, a
  protocol error); NOOP, HELP and VRFY accept anything.
* Verbs are case-insensitive; ``FROM:`` / ``TO:`` / ``SIZE`` too.

Protocol errors answered with 503 (the session goes on; counted in ``protocol_errors``)
--------------------------------------------------------------------------------------
* MAIL before HELO/EHLO: ``503 5.5.1 Error: send HELO/EHLO first``.
* MAIL inside a transaction: ``503 5.5.1 Error: nested MAIL command``.
* RCPT outside a transaction: ``503 5.5.1 Error: need MAIL command``.
* DATA without an accepted RCPT (no MAIL, or every RCPT rejected):
  ``503 5.5.1 Error: need RCPT command``.
* (The 501 replies above are also counted as protocol errors.)

Drops: the connection is closed at once, no reply, reason in ``dropped``
------------------------------------------------------------------------
Checked in this order on each command line:

* ``line too long``: a command line over 512 octets including CRLF (also when 512
  octets have arrived without a LF).
* ``bare LF``: a LF not preceded by CR ends the line.
* ``bare CR``: a CR inside the command line.
* ``NUL``: a NUL octet in the command line.
* ``8-bit``: an octet above 127 in the command line.
* ``pipelining``: any byte received before the reply to the previous command (or the
  greeting, or the 354, or the end-of-data reply) was sent.  Checked when a line is
  taken from the buffer (bytes already buffered after it) and again right before each
  reply (bytes pending on the socket, waiting ``pipelining_grace`` seconds for them).
* ``BDAT``: the BDAT verb (CHUNKING is not offered).
* ``unknown verb``: anything but HELO EHLO MAIL RCPT DATA RSET NOOP HELP VRFY QUIT
  (STARTTLS, AUTH, EXPN, an empty line, a verb followed by a TAB, ...).
* ``malformed MAIL`` / ``malformed RCPT``: not exactly ``MAIL FROM:<path>`` /
  ``RCPT TO:<path>`` (no space before ``<``), or a malformed path.  A path is ``<>``
  (MAIL only), ``<postmaster>`` (RCPT only, case-insensitive), or ``<local@domain>`` with
  a dot-atom or quoted local part and a domain of LDH labels or an address literal
  (``[1.2.3.4]``, ``[IPv6:...]``); source routes are malformed.
* ``unknown parameter``: anything after the path other than one ``SIZE=digits`` on MAIL
  (params are separated by exactly one SP; RCPT takes no parameter at all).
* ``timeout``: no complete command for ``timeout`` seconds.

Record
------
Each connection has a :class:`SessionRecord`; ``events`` lists, in order:

* ``("<", line)``: a command line as received, bytes without CRLF (DATA body lines are
  not events: see ``messages``);
* ``(">", reply)``: each reply line sent, str without CRLF (a multiline EHLO reply gives
  one event per line);
* ``("drop", reason)``: the server dropped the connection; ``reason`` starts with one of
  the drop names above (``pipelining``, ``unknown verb`` and ``unknown parameter`` are
  followed by ``: <details>``, so compare with ``startswith``);
* ``("eof",)``: the client closed (or reset) the connection.

After a QUIT reply there is no further event, nor when :meth:`StrictUpstream.stop`
closes a session still open.  Other fields: ``lines`` / ``replies`` (the ``<`` / ``>``
events only), ``dropped`` (the drop reason or None), ``protocol_errors`` (the 503/501
reply texts), ``messages`` and ``closed``.  Delivered messages are :class:`Message` with
``sender`` / ``recipients`` (paths without angle brackets, ``""`` for the null sender,
accepted recipients only), ``data`` (bytes after dot-unstuffing, each line ending in
CRLF, the final ``.`` line excluded) and ``queue_id``.  Sessions run in their own
threads: call :meth:`StrictUpstream.wait_closed` before asserting on a finished session.
With ``record_path`` every record change is also appended as a JSON line to that file
(bytes as latin-1 strings); :func:`load_record` reads such a file back.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import re
import select
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HOSTNAME = "legacy.test"
SIZE_LIMIT = 10485760
MAX_LINE = 512  # octets, CRLF included (RFC 5321 4.5.3.1.4)

GREETING = f"220 {HOSTNAME} ESMTP"
EHLO_LINES = (HOSTNAME, f"SIZE {SIZE_LIMIT}", "ENHANCEDSTATUSCODES", "HELP")
KNOWN_VERBS = frozenset(
    {"HELO", "EHLO", "MAIL", "RCPT", "DATA", "RSET", "NOOP", "HELP", "VRFY", "QUIT"}
)

_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_DOT_STRING = rf"{_ATEXT}+(?:\.{_ATEXT}+)*"
_QUOTED = r'"(?:[ !#-\[\]-~]|\\[ -~])*"'
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_DOMAIN = rf"{_LABEL}(?:\.{_LABEL})*"
_LITERAL = r"\[(?:\d{1,3}(?:\.\d{1,3}){3}|IPv6:[0-9A-Fa-f:.]+)\]"
_MAILBOX = rf"(?P<local>{_DOT_STRING}|{_QUOTED})@(?:{_DOMAIN}|{_LITERAL})"
MAIL_RE = re.compile(rf"FROM:<(?P<path>{_MAILBOX}|)>(?P<params>.*)", re.IGNORECASE | re.DOTALL)
RCPT_RE = re.compile(
    rf"TO:<(?P<path>{_MAILBOX}|postmaster)>(?P<params>.*)", re.IGNORECASE | re.DOTALL
)
SIZE_RE = re.compile(r"SIZE=([0-9]+)", re.IGNORECASE)

Event = tuple[Any, ...]


@dataclass
class Message:
    """A message the server accepted (250 after DATA)."""

    sender: str
    recipients: list[str]
    data: bytes
    queue_id: str = ""
    session: int = 0


@dataclass
class SessionRecord:
    """Everything one connection did.  ``sessions()`` hands out copies."""

    id: int
    peer: tuple[str, int] | None = None
    events: list[Event] = field(default_factory=list)
    dropped: str | None = None
    messages: list[Message] = field(default_factory=list)
    protocol_errors: list[str] = field(default_factory=list)
    closed: bool = False

    @property
    def lines(self) -> list[bytes]:
        """The command lines received, as bytes without CRLF."""
        return [event[1] for event in self.events if event[0] == "<"]

    @property
    def replies(self) -> list[str]:
        """The reply lines sent, without CRLF."""
        return [event[1] for event in self.events if event[0] == ">"]


class _Drop(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _Eof(Exception):
    pass


class _Quit(Exception):
    pass


def _latin1(value: Any) -> Any:
    return value.decode("latin-1") if isinstance(value, bytes) else value


class StrictUpstream:
    """The strict SMTP server; see the module docstring for its rules.

    ``port=0`` picks a free port on ``host`` at :meth:`start`; read it from ``.port``.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        record_path: str | Path | None = None,
        timeout: float = 60.0,
        pipelining_grace: float = 0.002,
    ) -> None:
        self.host = host
        self.port = port
        self.record_path = Path(record_path) if record_path is not None else None
        self.timeout = timeout
        self.pipelining_grace = pipelining_grace
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._sessions: list[SessionRecord] = []
        self._messages: list[Message] = []
        self._next_session = 1
        self._next_queue_id = 1
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._threads: list[threading.Thread] = []
        self._clients: set[socket.socket] = set()
        self._stopping = threading.Event()

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> StrictUpstream:
        if self._listener is not None:
            raise RuntimeError("already started")
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.host, self.port))
        listener.listen(64)
        listener.settimeout(0.1)
        self.port = listener.getsockname()[1]
        self._listener = listener
        self._stopping.clear()
        self._accept_thread = threading.Thread(
            target=self._accept_loop, name=f"strict-upstream-{self.port}", daemon=True
        )
        self._accept_thread.start()
        return self

    def stop(self) -> None:
        """Stop accepting, close every open connection and wait for the threads."""
        self._stopping.set()
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)  # wakes accept() at once on Linux
        if self._accept_thread is not None:
            self._accept_thread.join()
            self._accept_thread = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        with self._lock:
            clients = list(self._clients)
            threads = list(self._threads)
        for client in clients:
            with contextlib.suppress(OSError):
                client.shutdown(socket.SHUT_RDWR)
        for thread in threads:
            thread.join(timeout=5)

    def __enter__(self) -> StrictUpstream:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    # -- record API --------------------------------------------------------------------

    def sessions(self) -> list[SessionRecord]:
        """Copies of the session records so far (open ones included), oldest first."""
        with self._lock:
            return copy.deepcopy(self._sessions)

    def messages(self) -> list[Message]:
        """Copies of the messages accepted so far, across all sessions, in order."""
        with self._lock:
            return copy.deepcopy(self._messages)

    def clear(self) -> None:
        """Forget the sessions and messages recorded so far (the JSON file is kept)."""
        with self._lock:
            self._sessions.clear()
            self._messages.clear()

    def wait_closed(self, count: int | None = None, timeout: float = 5.0) -> list[SessionRecord]:
        """Wait until at least ``count`` sessions exist (default: 1) and all are closed.

        Returns the sessions; raises TimeoutError.  Useful because each session is
        handled in its own thread and may still be recording when the client is done.
        """
        wanted = 1 if count is None else count
        deadline = time.monotonic() + timeout
        with self._changed:
            while not (len(self._sessions) >= wanted and all(s.closed for s in self._sessions)):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(
                        f"{len(self._sessions)} session(s), "
                        f"{sum(not s.closed for s in self._sessions)} still open"
                    )
                self._changed.wait(remaining)
            return copy.deepcopy(self._sessions)

    # -- internals ---------------------------------------------------------------------

    def _write(self, entry: dict[str, Any]) -> None:
        # Called with self._lock held.
        if self.record_path is None:
            return
        with self.record_path.open("a", encoding="utf-8") as file:
            file.write(json.dumps(entry) + "\n")

    def _event(self, record: SessionRecord, *event: Any) -> None:
        with self._changed:
            record.events.append(tuple(event))
            if event[0] == "drop":
                record.dropped = event[1]
            self._write(
                {"session": record.id, "type": "event", "event": [_latin1(v) for v in event]}
            )
            self._changed.notify_all()

    def _protocol_error(self, record: SessionRecord, reason: str) -> None:
        with self._lock:
            record.protocol_errors.append(reason)
            self._write({"session": record.id, "type": "protocol_error", "reason": reason})

    def _deliver(self, record: SessionRecord, sender: str, rcpts: list[str], data: bytes) -> str:
        with self._lock:
            queue_id = str(self._next_queue_id)
            self._next_queue_id += 1
            message = Message(sender, list(rcpts), data, queue_id, record.id)
            record.messages.append(message)
            self._messages.append(message)
            self._write(
                {
                    "session": record.id,
                    "type": "message",
                    "sender": sender,
                    "recipients": rcpts,
                    "data": data.decode("latin-1"),
                    "queue_id": queue_id,
                }
            )
            return queue_id

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stopping.is_set():
            try:
                client, peer = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._changed:
                record = SessionRecord(self._next_session, (peer[0], peer[1]))
                self._next_session += 1
                self._sessions.append(record)
                self._clients.add(client)
                self._write({"session": record.id, "type": "connect", "peer": list(peer)})
                thread = threading.Thread(
                    target=self._serve,
                    args=(client, record),
                    name=f"strict-upstream-session-{record.id}",
                    daemon=True,
                )
                self._threads = [t for t in self._threads if t.is_alive()]
                self._threads.append(thread)
                self._changed.notify_all()
            thread.start()

    def _serve(self, client: socket.socket, record: SessionRecord) -> None:
        client.settimeout(self.timeout)
        try:
            _Session(self, client, record).run()
        finally:
            with contextlib.suppress(OSError):
                client.close()
            with self._changed:
                self._clients.discard(client)
                record.closed = True
                self._write({"session": record.id, "type": "close"})
                self._changed.notify_all()


class _Session:
    def __init__(self, server: StrictUpstream, sock: socket.socket, record: SessionRecord):
        self.server = server
        self.sock = sock
        self.record = record
        self.buf = bytearray()
        self.helo: str | None = None
        self.sender: str | None = None  # None: no transaction
        self.recipients: list[str] = []

    # -- I/O ---------------------------------------------------------------------------

    def run(self) -> None:
        try:
            self.reply(GREETING, before="greeting")
            while True:
                self.dispatch(self.read_command())
        except _Drop as drop:
            self.server._event(self.record, "drop", drop.reason)
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)
        except _Quit:
            pass
        except _Eof:
            if not self.server._stopping.is_set():
                self.server._event(self.record, "eof")
        except TimeoutError:
            self.server._event(self.record, "drop", "timeout")
        except OSError:
            if not self.server._stopping.is_set():
                self.server._event(self.record, "eof")

    def recv(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise _Eof
        self.buf += data

    def pending(self) -> bytes:
        """Bytes the client sent that we have not consumed (buffered or on the socket)."""
        if self.buf:
            return bytes(self.buf)
        readable, _, _ = select.select([self.sock], [], [], self.server.pipelining_grace)
        if not readable:
            return b""
        try:
            return self.sock.recv(256, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return b""
        except OSError:
            return b""  # reset: the next read reports it

    def reply(self, *lines: str, before: str) -> None:
        early = self.pending()
        if early:
            raise _Drop(f"pipelining: {early[:64]!r} received before the {before} reply")
        for line in lines:
            self.server._event(self.record, ">", line)
        self.sock.sendall("".join(f"{line}\r\n" for line in lines).encode("ascii"))

    def read_command(self) -> bytes:
        while True:
            index = self.buf.find(b"\n")
            if index == -1:
                if len(self.buf) >= MAX_LINE:
                    self.fail(bytes(self.buf), "line too long")
                self.recv()
                continue
            if index + 1 > MAX_LINE:
                self.fail(bytes(self.buf[:index]), "line too long")
            if index == 0 or self.buf[index - 1] != 0x0D:
                self.fail(bytes(self.buf[:index]), "bare LF")
            line = bytes(self.buf[: index - 1])
            del self.buf[: index + 1]
            self.server._event(self.record, "<", line)
            if b"\r" in line:
                raise _Drop("bare CR")
            if b"\0" in line:
                raise _Drop("NUL")
            if any(octet > 127 for octet in line):
                raise _Drop("8-bit")
            if self.buf:
                raise _Drop(f"pipelining: {bytes(self.buf[:64])!r} received with {line[:20]!r}")
            return line

    def fail(self, line: bytes, reason: str) -> None:
        self.server._event(self.record, "<", line)
        raise _Drop(reason)

    # -- commands ----------------------------------------------------------------------

    def dispatch(self, line: bytes) -> None:
        text = line.decode("ascii")
        verb, space, arg = text.partition(" ")
        verb = verb.upper()
        if verb == "BDAT":
            raise _Drop("BDAT")
        if verb not in KNOWN_VERBS:
            raise _Drop(f"unknown verb: {verb[:20]!r}")
        getattr(self, f"do_{verb.lower()}")(arg, bool(space))

    def error(self, code: str, reason: str, *, before: str) -> None:
        self.server._protocol_error(self.record, reason)
        self.reply(f"{code} {reason}", before=before)

    def reset(self) -> None:
        self.sender = None
        self.recipients = []

    def do_helo(self, arg: str, _space: bool, verb: str = "HELO") -> None:
        if not arg.strip():
            self.error("501", f"5.5.4 Syntax: {verb} hostname", before=verb)
            return
        self.helo = arg
        self.reset()
        if verb == "EHLO":
            *head, last = EHLO_LINES
            self.reply(*(f"250-{line}" for line in head), f"250 {last}", before=verb)
        else:
            self.reply(f"250 {HOSTNAME}", before=verb)

    def do_ehlo(self, arg: str, space: bool) -> None:
        self.do_helo(arg, space, "EHLO")

    def do_mail(self, arg: str, _space: bool) -> None:
        match = MAIL_RE.fullmatch(arg)
        if match is None:
            raise _Drop("malformed MAIL")
        size = self.parse_params(match["params"], allow_size=True)
        if self.helo is None:
            self.error("503", "5.5.1 Error: send HELO/EHLO first", before="MAIL")
        elif self.sender is not None:
            self.error("503", "5.5.1 Error: nested MAIL command", before="MAIL")
        elif size is not None and size > SIZE_LIMIT:
            self.reply("552 5.3.4 Message size exceeds fixed limit", before="MAIL")
        else:
            self.sender = match["path"]
            self.recipients = []
            self.reply("250 2.1.0 Ok", before="MAIL")

    def do_rcpt(self, arg: str, _space: bool) -> None:
        match = RCPT_RE.fullmatch(arg)
        if match is None:
            raise _Drop("malformed RCPT")
        self.parse_params(match["params"], allow_size=False)
        path = match["path"]
        if self.sender is None:
            self.error("503", "5.5.1 Error: need MAIL command", before="RCPT")
        elif (match["local"] or "").lower().startswith("reject"):
            self.reply(f"550 5.1.1 <{path}>: Recipient address rejected", before="RCPT")
        else:
            self.recipients.append(path)
            self.reply("250 2.1.5 Ok", before="RCPT")

    def parse_params(self, params: str, *, allow_size: bool) -> int | None:
        if not params:
            return None
        if not params.startswith(" "):
            raise _Drop("malformed path")
        size = None
        for param in params[1:].split(" "):
            match = SIZE_RE.fullmatch(param)
            if not allow_size or match is None or size is not None:
                raise _Drop(f"unknown parameter: {param[:40]!r}")
            size = int(match[1])
        return size

    def do_data(self, arg: str, space: bool) -> None:
        if space or arg:
            self.error("501", "5.5.4 Syntax error", before="DATA")
            return
        if self.sender is None or not self.recipients:
            self.error("503", "5.5.1 Error: need RCPT command", before="DATA")
            return
        self.reply("354 End data with <CR><LF>.<CR><LF>", before="DATA")
        data = bytearray()
        while True:
            index = self.buf.find(b"\r\n")
            if index == -1:
                self.recv()
                continue
            line = bytes(self.buf[:index])
            del self.buf[: index + 2]
            if line == b".":
                break
            data += (line[1:] if line.startswith(b".") else line) + b"\r\n"
        sender, recipients = self.sender, self.recipients
        self.reset()
        if len(data) > SIZE_LIMIT:
            self.reply("552 5.3.4 Message size exceeds fixed limit", before="end-of-data")
            return
        early = self.pending()
        if early:
            raise _Drop(f"pipelining: {early[:64]!r} received before the end-of-data reply")
        queue_id = self.server._deliver(self.record, sender, recipients, bytes(data))
        self.reply(f"250 2.0.0 Ok: queued as {queue_id}", before="end-of-data")

    def no_arg(self, verb: str, arg: str, space: bool) -> bool:
        if space or arg:
            self.error("501", "5.5.4 Syntax error", before=verb)
            return False
        return True

    def do_rset(self, arg: str, space: bool) -> None:
        if self.no_arg("RSET", arg, space):
            self.reset()
            self.reply("250 2.0.0 Ok", before="RSET")

    def do_noop(self, _arg: str, _space: bool) -> None:
        self.reply("250 2.0.0 Ok", before="NOOP")

    def do_help(self, _arg: str, _space: bool) -> None:
        self.reply(
            "214 2.0.0 Commands: HELO EHLO MAIL RCPT DATA RSET NOOP HELP VRFY QUIT", before="HELP"
        )

    def do_vrfy(self, _arg: str, _space: bool) -> None:
        self.reply("252 2.0.0 Cannot VRFY user, but will accept message", before="VRFY")

    def do_quit(self, arg: str, space: bool) -> None:
        if self.no_arg("QUIT", arg, space):
            self.reply("221 2.0.0 Bye", before="QUIT")
            raise _Quit


# -- reading a JSON-lines record back ------------------------------------------------------


def load_record(path: str | Path) -> list[SessionRecord]:
    """Rebuild the session records from a ``record_path`` file (bytes from latin-1)."""
    sessions: dict[int, SessionRecord] = {}
    for raw in Path(path).read_text(encoding="utf-8").splitlines():
        if not raw.strip():
            continue
        entry = json.loads(raw)
        number = entry["session"]
        record = sessions.setdefault(number, SessionRecord(number))
        kind = entry["type"]
        if kind == "connect":
            record.peer = (entry["peer"][0], entry["peer"][1])
        elif kind == "event":
            event = list(entry["event"])
            if event[0] == "<":
                event[1] = event[1].encode("latin-1")
            if event[0] == "drop":
                record.dropped = event[1]
            record.events.append(tuple(event))
        elif kind == "protocol_error":
            record.protocol_errors.append(entry["reason"])
        elif kind == "message":
            record.messages.append(
                Message(
                    entry["sender"],
                    entry["recipients"],
                    entry["data"].encode("latin-1"),
                    entry["queue_id"],
                    number,
                )
            )
        elif kind == "close":
            record.closed = True
    return [sessions[number] for number in sorted(sessions)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Strict legacy-appliance SMTP server.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: pick a free port")
    parser.add_argument("--record", help="append the record to this file as JSON lines")
    parser.add_argument("--timeout", type=float, default=60.0)
    args = parser.parse_args(argv)

    done = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: done.set())
    with StrictUpstream(args.host, args.port, record_path=args.record, timeout=args.timeout) as s:
        print(f"listening on {s.host}:{s.port}", flush=True)
        while not done.wait(0.5):
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
