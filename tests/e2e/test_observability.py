"""A real Prometheus scrapes a real smtpguard in front of a real Postfix.

Clients commit a known set of violations; Prometheus must report exactly
those counts, and every PromQL expression of the shipped dashboard and
alert rules must evaluate and return data.  The session summary log line
and the annotation header are checked on the same run.
"""

from __future__ import annotations

import json
import pathlib
import re
import sys
import time
import uuid
from collections.abc import Callable, Iterator

import pytest
from guard import Guard, RawClient
from peers import Postfix, Prometheus
from support.redis import RedisServer

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from monitoring import alert_expressions, dashboard_expressions, metric_names  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[2]
ALERTS = REPO / "deploy" / "prometheus" / "alerts.yaml"

# (commands after the greeting, violating verb, state) — each committed on its own session.
COMMITTED = [
    ([b"EHLO c", b"RCPT TO:<a@example.org>"], "RCPT", "ready"),
    ([b"EHLO c", b"RCPT TO:<a@example.org>"], "RCPT", "ready"),
    ([b"EHLO c", b"RCPT TO:<a@example.org>"], "RCPT", "ready"),
    ([b"MAIL FROM:<a@example.org>"], "MAIL", "connected"),
    ([b"MAIL FROM:<a@example.org>"], "MAIL", "connected"),
    ([b"EHLO c", b"MAIL FROM:<a@example.org>", b"DATA"], "DATA", "mail"),
]


@pytest.fixture(scope="module")
def observed(
    postfix: Postfix,
) -> Iterator[tuple[Guard, Postfix, Callable[..., Prometheus]]]:
    # With a shared store, so that its series (smtpguard_store_*) exist too.
    # Redis is started (its port bound) before smtpguard picks its free ports:
    # both take ports the OS calls free, and an unbound one can be given twice.
    with RedisServer() as redis:
        guard = Guard(
            f"{postfix.host}:{postfix.port}",
            annotate={"mode": "violations", "header": "X-SMTPGuard"},
            log={"format": "json"},
            store={"redis": redis.url},
        )
        with guard:
            yield from _with_prometheus(guard, postfix)


def _with_prometheus(
    guard: Guard, postfix: Postfix
) -> Iterator[tuple[Guard, Postfix, Callable[..., Prometheus]]]:
    prometheus = Prometheus([f"127.0.0.1:{guard.metrics_port}"], rule_files=[ALERTS])
    prometheus.start()
    try:
        yield guard, postfix, lambda: prometheus
    finally:
        prometheus.stop()


def commit_violations(guard: Guard) -> None:
    for commands, _, _ in COMMITTED:
        with RawClient(guard.port) as client:
            client.reply()
            for command in commands:
                client.send(command + b"\r\n")
                client.reply()
            client.send(b"QUIT\r\n")
            client.reply()


def test_prometheus_sees_exactly_the_committed_violations(observed) -> None:  # type: ignore[no-untyped-def]
    guard, _, prom = observed
    prometheus = prom()
    commit_violations(guard)
    expected: dict[tuple[str, str], int] = {}
    for _, verb, state in COMMITTED:
        expected[verb, state] = expected.get((verb, state), 0) + 1
    total = sum(expected.values())
    prometheus.wait_for(
        "sum(smtpguard_sequence_violations_total)",
        lambda r: bool(r) and float(r[0]["value"][1]) == total,
    )
    result = prometheus.query("smtpguard_sequence_violations_total > 0")
    seen = {
        (s["metric"]["command"], s["metric"]["state"]): int(float(s["value"][1])) for s in result
    }
    assert seen == expected
    assert prometheus.value('sum(smtpguard_local_replies_total{code="503"})') == total
    # Labels are closed sets: no address, host name or mail address in any label value.
    every = prometheus.query('{__name__=~"smtpguard_.*"}')
    for series in every:
        for key, value in series["metric"].items():
            if key not in ("instance", "job"):
                assert "@" not in value and "127.0.0.1" not in value, (key, value)


def test_every_dashboard_and_alert_expression_returns_data(observed) -> None:  # type: ignore[no-untyped-def]
    guard, _, prom = observed
    prometheus = prom()
    commit_violations(guard)
    # A message, so that the message, size and latency series have samples.
    with RawClient(guard.port) as client:
        client.reply()
        client.send(b"EHLO c\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n")
        client.replies(4)
        client.send(b"Subject: metrics\r\n\r\nx\r\n.\r\nQUIT\r\n")
        client.replies(2)
    time.sleep(3)  # several scrapes after the traffic, so rate() has two points
    empty = []
    for expr in dashboard_expressions():
        if not prometheus.wait_for(expr, timeout=20):
            empty.append(expr)
    assert empty == []
    # Alert expressions end in a threshold that a healthy test run does not
    # cross; each must evaluate without error, and each metric it reads must
    # have data.  Prometheus itself must report every rule healthy.
    for expr in alert_expressions():
        prometheus.query(expr)
        for name in metric_names(expr):
            if name != "up":
                assert prometheus.query(name), name
        # With its thresholds moved to ">= 0" the same expression must return
        # data: the alert would fire on this traffic if its numbers were crossed.
        relaxed = re.sub(r"(>|==)\s*[0-9.]+", ">= 0", expr)
        assert relaxed != expr
        assert prometheus.wait_for(relaxed, timeout=20), relaxed
    rules = [r for g in prometheus.rules() for r in g["rules"]]
    assert len(rules) == len(alert_expressions())
    deadline = time.monotonic() + 20
    while any(r.get("health") != "ok" for r in rules) and time.monotonic() < deadline:
        time.sleep(0.5)
        rules = [r for g in prometheus.rules() for r in g["rules"]]
    assert [(r["name"], r["health"], r.get("lastError", "")) for r in rules] == [
        (r["name"], "ok", "") for r in rules
    ]


def test_summary_line_and_violation_lines_in_the_log(observed) -> None:  # type: ignore[no-untyped-def]
    guard, _, _ = observed
    with RawClient(guard.port) as client:
        client.reply()
        client.send(b"EHLO summary.test\r\nRCPT TO:<a@example.org>\r\nAUTH PLAIN c2VjcmV0\r\n")
        client.replies(3)
        client.send(b"QUIT\r\n")
        client.reply()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        records = [json.loads(line) for line in guard.log().splitlines() if line.startswith("{")]
        summaries = [r for r in records if r["event"] == "disconnect" and r.get("auth") == "0/1"]
        if summaries:
            break
        time.sleep(0.1)
    [summary] = summaries
    assert summary["ehlo"] == "1" and summary["rcpt"] == "0/1" and summary["quit"] == "1"
    assert summary["commands"] == "2/4" and summary["violations"] == 1
    assert summary["reason"] == "quit" and re.match(r"127\.0\.0\.1:\d+$", summary["client"])
    violation = [r for r in records if r["event"] == "violation" and r["conn"] == summary["conn"]]
    assert violation == [
        {
            **violation[0],
            "state": "ready",
            "command": "RCPT",
            "expected": "need MAIL before RCPT",
            "action": "reject",
        }
    ]
    assert "c2VjcmV0" not in guard.log()  # the SASL payload is never logged


def test_annotation_header_reaches_postfix(observed) -> None:  # type: ignore[no-untyped-def]
    guard, postfix, _ = observed
    tag = uuid.uuid4().hex[:10]
    body = f"Subject: annotated {tag}\r\n\r\nbody\r\n".encode()
    with RawClient(guard.port) as client:
        client.reply()
        client.send(b"EHLO c\r\nRCPT TO:<early@example.org>\r\nMAIL FROM:<a@example.org>\r\n")
        client.replies(3)
        client.send(b"RCPT TO:<b@example.org>\r\nDATA\r\n")
        client.replies(2)
        client.send(body + b".\r\nQUIT\r\n")
        assert client.replies(2)[0].startswith(b"250")
    [message] = postfix.wait_for_messages(1, where=lambda m: tag in m.text)
    assert message.header("X-SMTPGuard") == "guard.test; violations=1; kinds=RCPT@ready"
    # The rest of the message is untouched.
    assert message.data.endswith(body.replace(b"\r\n", b"\n"))
