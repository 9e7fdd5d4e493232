"""Protection policies end to end: smtpguard (a real subprocess) in front of a real Postfix.

Each defence is attacked with raw bytes, once per action; Postfix's own log (``connect from``
and ``disconnect from ... commands=`` lines) and its captured mail prove what reached it, and
``smtpguard_policy_actions_total`` proves smtpguard counted it.  SMTP smuggling is first shown
to work against the legacy Postfix directly, so the guarded runs prove something.
"""

from __future__ import annotations

import contextlib
import json
import re
import ssl
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from guard import Guard, RawClient
from peers import CapturedMessage, Postfix, parse_disconnect

# --------------------------------------------------------------------------- helpers

POLICY = "smtpguard_policy_actions_total"
HOST = "guard.test"  # the hostname Guard configures

CONFIGS: dict[str, dict[str, Any]] = {
    "default": {},
    "smuggling_observe": {"policy": {"smuggling": "observe"}},
    "smuggling_reject": {"policy": {"smuggling": "reject"}},
    "pipelining_reject": {"policy": {"pipelining": "reject"}},
    "pipelining_disconnect": {"policy": {"pipelining": "disconnect"}},
    "pipelining_not_offered": {"policy": {"pipelining": "reject"}, "pipelining": {"offer": False}},
    "early_observe": {"policy": {"early_talk": "observe", "greet_wait_seconds": 1}},
    "early_reject": {"policy": {"early_talk": "reject", "greet_wait_seconds": 1}},
    "early_disconnect": {"policy": {"early_talk": "disconnect", "greet_wait_seconds": 1}},
    "non_smtp_observe": {"policy": {"non_smtp": "observe"}},
    "limits": {"limits": {"max_recipients": 2, "max_message_bytes": 1000, "max_line_bytes": 100}},
    "unknown_limit": {"limits": {"max_unknown_commands": 2}},
    "error_limit": {"limits": {"hard_error_limit": 3}},
    "both_limits": {"limits": {"max_unknown_commands": 2, "hard_error_limit": 3}},
    "per_client": {"limits": {"max_connections_per_client": 1}},
    # Every action set to its strictest: mode observe must turn them all into observe.
    "observe_mode": {
        "policy": {
            "mode": "observe",
            "sequence": "disconnect",
            "smuggling": "reject",
            "pipelining": "disconnect",
            "non_smtp": "disconnect",
            "early_talk": "disconnect",
        },
        "limits": {
            "max_recipients": 2,
            "max_message_bytes": 1000,
            "max_unknown_commands": 2,
            "hard_error_limit": 3,
            "max_connections_per_client": 1,
        },
    },
    "observe_mode_early": {
        "policy": {"mode": "observe", "early_talk": "disconnect", "greet_wait_seconds": 1}
    },
}

GuardFor = Callable[[Postfix, str], Guard]


@pytest.fixture(scope="module")
def guard_for() -> Iterator[GuardFor]:
    """``guard_for(postfix, "limits")``: one smtpguard per (upstream, config), module-wide."""
    started: dict[tuple[int, str], Guard] = {}

    def get(upstream: Postfix, name: str) -> Guard:
        key = (upstream.port, name)
        if key not in started:
            config = json.loads(json.dumps(CONFIGS[name]))  # a private copy
            started[key] = Guard(f"{upstream.host}:{upstream.port}", **config).start()
        return started[key]

    yield get
    for guard in started.values():
        guard.stop()


def unique() -> str:
    return uuid.uuid4().hex[:12]


def read_all(client: RawClient) -> bytes:
    """Everything until the peer closes (a reset after the data counts as closed)."""
    data = client.buf
    client.buf = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := client.sock.recv(65536):
            data += chunk
    return data


def settle_guard() -> None:
    """Let smtpguard finish writing the reply just read before the client talks again.

    smtpguard can lose its last reply when a session ends while its other pump is still
    writing (see test_last_reply_not_lost_*): tests about something else pause here so that
    they test what they are about.
    """
    time.sleep(0.05)


def wait_until(condition: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {condition}"
        time.sleep(0.05)


def connects(postfix: Postfix, offset: int) -> int:
    """How many SMTP connections Postfix accepted since ``offset`` (``disconnect`` excluded)."""
    return len(re.findall(r"\bconnect from ", postfix.log_since(offset)))


def settled(postfix: Postfix, offset: int) -> dict[str, str]:
    """Wait for the session's ``disconnect`` line and for the queue to drain; its counters."""
    counts = postfix.wait_for_disconnect(offset)
    postfix.messages(timeout=10)
    return counts


def tagged(postfix: Postfix, tag: str) -> list[CapturedMessage]:
    return [m for m in postfix.messages() if tag in m.text]


def ehlo(client: RawClient) -> bytes:
    """Read the greeting, send EHLO, return its reply (once smtpguard has finished it)."""
    greeting = client.reply()
    assert greeting.startswith(b"220 "), greeting
    client.send(b"EHLO c\r\n")
    reply = client.reply()
    assert reply.startswith(b"250-"), reply
    settle_guard()
    return reply


class Counter:
    """A policy counter read before an attack: ``.delta()`` is how much it moved since."""

    def __init__(self, guard: Guard, defence: str, action: str) -> None:
        self.guard, self.labels = guard, {"defence": defence, "action": action}
        self.before = guard.metric(POLICY, **self.labels)

    def delta(self) -> float:
        return self.guard.metric(POLICY, **self.labels) - self.before


def client_hello() -> bytes:
    """A real TLS ClientHello, as a client that expected implicit TLS would send it."""
    context = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="guard.test")
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    hello = outgoing.read()
    assert hello.startswith(b"\x16\x03"), hello[:8]
    return hello


# --------------------------------------------------------------------------- 1. smuggling

SENDER, RECIPIENT = "alice@example.org", "bob@example.org"
ENVELOPE = f"MAIL FROM:<{SENDER}>\r\nRCPT TO:<{RECIPIENT}>\r\nDATA\r\n".encode()

# (id, the fake end of data, does legacy Postfix 3.7 (smtpd_forbid_bare_newline = no) take it
# as the end of the first message?  Observed directly by test_legacy_postfix_alone_...)
VARIANTS = [
    ("lf_dot_lf", b"\n.\n", True),
    ("lf_dot_crlf", b"\n.\r\n", True),
    ("cr_dot_crlf", b"\r.\r\n", False),
    ("crlf_dot_cr", b"\r\n.\r", False),
    ("crlf_nul_dot_crlf", b"\r\n\0.\r\n", False),
    ("crlf_dot_nul_crlf", b"\r\n.\0\r\n", False),
    ("crcrlf_dot_crcrlf", b"\r\r\n.\r\r\n", True),
]


def smuggling_body(tag: str, variant: bytes) -> bytes:
    """A first message carrying a second one after ``variant``; ends with the real end."""
    return (
        f"Subject: first {tag}\r\n\r\nhello".encode()
        + variant
        + b"MAIL FROM:<smuggled@evil.example>\r\nRCPT TO:<victim@example.org>\r\nDATA\r\n"
        + f"Subject: smuggled {tag}\r\n\r\nsmuggled\r\n".encode()
        + b"\r\n.\r\n"
    )


def smuggle(port: int, tag: str, variant: bytes) -> bytes:
    """Send the smuggling message (and QUIT) to ``port``; everything it answered after 354."""
    with RawClient(port) as client:
        ehlo(client)
        client.send(ENVELOPE)
        replies = client.replies(3)
        assert [r[:3] for r in replies] == [b"250", b"250", b"354"], replies
        settle_guard()
        client.send(smuggling_body(tag, variant) + b"QUIT\r\n")
        return read_all(client)


def assert_only_first_message(postfix: Postfix, tag: str) -> CapturedMessage:
    [message] = postfix.wait_for_messages(1, where=lambda m: tag in m.text)
    time.sleep(0.2)
    messages = tagged(postfix, tag)
    assert len(messages) == 1, [(m.sender, m.recipients, m.header("Subject")) for m in messages]
    assert message.sender == SENDER
    assert message.recipients == [RECIPIENT]
    assert message.header("Subject") == f"first {tag}"
    # The smuggled commands stayed content of the first message.
    assert "MAIL FROM:<smuggled@evil.example>" in message.text
    return message


@pytest.mark.parametrize(
    ("variant", "smuggles"), [v[1:] for v in VARIANTS], ids=[v[0] for v in VARIANTS]
)
def test_legacy_postfix_alone_takes_some_end_of_data_lookalikes(
    legacy_postfix: Postfix, variant: bytes, smuggles: bool
) -> None:
    """Without smtpguard: the legacy Postfix turns some variants into a second message."""
    tag = unique()
    offset = legacy_postfix.log_offset()
    answered = smuggle(legacy_postfix.port, tag, variant)
    counts = settled(legacy_postfix, offset)
    messages = tagged(legacy_postfix, tag)
    summary = [(m.sender, m.recipients, m.header("Subject")) for m in messages]
    if smuggles:
        assert len(messages) == 2, summary
        assert answered.count(b"Ok: queued as") == 2, answered
        assert counts["mail"] == counts["rcpt"] == counts["data"] == "2", counts
        [smuggled] = [m for m in messages if m.sender == "smuggled@evil.example"]
        assert smuggled.recipients == ["victim@example.org"]
        assert smuggled.header("Subject") == f"smuggled {tag}"
    else:
        assert summary == [(SENDER, [RECIPIENT], f"first {tag}")]
        assert answered.count(b"Ok: queued as") == 1, answered
        assert counts["mail"] == "1", counts


@pytest.mark.parametrize("action", ["normalize", "observe"])
@pytest.mark.parametrize("variant", [v[1] for v in VARIANTS], ids=[v[0] for v in VARIANTS])
def test_smuggling_through_guard_delivers_only_the_first_message(
    guard_for: GuardFor, legacy_postfix: Postfix, action: str, variant: bytes
) -> None:
    guard = guard_for(legacy_postfix, "default" if action == "normalize" else f"smuggling_{action}")
    counter = Counter(guard, "smuggling", action)
    tag = unique()
    offset = legacy_postfix.log_offset()
    answered = smuggle(guard.port, tag, variant)
    assert re.fullmatch(rb"250 2\.0\.0 Ok: queued as \w+\r\n221 2\.0\.0 Bye\r\n", answered), (
        answered
    )
    counts = settled(legacy_postfix, offset)
    assert counts == {
        "ehlo": "1",
        "mail": "1",
        "rcpt": "1",
        "data": "1",
        "quit": "1",
        "commands": "5",
    }
    message = assert_only_first_message(legacy_postfix, tag)
    if action == "normalize":
        # Bare breaks became line breaks and NULs are gone.
        assert b"\0" not in message.data and b"\r" not in message.data, message.data
    assert counter.delta() >= 1


@pytest.mark.parametrize("variant", [v[1] for v in VARIANTS], ids=[v[0] for v in VARIANTS])
def test_smuggling_reject_refuses_the_message(
    guard_for: GuardFor, legacy_postfix: Postfix, variant: bytes
) -> None:
    guard = guard_for(legacy_postfix, "smuggling_reject")
    counter = Counter(guard, "smuggling", "reject")
    tag = unique()
    offset = legacy_postfix.log_offset()
    answered = smuggle(guard.port, tag, variant)
    assert answered == b"550 5.5.2 Error: bare <CR> or <LF> received\r\n"
    legacy_postfix.wait_for_log(r"lost connection after DATA", offset)
    counts = settled(legacy_postfix, offset)
    assert "quit" not in counts and counts["data"] == "0/1", counts
    assert tagged(legacy_postfix, tag) == []
    assert counter.delta() >= 1


def test_observe_mode_smuggling_still_one_message(
    guard_for: GuardFor, legacy_postfix: Postfix
) -> None:
    guard = guard_for(legacy_postfix, "observe_mode")
    counter = Counter(guard, "smuggling", "observe")
    rejected = Counter(guard, "smuggling", "reject")
    for _name, variant, _ in VARIANTS:
        tag = unique()
        offset = legacy_postfix.log_offset()
        answered = smuggle(guard.port, tag, variant)
        assert answered.startswith(b"250 2.0.0 Ok: queued as "), answered
        settled(legacy_postfix, offset)
        assert_only_first_message(legacy_postfix, tag)
    assert counter.delta() >= len(VARIANTS)
    assert rejected.delta() == 0


# --------------------------------------------------------------------------- 2. command lines


def test_bare_lf_command_lines_normalized(guard_for: GuardFor, postfix: Postfix) -> None:
    guard = guard_for(postfix, "default")
    counter = Counter(guard, "smuggling", "normalize")
    offset = postfix.log_offset()
    with RawClient(guard.port) as client:
        assert client.reply().startswith(b"220 ")
        client.send(b"EHLO c\n")
        assert client.reply().startswith(b"250-")
        client.send(b"MAIL FROM:<a@example.org>\n")
        assert client.reply().startswith(b"250 2.1.0")
        client.send(b"QUIT\n")
        assert client.reply().startswith(b"221 ")
    counts = settled(postfix, offset)
    assert counts == {"ehlo": "1", "mail": "1", "quit": "1", "commands": "3"}
    assert counter.delta() == 3


@pytest.mark.parametrize("name", ["default", "smuggling_reject"])
def test_bare_cr_inside_command_refused(guard_for: GuardFor, postfix: Postfix, name: str) -> None:
    guard = guard_for(postfix, name)
    action = "normalize" if name == "default" else "reject"
    counter = Counter(guard, "smuggling", action)
    offset = postfix.log_offset()
    with RawClient(guard.port) as client:
        ehlo(client)
        client.send(b"MAIL FROM:<a@example.org>\rRCPT TO:<b@example.org>\r\n")
        assert client.reply() == b"500 5.5.2 Error: bare <CR> or <LF> in command\r\n"
        client.send(b"QUIT\r\n")
        assert client.reply().startswith(b"221 ")
    counts = settled(postfix, offset)
    assert counts == {"ehlo": "1", "quit": "1", "commands": "2"}
    assert counter.delta() == 1


def test_bare_lf_command_line_rejected(guard_for: GuardFor, postfix: Postfix) -> None:
    guard = guard_for(postfix, "smuggling_reject")
    counter = Counter(guard, "smuggling", "reject")
    offset = postfix.log_offset()
    with RawClient(guard.port) as client:
        ehlo(client)
        client.send(b"MAIL FROM:<a@example.org>\n")
        assert client.reply() == b"500 5.5.2 Error: bare <CR> or <LF> in command\r\n"
        client.send(b"QUIT\r\n")
        assert client.reply().startswith(b"221 ")
    counts = settled(postfix, offset)
    assert counts == {"ehlo": "1", "quit": "1", "commands": "2"}
    assert counter.delta() == 1


# --------------------------------------------------------------------------- 3. pipelining

EHLO_AND_MAIL = b"EHLO c\r\nMAIL FROM:<a@example.org>\r\n"


def test_pipelining_observe_forwards_both(guard_for: GuardFor, postfix: Postfix) -> None:
    guard = guard_for(postfix, "default")
    counter = Counter(guard, "pipelining", "observe")
    offset = postfix.log_offset()
    with RawClient(guard.port) as client:
        assert client.reply().startswith(b"220 ")
        client.send(EHLO_AND_MAIL)
        replies = client.replies(2)
        assert replies[0].startswith(b"250-")
        assert replies[1].startswith(b"250 2.1.0")
        client.send(b"QUIT\r\n")
        assert client.reply().startswith(b"221 ")
    counts = settled(postfix, offset)
    assert counts == {"ehlo": "1", "mail": "1", "quit": "1", "commands": "3"}
    assert counter.delta() == 1


def test_pipelining_reject_answers_554(guard_for: GuardFor, postfix: Postfix) -> None:
    guard = guard_for(postfix, "pipelining_reject")
    counter = Counter(guard, "pipelining", "reject")
    offset = postfix.log_offset()
    with RawClient(guard.port) as client:
        assert client.reply().startswith(b"220 ")
        client.send(EHLO_AND_MAIL)
        replies = client.replies(2)
        assert replies[0].startswith(b"250-")
        assert replies[1] == b"554 5.5.0 Error: SMTP protocol synchronization\r\n"
        client.send(b"QUIT\r\n")
        assert client.reply().startswith(b"221 ")
    counts = settled(postfix, offset)
    assert counts == {"ehlo": "1", "quit": "1", "commands": "2"}
    assert counter.delta() == 1


def test_pipelining_disconnect_closes(guard_for: GuardFor, postfix: Postfix) -> None:
    guard = guard_for(postfix, "pipelining_disconnect")
    counter = Counter(guard, "pipelining", "disconnect")
    offset = postfix.log_offset()
    with RawClient(guard.port) as client:
        assert client.reply().startswith(b"220 ")
        client.send(EHLO_AND_MAIL)
        data = read_all(client)
    ehlo_reply, _, rest = data.rpartition(b"250 CHUNKING\r\n")
    assert ehlo_reply.startswith(b"250-"), data
    assert rest == b"554 5.5.0 Error: SMTP protocol synchronization\r\n", data
    counts = settled(postfix, offset)
    assert counts == {"ehlo": "1", "commands": "1"}
    assert counter.delta() == 1


def test_pipelining_not_offered_any_send_ahead_is_a_violation(
    guard_for: GuardFor, postfix: Postfix
) -> None:
    guard = guard_for(postfix, "pipelining_not_offered")
    counter = Counter(guard, "pipelining", "reject")
    offset = postfix.log_offset()
    with RawClient(guard.port) as client:
        assert b"PIPELINING" not in ehlo(client)
        client.send(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\n")
        replies = client.replies(2)
        assert replies[0].startswith(b"250 2.1.0")
        assert replies[1] == b"554 5.5.0 Error: SMTP protocol synchronization\r\n"
        client.send(b"QUIT\r\n")
        assert client.reply().startswith(b"221 ")
    counts = settled(postfix, offset)
    assert counts == {"ehlo": "1", "mail": "1", "quit": "1", "commands": "3"}
    assert counter.delta() == 1


def test_pipelining_noop_is_a_group_ender(guard_for: GuardFor, postfix: Postfix) -> None:
    """Even with PIPELINING offered, nothing may follow NOOP before its reply."""
    guard = guard_for(postfix, "pipelining_reject")
    counter = Counter(guard, "pipelining", "reject")
    offset = postfix.log_offset()
    with RawClient(guard.port) as client:
        assert b"PIPELINING" in ehlo(client)
        client.send(b"NOOP\r\nNOOP\r\n")
        replies = client.replies(2)
        assert replies[0].startswith(b"250 2.0.0")
        assert replies[1] == b"554 5.5.0 Error: SMTP protocol synchronization\r\n"
        client.send(b"QUIT\r\n")
        assert client.reply().startswith(b"221 ")
    counts = settled(postfix, offset)
    assert counts == {"ehlo": "1", "noop": "1", "quit": "1", "commands": "3"}
    assert counter.delta() == 1


@pytest.mark.parametrize("name", ["pipelining_reject", "pipelining_disconnect"])
def test_pipelining_quit_after_ehlo_tolerated(
    guard_for: GuardFor, postfix: Postfix, name: str
) -> None:
    guard = guard_for(postfix, name)
    counters = [Counter(guard, "pipelining", a) for a in ("observe", "reject", "disconnect")]
    offset = postfix.log_offset()
    with RawClient(guard.port) as client:
        assert client.reply().startswith(b"220 ")
        client.send(b"EHLO c\r\nQUIT\r\n")
        replies = client.replies(2)
    assert replies[0].startswith(b"250-")
    assert replies[1].startswith(b"221 2.0.0")
    counts = settled(postfix, offset)
    assert counts == {"ehlo": "1", "quit": "1", "commands": "2"}
    assert [c.delta() for c in counters] == [0, 0, 0]


# --------------------------------------------------------------------------- 4. early talk


def early_client(guard: Guard) -> RawClient:
    """Connect and talk at once, well before any greeting (greet_wait_seconds = 1)."""
    client = RawClient(guard.port)
    client.send(b"EHLO early\r\n")
    return client


def test_early_talk_observe_session_works(guard_for: GuardFor, postfix: Postfix) -> None:
    guard = guard_for(postfix, "early_observe")
    counter = Counter(guard, "early_talk", "observe")
    offset = postfix.log_offset()
    with early_client(guard) as client:
        replies = client.replies(2)
        assert replies[0].startswith(b"220 ")
        assert replies[1].startswith(b"250-")
        client.send(b"QUIT\r\n")
        assert client.reply().startswith(b"221 ")
    counts = settled(postfix, offset)
    assert counts == {"ehlo": "1", "quit": "1", "commands": "2"}
    assert counter.delta() == 1


def test_early_talk_reject_drops_the_early_bytes(guard_for: GuardFor, postfix: Postfix) -> None:
    guard = guard_for(postfix, "early_reject")
    counter = Counter(guard, "early_talk", "reject")
    offset = postfix.log_offset()
    with early_client(guard) as client:
        assert client.reply().startswith(b"220 ")
        client.send(b"QUIT\r\n")
        # The next reply is QUIT's: the early EHLO was never answered.
        assert client.reply().startswith(b"221 ")
    counts = settled(postfix, offset)
    assert counts == {"quit": "1", "commands": "1"}
    assert counter.delta() == 1


def test_early_talk_disconnect_never_contacts_postfix(
    guard_for: GuardFor, postfix: Postfix
) -> None:
    guard = guard_for(postfix, "early_disconnect")
    counter = Counter(guard, "early_talk", "disconnect")
    offset = postfix.log_offset()
    with early_client(guard) as client:
        data = read_all(client)
    assert (
        data == f"521 5.5.1 {HOST} Error: protocol error: talked before the greeting\r\n".encode()
    )
    # A patient client afterwards is served; only its connection reached Postfix.
    with RawClient(guard.port) as client:
        assert client.reply().startswith(b"220 ")
        client.send(b"QUIT\r\n")
        assert client.reply().startswith(b"221 ")
    settled(postfix, offset)
    assert connects(postfix, offset) == 1, postfix.log_since(offset)
    assert counter.delta() == 1


def test_observe_mode_early_talk_served(guard_for: GuardFor, postfix: Postfix) -> None:
    guard = guard_for(postfix, "observe_mode_early")
    counter = Counter(guard, "early_talk", "observe")
    offset = postfix.log_offset()
    with early_client(guard) as client:
        replies = client.replies(2)
        assert replies[0].startswith(b"220 ")
        assert replies[1].startswith(b"250-")
        client.send(b"QUIT\r\n")
        assert client.reply().startswith(b"221 ")
    counts = settled(postfix, offset)
    assert counts == {"ehlo": "1", "quit": "1", "commands": "2"}
    assert counter.delta() == 1


# --------------------------------------------------------------------------- 5. non-SMTP

NON_SMTP_COMMANDS = [
    pytest.param(b"GET / HTTP/1.1\r\nHost: guard.test\r\n\r\n", id="http_get"),
    pytest.param(b"POST /submit HTTP/1.1\r\n", id="http_post"),
    pytest.param(b"CONNECT mx.example.org:25 HTTP/1.1\r\n", id="http_connect"),
    pytest.param(b"Subject: hi\r\n", id="header_line"),
]


@pytest.mark.parametrize("request_bytes", NON_SMTP_COMMANDS)
def test_non_smtp_command_disconnects(
    guard_for: GuardFor, postfix: Postfix, request_bytes: bytes
) -> None:
    guard = guard_for(postfix, "default")
    counter = Counter(guard, "non_smtp", "disconnect")
    offset = postfix.log_offset()
    with RawClient(guard.port) as client:
        assert client.reply().startswith(b"220 ")
        settle_guard()
        client.send(request_bytes)
        data = read_all(client)
    assert data == f"521 5.7.0 {HOST} Error: non-SMTP command\r\n".encode()
    counts = settled(postfix, offset)
    assert counts["commands"] in ("0", "0/0"), counts
    assert counter.delta() == 1


def test_tls_client_hello_closed_without_reply(guard_for: GuardFor, postfix: Postfix) -> None:
    guard = guard_for(postfix, "default")
    counter = Counter(guard, "non_smtp", "disconnect")
    offset = postfix.log_offset()
    with RawClient(guard.port) as client:
        assert client.reply().startswith(b"220 ")
        client.send(client_hello())
        assert read_all(client) == b""
    counts = settled(postfix, offset)
    assert counts["commands"] in ("0", "0/0"), counts
    assert counter.delta() == 1


@pytest.mark.parametrize("name", ["non_smtp_observe", "observe_mode"])
def test_non_smtp_observe_answers_as_unknown(
    guard_for: GuardFor, postfix: Postfix, name: str
) -> None:
    guard = guard_for(postfix, name)
    counter = Counter(guard, "non_smtp", "observe")
    offset = postfix.log_offset()
    with RawClient(guard.port) as client:
        assert client.reply().startswith(b"220 ")
        client.send(b"GET / HTTP/1.1\r\n")
        assert client.reply() == b"500 Error: command not recognized\r\n"
        client.send(b"Subject: hi\r\n")
        assert client.reply() == b"500 Error: command not recognized\r\n"
        client.send(b"QUIT\r\n")
        assert client.reply().startswith(b"221 ")
    counts = settled(postfix, offset)
    assert counts == {"quit": "1", "commands": "1"}
    assert counter.delta() == 2


def test_non_smtp_observe_tls_hello_gets_errors_not_a_close(
    guard_for: GuardFor, postfix: Postfix
) -> None:
    guard = guard_for(postfix, "non_smtp_observe")
    counter = Counter(guard, "non_smtp", "observe")
    offset = postfix.log_offset()
    with RawClient(guard.port) as client:
        assert client.reply().startswith(b"220 ")
        # NOOP (answered by Postfix) marks the end of the errors the hello earns.
        client.send(client_hello() + b"\r\nNOOP\r\n")
        errors = []
        while not (reply := client.reply()).startswith(b"250 "):
            errors.append(reply)
        client.send(b"QUIT\r\n")
        assert client.reply().startswith(b"221 ")
    assert errors and all(e[:1] == b"5" and e[:3] != b"521" for e in errors), errors
    counts = settled(postfix, offset)
    assert counts == {"noop": "1", "quit": "1", "commands": "2"}
    assert counter.delta() >= 1


# --------------------------------------------------------------------------- 6. limits


def test_recipient_limit(guard_for: GuardFor, postfix: Postfix) -> None:
    guard = guard_for(postfix, "limits")
    counter = Counter(guard, "recipients", "reject")
    offset = postfix.log_offset()
    with RawClient(guard.port) as client:
        ehlo(client)
        client.send(
            b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b1@example.org>\r\n"
            b"RCPT TO:<b2@example.org>\r\nRCPT TO:<b3@example.org>\r\n"
        )
        replies = client.replies(4)
        assert [r[:3] for r in replies[:3]] == [b"250"] * 3, replies
        assert replies[3] == b"452 4.5.3 Error: too many recipients\r\n"
        client.send(b"QUIT\r\n")
        assert client.reply().startswith(b"221 ")
    counts = settled(postfix, offset)
    assert counts == {"ehlo": "1", "mail": "1", "rcpt": "2", "quit": "1", "commands": "5"}
    assert counter.delta() == 1


def test_declared_size_limit(guard_for: GuardFor, postfix: Postfix) -> None:
    guard = guard_for(postfix, "limits")
    counter = Counter(guard, "message_size", "reject")
    offset = postfix.log_offset()
    with RawClient(guard.port) as client:
        assert b"250-SIZE 1000\r\n" in ehlo(client)
        client.send(b"MAIL FROM:<a@example.org> SIZE=5000\r\n")
        assert client.reply() == b"552 5.3.4 Error: message file too big\r\n"
        client.send(b"MAIL FROM:<a@example.org> SIZE=500\r\nQUIT\r\n")
        replies = client.replies(2)
        assert replies[0].startswith(b"250 2.1.0"), replies
    counts = settled(postfix, offset)
    assert counts == {"ehlo": "1", "mail": "1", "quit": "1", "commands": "3"}
    assert counter.delta() == 1


def big_message(tag: str, size: int) -> bytes:
    head = f"Subject: big {tag}\r\n\r\n".encode()
    lines = (size - len(head)) // 100 + 1
    return head + (b"x" * 98 + b"\r\n") * lines


def test_message_size_limit_on_the_body(guard_for: GuardFor, postfix: Postfix) -> None:
    guard = guard_for(postfix, "limits")
    counter = Counter(guard, "message_size", "reject")
    tag = unique()
    offset = postfix.log_offset()
    with RawClient(guard.port) as client:
        ehlo(client)
        client.send(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n")
        assert [r[:3] for r in client.replies(3)] == [b"250", b"250", b"354"]
        settle_guard()
        client.send(big_message(tag, 5000) + b".\r\n")
        data = read_all(client)
    assert data == b"552 5.3.4 Error: message file too big\r\n"
    postfix.wait_for_log(r"lost connection after DATA", offset)
    settled(postfix, offset)
    assert tagged(postfix, tag) == []
    assert counter.delta() == 1


def test_message_size_limit_when_body_is_sent_before_354(
    guard_for: GuardFor, postfix: Postfix
) -> None:
    """A body sent with its commands (before the 354) must not escape the size limit."""
    guard = guard_for(postfix, "limits")
    counter = Counter(guard, "message_size", "reject")
    tag = unique()
    offset = postfix.log_offset()
    with RawClient(guard.port) as client:
        ehlo(client)
        client.send(
            b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n"
            + big_message(tag, 150_000)
            + b".\r\nQUIT\r\n"
        )
        data = read_all(client)
    assert data == (
        b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n"
        b"552 5.3.4 Error: message file too big\r\n"
    ), data
    settled(postfix, offset)
    assert tagged(postfix, tag) == []
    assert counter.delta() == 1


def test_line_length_limit(guard_for: GuardFor, postfix: Postfix) -> None:
    guard = guard_for(postfix, "limits")
    offset = postfix.log_offset()
    with RawClient(guard.port) as client:
        ehlo(client)
        # max_line_bytes 100, plus what Postfix's SIZE, DSN and SMTPUTF8 add
        # for MAIL (26 + 100 + 10, RFC 5321 4.5.3.1.4): 236 octets.
        client.send(b"MAIL FROM:<" + b"a" * 300 + b"@example.org>\r\n")
        assert client.reply() == b"500 5.5.2 Error: line too long\r\n"
        client.send(b"QUIT\r\n")
        assert client.reply().startswith(b"221 ")
    counts = settled(postfix, offset)
    assert counts == {"ehlo": "1", "quit": "1", "commands": "2"}


def test_unknown_command_limit(guard_for: GuardFor, postfix: Postfix) -> None:
    guard = guard_for(postfix, "unknown_limit")
    counter = Counter(guard, "unknown_commands", "reject")
    offset = postfix.log_offset()
    unknown = b"500 5.5.2 Error: command not recognized\r\n"
    closing = f"421 4.7.0 {HOST} Error: too many errors\r\n".encode()
    with RawClient(guard.port) as client:
        ehlo(client)
        client.send(b"WIBBLE\r\nWOBBLE\r\nWABBLE\r\nQUIT\r\n")
        data = read_all(client)
    # The third unknown command is one too many: the 421 is the last thing said.
    assert data in (unknown * 2 + closing, unknown * 3 + closing), data
    counts = settled(postfix, offset)
    assert counts == {"ehlo": "1", "commands": "1"}
    assert counter.delta() == 1


def test_hard_error_limit(guard_for: GuardFor, postfix: Postfix) -> None:
    guard = guard_for(postfix, "error_limit")
    counter = Counter(guard, "error_limit", "reject")
    offset = postfix.log_offset()
    bad = b"503 5.5.1 Error: need MAIL before RCPT\r\n"
    with RawClient(guard.port) as client:
        ehlo(client)
        client.send(b"RCPT TO:<b@example.org>\r\n" * 3 + b"QUIT\r\n")
        data = read_all(client)
    # Like Postfix: the third error is answered, then 421 closes the session.
    assert data == bad * 3 + f"421 4.7.0 {HOST} Error: too many errors\r\n".encode(), data
    counts = settled(postfix, offset)
    assert counts == {"ehlo": "1", "commands": "1"}
    assert counter.delta() == 1


def test_unknown_and_error_limits_reached_by_the_same_command(
    guard_for: GuardFor, postfix: Postfix
) -> None:
    """The third unknown command trips both limits: still one 421, and it comes last."""
    guard = guard_for(postfix, "both_limits")
    unknown = Counter(guard, "unknown_commands", "reject")
    errors = Counter(guard, "error_limit", "reject")
    offset = postfix.log_offset()
    with RawClient(guard.port) as client:
        ehlo(client)
        client.send(b"WIBBLE\r\nWOBBLE\r\nWABBLE\r\nQUIT\r\n")
        data = read_all(client)
    closing = f"421 4.7.0 {HOST} Error: too many errors\r\n".encode()
    assert data.endswith(closing) and data.count(b"421 ") == 1, data
    assert data[: -len(closing)] in (
        b"500 5.5.2 Error: command not recognized\r\n" * 2,
        b"500 5.5.2 Error: command not recognized\r\n" * 3,
    ), data
    counts = settled(postfix, offset)
    assert counts == {"ehlo": "1", "commands": "1"}
    assert unknown.delta() + errors.delta() >= 1


def test_hard_error_limit_counts_upstream_errors(guard_for: GuardFor, postfix: Postfix) -> None:
    guard = guard_for(postfix, "error_limit")
    counter = Counter(guard, "error_limit", "reject")
    offset = postfix.log_offset()
    with RawClient(guard.port) as client:
        ehlo(client)
        for _ in range(3):
            client.send(b"MAIL FROM:<bad address>\r\n")
            assert client.reply().startswith(b"501 "), "Postfix refuses the sender"
        data = read_all(client)
    assert data == f"421 4.7.0 {HOST} Error: too many errors\r\n".encode(), data
    counts = settled(postfix, offset)
    assert counts == {"ehlo": "1", "mail": "0/3", "commands": "1/4"}
    assert counter.delta() == 1


def test_connections_per_client_limit(guard_for: GuardFor, postfix: Postfix) -> None:
    guard = guard_for(postfix, "per_client")
    counter = Counter(guard, "connections", "reject")
    offset = postfix.log_offset()
    with RawClient(guard.port) as first:
        assert first.reply().startswith(b"220 ")
        with RawClient(guard.port) as second:
            data = read_all(second)
        assert data == f"421 4.7.0 {HOST} Error: too many connections\r\n".encode()
        first.send(b"QUIT\r\n")
        assert first.reply().startswith(b"221 ")
    settled(postfix, offset)
    assert connects(postfix, offset) == 1, postfix.log_since(offset)
    assert counter.delta() == 1
    # Once the first has gone, the client may connect again.
    wait_until(lambda: guard.metric("smtpguard_sessions_open") == 0)
    with RawClient(guard.port) as again:
        assert again.reply().startswith(b"220 ")
        again.send(b"QUIT\r\n")
        assert again.reply().startswith(b"221 ")


# --------------------------------------------------------------------------- 7. mode: observe


def test_observe_mode_counts_and_forwards(guard_for: GuardFor, postfix: Postfix) -> None:
    """Every attack above, with mode observe: counted as observe, forwarded as without a policy."""
    guard = guard_for(postfix, "observe_mode")
    defences = [
        "sequence",
        "pipelining",
        "smuggling",
        "recipients",
        "message_size",
        "unknown_commands",
        "error_limit",
        "connections",
    ]
    observed = {d: Counter(guard, d, "observe") for d in defences}
    enforced = {
        (d, a): Counter(guard, d, a)
        for d in defences
        for a in ("reject", "disconnect", "normalize")
    }
    violations = guard.metric("smtpguard_sequence_violations_total", command="RCPT", state="ready")
    tag = unique()
    offset = postfix.log_offset()
    with RawClient(guard.port) as client:
        assert client.reply().startswith(b"220 ")
        # pipelining: MAIL before the EHLO reply; then sequence: RCPT before MAIL.
        client.send(EHLO_AND_MAIL)
        replies = client.replies(2)
        assert replies[1].startswith(b"250 2.1.0"), replies
        client.send(b"RSET\r\n")
        assert client.reply().startswith(b"250 ")
        client.send(b"RCPT TO:<b@example.org>\r\n")
        assert client.reply().startswith(b"503 5.5.1"), "Postfix itself answers"
        # smuggling (command line): a bare CR inside a command goes on.
        client.send(b"NOOP\rx\r\n")
        assert client.reply()[:1] in (b"2", b"5")
        # message_size (declared) and recipients: forwarded to Postfix.
        client.send(
            b"MAIL FROM:<a@example.org> SIZE=5000\r\nRCPT TO:<b1@example.org>\r\n"
            b"RCPT TO:<b2@example.org>\r\nRCPT TO:<b3@example.org>\r\nDATA\r\n"
        )
        replies = client.replies(5)
        assert [r[:3] for r in replies] == [b"250"] * 4 + [b"354"], replies
        client.send(big_message(tag, 5000) + b".\r\n")
        assert client.reply().startswith(b"250 2.0.0 Ok: queued as ")
        # unknown_commands (limit 2) and error_limit (limit 3): the session goes on.
        client.send(b"WIBBLE\r\n" * 4)
        assert client.replies(4) == [b"500 5.5.2 Error: command not recognized\r\n"] * 4
        # connections (limit 1 per client): a second connection is served.
        with RawClient(guard.port) as second:
            assert second.reply().startswith(b"220 ")
            second.send(b"QUIT\r\n")
            assert second.reply().startswith(b"221 ")
        client.send(b"QUIT\r\n")
        assert client.reply().startswith(b"221 ")
    [message] = postfix.wait_for_messages(1, where=lambda m: tag in m.text)
    assert sorted(message.recipients) == ["b1@example.org", "b2@example.org", "b3@example.org"]
    line = postfix.wait_for_log(r"^.*\bdisconnect from .* mail=.*$", offset).group(0)
    counts = parse_disconnect(line)
    assert counts["mail"] == "2" and counts["rcpt"] == "3/4" and counts["data"] == "1", counts
    for defence, counter in observed.items():
        assert counter.delta() >= 1, defence
    assert {k: c.delta() for k, c in enforced.items() if c.delta()} == {}
    after = guard.metric("smtpguard_sequence_violations_total", command="RCPT", state="ready")
    assert after == violations + 1


# --------------------------------------------------------------------------- 8. BDAT


def bdat_session(guard: Guard, tag: str, *, closes: bool) -> bytes:
    """A two-chunk BDAT message; what the guard answered to the last chunk (up to EOF if
    ``closes``)."""
    chunk1 = f"Subject: bdat {tag}\r\n\r\n".encode()
    chunk2 = b"line one\nline two\r\n"  # a bare LF inside the last chunk
    with RawClient(guard.port) as client:
        assert b"CHUNKING" in ehlo(client)
        client.send(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\n")
        assert [r[:3] for r in client.replies(2)] == [b"250", b"250"]
        client.send(b"BDAT %d\r\n" % len(chunk1) + chunk1)
        assert client.reply().startswith(b"250 ")
        settle_guard()
        client.send(b"BDAT %d LAST\r\n" % len(chunk2) + chunk2)
        return read_all(client) if closes else client.reply()


def test_bdat_bare_lf_rejected(guard_for: GuardFor, legacy_postfix: Postfix) -> None:
    guard = guard_for(legacy_postfix, "smuggling_reject")
    counter = Counter(guard, "smuggling", "reject")
    tag = unique()
    offset = legacy_postfix.log_offset()
    assert (
        bdat_session(guard, tag, closes=True) == b"550 5.5.2 Error: bare <CR> or <LF> received\r\n"
    )
    counts = settled(legacy_postfix, offset)
    assert "quit" not in counts, counts
    assert tagged(legacy_postfix, tag) == []
    assert counter.delta() == 1


def test_bdat_bare_lf_normalize_delivers_unchanged_chunks(
    guard_for: GuardFor, legacy_postfix: Postfix
) -> None:
    guard = guard_for(legacy_postfix, "default")
    counter = Counter(guard, "smuggling", "normalize")
    tag = unique()
    offset = legacy_postfix.log_offset()
    reply = bdat_session(guard, tag, closes=False)
    assert re.fullmatch(rb"250 2\.0\.0 Ok: \d+ bytes queued as \w+\r\n", reply), reply
    [message] = legacy_postfix.wait_for_messages(1, where=lambda m: tag in m.text)
    assert message.text.endswith("line one\nline two\n"), message.text
    counts = legacy_postfix.wait_for_disconnect(offset)
    # Both chunks were framed as sent: Postfix accepted two BDATs.
    assert counts["bdat"] == "2", counts
    assert counter.delta() == 1


# --------------------------------------------------------------------------- the last reply


def test_last_reply_not_lost_after_a_local_error_and_quit(
    guard_for: GuardFor, postfix: Postfix
) -> None:
    """A local 500 and QUIT in one write: the client must get both replies, every time.

    (The 500 is written by the client pump while the upstream pump gets Postfix's 221 and
    ends the session.)
    """
    guard = guard_for(postfix, "default")
    answers = []
    for _ in range(20):
        with RawClient(guard.port) as client:
            ehlo(client)
            client.send(b"WIBBLE\r\nQUIT\r\n")
            answers.append(read_all(client))
    expected = b"500 5.5.2 Error: command not recognized\r\n221 2.0.0 Bye\r\n"
    lost = [a for a in answers if a != expected]
    assert lost == [], f"{len(lost)} of {len(answers)} sessions lost a reply: {lost[:3]}"


def test_last_reply_not_lost_when_the_body_follows_354_at_once(
    guard_for: GuardFor, legacy_postfix: Postfix
) -> None:
    """Smuggling reject: the 550 must reach a client that sends its body as the 354 arrives.

    (The 550 and the close come from the client pump while the upstream pump may still be
    writing the 354.)
    """
    guard = guard_for(legacy_postfix, "smuggling_reject")
    answers = []
    for _ in range(30):
        with RawClient(guard.port) as client:
            ehlo(client)
            client.send(ENVELOPE)
            assert client.replies(3)[-1].startswith(b"354 ")
            client.send(smuggling_body(unique(), b"\n.\n") + b"QUIT\r\n")
            answers.append(read_all(client))
    expected = b"550 5.5.2 Error: bare <CR> or <LF> received\r\n"
    lost = [a for a in answers if a != expected]
    assert lost == [], f"{len(lost)} of {len(answers)} sessions lost the 550: {lost[:3]}"
