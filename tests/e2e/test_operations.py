"""Health endpoints, a lint of the real exposition, and SIGHUP reloads."""

from __future__ import annotations

import signal
import subprocess
import time
import urllib.error
import urllib.request

import pytest
import yaml
from guard import Guard, RawClient
from peers import Postfix, find_program, free_port


def status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def test_healthz_and_readyz_follow_the_upstream(postfix: Postfix) -> None:
    with Guard(f"{postfix.host}:{postfix.port}") as good:
        base = f"http://127.0.0.1:{good.metrics_port}"
        assert status(base + "/healthz") == 200
        assert status(base + "/readyz") == 200
        assert status(base + "/nope") == 404
    with Guard(f"127.0.0.1:{free_port()}") as bad:
        base = f"http://127.0.0.1:{bad.metrics_port}"
        assert status(base + "/healthz") == 200
        assert status(base + "/readyz") == 503


def test_promtool_accepts_a_real_scrape(postfix: Postfix) -> None:
    with Guard(f"{postfix.host}:{postfix.port}") as guard:
        with RawClient(guard.port) as client:
            client.reply()
            client.send(b"EHLO c\r\nRCPT TO:<a@example.org>\r\nQUIT\r\n")
            client.replies(3)
        exposition = guard.metrics()
    result = subprocess.run(
        [find_program("promtool"), "check", "metrics"],
        input=exposition,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert 'smtpguard_sequence_violations_total{command="RCPT",state="ready"} 1.0' in exposition


def _help_reply(port: int) -> bytes:
    with RawClient(port) as client:
        client.reply()
        client.send(b"EHLO c\r\nHELP\r\nQUIT\r\n")
        return client.replies(3)[1]


def test_sighup_reloads_new_sessions_and_refuses_a_bad_config(postfix: Postfix) -> None:
    with Guard(
        f"{postfix.host}:{postfix.port}", help={"local": True, "text": ["first text"]}
    ) as guard:
        assert guard.proc is not None
        assert b"first text" in _help_reply(guard.port)
        # A session in flight across the reload keeps working.
        held = RawClient(guard.port)
        held.reply()
        held.send(b"EHLO c\r\n")
        held.reply()

        config = dict(guard.config, help={"local": True, "text": ["second text"]})
        guard.config_path.write_text(yaml.safe_dump(config))
        guard.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while b"second text" not in _help_reply(guard.port):
            assert time.monotonic() < deadline, guard.log()
            time.sleep(0.1)
        assert guard.metric("smtpguard_config_last_reload_successful") == 1

        guard.config_path.write_text("help:\n  local: maybe\n")
        guard.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "reload refused" not in guard.log():
            assert time.monotonic() < deadline, guard.log()
            time.sleep(0.1)
        assert "key=help.local" in guard.log()
        assert guard.metric("smtpguard_config_last_reload_successful") == 0
        assert b"second text" in _help_reply(guard.port)  # the old config stays

        held.send(b"NOOP\r\nQUIT\r\n")
        assert held.replies(2)[1].startswith(b"221")
        held.close()
        assert guard.proc.poll() is None


def test_sigterm_lets_a_message_in_data_finish_then_421s_the_idle(postfix: Postfix) -> None:
    guard = Guard(f"{postfix.host}:{postfix.port}", shutdown_grace_seconds=3)
    with guard:
        assert guard.proc is not None
        busy = RawClient(guard.port)
        idle = RawClient(guard.port)
        busy.reply()
        idle.reply()
        busy.send(b"EHLO c\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n")
        assert busy.replies(4)[-1].startswith(b"354")
        busy.send(b"Subject: graceful\r\n\r\nfirst half\r\n")
        started = time.monotonic()
        guard.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        # No new sessions once stopping.
        try:
            late = RawClient(guard.port)
            assert late.read_to_eof() == b""
        except OSError:
            pass
        busy.send(b"second half\r\n.\r\n")
        assert busy.reply().startswith(b"250")  # the message in DATA was not cut short
        busy.send(b"QUIT\r\n")
        assert busy.reply().startswith(b"221")
        assert (
            idle.read_to_eof()
            == b"421 4.3.2 guard.test Service shutting down, closing connection\r\n"
        )
        assert time.monotonic() - started >= 2.5  # the idle one got its grace period
        assert guard.proc.wait(20) == 0
        assert "stopping" in guard.log()


@pytest.mark.parametrize("workers", [1, 2])
def test_systemd_notify_ready_and_stopping(
    postfix: Postfix, tmp_path, monkeypatch, workers
) -> None:  # type: ignore[no-untyped-def]
    """One process, or the supervisor of two workers: the same notifications
    (only the supervisor talks to systemd)."""
    import socket as socketlib

    path = str(tmp_path / "notify.sock")
    with socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.settimeout(15)
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        with Guard(f"{postfix.host}:{postfix.port}", workers=workers) as guard:
            assert sock.recv(100) == b"READY=1"
            assert guard.proc is not None
            guard.proc.send_signal(signal.SIGHUP)
            assert sock.recv(100) == b"RELOADING=1"
            assert sock.recv(100) == b"READY=1"
            guard.proc.send_signal(signal.SIGTERM)
            assert sock.recv(100) == b"STOPPING=1"
            assert guard.proc.wait(20) == 0


def test_failover_to_the_next_upstream_and_round_robin(postfix: Postfix, postfix_factory) -> None:  # type: ignore[no-untyped-def]
    dead = f"127.0.0.1:{free_port()}"
    live = f"{postfix.host}:{postfix.port}"
    with Guard([dead, live]) as guard:  # type: ignore[arg-type]
        for _ in range(2):
            with RawClient(guard.port) as client:
                assert client.reply().startswith(b"220 ")  # Postfix's greeting, via #1
                client.send(b"QUIT\r\n")
                assert client.reply().startswith(b"221")
        assert guard.metric("smtpguard_upstream_up", upstream="0") == 0
        assert guard.metric("smtpguard_upstream_up", upstream="1") == 1
        assert guard.metric("smtpguard_upstream_connect_failures_total", reason="refused") == 2
        assert guard.metric("smtpguard_sessions_closed_total", reason="quit") == 2
        # What SMTPGuardUpstreamDown watches stays at 0: no session was refused.
        assert guard.metric("smtpguard_sessions_closed_total", reason="upstream_refused") == 0
    other = postfix_factory()
    offsets = (postfix.log_offset(), other.log_offset())
    with Guard(
        [live, f"{other.host}:{other.port}"],
        upstream_selection="round_robin",  # type: ignore[arg-type]
    ) as guard:
        for _ in range(4):
            with RawClient(guard.port) as client:
                client.reply()
                client.send(b"QUIT\r\n")
                client.reply()
    first = postfix.log_since(offsets[0]).count("disconnect from")
    second = other.log_since(offsets[1]).count("disconnect from")
    assert (first, second) == (2, 2)


def test_each_listener_relays_to_its_own_upstreams(postfix: Postfix, postfix_factory) -> None:  # type: ignore[no-untyped-def]
    """Two listeners: one uses the global upstream (a Postfix), the other its
    own list (a dead address, then a second Postfix): each message lands at
    its listener's Postfix, sent with smtplib."""
    import smtplib
    import uuid

    other = postfix_factory()
    dead = f"127.0.0.1:{free_port()}"
    ports = (free_port(), free_port())
    with Guard(
        f"{postfix.host}:{postfix.port}",
        listen=[  # type: ignore[arg-type]
            f"127.0.0.1:{ports[0]}",
            {"address": f"127.0.0.1:{ports[1]}", "upstream": [dead, f"{other.host}:{other.port}"]},
        ],
    ) as guard:
        tags = {}
        for port in ports:
            tag = uuid.uuid4().hex[:12]
            tags[port] = tag
            with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
                message = f"Subject: listener {tag}\r\n\r\nvia port {port}\r\n".encode()
                assert client.sendmail("a@example.org", ["b@example.org"], message) == {}
        first = postfix.wait_for_messages(1, where=lambda m: tags[ports[0]] in m.text)
        second = other.wait_for_messages(1, where=lambda m: tags[ports[1]] in m.text)
        assert len(first) == len(second) == 1
        assert not [m for m in postfix.messages() if tags[ports[1]] in m.text]
        assert not [m for m in other.messages() if tags[ports[0]] in m.text]
        assert guard.metric("smtpguard_upstream_up", upstream="0") == 1  # the global one
        assert guard.metric("smtpguard_upstream_up", upstream="1") == 0  # dead
        assert guard.metric("smtpguard_upstream_up", upstream="2") == 1  # the other Postfix
