"""Real MTAs as CLIENTS of smtpguard: Postfix's smtp(8) and Exim's smtp transport deliver
through smtpguard to real Postfix, Exim and OpenSMTPD upstreams.

A real MTA's client side pipelines the way RFC 2920 and RFC 3030 allow (Postfix: MAIL, RCPTs
and DATA in one write; Exim: MAIL, RCPTs and ``BDAT n LAST`` with the message in one write),
so each test proves that smtpguard relays what real senders do without a single sequence
violation, and that every message arrives with its envelope intact.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Callable
from typing import Any

from guard import Guard
from mtas import Exim, EximClient, EximDelivery, OpenSMTPD, PostfixClient, Session
from peers import Postfix

GuardFactory = Callable[..., Guard]
VIOLATIONS = "smtpguard_sequence_violations_total"


def tag() -> str:
    return uuid.uuid4().hex[:10]


def upstream_of(peer: Postfix | Exim | OpenSMTPD) -> str:
    return f"{peer.host}:{peer.port}"


def metric_sum(guard: Guard, name: str) -> float:
    """Sum of every sample of ``name`` (all label values) in a live scrape."""
    total = 0.0
    for line in guard.metrics().splitlines():
        if line.startswith("#"):
            continue
        series, _, value = line.rpartition(" ")
        if series.partition("{")[0] == name:
            total += float(value)
    return total


def violation_lines(guard: Guard) -> list[str]:
    return [line for line in guard.log().splitlines() if " event=violation " in line]


def message(sender: str, recipients: list[str], subject: str) -> bytes:
    return (
        f"From: <{sender}>\nTo: {', '.join(f'<{r}>' for r in recipients)}\n"
        f"Subject: {subject}\n\nA real MTA sent this through smtpguard.\n.leading dot\n"
    ).encode()


# --------------------------------------------------------------------------- Postfix client


def test_postfix_client_delivers_through_guard_to_postfix(
    postfix: Postfix, guard_factory: GuardFactory
) -> None:
    guard = guard_factory(upstream_of(postfix))
    t = tag()
    # (sender, recipients) of five messages, some with 2 or 3 recipients.
    plan = [
        (f"s{n}-{t}@src.example", [f"r{n}.{k}-{t}@dest.example" for k in range(count)])
        for n, count in enumerate((1, 2, 3, 1, 2))
    ]
    every_rcpt = [r for _, rcpts in plan for r in rcpts]
    # Held, then released together: Postfix reuses its connection, so smtpguard sees several
    # transactions (MAIL, RCPTs, DATA pipelined; RSET between them) in one session.
    with PostfixClient(("127.0.0.1", guard.port), batch=True) as client:
        offset = client.log_offset()
        for n, (sender, rcpts) in enumerate(plan):
            client.submit(sender, rcpts, message(sender, rcpts, f"postfix client {n} {t}"))
        client.release(len(plan))
        client.wait_for_deliveries(every_rcpt, offset)
        client.wait_queue_empty()
        statuses = client.deliveries(offset)
        client_log = client.log_since(offset)
    # Each recipient sent once, at the first attempt: nothing deferred, nothing bounced.
    assert statuses == {r: ["sent"] for r in every_rcpt}, client_log

    arrived = postfix.wait_for_messages(len(plan), where=lambda m: f" {t}" in m.text)
    envelopes = sorted((m.sender, sorted(m.recipients)) for m in arrived)
    assert envelopes == sorted((sender, sorted(rcpts)) for sender, rcpts in plan)
    for captured in arrived:
        assert "\n.leading dot\n" in captured.text  # dot-stuffed on the wire, unstuffed once
    assert metric_sum(guard, VIOLATIONS) == 0, violation_lines(guard)
    assert violation_lines(guard) == []
    assert guard.metric("smtpguard_messages_total", outcome="accepted") == len(plan)
    assert guard.metric("smtpguard_messages_total", outcome="aborted") == 0
    # The client is gone: every session has its summary line; one carried several messages.
    per_session = wait_session_messages(guard, len(plan))
    assert max(per_session) >= 2, guard.log()


def wait_session_messages(guard: Guard, total: int, timeout: float = 10) -> list[int]:
    """``messages_accepted`` of each smtpguard session summary, once they add up to ``total``."""
    deadline = time.monotonic() + timeout
    while True:
        counts = [
            int(found.group(1)) if (found := re.search(r" messages_accepted=(\d+)", line)) else 0
            for line in guard.log().splitlines()
            if " event=disconnect " in line
        ]
        if sum(counts) >= total or time.monotonic() > deadline:
            assert sum(counts) == total, guard.log()
            return counts
        time.sleep(0.05)


# --------------------------------------------------------------------------- Exim client


def exim_send(client: EximClient, t: str) -> tuple[list[tuple[str, list[str]]], list[EximDelivery]]:
    """Two messages (one to two recipients): the plan and Exim's delivery reports."""
    plan = [
        (f"e1-{t}@src.example", [f"x1-{t}@dest.example", f"y1-{t}@dest.example"]),
        (f"e2-{t}@src.example", [f"x2-{t}@dest.example"]),
    ]
    deliveries = [
        client.send(sender, rcpts, message(sender, rcpts, f"exim client {n} {t}"))
        for n, (sender, rcpts) in enumerate(plan)
    ]
    for delivery in deliveries:
        assert delivery.delivered, delivery.log
    return plan, deliveries


def assert_arrived(
    upstream: Postfix | Exim | OpenSMTPD, plan: list[tuple[str, list[str]]], t: str
) -> None:
    arrived = upstream.wait_for_messages(len(plan), where=lambda m: f" {t}" in m.text)
    envelopes = sorted((m.sender, sorted(m.recipients)) for m in arrived)
    assert envelopes == sorted((sender, sorted(rcpts)) for sender, rcpts in plan)


def upstream_sessions(
    upstream: Exim | OpenSMTPD, offset: int, helo: str, count: int, timeout: float = 10
) -> list[Session]:
    """The upstream's transcripts of the ``count`` sessions that said ``EHLO helo``, once
    all are closed."""
    deadline = time.monotonic() + timeout
    while True:
        found = [
            s
            for s in upstream.sessions(offset)
            if f"EHLO {helo}".upper() in map(str.upper, s.commands)
        ]
        if len(found) >= count and all(s.closed for s in found):
            assert len(found) == count, found
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"{count} closed sessions with EHLO {helo} expected: {found}")
        time.sleep(0.05)


def test_exim_client_through_guard_to_postfix_uses_chunking_and_pipelining(
    postfix: Postfix, guard_factory: GuardFactory, mta_factory: Callable[..., Any]
) -> None:
    guard = guard_factory(upstream_of(postfix))
    t = tag()
    client: EximClient = mta_factory(EximClient, ("127.0.0.1", guard.port), helo=f"ex-{t}.test")
    offset = postfix.log_offset()
    plan, deliveries = exim_send(client, t)
    for delivery in deliveries:
        # Exim's delivery log: L (pipelining) and K (CHUNKING, BDAT) were used.
        assert delivery.pipelining and delivery.chunking, delivery.log
        assert any(cmd.startswith("BDAT ") and cmd.endswith(" LAST") for cmd in delivery.pipelined)
    assert_arrived(postfix, plan, t)
    # Postfix itself received BDAT (no DATA) in every session from smtpguard.
    ours = [m for m in postfix.messages() if f" {t}" in m.text]
    assert len(ours) == len(plan)
    for captured in ours:
        found = postfix.wait_for_log(rf"{captured.queue_id}: client=\S+\[[^\]]*\]:(\d+)", offset)
        counters = postfix.wait_for_disconnect(offset, client_port=int(found.group(1)))
        assert "bdat" in counters and "data" not in counters, counters
        assert "/" not in counters["commands"], counters  # no command failed
    assert metric_sum(guard, VIOLATIONS) == 0, violation_lines(guard)


def test_exim_client_through_guard_to_exim_uses_chunking_and_pipelining(
    exim: Exim, guard_factory: GuardFactory, mta_factory: Callable[..., Any]
) -> None:
    guard = guard_factory(upstream_of(exim))
    t = tag()
    helo = f"ex-{t}.test"
    client: EximClient = mta_factory(EximClient, ("127.0.0.1", guard.port), helo=helo)
    offset, log_offset = exim.trace_offset(), exim.log_offset()
    plan, deliveries = exim_send(client, t)
    for delivery in deliveries:
        assert delivery.pipelining and delivery.chunking, delivery.log
    assert_arrived(exim, plan, t)
    sessions = upstream_sessions(exim, offset, helo, len(plan))
    for session in sessions:
        verbs = [c.split()[0].upper() for c in session.commands]
        assert "BDAT" in verbs and "DATA" not in verbs, session.commands
    # Exim enforces synchronization on the upstream side: smtpguard kept to it.
    assert "synchronization error" not in exim.log_since(log_offset)
    assert metric_sum(guard, VIOLATIONS) == 0, violation_lines(guard)


def test_exim_client_through_guard_to_opensmtpd_pipelines_to_guard_only(
    opensmtpd: OpenSMTPD, guard_factory: GuardFactory, mta_factory: Callable[..., Any]
) -> None:
    # OpenSMTPD offers neither PIPELINING nor CHUNKING; smtpguard still offers PIPELINING to
    # the client and feeds OpenSMTPD one command at a time; no CHUNKING, so plain DATA.
    guard = guard_factory(upstream_of(opensmtpd))
    t = tag()
    helo = f"ex-{t}.test"
    client: EximClient = mta_factory(EximClient, ("127.0.0.1", guard.port), helo=helo)
    offset = opensmtpd.trace_offset()
    plan, deliveries = exim_send(client, t)
    for delivery in deliveries:
        assert delivery.pipelining and not delivery.chunking, delivery.log
        assert (">", "DATA") in delivery.transcript
        assert not any(cmd.startswith("BDAT") for _, cmd in delivery.transcript)
    assert_arrived(opensmtpd, plan, t)
    sessions = upstream_sessions(opensmtpd, offset, helo, len(plan))
    for session in sessions:
        # One command per read: OpenSMTPD never said "Pipelining not supported" (500).
        assert not [r for r in session.replies if r.startswith("5")], session.lines
        assert "DATA" in [c.upper() for c in session.commands]
    assert metric_sum(guard, VIOLATIONS) == 0, violation_lines(guard)
