"""Health endpoints, a lint of the real exposition, and SIGHUP reloads."""

from __future__ import annotations

import signal
import subprocess
import time
import urllib.error
import urllib.request

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
