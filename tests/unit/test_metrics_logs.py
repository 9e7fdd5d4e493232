"""Metrics facade, summary line, log formats and the annotation header."""

from __future__ import annotations

import json
import logging

from prometheus_client import CollectorRegistry
from support.ehlo import EHLO_MINIMAL

from smtpguard.logs import JsonFormatter, LogfmtFormatter, fields
from smtpguard.metrics import Metrics
from smtpguard.protocol import Session, SessionOptions
from smtpguard.summary import SessionSummary


def drive(script: list[tuple[str, bytes]], **options: object) -> tuple[Session, list[object]]:
    s = Session(SessionOptions(**options))  # type: ignore[arg-type]
    events: list[object] = []
    for side, data in script:
        if side == "c":
            s.receive_client(data)
        else:
            s.receive_upstream(data)
        events += s.take_events()
        s.take_client_bytes()
    return s, events


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    value = registry.get_sample_value(name, labels)
    assert value is not None, (name, labels)
    return value


def test_known_series_exist_at_zero_on_a_fresh_registry() -> None:
    registry = CollectorRegistry()
    Metrics(registry)
    assert (
        sample(registry, "smtpguard_sequence_violations_total", command="RCPT", state="ready") == 0
    )
    assert sample(registry, "smtpguard_local_replies_total", code="503") == 0
    assert sample(registry, "smtpguard_sessions_closed_total", reason="client_timeout") == 0
    assert sample(registry, "smtpguard_upstream_connect_failures_total", reason="refused") == 0
    assert sample(registry, "smtpguard_messages_total", outcome="aborted") == 0
    assert sample(registry, "smtpguard_help_requests_total", handling="local") == 0
    assert sample(registry, "smtpguard_build_info", version="0.1.0") == 1


def test_every_decision_moves_its_series() -> None:
    registry = CollectorRegistry()
    m = Metrics(registry)
    _, events = drive(
        [
            ("u", b"220 up\r\n"),
            ("c", b"EHLO c\r\n"),
            ("u", EHLO_MINIMAL),
            ("c", b"RCPT TO:<a@b>\r\nFOO\r\nHELP\r\nMAIL FROM:<a@b>\r\n"),
            ("u", b"250 ok\r\n"),
            ("c", b"RCPT TO:<c@d>\r\n"),
            ("u", b"250 ok\r\n"),
            ("c", b"DATA\r\n"),
            ("u", b"354 go\r\n"),
            ("c", b"hello\r\n.\r\n"),
            ("u", b"554 no\r\n"),
            ("c", b"HELP\r\n"),
            ("u", b"214 upstream help\r\n"),
        ],
        help_local=True,
    )
    m.observe(events)  # type: ignore[arg-type]
    assert (
        sample(registry, "smtpguard_sequence_violations_total", command="RCPT", state="ready") == 1
    )
    assert sample(registry, "smtpguard_local_replies_total", code="503") == 1
    assert sample(registry, "smtpguard_local_replies_total", code="500") == 1
    assert sample(registry, "smtpguard_local_replies_total", code="214") == 2
    assert sample(registry, "smtpguard_help_requests_total", handling="local") == 2
    assert sample(registry, "smtpguard_commands_forwarded_total", command="MAIL") == 1
    assert sample(registry, "smtpguard_commands_forwarded_total", command="DATA_END") == 1
    assert sample(registry, "smtpguard_upstream_replies_total", command="DATA", **{"class": "3xx"})
    assert sample(
        registry, "smtpguard_upstream_replies_total", command="DATA_END", **{"class": "5xx"}
    )
    assert sample(registry, "smtpguard_messages_total", outcome="rejected") == 1
    assert sample(registry, "smtpguard_message_size_bytes_count") == 1
    m.session_opened()
    assert sample(registry, "smtpguard_sessions_open") == 1
    m.session_closed("quit")
    assert sample(registry, "smtpguard_sessions_open") == 0
    assert sample(registry, "smtpguard_sessions_closed_total", reason="quit") == 1
    m.connect_failed("timeout")
    assert sample(registry, "smtpguard_upstream_connect_failures_total", reason="timeout") == 1


def test_batched_counters_are_never_missed_by_a_scrape() -> None:
    """Per-command counters are batched; a collection flushes the batch first."""
    registry = CollectorRegistry()
    m = Metrics(registry)
    _, events = drive([("u", b"220 up\r\n"), ("c", b"EHLO c\r\n"), ("u", EHLO_MINIMAL)])
    m.observe(events)  # type: ignore[arg-type]
    m.relayed_bytes("client_to_upstream", 7)
    assert m._pending  # batched, not yet in prometheus-client's values
    assert sample(registry, "smtpguard_commands_forwarded_total", command="EHLO") == 1
    assert sample(registry, "smtpguard_bytes_total", direction="client_to_upstream") == 7
    assert not m._pending
    m.relayed_bytes("client_to_upstream", 5)
    assert b'smtpguard_bytes_total{direction="client_to_upstream"} 12.0' in m.exposition()
    m.session_opened()
    m.session_closed("no such reason")  # counted, under internal_error
    assert sample(registry, "smtpguard_sessions_closed_total", reason="internal_error") == 1


def unflushed_value(metric: object, sample_name: str, **labels: str) -> float:
    """A sample as prometheus-client holds it now (no registry collection,
    which would flush the batch first)."""
    [family] = metric.collect()  # type: ignore[attr-defined]
    for s in family.samples:
        if s.name == sample_name and s.labels == labels:
            return float(s.value)
    raise AssertionError((sample_name, labels))


async def test_workers_flush_periodically_and_on_exit(autojump_clock: object) -> None:
    import trio

    m = Metrics(CollectorRegistry())

    def flushed() -> float:
        return unflushed_value(m.bytes, "smtpguard_bytes_total", direction="client_to_upstream")

    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(m.flush_every, 1.0)
            m.relayed_bytes("client_to_upstream", 4)
            assert flushed() == 0
            await trio.sleep(1.5)
            assert not m._pending and flushed() == 4
            m.relayed_bytes("client_to_upstream", 6)
            scope.cancel()
    assert flushed() == 10  # the last batch, flushed on the way out


def test_batched_latency_histogram_equals_observing_one_by_one() -> None:
    """Bucket counts and sums of the batched histogram, against a plain
    prometheus-client histogram fed the same values (bounds included)."""
    from prometheus_client import Histogram

    from smtpguard.metrics import LATENCY_BUCKETS
    from smtpguard.protocol.rules import Verb

    registry = CollectorRegistry()
    m = Metrics(registry)
    reference_registry = CollectorRegistry()
    reference = Histogram(
        "ref_seconds", "same buckets", buckets=LATENCY_BUCKETS, registry=reference_registry
    )
    values = [0.0, 0.0005, 0.001, 0.0010001, 0.0025, 0.07, 0.1, 2.5, 29.9, 30.0, 31.0, 1e9]
    for v in values:
        m.reply_latency(Verb.MAIL, v)
        reference.observe(v)
    count = "smtpguard_upstream_reply_seconds_count"
    assert unflushed_value(m.upstream_latency, count, command="MAIL") == 0  # not yet flushed
    for bound in (*LATENCY_BUCKETS, float("inf")):
        le = "+Inf" if bound == float("inf") else str(float(bound))
        got = sample(registry, "smtpguard_upstream_reply_seconds_bucket", command="MAIL", le=le)
        want = reference_registry.get_sample_value("ref_seconds_bucket", {"le": le})
        assert want is not None and got == want, le
    assert sample(registry, count, command="MAIL") == len(values)
    assert sample(registry, "smtpguard_upstream_reply_seconds_sum", command="MAIL") == sum(values)


def test_exposition_has_no_addresses() -> None:
    registry = CollectorRegistry()
    m = Metrics(registry)
    _, events = drive([("u", b"220 up\r\n"), ("c", b"EHLO 192.0.2.7\r\nMAIL FROM:<x@y>\r\n")])
    m.observe(events)  # type: ignore[arg-type]
    text = m.exposition().decode()
    assert "192.0.2.7" not in text and "x@y" not in text


def test_summary_counts_like_postfix() -> None:
    _, events = drive(
        [
            ("u", b"220 up\r\n"),
            ("c", b"EHLO c\r\n"),
            ("u", EHLO_MINIMAL),
            ("c", b"MAIL FROM:<a@b>\r\n"),
            ("u", b"250 ok\r\n"),
            ("c", b"RCPT TO:<x@y>\r\nRCPT TO:<z@y>\r\n"),
            ("u", b"550 no\r\n250 ok\r\n"),
            ("c", b"DATA\r\n"),
            ("u", b"354 go\r\n"),
            ("c", b"x\r\n.\r\nMAIL FROM:<n@x>\r\nQUIT\r\n"),
            ("u", b"250 queued\r\n250 ok\r\n221 bye\r\n"),
        ]
    )
    summary = SessionSummary()
    summary.observe(events)  # type: ignore[arg-type]
    f = summary.fields()
    assert list(f)[:5] == ["ehlo", "mail", "rcpt", "data", "quit"]
    assert f["ehlo"] == "1"
    assert f["mail"] == "2"
    assert f["rcpt"] == "1/2"
    assert f["commands"] == "6/7"
    assert f["violations"] == 0
    assert f["messages_accepted"] == 1


def _record(msg: str, **values: object) -> logging.LogRecord:
    record = logging.LogRecord("smtpguard", logging.INFO, __file__, 1, msg, None, None)
    record.__dict__.update(fields(**values))
    return record


def test_logfmt_quotes_and_escapes() -> None:
    line = LogfmtFormatter().format(_record("violation", conn=3, expected='need "MAIL"', n=1))
    assert " level=info event=violation conn=3 " in line
    assert 'expected="need \\"MAIL\\""' in line
    assert line.startswith("ts=")


def test_json_lines() -> None:
    obj = json.loads(JsonFormatter().format(_record("disconnect", conn=9, rcpt="0/1")))
    assert obj["event"] == "disconnect" and obj["conn"] == 9 and obj["rcpt"] == "0/1"


def _transaction(session: Session, data_cmd: bytes) -> None:
    for line in (b"MAIL FROM:<a@b>\r\n", b"RCPT TO:<c@d>\r\n"):
        session.receive_client(line)
        session.receive_upstream(b"250 ok\r\n")
    session.take_upstream_bytes()
    session.receive_client(data_cmd)


def test_annotation_header_on_data_only_with_violations() -> None:
    s, _ = drive(
        [
            ("u", b"220 up\r\n"),
            ("c", b"EHLO c\r\n"),
            ("u", EHLO_MINIMAL),
            ("c", b"RCPT TO:<a@b>\r\n"),
        ],
        annotate="violations",
        hostname="g.test",
    )
    _transaction(s, b"DATA\r\n")
    s.receive_upstream(b"354 go\r\n")
    s.receive_client(b"Subject: x\r\n\r\nbody\r\n.\r\n")
    assert s.take_upstream_bytes() == (
        b"DATA\r\nX-SMTPGuard: g.test; violations=1; kinds=RCPT@ready\r\n"
        b"Subject: x\r\n\r\nbody\r\n.\r\n"
    )
    clean, _ = drive(
        [("u", b"220 up\r\n"), ("c", b"EHLO c\r\n"), ("u", EHLO_MINIMAL)], annotate="violations"
    )
    _transaction(clean, b"DATA\r\n")
    clean.receive_upstream(b"354 go\r\n")
    clean.receive_client(b"body\r\n.\r\n")
    assert clean.take_upstream_bytes() == b"DATA\r\nbody\r\n.\r\n"


def test_annotation_header_on_bdat_adjusts_the_first_chunk_size() -> None:
    s, _ = drive(
        [("u", b"220 up\r\n"), ("c", b"EHLO c\r\n"), ("u", EHLO_MINIMAL)],
        annotate="always",
        annotate_header="X-Guard",
        hostname="g",
    )
    _transaction(s, b"BDAT 4\r\nabcdBDAT 2 LAST\r\nef")
    header = b"X-Guard: g; violations=0\r\n"
    assert s.take_upstream_bytes() == (
        b"BDAT %d\r\n" % (4 + len(header)) + header + b"abcdBDAT 2 LAST\r\nef"
    )
