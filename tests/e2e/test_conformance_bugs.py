"""Regression tests, end to end against the real MTAs, for the conformance bugs fixed in
"One view of the session" (smtpguard/protocol/session.py, ehlo.py, rules.py, proxy.py).

Each test drives the real smtpguard (a subprocess) in front of a real Postfix, Exim or
OpenSMTPD and asserts on what the upstream itself recorded (Postfix's ``debug_peer_list``
command log and its ``disconnect`` counters, the Exim / OpenSMTPD transcripts, the captured
messages with their envelopes), so that each fails on the old behaviour.
"""

from __future__ import annotations

import re
import smtplib
import time
import uuid
from collections.abc import Callable, Iterator

import pytest
from guard import Guard, RawClient
from mtas import Exim, OpenSMTPD, Session
from peers import Postfix
from peers_tls import Certs, make_certs

GuardFactory = Callable[..., Guard]


def tag() -> str:
    return uuid.uuid4().hex[:10]


def upstream_of(peer: Postfix | Exim | OpenSMTPD) -> str:
    return f"{peer.host}:{peer.port}"


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def strict_postfix(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Postfix]:
    """A Postfix that refuses recipients starting with ``reject`` (554 at RCPT) and logs every
    command it reads from 127.0.0.1 (``< unknown[127.0.0.1]:PORT: COMMAND``)."""
    maps = tmp_path_factory.mktemp("postfix-maps")
    maps.chmod(0o755)
    access = maps / "recipient_access"
    access.write_text("/^reject/ REJECT\n")
    access.chmod(0o644)
    settings = {
        "smtpd_recipient_restrictions": f"check_recipient_access regexp:{access}, "
        "permit_mynetworks",
        "debug_peer_list": "127.0.0.1",
    }
    with Postfix(extra_main_cf=settings) as instance:
        yield instance


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


# --------------------------------------------------------------------------- helpers


def postfix_session(postfix: Postfix, offset: int, helo: str) -> tuple[list[str], dict[str, str]]:
    """(commands Postfix read, its ``disconnect`` counters) for the session that said
    ``EHLO helo`` after log ``offset``, once Postfix has closed it."""
    found = postfix.wait_for_log(rf"^.*: < \S+\[[^\]]+\]:(\d+): EHLO {re.escape(helo)}$", offset)
    port = int(found.group(1))
    counters = postfix.wait_for_disconnect(offset, client_port=port)
    commands = re.findall(
        rf"^.*: < \S+\[[^\]]+\]:{port}: (.*)$", postfix.log_since(offset), re.MULTILINE
    )
    return commands, counters


def mta_session(mta: Exim | OpenSMTPD, offset: int, helo: str, timeout: float = 10) -> Session:
    """The MTA's transcript of the session that said ``EHLO helo``, once it is closed."""
    deadline = time.monotonic() + timeout
    while True:
        for session in mta.sessions(offset):
            said = [c.upper() for c in session.commands]
            if f"EHLO {helo}".upper() in said and session.closed:
                return session
        if time.monotonic() > deadline:
            raise AssertionError(
                f"no closed {mta.name} session with EHLO {helo}: {mta.sessions(offset)}"
            )
        time.sleep(0.05)


def greet(client: RawClient, helo: str) -> bytes:
    """Read the greeting, send EHLO; return the EHLO reply."""
    assert client.reply().startswith(b"220 ")
    client.send(f"EHLO {helo}\r\n".encode())
    ehlo = client.reply()
    assert ehlo.startswith(b"250"), ehlo
    return ehlo


def ehlo_keywords(reply: bytes) -> list[str]:
    return [line[4:].split(" ")[0].upper() for line in reply.decode().splitlines()[1:]]


def read_until_closed(client: RawClient) -> bytes:
    try:
        return client.read_to_eof()
    except ConnectionResetError:
        return b""


def guard_log_lines(guard: Guard, event: str) -> list[str]:
    return [line for line in guard.log().splitlines() if f" event={event} " in line]


def wait_guard_disconnect(guard: Guard, timeout: float = 10) -> list[str]:
    """smtpguard's ``event=disconnect`` summary lines, once there is at least one."""
    deadline = time.monotonic() + timeout
    while not (lines := guard_log_lines(guard, "disconnect")):
        if time.monotonic() > deadline:
            raise AssertionError(f"no event=disconnect line; smtpguard log:\n{guard.log()}")
        time.sleep(0.05)
    return lines


def assert_guard_still_serving(guard: Guard, summary_field: str) -> None:
    """The session ended with its summary line (holding ``summary_field``, e.g. ``etrn=1``)
    and smtpguard still takes connections."""
    lines = wait_guard_disconnect(guard)
    assert guard.proc is not None and guard.proc.poll() is None, (
        f"smtpguard exited ({guard.proc and guard.proc.returncode}); log:\n{guard.log()[-3000:]}"
    )
    try:
        with RawClient(guard.port) as client:
            client.sock.settimeout(5)
            greeting = client.reply()
    except (OSError, AssertionError) as exc:
        raise AssertionError(
            f"smtpguard no longer serves ({exc!r}); log:\n{guard.log()[-3000:]}"
        ) from exc
    assert greeting.startswith(b"220 "), greeting
    assert f" {summary_field} " in lines[0], lines


# --------------------------------------------------------------------------- 1. envelope sender


def test_bdat_refused_after_rejected_rcpt_does_not_leak_old_sender(
    strict_postfix: Postfix, guard_factory: GuardFactory
) -> None:
    # Before the fix: smtpguard's local 503 for the BDAT left Postfix's transaction open, the
    # next MAIL got "503 nested MAIL" from Postfix and the message went out as old@.
    guard = guard_factory(upstream_of(strict_postfix))
    helo, t = f"sender-{tag()}.test", tag()
    offset = strict_postfix.log_offset()
    with RawClient(guard.port) as client:
        assert b"CHUNKING" in greet(client, helo)
        client.send(
            b"MAIL FROM:<old@client.test>\r\nRCPT TO:<reject-1@dest.example>\r\n"
            b"BDAT 5 LAST\r\nhello"
        )
        mail, rcpt, bdat = client.replies(3)
        assert mail.startswith(b"250 "), mail
        assert rcpt.startswith(b"554 5.7.1 <reject-1@dest.example>"), rcpt  # Postfix's refusal
        assert bdat == b"503 5.5.1 Error: need RCPT command\r\n"  # smtpguard's own
        client.send(
            f"MAIL FROM:<new@client.test>\r\nRCPT TO:<ok-{t}@dest.example>\r\n"
            "BDAT 5 LAST\r\nhello".encode()
        )
        replies = client.replies(3)
        assert [r[:4] for r in replies] == [b"250 "] * 3, replies
        client.send(b"QUIT\r\n")
        assert client.reply().startswith(b"221 ")

    (message,) = strict_postfix.wait_for_messages(
        1, where=lambda m: m.recipients == [f"ok-{t}@dest.example"]
    )
    assert message.sender == "new@client.test"
    assert message.text.endswith("\nhello\n")
    commands, counters = postfix_session(strict_postfix, offset, helo)
    # Postfix accepted both MAILs (no "nested MAIL command") and got one BDAT: the second.
    assert counters["mail"] == "2", (counters, commands)
    assert counters["bdat"] == "1", (counters, commands)
    assert [c for c in commands if c.startswith("BDAT")] == ["BDAT 5 LAST"]
    bdat_at = commands.index("BDAT 5 LAST")
    assert commands[bdat_at - 2 : bdat_at] == [
        "MAIL FROM:<new@client.test>",
        f"RCPT TO:<ok-{t}@dest.example>",
    ]


# --------------------------------------------------------------------------- 2. BDAT smuggling


def test_bdat_chunk_is_never_run_as_commands_by_an_upstream_without_chunking(
    opensmtpd: OpenSMTPD, guard_factory: GuardFactory
) -> None:
    # Before the fix: smtpguard forwarded "BDAT 33 LAST" and the chunk to OpenSMTPD (no
    # CHUNKING), which reads them as two command lines: it answered "500 5.5.1 Invalid
    # command: Pipelining not supported" and hung up (a server that tolerates pipelining runs
    # the smuggled RCPT).
    guard = guard_factory(upstream_of(opensmtpd))
    helo = f"smuggle-{tag()}.test"
    chunk = b"RCPT TO:<smuggled@evil.example>\r\n"
    assert len(chunk) == 33
    offset = opensmtpd.trace_offset()
    with RawClient(guard.port) as client:
        assert "CHUNKING" not in ehlo_keywords(greet(client, helo))
        client.send(b"MAIL FROM:<a@client.test>\r\n")
        assert client.reply().startswith(b"250 ")
        client.send(b"RCPT TO:<b@dest.example>\r\n")
        assert client.reply().startswith(b"250 ")
        client.send(b"BDAT 33 LAST\r\n" + chunk)
        assert client.reply() == b"502 5.5.1 Error: command not implemented\r\n"
        client.send(b"NOOP\r\n")  # the 33 bytes were consumed as the chunk, not as a command
        assert client.reply().startswith(b"250 ")
        client.send(b"QUIT\r\n")
        assert client.reply().startswith(b"221 ")
        assert read_until_closed(client) == b""

    session = mta_session(opensmtpd, offset, helo)
    verbs = [c.split()[0].upper() for c in session.commands]
    assert "BDAT" not in verbs, session.commands
    assert not any("smuggled" in c for c in session.commands), session.commands
    assert verbs.count("RCPT") == 1, session.commands
    assert verbs[-2:] == ["NOOP", "QUIT"], session.commands
    # Nothing made OpenSMTPD complain (500 unrecognized / pipelining not supported).
    assert not [r for r in session.replies if r.startswith("5")], session.lines


# --------------------------------------------------------------------------- 3. STARTTLS


def test_starttls_through_guard_to_opensmtpd_sends_one_ehlo_upstream(
    opensmtpd: OpenSMTPD, certs: Certs, guard_factory: GuardFactory
) -> None:
    # Before the fix: the client's second EHLO (after STARTTLS) was forwarded, and OpenSMTPD,
    # which allows one EHLO per session, answered "503 5.5.1 Invalid command: Already
    # identified": the message could not be sent.
    guard = guard_factory(
        upstream_of(opensmtpd),
        tls={"certificate": str(certs.cert_pem), "key": str(certs.key_pem)},
    )
    helo, t = f"tls-{tag()}.test", tag()
    rcpt = f"tls-{t}@dest.example"
    offset = opensmtpd.trace_offset()
    with smtplib.SMTP("127.0.0.1", guard.port, timeout=15) as client:
        client.ehlo(helo)
        assert client.has_extn("starttls")
        code, _ = client.starttls(context=certs.client_context())
        assert code == 220
        code, reply = client.ehlo(helo)
        assert code == 250, reply
        assert not client.has_extn("starttls")
        assert client.sock is not None and client.sock.version() is not None  # TLS is on
        refused = client.sendmail(
            "tls-sender@client.test", [rcpt], f"Subject: starttls {t}\r\n\r\nover TLS\r\n"
        )
        assert refused == {}

    (message,) = opensmtpd.wait_for_messages(1, where=lambda m: rcpt in m.recipients)
    assert message.sender == "tls-sender@client.test"
    assert message.recipients == [rcpt]
    assert message.header("Subject") == f"starttls {t}"
    session = mta_session(opensmtpd, offset, helo)
    greetings = [c for c in session.commands if c.split()[0].upper() in ("EHLO", "HELO")]
    assert [c.upper() for c in greetings] == [f"EHLO {helo}".upper()], session.commands
    assert "STARTTLS" not in [c.upper() for c in session.commands]
    assert not any("Already identified" in r for r in session.replies), session.lines


# --------------------------------------------------------------------------- 4. ETRN


def test_etrn_is_relayed_to_postfix_which_advertises_it(
    strict_postfix: Postfix, guard_factory: GuardFactory
) -> None:
    # Before the fix: ETRN was relayed in the EHLO reply but answered "500 unknown command".
    guard = guard_factory(upstream_of(strict_postfix))
    helo = f"etrn-{tag()}.test"
    offset = strict_postfix.log_offset()
    with RawClient(guard.port) as client:
        assert "ETRN" in ehlo_keywords(greet(client, helo))
        client.send(b"ETRN dest.example\r\n")
        assert client.reply() == b"250 Queuing started\r\n"  # Postfix's own reply
        client.send(b"QUIT\r\n")
        assert client.reply().startswith(b"221 ")
    commands, counters = postfix_session(strict_postfix, offset, helo)
    assert "ETRN dest.example" in commands
    assert counters.get("etrn") == "1", counters
    # The session's summary line counts the relayed ETRN (and writing it must not fail).
    assert_guard_still_serving(guard, "etrn=1")


def test_etrn_is_answered_locally_when_the_upstream_does_not_offer_it(
    opensmtpd: OpenSMTPD, guard_factory: GuardFactory
) -> None:
    guard = guard_factory(upstream_of(opensmtpd))
    helo = f"etrn-{tag()}.test"
    offset = opensmtpd.trace_offset()
    with RawClient(guard.port) as client:
        assert "ETRN" not in ehlo_keywords(greet(client, helo))
        client.send(b"ETRN dest.example\r\n")
        assert client.reply() == b"502 5.5.1 Error: command not implemented\r\n"
        client.send(b"NOOP\r\n")
        assert client.reply().startswith(b"250 ")
        client.send(b"QUIT\r\n")
        assert client.reply().startswith(b"221 ")
    session = mta_session(opensmtpd, offset, helo)
    assert not any(c.upper().startswith("ETRN") for c in session.commands), session.commands
    assert_guard_still_serving(guard, "etrn=0/1")  # a local refusal is a failed ETRN


# --------------------------------------------------------------------------- 5. long DSN RCPT


def test_long_dsn_rcpt_line_is_relayed_and_delivered(
    strict_postfix: Postfix, guard_factory: GuardFactory
) -> None:
    # RFC 3461 5: DSN allows RCPT lines up to 512 + 500 octets.  Before the fix smtpguard's
    # 512-octet limit answered "500 5.5.2 line too long".
    guard = guard_factory(upstream_of(strict_postfix))
    helo, t = f"dsn-{tag()}.test", tag()
    rcpt = f"b-{t}@dest.example"
    head = f"RCPT TO:<{rcpt}> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;"
    tail = "@dest.example\r\n"
    line = (head + "x" * (556 - len(head) - len(tail)) + tail).encode()
    assert len(line) == 556
    offset = strict_postfix.log_offset()
    with RawClient(guard.port) as client:
        assert "DSN" in ehlo_keywords(greet(client, helo))
        client.send(f"MAIL FROM:<dsn-{t}@client.test>\r\n".encode())
        assert client.reply().startswith(b"250 ")
        client.send(line)
        assert client.reply().startswith(b"250 ")
        client.send(b"DATA\r\n")
        assert client.reply().startswith(b"354 ")
        client.send(f"Subject: dsn {t}\r\n\r\nlong ORCPT\r\n.\r\n".encode())
        assert client.reply().startswith(b"250 ")
        client.send(b"QUIT\r\n")
        assert client.reply().startswith(b"221 ")

    (message,) = strict_postfix.wait_for_messages(1, where=lambda m: m.recipients == [rcpt])
    assert message.sender == f"dsn-{t}@client.test"
    assert message.header("Subject") == f"dsn {t}"
    commands, _ = postfix_session(strict_postfix, offset, helo)
    assert line.decode().removesuffix("\r\n") in commands  # all 554 octets reached Postfix


# --------------------------------------------------------------------------- 6. BDAT 1x


def test_bad_bdat_syntax_hangs_up_before_postfix_sees_anything(
    strict_postfix: Postfix, guard_factory: GuardFactory
) -> None:
    # Before the fix: "BDAT 1x" got a 501 and the bytes after it were read as commands.
    guard = guard_factory(upstream_of(strict_postfix))
    helo, t = f"bdat1x-{tag()}.test", tag()
    offset = strict_postfix.log_offset()
    with RawClient(guard.port) as client:
        greet(client, helo)
        client.send(f"MAIL FROM:<a-{t}@client.test>\r\nRCPT TO:<c-{t}@dest.example>\r\n".encode())
        assert [r[:4] for r in client.replies(2)] == [b"250 ", b"250 "]
        client.send(b"BDAT 1x\r\nRCPT TO:<smuggled@evil.example>\r\n")
        assert client.reply().startswith(b"521 5.5.4 "), "BDAT 1x must be answered 521 5.5.4"
        assert read_until_closed(client) == b""  # and the connection closed

    commands, counters = postfix_session(strict_postfix, offset, helo)
    assert not any(c.upper().startswith("BDAT") for c in commands), commands
    assert not any("smuggled" in c for c in commands), commands
    assert "bdat" not in counters and counters["rcpt"] == "1", counters


# --------------------------------------------------------------------------- 7. message counts


def test_pipelined_messages_are_counted_once_each(exim: Exim, guard_factory: GuardFactory) -> None:
    # RFC 2920: the next MAIL may follow the final dot before its reply.  Before the fix the
    # message was counted "aborted" at the next MAIL, then "accepted" with size 0.
    guard = guard_factory(upstream_of(exim))
    helo, t = f"pipe-{tag()}.test", tag()
    log_offset, offset = exim.log_offset(), exim.trace_offset()

    def envelope(n: int) -> bytes:
        mail = f"MAIL FROM:<p{n}-{t}@client.test>\r\n"
        return f"{mail}RCPT TO:<p{n}-{t}@dest.example>\r\nDATA\r\n".encode()

    def body(n: int) -> bytes:
        return f"Subject: pipelined {n} {t}\r\n\r\nbody {n}\r\n.\r\n".encode()

    with RawClient(guard.port) as client:
        assert "PIPELINING" in ehlo_keywords(greet(client, helo))
        client.send(envelope(1))
        assert [r[:4] for r in client.replies(3)] == [b"250 ", b"250 ", b"354 "]
        client.send(body(1) + envelope(2))
        assert [r[:4] for r in client.replies(4)] == [b"250 ", b"250 ", b"250 ", b"354 "]
        client.send(body(2) + envelope(3))
        assert [r[:4] for r in client.replies(4)] == [b"250 ", b"250 ", b"250 ", b"354 "]
        client.send(body(3) + b"QUIT\r\n")
        assert [r[:4] for r in client.replies(2)] == [b"250 ", b"221 "]

    messages = exim.wait_for_messages(3, where=lambda m: m.sender.endswith(f"-{t}@client.test"))
    assert sorted(m.sender for m in messages) == [f"p{n}-{t}@client.test" for n in (1, 2, 3)]
    session = mta_session(exim, offset, helo)
    assert [c.split()[0] for c in session.commands].count("MAIL") == 3
    assert "synchronization error" not in exim.log_since(log_offset)
    wait_guard_disconnect(guard)
    assert guard.metric("smtpguard_messages_total", outcome="accepted") == 3
    assert guard.metric("smtpguard_messages_total", outcome="aborted") == 0


# --------------------------------------------------------------------------- 8. one log line


def test_observed_sequence_violation_is_logged_once(
    strict_postfix: Postfix, guard_factory: GuardFactory
) -> None:
    # Before the fix: an observed violation was logged twice, as event=violation and as
    # event=policy defence=sequence action=observe.
    guard = guard_factory(upstream_of(strict_postfix), policy={"sequence": "observe"})
    helo = f"observe-{tag()}.test"
    offset = strict_postfix.log_offset()
    with RawClient(guard.port) as client:
        greet(client, helo)
        client.send(b"RCPT TO:<early@dest.example>\r\n")
        # Forwarded: the answer is Postfix's ("need MAIL command"), not smtpguard's.
        assert client.reply() == b"503 5.5.1 Error: need MAIL command\r\n"
        client.send(b"QUIT\r\n")
        assert client.reply().startswith(b"221 ")

    commands, counters = postfix_session(strict_postfix, offset, helo)
    assert "RCPT TO:<early@dest.example>" in commands
    assert counters["rcpt"] == "0/1", counters
    wait_guard_disconnect(guard)
    violations = guard_log_lines(guard, "violation")
    assert len(violations) == 1, guard.log()
    assert " command=RCPT " in violations[0] and " action=observe" in violations[0], violations
    sequence_policy = [
        line for line in guard_log_lines(guard, "policy") if " defence=sequence " in line
    ]
    assert sequence_policy == [], guard.log()
