"""The Exim 4 and OpenSMTPD fixtures (mtas.py) work against the real programs."""

from __future__ import annotations

import smtplib
import socket
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from mtas import (
    Exim,
    EximClient,
    OpenSMTPD,
    Session,
    parse_exim_client_debug,
    parse_exim_debug,
    parse_smtpd_reports,
)
from peers import CapturedMessage, Postfix, body_matches, free_port

SERVERS = ["exim", "exim_pipeconnect", "opensmtpd"]


def _unique(domain: str = "dest.example") -> str:
    return f"rcpt-{uuid.uuid4().hex[:12]}@{domain}"


def _to(address: str) -> Callable[[CapturedMessage], bool]:
    return lambda message: address in message.recipients


class RawClient:
    """A socket client that sends exactly the bytes it is given and reads whole replies."""

    def __init__(self, address: tuple[str, int]) -> None:
        self.sock = socket.create_connection(address, timeout=10)
        self.port = int(self.sock.getsockname()[1])
        self._file = self.sock.makefile("rb")

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> list[str]:
        """One reply's lines; [] if the server closed the connection."""
        lines = []
        while True:
            line = self._file.readline()
            if not line:
                return lines
            text = line.decode().rstrip("\r\n")
            lines.append(text)
            if len(text) < 4 or text[3] != "-":
                return lines

    def close(self) -> None:
        self._file.close()
        self.sock.close()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------- pure parsers


def test_parse_exim_debug_follows_each_process() -> None:
    text = (
        "  101 Process 101 is handling incoming connection from [127.0.0.1]:4000\n"
        "  102 Process 102 is handling incoming connection from [127.0.0.1]:4001\n"
        "  101 SMTP>> 220 host ESMTP\n"
        "  101 SMTP<< EHLO a\n"
        "  102 SMTP>> 220 host ESMTP\n"
        "  101 SMTP>> 250-host Hello a\n"
        "  101        250 HELP\n"
        "  101   Subject: not a reply line\n"
        "  101        250 stray\n"
        "  101 SMTP>>(close on process exit)\n"
    )
    first, second = parse_exim_debug(text)
    assert first == Session(
        id="101",
        client=("127.0.0.1", 4000),
        lines=[
            (">", "220 host ESMTP"),
            ("<", "EHLO a"),
            (">", "250-host Hello a"),
            (">", "250 HELP"),
        ],
        closed=True,
    )
    assert second.client_port == 4001 and not second.closed
    assert second.replies == ["220 host ESMTP"] and second.commands == []


def test_parse_smtpd_reports() -> None:
    text = (
        "report|0.6|1.0|smtp-in|link-connect|abc|localhost|pass|127.0.0.1:5000|127.0.0.1:25\n"
        "report|0.6|1.1|smtp-in|protocol-server|abc|220 host ESMTP OpenSMTPD\n"
        "report|0.6|1.2|smtp-in|protocol-client|abc|MAIL FROM:<a|b@c>\n"
        "report|0.6|1.3|smtp-in|link-disconnect|abc\n"
    )
    (session,) = parse_smtpd_reports(text)
    assert session.client == ("127.0.0.1", 5000) and session.closed
    assert session.lines == [(">", "220 host ESMTP OpenSMTPD"), ("<", "MAIL FROM:<a|b@c>")]


def test_parse_exim_client_debug() -> None:
    text = (
        "  SMTP<< 220 host ESMTP\n"
        "  SMTP>> EHLO client\n"
        "  SMTP<< 250-host Hello\n"
        "         250 CHUNKING\n"
        "  SMTP|> MAIL FROM:<a@b>\n"
        "  SMTP+> BDAT 12 LAST\n"
        "  SMTP(close)>>\n"
    )
    transcript, buffered = parse_exim_client_debug(text)
    assert transcript == [
        ("<", "220 host ESMTP"),
        (">", "EHLO client"),
        ("<", "250-host Hello"),
        ("<", "250 CHUNKING"),
        (">", "MAIL FROM:<a@b>"),
        (">", "BDAT 12 LAST"),
    ]
    assert buffered == ["MAIL FROM:<a@b>", "BDAT 12 LAST"]


# --------------------------------------------------------------------------- servers


@pytest.mark.parametrize("server_name", SERVERS)
def test_smtplib_message_is_captured_with_envelope(
    server_name: str, request: pytest.FixtureRequest
) -> None:
    server: Exim | OpenSMTPD = request.getfixturevalue(server_name)
    rcpt1, rcpt2 = _unique(), _unique("other.example")
    # With Date and Message-ID, OpenSMTPD adds nothing but its Received header.
    original = (
        b"From: Alice <alice@src.example>\r\n"
        b"Date: Thu, 03 Dec 2026 10:00:00 +0000\r\n"
        b"Message-ID: <" + uuid.uuid4().hex.encode() + b"@src.example>\r\n"
        b"Subject: e2e mtas\r\n"
        b"\r\n"
        b"first line\r\n"
        b".leading dot survives\r\n"
        b"last line\r\n"
    )
    with smtplib.SMTP(server.host, server.port, timeout=10) as client:
        assert client.sendmail("alice@src.example", [rcpt1, rcpt2], original) == {}

    (message,) = server.wait_for_messages(1, where=_to(rcpt1))
    assert message.sender == "alice@src.example"
    assert message.recipients == [rcpt1, rcpt2]
    assert body_matches(original, message.data), message.data
    assert message.header("Subject") == "e2e mtas"
    assert server.queue_files() == []


@pytest.mark.parametrize("server_name", SERVERS)
def test_null_sender_is_kept(server_name: str, request: pytest.FixtureRequest) -> None:
    server: Exim | OpenSMTPD = request.getfixturevalue(server_name)
    rcpt = _unique()
    with smtplib.SMTP(server.host, server.port, timeout=10) as client:
        client.sendmail("", [rcpt], b"Subject: bounce-like\r\n\r\nbody\r\n")
    (message,) = server.wait_for_messages(1, where=_to(rcpt))
    assert message.sender == ""
    assert message.recipients == [rcpt]


@pytest.mark.parametrize("server_name", SERVERS)
def test_reject_recipient_gets_550_and_transcript_shows_it(
    server_name: str, request: pytest.FixtureRequest
) -> None:
    server: Exim | OpenSMTPD = request.getfixturevalue(server_name)
    good, bad = _unique(), "reject-1@dest.example"
    offset = server.trace_offset()  # before connecting: the session starts at the connection
    with smtplib.SMTP(server.host, server.port, timeout=10) as client:
        assert client.sock is not None
        port = client.sock.getsockname()[1]
        client.ehlo("client.example")
        assert client.mail("alice@src.example")[0] == 250
        code, text = client.rcpt(bad)
        assert code == 550, text
        assert client.rcpt(good)[0] == 250
        assert client.data(b"Subject: half refused\r\n\r\nbody\r\n")[0] == 250

    transcript = server.wait_for_transcript(port, offset)
    commands = [text for direction, text in transcript if direction == "<"]
    assert [c.split()[0].upper() for c in commands] == ["EHLO", "MAIL", "RCPT", "RCPT", "DATA"] + (
        ["."] if server_name == "opensmtpd" else []
    ) + ["QUIT"]
    assert commands[2].upper() == f"RCPT TO:<{bad}>".upper()
    # The reply to each command follows it; the 550 answers the refused RCPT.
    index = transcript.index(("<", commands[2]))
    assert transcript[index + 1][0] == ">" and transcript[index + 1][1].startswith("550 ")
    assert transcript[0][0] == ">" and transcript[0][1].startswith("220 ")

    (message,) = server.wait_for_messages(1, where=_to(good))
    assert message.recipients == [good]


def test_opensmtpd_refuses_second_ehlo_and_pipelining(opensmtpd: OpenSMTPD) -> None:
    offset = opensmtpd.trace_offset()
    with RawClient(opensmtpd.address) as client:
        assert client.reply()[0].startswith("220 ")
        client.send(b"EHLO one.example\r\n")
        ehlo = client.reply()
        assert ehlo[-1].startswith("250 ")
        assert not any("PIPELINING" in line or "CHUNKING" in line for line in ehlo)
        client.send(b"EHLO two.example\r\n")
        assert client.reply() == ["503 5.5.1 Invalid command: Already identified"]
        # Two commands in one write: refused, and the session is closed.
        client.send(b"MAIL FROM:<a@src.example>\r\nRCPT TO:<b@dest.example>\r\n")
        assert client.reply() == ["500 5.5.1 Invalid command: Pipelining not supported"]
        assert client.reply() == []
        port = client.port
    session = opensmtpd.wait_for_session(port, offset)
    assert session.commands == ["EHLO one.example", "EHLO two.example"]
    assert session.replies[-1] == "500 5.5.1 Invalid command: Pipelining not supported"
    opensmtpd.wait_for_log(r"smtp bad-input result=\"500 5.5.1 Invalid command: Pipelining")


def test_exim_without_pipeconnect_refuses_early_talker(exim: Exim) -> None:
    log_offset = exim.log_offset()
    with RawClient(exim.address) as client:
        # EHLO and MAIL before the greeting.
        client.send(b"EHLO early.example\r\nMAIL FROM:<a@src.example>\r\n")
        assert client.reply() == ["554 SMTP synchronization error"]
    exim.wait_for_log(
        r"SMTP protocol synchronization error \(input sent without waiting for greeting\): "
        r"rejected connection from H=\[127\.0\.0\.1\]:\d+ "
        r'input="EHLO early.example\\r\\nMAIL FROM:<a@src.example>\\r\\n"',
        log_offset,
    )


def test_exim_pipeconnect_accepts_early_commands(exim_pipeconnect: Exim) -> None:
    with RawClient(exim_pipeconnect.address) as client:
        client.send(b"EHLO early.example\r\nMAIL FROM:<a@src.example>\r\n")
        assert client.reply()[0].startswith("220 ")
        ehlo = client.reply()
        assert "250-PIPECONNECT" in ehlo and "250-CHUNKING" in ehlo
        assert client.reply() == ["250 OK"]
        client.send(b"QUIT\r\n")
        assert client.reply()[0].startswith("221 ")


def test_exim_logs_pipelined_data_sent_too_soon(exim: Exim) -> None:
    log_offset = exim.log_offset()
    with RawClient(exim.address) as client:
        assert client.reply()[0].startswith("220 ")
        client.send(b"EHLO c.example\r\n")
        ehlo = client.reply()
        assert "250-PIPELINING" in ehlo and "250-PIPECONNECT" not in ehlo
        # DATA must be the last command of a group: the message right behind it is too soon.
        client.send(
            b"MAIL FROM:<a@src.example>\r\nRCPT TO:<b@dest.example>\r\nDATA\r\n"
            b"Subject: x\r\n\r\nbody\r\n.\r\n"
        )
        assert client.reply() == ["250 OK"]
        assert client.reply() == ["250 Accepted"]
        assert client.reply() == ["554 SMTP synchronization error"]
    exim.wait_for_log(
        r"SMTP protocol synchronization error \(next input sent too soon: pipelining was "
        r'advertised\): rejected "DATA"',
        log_offset,
    )
    exim.wait_for_log(r"incomplete transaction \(sync failure\) from <a@src.example>", log_offset)


def test_exim_factory_without_chunking(mta_factory: Callable[..., Any]) -> None:
    server: Exim = mta_factory(Exim, chunking=False)
    with smtplib.SMTP(*server.address, timeout=10) as client:
        code, reply = client.ehlo("c.example")
        assert code == 250 and b"CHUNKING" not in reply and b"PIPELINING" in reply


# --------------------------------------------------------------------------- Exim as client


def test_exim_client_sends_with_pipelining_and_chunking_to_exim(
    exim: Exim, mta_factory: Callable[..., Any]
) -> None:
    client: EximClient = mta_factory(EximClient, exim.address)
    rcpt = _unique()
    offset = exim.trace_offset()
    delivery = client.send(
        "sender@src.example", [rcpt, "reject-2@dest.example"], b"Subject: c\n\nhi\n"
    )
    assert delivery.recipients == {rcpt: "delivered", "reject-2@dest.example": "bounced"}
    assert delivery.status == "mixed"
    assert delivery.pipelining and delivery.chunking
    assert " L K C=" in delivery.log
    # One write: MAIL, both RCPTs and BDAT ... LAST (with the message), then QUIT.
    assert delivery.pipelined[:3] == [
        delivery.pipelined[0],
        f"RCPT TO:<{rcpt}>",
        "RCPT TO:<reject-2@dest.example>",
    ]
    assert delivery.pipelined[0].startswith("MAIL FROM:<sender@src.example>")
    assert delivery.pipelined[3].startswith("BDAT ") and delivery.pipelined[3].endswith(" LAST")

    (message,) = exim.wait_for_messages(1, where=_to(rcpt))
    assert message.sender == "sender@src.example" and message.recipients == [rcpt]
    assert message.header("Subject") == "c"
    # The server saw the same dialog.
    (session,) = [s for s in exim.sessions(offset) if "EHLO client.smtpguard.test" in s.commands]
    assert [c.split()[0] for c in session.commands] == [
        "EHLO",
        "MAIL",
        "RCPT",
        "RCPT",
        "BDAT",
        "QUIT",
    ]


def test_exim_client_sends_bdat_to_postfix(
    postfix: Postfix, mta_factory: Callable[..., Any]
) -> None:
    client: EximClient = mta_factory(EximClient, postfix.address)
    rcpt = _unique()
    delivery = client.send("sender@src.example", [rcpt], b"Subject: to postfix\r\n\r\nhi\r\n")
    assert delivery.delivered and delivery.chunking, delivery.log
    (message,) = postfix.wait_for_messages(1, where=_to(rcpt))
    assert message.sender == "sender@src.example"


def test_exim_client_without_chunking_and_deferral(
    opensmtpd: OpenSMTPD, mta_factory: Callable[..., Any]
) -> None:
    # OpenSMTPD offers neither PIPELINING nor CHUNKING: one command at a time, DATA.
    client: EximClient = mta_factory(EximClient, opensmtpd.address)
    rcpt = _unique()
    delivery = client.send("sender@src.example", [rcpt], b"Subject: to opensmtpd\n\nhi\n")
    assert delivery.delivered, delivery.log
    assert not delivery.pipelining and not delivery.chunking
    # Only the final QUIT is written unflushed (Exim shuts the socket down right after it).
    assert delivery.pipelined == ["QUIT"]
    assert (">", "DATA") in delivery.transcript
    (message,) = opensmtpd.wait_for_messages(1, where=_to(rcpt))
    assert message.recipients == [rcpt]

    nowhere: EximClient = mta_factory(EximClient, ("127.0.0.1", free_port()))
    deferred = nowhere.send("sender@src.example", [rcpt], b"Subject: x\n\nhi\n")
    assert deferred.status == "deferred" and deferred.recipients == {rcpt: "deferred"}
    assert "Connection refused" in deferred.log
    assert nowhere.queue() == [deferred.message_id]
