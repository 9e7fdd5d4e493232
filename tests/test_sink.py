"""Tests for the embedded default upstream (smtpguard.sink), over real TCP connections."""

from __future__ import annotations

import email
import pathlib
import smtplib
from dataclasses import dataclass

import pytest
import trio

import smtpguard.sink as sink_module
from smtpguard.sink import serve_sink

TIMEOUT = 10


@dataclass
class Sink:
    directory: pathlib.Path
    port: int

    def files(self) -> list[pathlib.Path]:
        return sorted(self.directory.iterdir())


@pytest.fixture
async def sink(nursery: trio.Nursery, tmp_path: pathlib.Path) -> Sink:
    directory = tmp_path / "not-yet-created" / "mail"
    host, port = await nursery.start(serve_sink, directory)
    assert host == "127.0.0.1"
    return Sink(directory, port)


class Client:
    """Raw SMTP client: sends bytes verbatim and parses (possibly multi-line) replies."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buf = bytearray()

    @classmethod
    async def connect(cls, port: int) -> Client:
        client = cls(await trio.open_tcp_stream("127.0.0.1", port))
        code, text = await client.reply()
        assert (code, text) == (220, "smtpguard-sink ESMTP smtpguard-sink")
        return client

    async def _fill(self) -> bool:
        with trio.fail_after(TIMEOUT):
            data = await self.stream.receive_some(65536)
        self.buf += data
        return bool(data)

    async def reply(self) -> tuple[int, str]:
        lines = []
        while True:
            while b"\r\n" not in self.buf:
                if not await self._fill():
                    raise EOFError(bytes(self.buf))
            raw, _, rest = bytes(self.buf).partition(b"\r\n")
            self.buf = bytearray(rest)
            line = raw.decode()
            lines.append(line[4:])
            if line[3] == " ":
                return int(line[:3]), "\n".join(lines)
            assert line[3] == "-", line

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def cmd(self, line: str) -> tuple[int, str]:
        await self.send(line.encode() + b"\r\n")
        return await self.reply()

    async def closed_by_peer(self) -> bool:
        return not self.buf and not await self._fill()

    async def envelope(self, sender: str = "a@example.org", rcpt: str = "b@example.net") -> None:
        assert (await self.cmd("EHLO client.example"))[0] == 250
        assert await self.cmd(f"MAIL FROM:<{sender}>") == (250, "2.1.0 Ok")
        assert await self.cmd(f"RCPT TO:<{rcpt}>") == (250, "2.1.5 Ok")


def queued_name(text: str) -> str:
    prefix = "2.0.0 Ok: queued as "
    assert text.startswith(prefix), text
    return text[len(prefix) :]


async def test_smtplib_message_is_stored_with_envelope_headers(sink: Sink) -> None:
    message = (
        b"From: Alice <alice@example.org>\r\n"
        b"To: Bob <bob@example.net>\r\n"
        b"Subject: hello\r\n"
        b"\r\n"
        b"First line.\r\n"
        b".leading dot survives\r\n"
        b"\xc3\xa9 8-bit body\r\n"
    )

    def send() -> tuple[dict[str, str], tuple[int, bytes]]:
        with smtplib.SMTP("127.0.0.1", sink.port, timeout=TIMEOUT) as smtp:
            smtp.ehlo("client.example")
            features = dict(smtp.esmtp_features)
            smtp.mail("alice@example.org")
            for rcpt in ("bob@example.net", "carol@example.com"):
                assert smtp.rcpt(rcpt)[0] == 250
            return features, smtp.data(message)

    features, (code, text) = await trio.to_thread.run_sync(send)

    assert code == 250
    for keyword in ("pipelining", "8bitmime", "enhancedstatuscodes", "chunking", "smtputf8"):
        assert keyword in features
    assert features["size"] == "52428800"
    [stored] = sink.files()  # and no leftover temp file
    assert stored.name == queued_name(text.decode())
    assert stored.name.endswith("-000001.eml")
    assert stored.read_bytes() == (
        b"Return-Path: <alice@example.org>\r\n"
        b"X-Smtpguard-Sink-Recipients: bob@example.net, carol@example.com\r\n" + message
    )


async def test_many_recipients_header_is_folded_and_parseable(sink: Sink) -> None:
    rcpts = [f"user{i}@example.net" for i in range(40)]

    def send() -> None:
        with smtplib.SMTP("127.0.0.1", sink.port, timeout=TIMEOUT) as smtp:
            smtp.sendmail("", rcpts, b"Subject: x\r\n\r\nbody\r\n")

    await trio.to_thread.run_sync(send)
    [stored] = sink.files()
    raw = stored.read_bytes()
    assert raw.startswith(b"Return-Path: <>\r\n")
    assert all(len(line) <= 78 for line in raw.split(b"\r\n"))
    parsed = email.message_from_bytes(raw)
    assert parsed["X-Smtpguard-Sink-Recipients"].replace("\r\n", "").split(", ") == rcpts


async def test_dot_stuffed_lines_are_unstuffed(sink: Sink) -> None:
    client = await Client.connect(sink.port)
    await client.envelope()
    assert (await client.cmd("DATA"))[0] == 354
    await client.send(b"Subject: dots\r\n\r\n..one\r\n...two\r\n. \r\n..\r\nbare\n.\nLF\r\n.\r\n")
    code, text = await client.reply()
    assert code == 250
    body = (sink.directory / queued_name(text)).read_bytes().split(b"\r\n\r\n", 1)[1]
    # Only CRLF-framed dots are stuffing; LF.LF is ordinary content, not an end of data.
    assert body == b".one\r\n..two\r\n \r\n.\r\nbare\n.\nLF\r\n"


async def test_data_split_across_reads_and_bare_lf_dot_does_not_end_body(sink: Sink) -> None:
    client = await Client.connect(sink.port)
    await client.envelope()
    assert (await client.cmd("DATA"))[0] == 354
    payload = b"Subject: split\r\n\r\nline\n.\nstill body\r\n..x\r\n.\r\n"
    for i in range(len(payload)):
        # One byte per write so every CRLF and the terminator straddle separate reads.
        await client.send(payload[i : i + 1])
        await trio.sleep(0.001)
    code, text = await client.reply()
    assert code == 250
    stored = (sink.directory / queued_name(text)).read_bytes()
    assert stored.endswith(b"\r\n\r\nline\n.\nstill body\r\n.x\r\n")


async def test_pipelined_commands_get_replies_in_order(sink: Sink) -> None:
    client = await Client.connect(sink.port)
    await client.send(
        b"EHLO client.example\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<>\r\n"
        b"RCPT TO:<b@example.net>\r\nDATA\r\nSubject: p\r\n\r\nhi\r\n.\r\nNOOP\r\nQUIT\r\n"
    )
    code, ehlo = await client.reply()
    assert code == 250 and ehlo.splitlines()[0] == "smtpguard-sink greets client.example"
    assert "CHUNKING" in ehlo.splitlines()
    assert await client.reply() == (250, "2.1.0 Ok")
    assert (await client.reply())[0] == 501  # empty recipient, transaction continues
    assert await client.reply() == (250, "2.1.5 Ok")
    assert (await client.reply())[0] == 354
    code, text = await client.reply()
    assert code == 250 and (sink.directory / queued_name(text)).exists()
    assert await client.reply() == (250, "2.0.0 Ok")
    assert await client.reply() == (221, "2.0.0 Bye")
    assert await client.closed_by_peer()


async def test_command_split_across_writes(sink: Sink) -> None:
    client = await Client.connect(sink.port)
    for piece in (b"NO", b"OP", b"\r", b"\nVR", b"FY x\r\n"):
        await client.send(piece)
        await trio.sleep(0.01)
    assert await client.reply() == (250, "2.0.0 Ok")
    assert (await client.reply())[0] == 252


async def test_bdat_chunks_are_stored_byte_exact(sink: Sink) -> None:
    client = await Client.connect(sink.port)
    await client.envelope()
    chunk1 = b"Subject: bin\r\n\r\n\x00\xff\r\n.\r\nQUIT\r\nlone\rCR"
    chunk2 = b"\nbare LF tail without CRLF"
    await client.send(b"BDAT %d\r\n" % len(chunk1) + chunk1)
    assert await client.reply() == (250, f"2.0.0 {len(chunk1)} octets received")
    await client.send(b"BDAT %d LAST\r\n" % len(chunk2) + chunk2)
    code, text = await client.reply()
    assert code == 250
    stored = (sink.directory / queued_name(text)).read_bytes()
    assert stored.split(b"\r\n", 2)[2] == chunk1 + chunk2
    assert await client.cmd("DATA") == (503, "5.5.1 Error: need MAIL command")


async def test_refused_bdat_chunk_is_still_consumed(sink: Sink) -> None:
    client = await Client.connect(sink.port)
    await client.send(b"BDAT 6 LAST\r\nQUIT\r\nNOOP\r\n")
    assert await client.reply() == (503, "5.5.1 Error: need MAIL command")
    assert await client.reply() == (250, "2.0.0 Ok")  # the QUIT inside the chunk was data
    assert sink.files() == []


@pytest.mark.parametrize(
    ("commands", "expected"),
    [
        (["RCPT TO:<b@example.net>"], (503, "5.5.1 Error: need MAIL command")),
        (["MAIL FROM:<a@example.org>"], (503, "5.5.1 Error: send HELO/EHLO first")),
        (["HELO c", "MAIL FROM:<a@example.org>", "DATA"], (503, "5.5.1 Error: need RCPT command")),
        (
            ["HELO c", "MAIL FROM:<a@x>", "MAIL FROM:<a@x>"],
            (503, "5.5.1 Error: nested MAIL command"),
        ),
        (["HELO c", "MAIL FROM:<a@x> SIZE=52428801"], (552, "5.3.4 Error: message too big")),
        (["HELO c", "MAIL FROM: a@x"], (501, "5.5.4 Syntax: MAIL FROM:<address>")),
        (["HELO c", "MAIL FROM:<a@x> FOO=1"], (555, "5.5.4 Error: unsupported parameter FOO=1")),
        (["EHLO"], (501, "5.5.4 Syntax: EHLO hostname")),
        (["STARTTLS"], (500, "5.5.2 Error: command not recognized")),
        (["XYZZY plugh"], (500, "5.5.2 Error: command not recognized")),
        ([""], (500, "5.5.2 Error: command not recognized")),
        (
            ["HELO c", "MAIL FROM:<a@x>", "RCPT TO:<b@y>", "RSET", "DATA"],
            (503, "5.5.1 Error: need MAIL command"),
        ),
        (["HELP"], (214, "2.0.0 Commands: HELO EHLO MAIL RCPT DATA BDAT RSET NOOP VRFY HELP QUIT")),
    ],
)
async def test_sequencing_and_syntax_errors(
    sink: Sink, commands: list[str], expected: tuple[int, str]
) -> None:
    client = await Client.connect(sink.port)
    for command in commands[:-1]:
        assert (await client.cmd(command))[0] < 400, command
    assert await client.cmd(commands[-1]) == expected
    assert await client.cmd("NOOP") == (250, "2.0.0 Ok")  # the session survives the error


async def test_quit_replies_221_and_closes(sink: Sink) -> None:
    client = await Client.connect(sink.port)
    assert await client.cmd("QUIT") == (221, "2.0.0 Bye")
    assert await client.closed_by_peer()


async def test_overlong_line_is_rejected_without_killing_session(sink: Sink) -> None:
    client = await Client.connect(sink.port)
    await client.send(b"NOOP " + b"x" * 100_000 + b"\r\nNOOP\r\n")
    assert await client.reply() == (500, "5.5.2 Error: line too long")
    assert await client.reply() == (250, "2.0.0 Ok")


async def test_recipient_limit(sink: Sink) -> None:
    client = await Client.connect(sink.port)
    await client.envelope(rcpt="r0@example.net")
    await client.send(b"".join(b"RCPT TO:<r%d@example.net>\r\n" % i for i in range(1, 1001)))
    codes = [(await client.reply())[0] for _ in range(1000)]
    assert codes == [250] * 999 + [452]


async def test_idle_timeout_sends_421_and_closes(
    nursery: trio.Nursery, tmp_path: pathlib.Path
) -> None:
    _, port = await nursery.start(
        lambda task_status: serve_sink(tmp_path, idle_timeout=0.2, task_status=task_status)
    )
    client = await Client.connect(port)
    with trio.fail_after(TIMEOUT):
        code, text = await client.reply()
    assert code == 421 and text.startswith("4.4.2 ") and "timeout" in text
    assert await client.closed_by_peer()


async def test_broken_clients_do_not_kill_server(sink: Sink) -> None:
    client = await Client.connect(sink.port)
    await client.envelope()
    assert (await client.cmd("DATA"))[0] == 354
    await client.send(b"Subject: half a message\r\n")
    await client.stream.aclose()  # vanish mid-body

    raw = await trio.open_tcp_stream("127.0.0.1", sink.port)
    await trio.aclose_forcefully(raw)  # vanish before even reading the greeting

    client = await Client.connect(sink.port)
    await client.envelope()
    assert (await client.cmd("DATA"))[0] == 354
    await client.send(b"Subject: whole\r\n\r\nok\r\n.\r\n")
    code, text = await client.reply()
    assert code == 250
    assert [p.name for p in sink.files()] == [queued_name(text)]  # nothing from the broken ones


async def test_storage_failure_replies_451(sink: Sink, monkeypatch: pytest.MonkeyPatch) -> None:
    def disk_full(*args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(sink_module, "_write_message", disk_full)
    client = await Client.connect(sink.port)
    await client.envelope()
    await client.send(b"DATA\r\nSubject: x\r\n\r\nbody\r\n.\r\n")
    assert (await client.reply())[0] == 354
    assert await client.reply() == (451, "4.3.0 Error: local error in processing")
    assert await client.cmd("NOOP") == (250, "2.0.0 Ok")
    assert sink.files() == []


async def test_unexpected_handler_error_closes_only_that_connection(
    sink: Sink, monkeypatch: pytest.MonkeyPatch
) -> None:
    def bug(*args: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(sink_module, "_write_message", bug)
    client = await Client.connect(sink.port)
    await client.envelope()
    await client.send(b"DATA\r\nSubject: x\r\n\r\nbody\r\n.\r\n")
    assert (await client.reply())[0] == 354
    assert await client.closed_by_peer()  # dropped without a reply, let alone a traceback
    assert b"boom" not in client.buf

    other = await Client.connect(sink.port)
    assert await other.cmd("NOOP") == (250, "2.0.0 Ok")
