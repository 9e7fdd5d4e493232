"""smtpguard (a real subprocess) in front of a real Postfix, driven by real clients."""

from __future__ import annotations

import smtplib
import subprocess
import time
import uuid
from collections.abc import Iterator
from email.message import EmailMessage

import pytest
from guard import Guard, RawClient
from peers import Postfix, free_port, swaks


@pytest.fixture(scope="module")
def guard(postfix: Postfix) -> Iterator[Guard]:
    with Guard(f"{postfix.host}:{postfix.port}", help={"local": True}) as g:
        yield g


def unique() -> str:
    return uuid.uuid4().hex[:12]


def test_smtplib_message_arrives_exactly(guard: Guard, postfix: Postfix) -> None:
    tag = unique()
    msg = EmailMessage()
    msg["From"] = "alice@example.org"
    msg["To"] = "bob@example.org"
    msg["Subject"] = f"hello {tag}"
    msg.set_content("line one\n.starts with a dot\n\nlast line\n")
    wire = msg.as_bytes(policy=msg.policy.clone(linesep="\r\n"))
    with smtplib.SMTP("127.0.0.1", guard.port, timeout=30) as client:
        client.ehlo("client.example")
        assert client.has_extn("pipelining")
        assert not client.has_extn("starttls")
        refused = client.sendmail("alice@example.org", ["bob@example.org"], wire)
        assert refused == {}
    [captured] = postfix.wait_for_messages(1, where=lambda m: tag in m.text)
    assert captured.sender == "alice@example.org"
    assert captured.recipients == ["bob@example.org"]
    from peers import body_matches

    assert body_matches(wire, captured.data), captured.data


def test_swaks_message_arrives(guard: Guard, postfix: Postfix) -> None:
    tag = unique()
    result = swaks(
        "--server",
        f"127.0.0.1:{guard.port}",
        "--from",
        "carol@example.org",
        "--to",
        "dave@example.org,erin@example.org",
        "--header",
        f"Subject: swaks {tag}",
        "--body",
        "swaks body\n..two dots\n",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    [captured] = postfix.wait_for_messages(1, where=lambda m: tag in m.text)
    assert captured.sender == "carol@example.org"
    assert sorted(captured.recipients) == ["dave@example.org", "erin@example.org"]
    assert "\n..two dots\n" in captured.text  # the stuffed dot arrived unstuffed once


def test_swaks_pipelining_through_guard(guard: Guard, postfix: Postfix) -> None:
    tag = unique()
    result = swaks(
        "--pipeline",
        "--server",
        f"127.0.0.1:{guard.port}",
        "--to",
        "frank@example.org",
        "--header",
        f"Subject: pipelined {tag}",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    postfix.wait_for_messages(1, where=lambda m: tag in m.text)


# (commands sent after the greeting, index of the violating one, expected 503 text,
#  the Postfix counter that must NOT appear for the violating verb)
VIOLATIONS = [
    ("mail_before_ehlo", [b"MAIL FROM:<a@example.org>"], 0, b"send HELO/EHLO first", "mail"),
    (
        "rcpt_before_mail",
        [b"EHLO c", b"RCPT TO:<b@example.org>"],
        1,
        b"need MAIL before RCPT",
        "rcpt",
    ),
    (
        "nested_mail",
        [b"EHLO c", b"MAIL FROM:<a@example.org>", b"MAIL FROM:<x@example.org>"],
        2,
        b"nested MAIL command",
        None,
    ),
    (
        "data_without_accepted_rcpt",
        [b"EHLO c", b"MAIL FROM:<a@example.org>", b"DATA"],
        2,
        b"need RCPT command",
        "data",
    ),
    (
        "bdat_without_accepted_rcpt",
        [b"EHLO c", b"MAIL FROM:<a@example.org>", b"BDAT 4 LAST\r\nabcd"],
        2,
        b"need RCPT command",
        "bdat",
    ),
    ("auth_before_ehlo", [b"AUTH PLAIN AGFAYg=="], 0, b"send HELO/EHLO first", "auth"),
    (
        "auth_in_transaction",
        [b"EHLO c", b"MAIL FROM:<a@example.org>", b"AUTH PLAIN AGFAYg=="],
        2,
        b"MAIL transaction in progress",
        "auth",
    ),
    (
        "starttls_in_transaction",
        [b"EHLO c", b"MAIL FROM:<a@example.org>", b"STARTTLS"],
        2,
        b"MAIL transaction in progress",
        "starttls",
    ),
    (
        "data_after_bdat",
        [
            b"EHLO c",
            b"MAIL FROM:<a@example.org>",
            b"RCPT TO:<b@example.org>",
            b"BDAT 5\r\nhello",
            b"DATA",
        ],
        4,
        b"DATA not allowed after BDAT",
        "data",
    ),
]


@pytest.mark.parametrize(
    ("commands", "bad", "text", "absent"),
    [v[1:] for v in VIOLATIONS],
    ids=[v[0] for v in VIOLATIONS],
)
def test_violation_answered_locally_and_never_reaches_postfix(
    guard: Guard,
    postfix: Postfix,
    commands: list[bytes],
    bad: int,
    text: bytes,
    absent: str | None,
) -> None:
    verb = commands[bad].split()[0].decode()
    before = guard.metric("smtpguard_sequence_violations_total", command=verb, state=_state(bad))
    offset = postfix.log_offset()
    with RawClient(guard.port) as client:
        assert client.reply().startswith(b"220 ")
        for i, command in enumerate(commands):
            # A BDAT entry carries its chunk after its own CRLF.
            client.send(command if b"\r\n" in command else command + b"\r\n")
            reply = client.reply()
            if i == bad:
                assert reply.startswith(b"503 "), reply
                assert text in reply
                if i > 0:  # after EHLO the enhanced code is used
                    assert reply.startswith(b"503 5.5.1 Error: ")
            else:
                assert reply[:1] in (b"2", b"3"), (command, reply)
        client.send(b"QUIT\r\n")
        assert client.reply().startswith(b"221")
    counts = postfix.wait_for_disconnect(offset)
    # Postfix saw every command but the violating one, and QUIT; a BDAT refused
    # inside a transaction fails it (RFC 3030 2), so smtpguard ends Postfix's
    # transaction too, with an RSET of its own.
    forwarded = len(commands) - 1 + 1
    if verb == "BDAT" and bad >= 2:
        forwarded += 1
        assert counts.get("rset") == "1", counts
    assert counts["commands"] == str(forwarded), counts
    if absent is not None:
        assert absent not in counts, counts
    after = guard.metric("smtpguard_sequence_violations_total", command=verb, state=_state(bad))
    assert after == before + 1


def _state(bad: int) -> str:
    return {0: "connected", 1: "ready", 2: "mail", 4: "bdat"}[bad]


def test_pipelined_violation_batch_in_one_write(guard: Guard, postfix: Postfix) -> None:
    """RCPT after a MAIL that Postfix rejects: held, then answered 503, never forwarded."""
    offset = postfix.log_offset()
    with RawClient(guard.port) as client:
        client.reply()
        client.send(
            b"EHLO c\r\nMAIL FROM:<bad address>\r\nRCPT TO:<b@example.org>\r\nDATA\r\nQUIT\r\n"
        )
        replies = client.replies(5)
    assert replies[0].startswith(b"250-")
    assert replies[1].startswith(b"501 ")  # Postfix rejects the malformed sender
    assert replies[2] == b"503 5.5.1 Error: need MAIL before RCPT\r\n"
    assert replies[3] == b"503 5.5.1 Error: need MAIL command\r\n"
    assert replies[4].startswith(b"221")
    counts = postfix.wait_for_disconnect(offset)
    assert counts == {"ehlo": "1", "mail": "0/1", "quit": "1", "commands": "2/3"}


def test_help_answered_locally_with_214(guard: Guard, postfix: Postfix) -> None:
    offset = postfix.log_offset()
    before = guard.metric("smtpguard_local_replies_total", code="214")
    with RawClient(guard.port) as client:
        client.reply()
        client.send(b"EHLO c\r\nHELP\r\nHELP MAIL\r\nQUIT\r\n")
        replies = client.replies(4)
    assert replies[1].startswith(b"214-2.0.0 ")
    assert replies[1].endswith(b"214 2.0.0 End of HELP info\r\n")
    assert b"MAIL FROM:<sender>" in replies[2]
    counts = postfix.wait_for_disconnect(offset)
    assert counts == {"ehlo": "1", "quit": "1", "commands": "2"}  # no HELP reached Postfix
    assert guard.metric("smtpguard_local_replies_total", code="214") == before + 2


def test_unknown_and_xclient_never_forwarded(guard: Guard, postfix: Postfix) -> None:
    offset = postfix.log_offset()
    with RawClient(guard.port) as client:
        client.reply()
        client.send(b"EHLO c\r\nXCLIENT ADDR=192.0.2.1\r\nWIBBLE\r\nQUIT\r\n")
        replies = client.replies(4)
    assert replies[1] == replies[2] == b"500 5.5.2 Error: command not recognized\r\n"
    counts = postfix.wait_for_disconnect(offset)
    assert counts == {"ehlo": "1", "quit": "1", "commands": "2"}


def test_bdat_message_through_guard(guard: Guard, postfix: Postfix) -> None:
    tag = unique()
    chunk1 = f"Subject: bdat {tag}\r\n\r\n".encode()
    chunk2 = b"binary-safe body\r\n.\r\nnot the end\r\n"
    with RawClient(guard.port) as client:
        client.reply()
        client.send(b"EHLO c\r\n")
        assert b"CHUNKING" in client.reply()
        client.send(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\n")
        client.send(b"BDAT %d\r\n" % len(chunk1) + chunk1)
        client.send(b"BDAT %d LAST\r\n" % len(chunk2) + chunk2 + b"QUIT\r\n")
        replies = client.replies(5)
    assert [r[:3] for r in replies] == [b"250", b"250", b"250", b"250", b"221"], replies
    [captured] = postfix.wait_for_messages(1, where=lambda m: tag in m.text)
    assert captured.text.endswith("binary-safe body\n.\nnot the end\n")


def test_client_cut_off_mid_data_is_never_delivered(guard: Guard, postfix: Postfix) -> None:
    tag = unique()
    offset = postfix.log_offset()
    before = guard.metric("smtpguard_messages_total", outcome="aborted")
    with RawClient(guard.port) as client:
        client.reply()
        client.send(b"EHLO c\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n")
        assert client.replies(4)[-1].startswith(b"354")
        client.send(f"Subject: cut {tag}\r\n\r\nthe first half\r\n.".encode())
        time.sleep(0.3)
    postfix.wait_for_log(r"lost connection after DATA", offset)
    time.sleep(1.5)
    assert [m for m in postfix.messages() if tag in m.text] == []
    assert guard.metric("smtpguard_messages_total", outcome="aborted") == before + 1


def test_upstream_unreachable_gives_421_and_counts() -> None:
    dead = free_port()
    with Guard(f"127.0.0.1:{dead}") as g:
        with RawClient(g.port) as client:
            data = client.read_to_eof()
        assert data == b"421 4.3.0 guard.test Service not available, try again later\r\n"
        assert g.metric("smtpguard_upstream_connect_failures_total", reason="refused") == 1


def test_postfix_stopping_mid_session_gives_421(postfix_factory) -> None:  # type: ignore[no-untyped-def]
    pf = postfix_factory()
    with Guard(f"{pf.host}:{pf.port}") as g, RawClient(g.port) as client:
        assert client.reply().startswith(b"220")
        client.send(b"EHLO c\r\n")
        client.reply()
        pf.stop()
        client.send(b"NOOP\r\n")
        data = client.read_to_eof()
        assert data.startswith(b"421 4.") and data.endswith(b"\r\n"), data
        assert b"Traceback" not in data


def test_metrics_endpoint_and_sigterm_exit_code(guard: Guard) -> None:
    text = guard.metrics()
    assert 'smtpguard_build_info{version="' in text
    assert "smtpguard_sequence_violations_total" in text
    g = Guard("127.0.0.1:1")
    g.start()
    assert g.stop() == 0


def test_nc_example_from_the_issue(guard: Guard, postfix: Postfix) -> None:
    """printf 'EHLO x\\r\\nRCPT TO:<a@example.org>\\r\\n' | nc 127.0.0.1 PORT."""
    offset = postfix.log_offset()
    result = subprocess.run(
        ["nc", "-N", "127.0.0.1", str(guard.port)],
        input=b"EHLO x\r\nRCPT TO:<a@example.org>\r\n",
        capture_output=True,
        timeout=30,
    )
    assert b"503 5.5.1 Error: need MAIL before RCPT\r\n" in result.stdout
    counts = postfix.wait_for_disconnect(offset)
    assert "rcpt" not in counts


def test_after_postfix_refuses_a_bdat_chunk_it_sees_no_command_out_of_order(
    postfix_factory,  # type: ignore[no-untyped-def]
) -> None:
    """Postfix refuses a chunk over its size limit (552) and keeps the failed
    transaction in BDAT mode: smtpguard answers RCPT and DATA itself then, and
    after BDAT ... LAST (refused too) a RCPT needs MAIL. Postfix's own log
    shows it got one RCPT and no DATA: it never had to answer out of order."""
    pf = postfix_factory(extra_main_cf={"message_size_limit": "2000"})
    offset = pf.log_offset()
    with Guard(f"{pf.host}:{pf.port}") as g, RawClient(g.port) as client:
        client.reply()
        client.send(b"EHLO c\r\n")
        assert b"CHUNKING" in client.reply()
        client.send(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\n")
        assert [r[:3] for r in client.replies(2)] == [b"250", b"250"]
        client.send(b"BDAT 3000\r\n" + b"x" * 2998 + b"\r\n")
        refused = client.reply()
        assert refused.startswith(b"552 "), refused
        client.send(b"RCPT TO:<c@example.org>\r\nDATA\r\n")
        assert client.replies(2) == [
            b"503 5.5.1 Error: RCPT after BDAT; send BDAT ... LAST or RSET\r\n",
            b"503 5.5.1 Error: DATA not allowed after BDAT; send BDAT ... LAST\r\n",
        ]
        client.send(b"BDAT 2 LAST\r\nxy")
        assert client.reply()[:1] == b"5"  # discarded after the earlier error
        client.send(b"RCPT TO:<c@example.org>\r\nQUIT\r\n")
        assert client.replies(2) == [
            b"503 5.5.1 Error: need MAIL before RCPT\r\n",
            b"221 2.0.0 Bye\r\n",
        ]
    counts = pf.wait_for_disconnect(offset)
    assert counts["rcpt"] == "1" and "data" not in counts, counts
    assert counts["bdat"] == "0/2", counts
