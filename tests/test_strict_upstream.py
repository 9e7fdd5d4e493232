"""Tests for the strict legacy-appliance SMTP server in tests/support/strict_upstream.py."""

from __future__ import annotations

import json
import smtplib
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.strict_upstream import StrictUpstream, load_record

SCRIPT = Path(__file__).resolve().parent / "support" / "strict_upstream.py"
TIMEOUT = 10


@pytest.fixture
def upstream() -> Iterator[StrictUpstream]:
    with StrictUpstream() as server:
        yield server


class Raw:
    """Raw client: sends bytes verbatim, reads whole (possibly multiline) replies."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        self.buf = b""

    def reply(self) -> list[bytes]:
        """One reply's lines, or [] if the server closed the connection first."""
        lines: list[bytes] = []
        while True:
            while b"\r\n" not in self.buf:
                try:
                    data = self.sock.recv(4096)
                except ConnectionResetError:
                    data = b""
                if not data:
                    return lines
                self.buf += data
            line, self.buf = self.buf.split(b"\r\n", 1)
            lines.append(line)
            if line[3:4] != b"-":
                return lines

    def command(self, data: bytes) -> list[bytes]:
        self.sock.sendall(data)
        return self.reply()

    def closed_without_reply(self) -> bool:
        return self.reply() == [] and self.buf == b""

    def close(self) -> None:
        self.sock.close()


def ready(port: int) -> Raw:
    client = Raw(port)
    assert client.reply() == [b"220 legacy.test ESMTP"]
    assert client.command(b"EHLO client.test\r\n")[-1] == b"250 HELP"
    return client


def test_smtplib_session_delivers_message(upstream: StrictUpstream) -> None:
    body = b"Subject: hi\r\n\r\n.leading dot\r\n..two dots\r\nlast\r\n"
    with smtplib.SMTP("127.0.0.1", upstream.port, timeout=TIMEOUT) as client:
        code, text = client.ehlo("client.test")
        assert code == 250
        assert text.split(b"\n") == [
            b"legacy.test",
            b"SIZE 10485760",
            b"ENHANCEDSTATUSCODES",
            b"HELP",
        ]
        assert not client.has_extn("pipelining")
        refused = client.sendmail("a@x.test", ["b@y.test", "reject.me@y.test"], body)
        assert refused == {
            "reject.me@y.test": (550, b"5.1.1 <reject.me@y.test>: Recipient address rejected")
        }
    [session] = upstream.wait_closed(1)
    assert session.dropped is None
    assert session.protocol_errors == []
    [message] = upstream.messages()
    assert message.sender == "a@x.test"
    assert message.recipients == ["b@y.test"]
    # smtplib dot-stuffs the body; the server unstuffs it back.
    assert message.data == body
    assert session.messages == [message]
    assert session.replies[-2:] == ["250 2.0.0 Ok: queued as 1", "221 2.0.0 Bye"]


def test_record_content_is_exact(upstream: StrictUpstream) -> None:
    client = ready(upstream.port)
    assert client.command(b"MAIL FROM:<>\r\n") == [b"250 2.1.0 Ok"]
    assert client.command(b"RCPT TO:<Postmaster>\r\n") == [b"250 2.1.5 Ok"]
    assert client.command(b"DATA\r\n")[0].startswith(b"354 ")
    assert client.command(b"x\r\n.\r\n") == [b"250 2.0.0 Ok: queued as 1"]
    client.close()
    [session] = upstream.wait_closed(1)
    assert session.events == [
        (">", "220 legacy.test ESMTP"),
        ("<", b"EHLO client.test"),
        (">", "250-legacy.test"),
        (">", "250-SIZE 10485760"),
        (">", "250-ENHANCEDSTATUSCODES"),
        (">", "250 HELP"),
        ("<", b"MAIL FROM:<>"),
        (">", "250 2.1.0 Ok"),
        ("<", b"RCPT TO:<Postmaster>"),
        (">", "250 2.1.5 Ok"),
        ("<", b"DATA"),
        (">", "354 End data with <CR><LF>.<CR><LF>"),
        (">", "250 2.0.0 Ok: queued as 1"),
        ("eof",),
    ]
    assert session.lines == [b"EHLO client.test", b"MAIL FROM:<>", b"RCPT TO:<Postmaster>", b"DATA"]
    assert session.dropped is None
    assert session.closed
    [message] = session.messages
    assert (message.sender, message.recipients, message.data) == ("", ["Postmaster"], b"x\r\n")


def test_pipelined_commands_are_dropped(upstream: StrictUpstream) -> None:
    client = Raw(upstream.port)
    assert client.reply() == [b"220 legacy.test ESMTP"]
    client.sock.sendall(b"EHLO client.test\r\nMAIL FROM:<a@x.test>\r\n")
    assert client.closed_without_reply()
    [session] = upstream.wait_closed(1)
    assert session.dropped is not None
    assert session.dropped.startswith("pipelining: ")
    assert "MAIL FROM" in session.dropped
    assert session.events[-2:] == [("<", b"EHLO client.test"), ("drop", session.dropped)]
    assert session.replies == ["220 legacy.test ESMTP"]


def test_body_sent_with_data_command_is_pipelining(upstream: StrictUpstream) -> None:
    client = ready(upstream.port)
    assert client.command(b"MAIL FROM:<a@x.test>\r\n") == [b"250 2.1.0 Ok"]
    assert client.command(b"RCPT TO:<b@y.test>\r\n") == [b"250 2.1.5 Ok"]
    client.sock.sendall(b"DATA\r\nSubject: x\r\n\r\nbody\r\n.\r\n")
    assert client.closed_without_reply()
    [session] = upstream.wait_closed(1)
    assert session.dropped is not None and session.dropped.startswith("pipelining")
    assert upstream.messages() == []


def test_command_after_end_of_data_is_pipelining(upstream: StrictUpstream) -> None:
    client = ready(upstream.port)
    assert client.command(b"MAIL FROM:<a@x.test>\r\n") == [b"250 2.1.0 Ok"]
    assert client.command(b"RCPT TO:<b@y.test>\r\n") == [b"250 2.1.5 Ok"]
    assert client.command(b"DATA\r\n")[0].startswith(b"354 ")
    client.sock.sendall(b"body\r\n.\r\nQUIT\r\n")
    assert client.closed_without_reply()
    [session] = upstream.wait_closed(1)
    assert session.dropped is not None and session.dropped.startswith("pipelining")
    assert upstream.messages() == []


def test_early_talker_is_dropped() -> None:
    with StrictUpstream(pipelining_grace=0.5) as server:
        client = Raw(server.port)
        client.sock.sendall(b"EHLO client.test\r\n")
        assert client.closed_without_reply()
        [session] = server.wait_closed(1)
    assert session.dropped is not None and session.dropped.startswith("pipelining")
    assert session.events == [("drop", session.dropped)]


def test_bdat_is_dropped(upstream: StrictUpstream) -> None:
    client = ready(upstream.port)
    assert client.command(b"MAIL FROM:<a@x.test>\r\n") == [b"250 2.1.0 Ok"]
    assert client.command(b"RCPT TO:<b@y.test>\r\n") == [b"250 2.1.5 Ok"]
    client.sock.sendall(b"BDAT 0 LAST\r\n")
    assert client.closed_without_reply()
    [session] = upstream.wait_closed(1)
    assert session.dropped == "BDAT"
    assert session.events[-2:] == [("<", b"BDAT 0 LAST"), ("drop", "BDAT")]
    assert upstream.messages() == []


def test_out_of_sequence_commands_get_503_without_drop(upstream: StrictUpstream) -> None:
    client = Raw(upstream.port)
    assert client.reply() == [b"220 legacy.test ESMTP"]
    assert client.command(b"MAIL FROM:<a@x.test>\r\n") == [b"503 5.5.1 Error: send HELO/EHLO first"]
    assert client.command(b"HELO client.test\r\n") == [b"250 legacy.test"]
    assert client.command(b"RCPT TO:<b@y.test>\r\n") == [b"503 5.5.1 Error: need MAIL command"]
    assert client.command(b"DATA\r\n") == [b"503 5.5.1 Error: need RCPT command"]
    assert client.command(b"MAIL FROM:<a@x.test>\r\n") == [b"250 2.1.0 Ok"]
    assert client.command(b"MAIL FROM:<a@x.test>\r\n") == [b"503 5.5.1 Error: nested MAIL command"]
    assert client.command(b"RCPT TO:<reject@y.test>\r\n") == [
        b"550 5.1.1 <reject@y.test>: Recipient address rejected"
    ]
    assert client.command(b"DATA\r\n") == [b"503 5.5.1 Error: need RCPT command"]
    assert client.command(b"RSET\r\n") == [b"250 2.0.0 Ok"]
    assert client.command(b"RCPT TO:<b@y.test>\r\n") == [b"503 5.5.1 Error: need MAIL command"]
    assert client.command(b"QUIT\r\n") == [b"221 2.0.0 Bye"]
    assert client.closed_without_reply()
    [session] = upstream.wait_closed(1)
    assert session.dropped is None
    assert session.protocol_errors == [
        "5.5.1 Error: send HELO/EHLO first",
        "5.5.1 Error: need MAIL command",
        "5.5.1 Error: need RCPT command",
        "5.5.1 Error: nested MAIL command",
        "5.5.1 Error: need RCPT command",
        "5.5.1 Error: need MAIL command",
    ]
    assert session.events[-1] == (">", "221 2.0.0 Bye")


def test_ehlo_again_resets_transaction(upstream: StrictUpstream) -> None:
    client = ready(upstream.port)
    assert client.command(b"MAIL FROM:<a@x.test>\r\n") == [b"250 2.1.0 Ok"]
    assert client.command(b"EHLO again.test\r\n")[-1] == b"250 HELP"
    assert client.command(b"RCPT TO:<b@y.test>\r\n") == [b"503 5.5.1 Error: need MAIL command"]
    assert client.command(b"MAIL FROM:<a@x.test> SIZE=10485761\r\n") == [
        b"552 5.3.4 Message size exceeds fixed limit"
    ]
    assert client.command(b"mail from:<a@x.test> size=10485760\r\n") == [b"250 2.1.0 Ok"]
    assert client.command(b"NOOP\r\n") == [b"250 2.0.0 Ok"]
    assert client.command(b"VRFY b\r\n")[0].startswith(b"252 2.0.0 ")
    assert client.command(b"HELP\r\n")[0].startswith(b"214 2.0.0 ")
    client.close()
    [session] = upstream.wait_closed(1)
    assert session.dropped is None


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (b"NOOP\n", "bare LF"),
        (b"NOOP\rx\r\n", "bare CR"),
        (b"NOOP \0\r\n", "NUL"),
        (b"NOOP caf\xc3\xa9\r\n", "8-bit"),
        (b"NOOP " + b"x" * 506 + b"\r\n", "line too long"),  # 513 octets
        (b"NOOP " + b"x" * 600, "line too long"),  # no LF at all
        (b"STARTTLS\r\n", "unknown verb"),
        (b"AUTH PLAIN AGJAYg==\r\n", "unknown verb"),
        (b"\r\n", "unknown verb"),
        (b"MAIL FROM:<a@x.test> BODY=8BITMIME\r\n", "unknown parameter"),
        (b"MAIL FROM:<a@x.test> SIZE=1 SIZE=2\r\n", "unknown parameter"),
        (b"MAIL FROM:<a@x.test>  SIZE=1\r\n", "unknown parameter"),
        (b"MAIL FROM:<a@x.test> SIZE=12k\r\n", "unknown parameter"),
        (b"MAIL FROM:<a@x.test>SIZE=1\r\n", "malformed path"),
        (b"MAIL FROM: <a@x.test>\r\n", "malformed MAIL"),
        (b"MAIL FROM:a@x.test\r\n", "malformed MAIL"),
        (b"MAIL FROM:<a@x..test>\r\n", "malformed MAIL"),
        (b"MAIL FROM:<@relay.test:a@x.test>\r\n", "malformed MAIL"),
        (b"MAIL TO:<a@x.test>\r\n", "malformed MAIL"),
        (b"RCPT TO:<>\r\n", "malformed RCPT"),
        (b"RCPT TO:<a@x.test> SIZE=1\r\n", "unknown parameter"),
        (b"RCPT TO:<a@x.test> NOTIFY=NEVER\r\n", "unknown parameter"),
    ],
)
def test_framing_errors_drop(upstream: StrictUpstream, line: bytes, reason: str) -> None:
    client = ready(upstream.port)
    client.sock.sendall(line)
    if not line.endswith(b"\n"):
        client.sock.shutdown(socket.SHUT_WR)
    assert client.closed_without_reply()
    [session] = upstream.wait_closed(1)
    assert session.dropped is not None
    assert session.dropped.split(":")[0] == reason
    assert session.events[-1] == ("drop", session.dropped)
    assert session.replies[-1] == "250 HELP"


def test_longest_command_line_is_accepted(upstream: StrictUpstream) -> None:
    client = ready(upstream.port)
    line = b"NOOP " + b"x" * 505 + b"\r\n"
    assert len(line) == 512
    assert client.command(line) == [b"250 2.0.0 Ok"]
    client.close()
    [session] = upstream.wait_closed(1)
    assert session.dropped is None
    assert session.lines[-1] == line[:-2]


def test_body_is_recorded_verbatim(upstream: StrictUpstream) -> None:
    client = ready(upstream.port)
    assert client.command(b"MAIL FROM:<a@x.test>\r\n") == [b"250 2.1.0 Ok"]
    assert client.command(b'RCPT TO:<"odd user"@[127.0.0.1]>\r\n') == [b"250 2.1.5 Ok"]
    assert client.command(b"DATA\r\n")[0].startswith(b"354 ")
    # A bare LF and a "\n.\n" are data, not line ends: only CRLF.CRLF ends the body.
    body = b"a\nb\r\n.\n\xff\r\n..\r\n"
    assert client.command(body + b".\r\n") == [b"250 2.0.0 Ok: queued as 1"]
    [message] = upstream.messages()
    assert message.recipients == ['"odd user"@[127.0.0.1]']
    assert message.data == b"a\nb\r\n\n\xff\r\n.\r\n"


def test_messages_across_sessions_and_clear(upstream: StrictUpstream) -> None:
    for number in range(2):
        with smtplib.SMTP("127.0.0.1", upstream.port, timeout=TIMEOUT) as client:
            client.sendmail(f"s{number}@x.test", [f"r{number}@y.test"], b"body\r\n")
    upstream.wait_closed(2)
    messages = upstream.messages()
    assert [(m.sender, m.queue_id, m.session) for m in messages] == [
        ("s0@x.test", "1", 1),
        ("s1@x.test", "2", 2),
    ]
    upstream.clear()
    assert upstream.sessions() == []
    assert upstream.messages() == []


def test_record_file_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "record.jsonl"
    with StrictUpstream(record_path=path) as server:
        with smtplib.SMTP("127.0.0.1", server.port, timeout=TIMEOUT) as client:
            client.sendmail("a@x.test", ["b@y.test"], b"caf\xc3\xa9\r\n")
        client = ready(server.port)
        client.sock.sendall(b"BDAT 1\r\n")
        assert client.closed_without_reply()
        expected = server.wait_closed(2)
    for line in path.read_text().splitlines():
        json.loads(line)
    assert load_record(path) == expected


def test_script_mode(tmp_path: Path) -> None:
    path = tmp_path / "record.jsonl"
    process = subprocess.Popen(
        [sys.executable, str(SCRIPT), "--port", "0", "--record", str(path)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        banner = process.stdout.readline()
        assert banner.startswith("listening on 127.0.0.1:")
        port = int(banner.rsplit(":", 1)[1])
        with smtplib.SMTP("127.0.0.1", port, timeout=TIMEOUT) as client:
            client.sendmail("a@x.test", ["b@y.test"], b"hello\r\n")
    finally:
        process.terminate()
        assert process.wait(timeout=TIMEOUT) == 0
    [session] = load_record(path)
    assert session.closed
    assert [m.data for m in session.messages] == [b"hello\r\n"]
