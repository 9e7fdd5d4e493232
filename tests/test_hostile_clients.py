"""Hypothesis-driven hostile clients: random bytes, CR/LF/NUL, chunking and pipelining.

Against the core and against the whole trio proxy (with a mock clock): no
crash, no hang past the deadlines, every reply well-formed, memory bounded,
and nothing out of sequence or smuggled reaches the upstream.
"""

from __future__ import annotations

import re

import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.driver import open_session
from support.upstream import BDAT, DATA_END, DEFAULT, Conversation, ScriptedUpstream

from smtpguard.protocol import Session, SessionOptions
from smtpguard.protocol.policy import Policy

REPLY_LINE = re.compile(rb"[2-5]\d\d([ -][^\r\n]*)?\r\n")

PIECES = st.sampled_from(
    [
        b"\r",
        b"\n",
        b"\r\n",
        b"\0",
        b".",
        b" ",
        b"x",
        b"\xff",
        b"EHLO h\r\n",
        b"HELO h\r\n",
        b"MAIL FROM:<a@b>\r\n",
        b"RCPT TO:<c@d>\r\n",
        b"DATA\r\n",
        b"BDAT 4\r\n",
        b"BDAT 2 LAST\r\n",
        b"RSET\r\n",
        b"NOOP\r\n",
        b"AUTH PLAIN AGFAYg==\r\n",
        b"STARTTLS\r\n",
        b"GET / HTTP/1.1\r\n",
        b"\r\n.\r\n",
        b"\n.\n",
        b"QUIT\r\n",
    ]
)
POLICIES = st.builds(
    Policy,
    sequence=st.sampled_from(["reject", "disconnect"]),
    smuggling=st.sampled_from(["normalize", "observe", "reject"]),
    pipelining=st.sampled_from(["observe", "reject", "disconnect"]),
    early_talk=st.sampled_from(["observe", "reject", "disconnect"]),
    non_smtp=st.sampled_from(["observe", "disconnect"]),
    max_message_bytes=st.sampled_from([0, 50]),
    hard_error_limit=st.sampled_from([3, 20]),
)


def well_formed(data: bytes) -> bool:
    pos = 0
    while pos < len(data):
        m = REPLY_LINE.match(data, pos)
        if m is None:
            return False
        pos = m.end()
    return True


def hostile_upstream() -> Conversation:
    """Answers every line (354 after DATA, chunks and bodies too) and counts
    the messages its own DATA framing saw; sans-I/O."""
    return ScriptedUpstream(
        greeting=b"220 up ESMTP",
        name=b"up",
        chunking=True,
        keywords=(b"SIZE 100",),
        replies={
            DEFAULT: b"250 ok",
            b"DATA": b"354 go",
            DATA_END: b"250 queued",
            BDAT: b"250 chunk",
            b"QUIT": b"221 bye",
            b"XCLIENT": b"250 ok",
            b"STARTTLS": b"250 ok",
        },
    ).conversation()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(PIECES, max_size=60), st.data(), POLICIES)
def test_core_survives_hostile_input(
    pieces: list[bytes], data: st.DataObject, policy: Policy
) -> None:
    stream = b"".join(pieces)
    session = Session(SessionOptions(policy=policy, max_line_bytes=64, max_sasl_line_bytes=128))
    upstream = hostile_upstream()
    to_client = bytearray()
    greeted = data.draw(st.booleans())
    if greeted:
        session.receive_upstream(bytes(upstream.out))
        upstream.out.clear()
    pos = 0
    for _ in range(2000):
        if session.closed:
            break
        if pos < len(stream) and (not upstream.out or data.draw(st.booleans())):
            n = data.draw(st.integers(1, 16))
            session.receive_client(stream[pos : pos + n])
            pos += n
        elif upstream.out:
            n = data.draw(st.integers(1, len(upstream.out)))
            chunk = bytes(upstream.out[:n])
            del upstream.out[:n]
            session.receive_upstream(chunk)
        elif pos >= len(stream):
            session.client_eof()
            if not session.closed and not upstream.out:
                break
        upstream.feed(session.take_upstream_bytes())
        to_client += session.take_client_bytes()
        assert len(session._buf) <= 65536 + 16  # memory stays bounded
    to_client += session.take_client_bytes()
    assert well_formed(bytes(to_client)), bytes(to_client)
    # Nothing smuggled: the upstream's own DATA framing saw at most as many
    # messages as the client sent CRLF.CRLF terminators.
    assert upstream.messages <= stream.count(b"\r\n.\r\n") + 1


async def _drive(soup: bytes, step: int) -> tuple[bytes, ScriptedUpstream]:
    out = bytearray()
    async with trio.open_nursery() as nursery:
        h = await open_session(
            nursery, timeouts={"client_command_seconds": 60, "command_reply_seconds": 60}
        )
        client = h.client

        async def send() -> None:
            try:
                for i in range(0, len(soup), step):
                    await client.send_all(soup[i : i + step])
                    await trio.sleep(0.01)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

        nursery.start_soon(send)
        while chunk := await client.receive_some(65536):
            out += chunk
        nursery.cancel_scope.cancel()
    return bytes(out), h.upstream


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(PIECES, max_size=40), st.integers(1, 9))
def test_proxy_survives_hostile_clients_without_hanging(pieces: list[bytes], step: int) -> None:
    soup = b"".join(pieces)
    clock = trio.testing.MockClock(autojump_threshold=0)
    out, upstream = trio.run(_drive, soup, step, clock=clock)
    # The session always ends: by QUIT, a policy, or the client timeout at
    # the latest (no hang), and no reply is malformed.
    assert clock.current_time() <= 60 * 5
    assert well_formed(out), out
    assert out.startswith(b"220 fake ESMTP\r\n")
    assert b"Traceback" not in out
