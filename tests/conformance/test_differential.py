"""Differential conformance: the same seeded sessions, directly against a real
upstream and through smtpguard in front of it, compared reply by reply,
delivery by delivery, with the upstream's own logs as the witness.

Four invariants (see ``verdicts.py`` for the classes):

- no false positive: smtpguard never refuses what the upstream accepts, nor
  accepts what it refuses, except the by-design differences;
- no leak: the upstream never receives a command out of sequence given the
  replies it sent (its own log shows no 503, no synchronization error, no
  dropped connection);
- same deliveries: the same messages, envelopes and bodies;
- one view: what each upstream delivered is exactly what the client was told
  was accepted, under the sender the client saw accepted.

``SMTPGUARD_CONFORMANCE_SESSIONS`` (default 200) sessions per upstream,
seeded by ``SMTPGUARD_CONFORMANCE_SEED`` (default 3207); with
``SMTPGUARD_CONFORMANCE_REPORT=DIR`` each upstream's report is written there.
"""

from __future__ import annotations

import os
import re
import ssl
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from guard import Guard
from mtas import Exim, OpenSMTPD
from peers import Postfix
from peers_tls import make_certs
from runner import Transcript, play
from scripts import Capabilities, Step, generate
from support.strict_upstream import StrictUpstream
from verdicts import Report, compare, delivered

SESSIONS = int(os.environ.get("SMTPGUARD_CONFORMANCE_SESSIONS", "200"))
SEED = int(os.environ.get("SMTPGUARD_CONFORMANCE_SEED", "3207"))
PARALLEL = 8


@dataclass
class Upstream:
    """A real upstream, as the harness needs it."""

    name: str
    address: tuple[str, int]
    #: (sender, recipients, data) of everything delivered, once all is delivered.
    messages: Callable[[], list[tuple[str, list[str], bytes]]]
    #: A position in the upstream's logs, and what they show since as leaks.
    offset: Callable[[], int]
    leaks: Callable[[int], list[str]]


def _capabilities(address: tuple[str, int]) -> Capabilities:
    from runner import _Conn

    conn = _Conn(address)
    try:
        conn.reply()
        conn.send(b"EHLO probe.test\r\n")
        reply = conn.reply()
        conn.send(b"QUIT\r\n")
        conn.reply()
    finally:
        conn.close()
    keywords = {line[4:].split(" ", 1)[0].upper() for line in reply.text.split("\n")[1:]}
    return Capabilities(frozenset(keywords))


# ------------------------------------------------------------------ upstreams

_REJECT_MAP = "/^reject/ REJECT\n"
_POSTFIX_REPLY = re.compile(r"smtpd\[\d+\]: > [^ ]*\[127\.0\.0\.1\]:\d+: (\d{3}) (.*)$", re.M)


def _postfix_upstream(instance: Postfix) -> Upstream:
    def messages() -> list[tuple[str, list[str], bytes]]:
        return [(m.sender, m.recipients, m.data) for m in instance.messages(timeout=60)]

    def leaks(offset: int) -> list[str]:
        text = instance.log_since(offset)
        found = [f"{code} {text}" for code, text in _POSTFIX_REPLY.findall(text) if code == "503"]
        found += [line for line in text.splitlines() if "improper command pipelining" in line]
        return found

    return Upstream("postfix", instance.address, messages, instance.log_offset, leaks)


def _mta_upstream(name: str, instance: Exim | OpenSMTPD) -> Upstream:
    def messages() -> list[tuple[str, list[str], bytes]]:
        return [(m.sender, m.recipients, m.data) for m in instance.messages(timeout=60)]

    def leaks(start: int) -> list[str]:
        trace_start, log_start = divmod(start, 1 << 40)
        found = []
        for session in instance.sessions(trace_start):
            command = ""
            for direction, text in session.lines:
                if direction == "<":
                    command = text
                    continue
                # OpenSMTPD refuses a second HELO/EHLO, which RFC 5321 4.1.4
                # permits: that is its own answer, the same directly.
                # It also refuses RSET before HELO/EHLO, which RFC 5321 4.1.4 says
                # servers SHOULD process normally: smtpguard relays it, and the
                # client gets the same 503 it would get directly.
                if "Already identified" in text or command.upper() == "RSET":
                    continue
                if text.startswith("503") or "Pipelining not supported" in text:
                    found.append(f"{session.client}: {command!r} -> {text}")
        for line in instance.log_since(log_start).splitlines():
            # Exim's sequence errors; its syntax errors ("MAIL must have an
            # address operand") are the syntax guard's (issue 14).
            if "synchronization error" in line or (
                "SMTP protocol error" in line and _EXIM_SEQUENCE.search(line)
            ):
                found.append(line)
        return found

    return Upstream(name, instance.address, messages, lambda: _combined_offset(instance), leaks)


_EXIM_SEQUENCE = re.compile(
    r"not yet given|already given|must precede|HELO or EHLO|too many|not allowed"
)


def _combined_offset(instance: Exim | OpenSMTPD) -> int:
    return instance.trace_offset() * (1 << 40) + instance.log_offset()


def _strict_upstream(instance: StrictUpstream) -> Upstream:
    def messages() -> list[tuple[str, list[str], bytes]]:
        instance.wait_closed(count=0, timeout=10)
        return [(m.sender, m.recipients, m.data) for m in instance.messages()]

    def offset() -> int:
        return len(instance.sessions())

    def leaks(start: int) -> list[str]:
        found = []
        for session in instance.sessions()[start:]:
            # Sequence errors (its 503s) and framing it cannot survive; syntax
            # (501) and verbs it lacks (EXPN) are issue 14's syntax guard.
            found += [
                f"session {session.id}: {error}"
                for error in session.protocol_errors
                if not error.startswith("5.5.4")
            ]
            dropped = session.dropped or ""
            if dropped.startswith(("pipelining", "BDAT")) or (
                dropped.startswith("unknown verb") and "EXPN" not in dropped
            ):
                found.append(f"session {session.id} dropped: {dropped}")
        return found

    return Upstream("strict", instance.address, messages, offset, leaks)


@pytest.fixture(scope="module")
def certs() -> Iterator[object]:
    with tempfile.TemporaryDirectory(prefix="smtpguard-conformance-") as tmp:
        yield make_certs(tmp)


@pytest.fixture(scope="module")
def reject_map() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="smtpguard-conformance-map-") as tmp:
        path = Path(tmp) / "reject.regexp"
        path.write_text(_REJECT_MAP)
        Path(tmp).chmod(0o755)
        yield path


UPSTREAMS = ["postfix", "exim", "exim-pipeconnect", "opensmtpd", "strict"]


@pytest.fixture(params=UPSTREAMS)
def upstream(request: pytest.FixtureRequest, reject_map: Path) -> Iterator[Upstream]:
    name = request.param
    if name == "postfix":
        settings = {
            "smtpd_recipient_restrictions": (
                f"check_recipient_access regexp:{reject_map}, permit_mynetworks"
            ),
            "debug_peer_list": "127.0.0.1",
        }
        with Postfix(extra_main_cf=settings) as postfix:
            yield _postfix_upstream(postfix)
    elif name.startswith("exim"):
        with Exim(pipeconnect=name.endswith("pipeconnect")) as exim:
            yield _mta_upstream(name, exim)
    elif name == "opensmtpd":
        with OpenSMTPD() as opensmtpd:
            yield _mta_upstream(name, opensmtpd)
    else:
        with StrictUpstream() as strict:
            yield _strict_upstream(strict)


def _run_all(
    address: tuple[str, int],
    scripts: dict[int, list[Step]],
    run: str,
    tls_context: ssl.SSLContext | None,
) -> dict[int, Transcript]:
    with ThreadPoolExecutor(PARALLEL) as pool:
        futures = {
            n: pool.submit(play, address, steps, n, run, tls_context)
            for n, steps in scripts.items()
        }
        return {n: future.result() for n, future in futures.items()}


def test_same_sessions_directly_and_through_smtpguard(upstream: Upstream, certs: object) -> None:
    caps = _capabilities(upstream.address)
    scripts = {n: generate(n, caps, SEED) for n in range(SESSIONS)}
    guard = Guard(
        f"{upstream.address[0]}:{upstream.address[1]}",
        upstream_connect="on_command",  # the default: greet, connect at the first command
        tls={"certificate": str(certs.chain_pem), "key": str(certs.key_pem)},  # type: ignore[attr-defined]
    )
    with guard:
        direct = _run_all(upstream.address, scripts, "d", None)
        time.sleep(0.5)  # the upstream's last log lines of the direct run
        start = upstream.offset()
        context = certs.client_context()  # type: ignore[attr-defined]
        through = _run_all(("127.0.0.1", guard.port), scripts, "g", context)
        messages = upstream.messages()
        time.sleep(0.5)
        leaks = upstream.leaks(start)
        guard_log = guard.log()
    report = Report(upstream.name)
    compare(report, scripts, direct, through, delivered(messages))
    report.leaks = leaks
    directory = os.environ.get("SMTPGUARD_CONFORMANCE_REPORT")
    if directory:
        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / f"{upstream.name}.txt").write_text(report.summary() + "\n")
    assert report.sessions == SESSIONS
    assert report.messages["accepted (direct)"] > SESSIONS // 4, report.summary()
    assert "Traceback" not in guard_log
    assert not leaks, report.summary()
    assert not report.failures, report.summary()
