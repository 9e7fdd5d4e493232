"""Embedded default upstream: a tiny SMTP server that drops accepted mail into a directory.

smtpguard starts it when no real MTA is configured, so a newcomer's first test message ends up
as a file they can open instead of bouncing off a missing upstream.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import os
import pathlib
import re
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime

# trio < 0.23 ships no type information; newer versions do, hence the unused-ignore escape.
import trio

__all__ = ["serve_sink"]

log = logging.getLogger(__name__)

MAX_MESSAGE_SIZE = 52_428_800
MAX_RECIPIENTS = 1000
MAX_LINE = 4096
IDLE_TIMEOUT = 300.0

_EHLO_KEYWORDS = (
    "PIPELINING",
    f"SIZE {MAX_MESSAGE_SIZE}",
    "8BITMIME",
    "ENHANCEDSTATUSCODES",
    "CHUNKING",
    "SMTPUTF8",
)
# Control characters are refused so an address can never inject a header line into the .eml.
_MAIL_RE = re.compile(r"FROM:\s*<([^<>\x00-\x1f\x7f]*)>((?:\s+\S+)*)\s*", re.IGNORECASE)
_RCPT_RE = re.compile(r"TO:\s*<([^<>\x00-\x1f\x7f]+)>((?:\s+\S+)*)\s*", re.IGNORECASE)
_BDAT_RE = re.compile(r"(\d{1,10})(\s+LAST)?\s*", re.IGNORECASE)
_BODY_TYPES = {"7BIT", "8BITMIME"}


class _LineTooLong(Exception):
    pass


def _recipients_header(rcpts: list[str]) -> str:
    lines = ["X-Smtpguard-Sink-Recipients:"]
    for i, rcpt in enumerate(rcpts):
        item = rcpt + ("," if i < len(rcpts) - 1 else "")
        # Fold rather than emit one huge line: 1000 recipients would break RFC 5322's 998 limit.
        if i and len(lines[-1]) + 1 + len(item) > 78:
            lines.append("")
        lines[-1] += " " + item
    return "\r\n".join(lines) + "\r\n"


def _write_message(path: pathlib.Path, sender: str, rcpts: list[str], body: bytes) -> None:
    header = f"Return-Path: <{sender}>\r\n" + _recipients_header(rcpts)
    # Hidden non-.eml temp name + rename: anyone watching the directory sees whole files only.
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(header.encode("utf-8", "surrogateescape"))
            f.write(body)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class _Session:
    def __init__(
        self,
        stream: trio.SocketStream,
        directory: pathlib.Path,
        hostname: str,
        counter: Iterator[int],
        idle_timeout: float,
    ) -> None:
        self.stream = stream
        self.directory = directory
        self.hostname = hostname
        self.counter = counter
        self.idle_timeout = idle_timeout
        self.buf = bytearray()
        self.done = False
        self.helo: str | None = None
        self.sender: str | None = None
        self.rcpts: list[str] = []
        self.bdat: bytearray | None = None
        self.commands: dict[str, Callable[[str], Awaitable[None]]] = {
            "HELO": self.helo_cmd,
            "EHLO": self.ehlo_cmd,
            "MAIL": self.mail_cmd,
            "RCPT": self.rcpt_cmd,
            "DATA": self.data_cmd,
            "BDAT": self.bdat_cmd,
            "RSET": self.rset_cmd,
            "NOOP": self.noop_cmd,
            "VRFY": self.vrfy_cmd,
            "HELP": self.help_cmd,
            "QUIT": self.quit_cmd,
        }

    async def fill(self) -> bool:
        with trio.fail_after(self.idle_timeout):
            data: bytes = await self.stream.receive_some(65536)
        self.buf += data
        return bool(data)

    async def reply(self, code: int, *texts: str) -> None:
        last = len(texts) - 1
        out = "".join(f"{code}{' ' if i == last else '-'}{t}\r\n" for i, t in enumerate(texts))
        with trio.fail_after(self.idle_timeout):
            await self.stream.send_all(out.encode("utf-8", "surrogateescape"))

    async def read_line(self) -> bytes | None:
        """Next command line without its terminator; None at EOF."""
        start, discarding = 0, False
        while True:
            idx = self.buf.find(b"\n", start)
            if idx >= 0:
                line = bytes(self.buf[:idx])
                del self.buf[: idx + 1]
                if discarding or idx >= MAX_LINE:
                    raise _LineTooLong
                # Bare LF is tolerated on command lines for people typing into plain netcat.
                return line.removesuffix(b"\r")
            if len(self.buf) > MAX_LINE:
                # Drop the oversized line as it streams in so memory stays bounded.
                discarding = True
                self.buf.clear()
            start = len(self.buf)
            if not await self.fill():
                return None

    async def read_exact(self, n: int, keep: bool) -> bytearray | None:
        out = bytearray()
        while n:
            if not self.buf and not await self.fill():
                return None
            take = min(n, len(self.buf))
            if keep:
                out += self.buf[:take]
            del self.buf[:take]
            n -= take
        return out

    async def read_data(self) -> tuple[bytearray, bool] | None:
        """Un-dot-stuffed DATA body and whether it exceeded the size limit; None at EOF."""
        out, too_big, line_start = bytearray(), False, True
        while True:
            buf = self.buf
            if line_start:
                # Only CRLF.CRLF ends the body: a looser rule than the real MTA's would let a
                # client smuggle a second message past whatever sits in front of us.
                if buf.startswith(b".\r\n"):
                    del buf[:3]
                    return out, too_big
                if buf.startswith(b"."):
                    if len(buf) >= 3 or not b".\r\n".startswith(buf):
                        del buf[:1]
                        line_start = False
                elif buf:
                    line_start = False
            if not line_start:
                idx = buf.find(b"\r\n")
                # Hold back a trailing CR: it may be the first half of a CRLF split across reads.
                end = idx + 2 if idx >= 0 else len(buf) - (1 if buf.endswith(b"\r") else 0)
                if end > 0:
                    if not too_big and len(out) + end > MAX_MESSAGE_SIZE:
                        too_big = True
                        out.clear()
                    if not too_big:
                        out += buf[:end]
                    del buf[:end]
                    line_start = idx >= 0
                    continue
            if not await self.fill():
                return None

    async def run(self) -> None:
        await self.reply(220, f"{self.hostname} ESMTP smtpguard-sink")
        while not self.done:
            try:
                raw = await self.read_line()
            except _LineTooLong:
                await self.reply(500, "5.5.2 Error: line too long")
                continue
            if raw is None:
                return
            verb, _, arg = raw.decode("utf-8", "surrogateescape").partition(" ")
            handler = self.commands.get(verb.upper())
            if handler is None:
                await self.reply(500, "5.5.2 Error: command not recognized")
            else:
                await handler(arg.strip())

    def reset(self) -> None:
        self.sender, self.rcpts, self.bdat = None, [], None

    async def deliver(self, body: bytes) -> None:
        assert self.sender is not None
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
        name = f"{stamp}-{next(self.counter):06d}.eml"
        try:
            await trio.to_thread.run_sync(
                _write_message, self.directory / name, self.sender, self.rcpts, body
            )
        except OSError:
            log.exception("smtpguard-sink: could not store message")
            await self.reply(451, "4.3.0 Error: local error in processing")
        else:
            await self.reply(250, f"2.0.0 Ok: queued as {name}")
        finally:
            self.reset()

    async def helo_cmd(self, arg: str, verb: str = "HELO") -> None:
        if not arg:
            return await self.reply(501, f"5.5.4 Syntax: {verb} hostname")
        self.reset()
        self.helo = arg
        if verb == "EHLO":
            await self.reply(250, f"{self.hostname} greets {arg}", *_EHLO_KEYWORDS)
        else:
            await self.reply(250, self.hostname)

    async def ehlo_cmd(self, arg: str) -> None:
        await self.helo_cmd(arg, "EHLO")

    async def mail_cmd(self, arg: str) -> None:
        if self.helo is None:
            return await self.reply(503, "5.5.1 Error: send HELO/EHLO first")
        if self.sender is not None:
            return await self.reply(503, "5.5.1 Error: nested MAIL command")
        m = _MAIL_RE.fullmatch(arg)
        if m is None:
            return await self.reply(501, "5.5.4 Syntax: MAIL FROM:<address>")
        for param in m.group(2).split():
            key, _, value = param.upper().partition("=")
            if key == "SIZE" and value.isdigit():
                if int(value) > MAX_MESSAGE_SIZE:
                    return await self.reply(552, "5.3.4 Error: message too big")
            elif not ((key == "BODY" and value in _BODY_TYPES) or param.upper() == "SMTPUTF8"):
                return await self.reply(555, f"5.5.4 Error: unsupported parameter {param}")
        self.sender = m.group(1)
        await self.reply(250, "2.1.0 Ok")

    async def rcpt_cmd(self, arg: str) -> None:
        if self.sender is None:
            return await self.reply(503, "5.5.1 Error: need MAIL command")
        m = _RCPT_RE.fullmatch(arg)
        if m is None:
            return await self.reply(501, "5.5.4 Syntax: RCPT TO:<address>")
        if m.group(2).strip():
            return await self.reply(555, "5.5.4 Error: RCPT parameters not supported")
        if len(self.rcpts) >= MAX_RECIPIENTS:
            return await self.reply(452, "4.5.3 Error: too many recipients")
        self.rcpts.append(m.group(1))
        await self.reply(250, "2.1.5 Ok")

    def envelope_error(self) -> str | None:
        if self.sender is None:
            return "5.5.1 Error: need MAIL command"
        if not self.rcpts:
            return "5.5.1 Error: need RCPT command"
        return None

    async def data_cmd(self, arg: str) -> None:
        if arg:
            return await self.reply(501, "5.5.4 Syntax: DATA")
        error = self.envelope_error()
        if error is None and self.bdat is not None:
            error = "5.5.1 Error: DATA not allowed after BDAT"
        if error is not None:
            return await self.reply(503, error)
        await self.reply(354, "End data with <CR><LF>.<CR><LF>")
        result = await self.read_data()
        if result is None:
            self.done = True
        elif result[1]:
            self.reset()
            await self.reply(552, "5.3.4 Error: message too big")
        else:
            await self.deliver(bytes(result[0]))

    async def bdat_cmd(self, arg: str) -> None:
        m = _BDAT_RE.fullmatch(arg)
        if m is None:
            # Without a valid size the chunk cannot be skipped; its bytes will read as commands.
            return await self.reply(501, "5.5.4 Syntax: BDAT size [LAST]")
        size, last = int(m.group(1)), m.group(2) is not None
        error = self.envelope_error()
        too_big = len(self.bdat or b"") + size > MAX_MESSAGE_SIZE
        # The chunk is consumed even when refused, or its binary content would be parsed as
        # commands (RFC 3030 section 2).
        chunk = await self.read_exact(size, keep=not (error or too_big))
        if chunk is None:
            self.done = True
        elif error:
            await self.reply(503, error)
        elif too_big:
            self.reset()
            await self.reply(552, "5.3.4 Error: message too big")
        else:
            self.bdat = self.bdat or bytearray()
            self.bdat += chunk
            if last:
                await self.deliver(bytes(self.bdat))
            else:
                await self.reply(250, f"2.0.0 {size} octets received")

    async def rset_cmd(self, arg: str) -> None:
        if arg:
            return await self.reply(501, "5.5.4 Syntax: RSET")
        self.reset()
        await self.reply(250, "2.0.0 Ok")

    async def noop_cmd(self, arg: str) -> None:
        await self.reply(250, "2.0.0 Ok")

    async def vrfy_cmd(self, arg: str) -> None:
        if not arg:
            return await self.reply(501, "5.5.4 Syntax: VRFY address")
        await self.reply(252, "2.0.0 Cannot VRFY user, but will accept message")

    async def help_cmd(self, arg: str) -> None:
        await self.reply(214, "2.0.0 Commands: " + " ".join(self.commands))

    async def quit_cmd(self, arg: str) -> None:
        if arg:
            return await self.reply(501, "5.5.4 Syntax: QUIT")
        await self.reply(221, "2.0.0 Bye")
        self.done = True


async def _handle_connection(
    stream: trio.SocketStream,
    directory: pathlib.Path,
    hostname: str,
    counter: Iterator[int],
    idle_timeout: float,
) -> None:
    try:
        await _Session(stream, directory, hostname, counter, idle_timeout).run()
    except trio.TooSlowError:
        with trio.move_on_after(5), contextlib.suppress(trio.BrokenResourceError):
            await stream.send_all(f"421 4.4.2 {hostname} Error: timeout exceeded\r\n".encode())
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # the client went away; nothing to tell it
    except Exception:
        # Catch-all so one misbehaving connection can never take down the whole sink.
        log.exception("smtpguard-sink: connection handler failed")
    finally:
        await trio.aclose_forcefully(stream)


async def serve_sink(
    directory: pathlib.Path,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    hostname: str = "smtpguard-sink",
    idle_timeout: float = IDLE_TIMEOUT,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run a minimal SMTP server that stores every accepted message under ``directory``.

    Each message becomes ``<directory>/<timestamp>-<counter>.eml``: a ``Return-Path`` and an
    ``X-Smtpguard-Sink-Recipients`` header followed by the message exactly as received (DATA
    bodies un-dot-stuffed, BDAT chunks verbatim). ``directory`` is created if missing. Reports
    ``(host, actual_port)`` through ``task_status`` once listening (``port=0`` picks a free
    port), then serves until cancelled. Commands idle for ``idle_timeout`` seconds get
    ``421 4.4.2`` and are disconnected. With ``port=0`` pass an IP literal as ``host``: a name
    resolving to several addresses would get one listener, and one free port, per address.
    """
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    listeners = await trio.open_tcp_listeners(port, host=host)
    actual_port: int = listeners[0].socket.getsockname()[1]
    handler = functools.partial(
        _handle_connection,
        directory=directory,
        hostname=hostname,
        counter=itertools.count(1),
        idle_timeout=idle_timeout,
    )
    task_status.started((host, actual_port))
    await trio.serve_listeners(handler, listeners)
