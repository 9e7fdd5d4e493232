"""The e2e fixtures work against the real programs (Postfix, swaks, Prometheus, promtool)."""

from __future__ import annotations

import smtplib
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from peers import (
    CapturedMessage,
    MissingProgramError,
    Postfix,
    Prometheus,
    body_matches,
    find_program,
    parse_disconnect,
    promtool,
    promtool_check_metrics,
    strip_received,
    swaks,
)

# --------------------------------------------------------------------------- pure helpers

RECEIVED = (
    b"Received: from [127.0.0.1] (unknown [127.0.0.1])\n"
    b"\tby upstream.smtpguard.test (Postfix) with ESMTP id 4F1A320C24A\n"
    b"\tfor <b@y.test>; Sun, 29 Nov 2026 04:43:23 +0000 (UTC)\n"
)


def test_body_matches_accounts_for_crlf_and_received_only() -> None:
    original = b"Subject: hi\r\nX-A: 1\r\n\r\nline one\r\n\r\nline three\r\n"
    captured = RECEIVED + b"Subject: hi\nX-A: 1\n\nline one\n\nline three\n"
    assert body_matches(original, captured)
    assert strip_received(captured) == b"Subject: hi\nX-A: 1\n\nline one\n\nline three\n"
    # A one-line Received header is fine too.
    assert body_matches(b"a: b\r\n\r\nx\r\n", b"Received: by h; date\na: b\n\nx\n")


@pytest.mark.parametrize(
    "captured",
    [
        # no Received header
        b"Subject: hi\n\nbody\n",
        # CRLF kept
        RECEIVED + b"Subject: hi\r\n\r\nbody\r\n",
        # body changed by one byte
        RECEIVED + b"Subject: hi\n\nbodY\n",
        # two Received headers: only one is Postfix's
        RECEIVED + RECEIVED + b"Subject: hi\n\nbody\n",
        # an extra header besides Received
        RECEIVED + b"Message-Id: <x@y>\nSubject: hi\n\nbody\n",
        # trailing newline lost
        RECEIVED + b"Subject: hi\n\nbody",
    ],
)
def test_body_matches_rejects_anything_else(captured: bytes) -> None:
    assert not body_matches(b"Subject: hi\r\n\r\nbody\r\n", captured)


def test_body_matches_wants_wire_content() -> None:
    with pytest.raises(ValueError, match="wire content"):
        body_matches(b"Subject: hi\r\n\r\nno final line end", RECEIVED + b"x\n")


def test_parse_disconnect() -> None:
    line = (
        "Nov 29 04:43:23 upstream postfix/smtpd[6860]: disconnect from unknown[127.0.0.1]:37806"
        " ehlo=1 mail=1 rcpt=1 data=1 quit=1 commands=5\n"
    )
    assert parse_disconnect(line) == {
        "ehlo": "1",
        "mail": "1",
        "rcpt": "1",
        "data": "1",
        "quit": "1",
        "commands": "5",
    }
    failed = "postfix/smtpd[1]: disconnect from localhost[127.0.0.1] ehlo=1 rcpt=0/1 commands=1/2"
    assert parse_disconnect(failed) == {"ehlo": "1", "rcpt": "0/1", "commands": "1/2"}
    assert parse_disconnect("smtpd[1]: disconnect from unknown[127.0.0.1] commands=0/0") == {
        "commands": "0/0"
    }
    with pytest.raises(ValueError):
        parse_disconnect("postfix/smtpd[1]: connect from unknown[127.0.0.1]")


def test_missing_program_is_an_error_not_a_skip() -> None:
    with pytest.raises(MissingProgramError, match="not installed"):
        find_program("smtpguard-no-such-program")
    for name in ("postfix", "postsuper", "swaks", "prometheus", "promtool", "haproxy"):
        assert Path(find_program(name)).is_file()


# --------------------------------------------------------------------------- Postfix


def _unique(domain: str = "example.test") -> str:
    return f"rcpt-{uuid.uuid4().hex[:12]}@{domain}"


def _to(address: str) -> Callable[[CapturedMessage], bool]:
    return lambda message: address in message.recipients


def test_smtplib_message_is_captured_with_envelope_and_body(
    postfix: Postfix, postfix_log_offset: int
) -> None:
    rcpt1, rcpt2 = _unique(), _unique("other.test")
    original = (
        b"From: Alice <alice@sender.test>\r\n"
        b"To: undisclosed-recipients:;\r\n"
        b"Subject: e2e smtplib\r\n"
        b"\r\n"
        b"first line\r\n"
        b".leading dot survives\r\n"
        b"\r\n"
        b"last line\r\n"
    )
    with smtplib.SMTP(postfix.host, postfix.port, timeout=10) as client:
        assert client.sock is not None
        client_port = client.sock.getsockname()[1]
        refused = client.sendmail("alice@sender.test", [rcpt1, rcpt2], original)
        assert refused == {}
    sent = time.monotonic()

    (message,) = postfix.wait_for_messages(1, timeout=10, where=_to(rcpt1))
    # Delivered promptly, in a single delivery carrying both recipients.
    assert time.monotonic() - sent < 2
    assert message.sender == "alice@sender.test"
    assert message.recipients == [rcpt1, rcpt2]
    assert body_matches(original, message.data)
    assert message.header("Subject") == "e2e smtplib"
    received = message.header("Received")
    assert received is not None and f"with ESMTP id {message.queue_id}" in received

    counts = postfix.wait_for_disconnect(postfix_log_offset, client_port=client_port)
    assert counts == {
        "ehlo": "1",
        "mail": "1",
        "rcpt": "2",
        "data": "1",
        "quit": "1",
        "commands": "6",
    }
    log = postfix.log_since(postfix_log_offset)
    assert f"{message.queue_id}: from=<alice@sender.test>" in log
    assert "status=sent (delivered via capture service)" in log


def test_swaks_message_is_captured(postfix: Postfix, postfix_log_offset: int) -> None:
    rcpt = _unique()
    result = swaks(
        "--server",
        f"{postfix.host}:{postfix.port}",
        "--from",
        "swaks@sender.test",
        "--to",
        rcpt,
        "--header",
        "Subject: e2e swaks",
        "--body",
        "hello from swaks",
        timeout=30,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "250 2.0.0 Ok: queued as" in result.stdout

    (message,) = postfix.wait_for_messages(1, timeout=10, where=_to(rcpt))
    assert message.sender == "swaks@sender.test"
    assert message.recipients == [rcpt]
    assert message.header("Subject") == "e2e swaks"
    assert "hello from swaks" in message.text
    assert b"\r" not in message.data

    counts = postfix.wait_for_disconnect(postfix_log_offset)
    assert counts == {
        "ehlo": "1",
        "mail": "1",
        "rcpt": "1",
        "data": "1",
        "quit": "1",
        "commands": "5",
    }


def test_null_sender_many_recipients_and_queue_drain(postfix: Postfix) -> None:
    rcpts = [_unique(f"d{i}.test") for i in range(3)]
    original = b"Subject: bounce-like\r\n\r\nbody\r\n"
    with smtplib.SMTP(postfix.host, postfix.port, timeout=10) as client:
        client.sendmail("", rcpts, original)
    # messages(timeout) waits until Postfix's queue is empty: no wait_for_* needed.
    mine = [m for m in postfix.messages(timeout=5) if m.recipients == rcpts]
    assert len(mine) == 1
    assert mine[0].sender == ""
    assert body_matches(original, mine[0].data)
    assert postfix.queue_files() == []


def test_failed_commands_show_as_ok_over_total(postfix: Postfix, postfix_log_offset: int) -> None:
    with smtplib.SMTP(postfix.host, postfix.port, timeout=10) as client:
        client.ehlo()
        code, _ = client.docmd("RCPT", "TO:<nobody@example.test>")  # no MAIL yet
        assert code == 503
        assert client.sock is not None
        client_port = client.sock.getsockname()[1]
    line = postfix.wait_for_log(
        rf"^.*disconnect from \S+:{client_port} .*$", postfix_log_offset, timeout=10
    )
    assert parse_disconnect(line.group(0)) == {
        "ehlo": "1",
        "rcpt": "0/1",
        "quit": "1",
        "commands": "2/3",
    }


def test_headerless_message_gets_an_empty_line_from_postfix(postfix: Postfix) -> None:
    # Documented limit of body_matches: Postfix separates its Received header from a body
    # that has no header of its own by an empty line.
    rcpt = _unique()
    original = b"no header here\r\nsecond line\r\n"
    with smtplib.SMTP(postfix.host, postfix.port, timeout=10) as client:
        client.sendmail("a@sender.test", [rcpt], original)
    (message,) = postfix.wait_for_messages(1, where=_to(rcpt))
    assert not body_matches(original, message.data)
    assert strip_received(message.data) == b"\n" + original.replace(b"\r\n", b"\n")


def _read_reply(sock: socket.socket, buf: bytearray) -> bytes:
    """One complete (possibly multi-line) SMTP reply."""
    while True:
        lines = bytes(buf).split(b"\r\n")
        for i, line in enumerate(lines[:-1]):
            if len(line) >= 4 and line[3:4] == b" ":
                reply = b"\r\n".join(lines[: i + 1])
                del buf[: len(reply) + 2]
                return reply
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError(f"connection closed; pending {bytes(buf)!r}")
        buf += chunk


def _send_with_bare_lf_end(instance: Postfix, rcpt: str) -> tuple[bytes | None, bytes]:
    """Send DATA content ending in LF.LF; return (reply to that or None, final reply)."""
    buf = bytearray()
    with socket.create_connection(instance.address, timeout=10) as sock:
        assert _read_reply(sock, buf).startswith(b"220")
        for command, expect in (
            (b"EHLO client.test", b"250"),
            (b"MAIL FROM:<a@sender.test>", b"250"),
            (f"RCPT TO:<{rcpt}>".encode(), b"250"),
            (b"DATA", b"354"),
        ):
            sock.sendall(command + b"\r\n")
            assert _read_reply(sock, buf).startswith(expect)
        sock.sendall(b"Subject: bare lf\r\n\r\nbody\n.\n")
        sock.settimeout(1.5)
        try:
            early: bytes | None = _read_reply(sock, buf)
        except TimeoutError:
            early = None
        sock.settimeout(10)
        if early is None:
            sock.sendall(b"\r\n.\r\n")
            final = _read_reply(sock, buf)
        else:
            final = early
        sock.sendall(b"QUIT\r\n")
        _read_reply(sock, buf)
    return early, final


def test_legacy_postfix_ends_data_at_bare_lf_dot(legacy_postfix: Postfix) -> None:
    rcpt = _unique()
    early, final = _send_with_bare_lf_end(legacy_postfix, rcpt)
    assert early is not None and early.startswith(b"250")
    (message,) = legacy_postfix.wait_for_messages(1, where=_to(rcpt))
    assert strip_received(message.data) == b"Subject: bare lf\n\nbody\n"


def test_normal_postfix_needs_crlf_dot_crlf(postfix: Postfix) -> None:
    rcpt = _unique()
    early, final = _send_with_bare_lf_end(postfix, rcpt)
    assert early is None  # LF.LF did not end the message
    assert final.startswith(b"250")
    (message,) = postfix.wait_for_messages(1, where=_to(rcpt))
    assert strip_received(message.data).startswith(b"Subject: bare lf\n\nbody\n")


def test_factory_extra_main_cf_and_stop_releases_everything(
    postfix_factory: Callable[..., Postfix],
) -> None:
    instance = postfix_factory(extra_main_cf={"smtpd_discard_ehlo_keywords": "chunking"})
    with smtplib.SMTP(instance.host, instance.port, timeout=10) as client:
        client.ehlo()
        assert client.has_extn("pipelining")
        assert not client.has_extn("chunking")
    rcpt = _unique()
    with smtplib.SMTP(instance.host, instance.port, timeout=10) as client:
        client.sendmail("a@sender.test", [rcpt], b"Subject: x\r\n\r\ny\r\n")
    instance.wait_for_messages(1, where=_to(rcpt))
    base = instance.base_dir
    instance.stop()
    with pytest.raises(OSError):
        socket.create_connection(instance.address, timeout=2).close()
    assert not base.exists()
    assert _instance_pids(base) == []


def _instance_pids(base: Path) -> list[str]:
    """Live (non-zombie) processes of the Postfix instance in ``base``."""
    marker = f"MAIL_CONFIG={base}/etc".encode()
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                env = (proc / "environ").read_bytes().split(b"\0")
                state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if marker in env and state != "Z":
                pids.append(proc.name)
    return pids


def test_peers_of_a_killed_test_run_are_reaped() -> None:
    # A test run killed with SIGKILL (or by `timeout`) cannot clean up: the next start does.
    code = (
        "import time, peers\n"
        "p = peers.Postfix().start()\n"
        "print(p.base_dir, p.port, flush=True)\n"
        "time.sleep(120)\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=Path(__file__).parent,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        base_text, port_text = child.stdout.readline().split()
    finally:
        child.kill()
        child.wait(10)
    base, port = Path(base_text), int(port_text)
    assert base.is_dir() and _instance_pids(base)
    with Postfix() as other:  # starting any peer reaps the orphan
        assert other.port != port
    assert not base.exists()
    assert _instance_pids(base) == []
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


# --------------------------------------------------------------------------- Prometheus

EXPOSITION = """\
# HELP smtpguard_e2e_value A value served by a static exposition.
# TYPE smtpguard_e2e_value gauge
smtpguard_e2e_value{kind="static"} 42
# HELP smtpguard_e2e_events_total Events counted by a static exposition.
# TYPE smtpguard_e2e_events_total counter
smtpguard_e2e_events_total 7
"""


@pytest.fixture
def static_metrics() -> Iterator[str]:
    """A tiny http.server serving EXPOSITION at /metrics; yields its host:port."""
    body = EXPOSITION.encode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path != "/metrics":
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_prometheus_scrapes_static_metrics_and_evaluates_rules(
    prometheus_factory: Callable[..., Prometheus], static_metrics: str, tmp_path: Path
) -> None:
    rules = tmp_path / "rules.yml"
    rules.write_text(
        "groups:\n"
        "  - name: e2e\n"
        "    rules:\n"
        "      - alert: SmtpguardE2EValueHigh\n"
        "        expr: smtpguard_e2e_value > 40\n"
        "        labels:\n"
        "          severity: test\n"
        "        annotations:\n"
        "          summary: value is {{ $value }}\n"
    )
    check = promtool("check", "rules", str(rules))
    assert check.returncode == 0, check.stdout + check.stderr

    prom = prometheus_factory([static_metrics], rule_files=[rules])
    result = prom.wait_for("smtpguard_e2e_value", timeout=30)
    assert result[0]["metric"]["kind"] == "static"
    assert result[0]["metric"]["instance"] == static_metrics
    assert float(result[0]["value"][1]) == 42
    assert prom.value("smtpguard_e2e_events_total") == 7
    assert prom.value(f'up{{instance="{static_metrics}"}}') == 1
    assert prom.value("smtpguard_e2e_missing") is None
    assert prom.target_health()[0]["health"] == "up"

    prom.wait_for('ALERTS{alertname="SmtpguardE2EValueHigh",alertstate="firing"}', timeout=15)
    (alert,) = prom.alerts()
    assert alert["labels"]["severity"] == "test"
    assert alert["annotations"]["summary"] == "value is 42"


def test_promtool_check_metrics() -> None:
    ok = promtool_check_metrics(EXPOSITION)
    assert ok.returncode == 0, ok.stderr
    assert ok.stderr == ""
    # A counter without the _total suffix is a lint finding (exit 3, message on stderr).
    lint = promtool_check_metrics("# HELP bad_count x\n# TYPE bad_count counter\nbad_count 1\n")
    assert lint.returncode == 3
    assert "bad_count" in lint.stderr
    broken = promtool_check_metrics("not an exposition {\n")
    assert broken.returncode != 0
