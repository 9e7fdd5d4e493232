"""The shipped deploy/haproxy/haproxy.cfg, end to end on loopback.

The test rewrites only what cannot work here (host names, ports, the system log socket, the
chroot and stats socket paths) in the shipped file and runs Debian's haproxy on the result, in
front of two real smtpguard instances whose listeners require a PROXY header, and one
instance that is down. It shows that:

- the health check (``option httpchk GET /readyz`` on the metrics port) finds the two live
  instances ready and the dead one down;
- mail sent through HAProxy is spread over both instances and reaches Postfix;
- ``send-proxy-v2`` carries the client's address: smtpguard logs the client (bound to
  127.0.0.7), never HAProxy's 127.0.0.1;
- when an instance stops, the check takes it out and mail goes through the other one.
"""

from __future__ import annotations

import csv
import os
import re
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from guard import Guard
from peers import Postfix, free_port
from peers_tls import HAProxy, SMTPClient

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "deploy" / "haproxy" / "haproxy.cfg"
FRONTEND, BACKEND = "smtp_in", "smtpguard_fleet"
CLIENT_ADDRESS = "127.0.0.7"
SENDER = "sender@example.org"


def loopback_variant(
    text: str, *, bind: str, servers: dict[str, tuple[int, int]], base_dir: Path
) -> str:
    """The shipped config with ``bind`` for the frontend, ``servers[name] = (smtp_port,
    check_port)`` on 127.0.0.1, logs on stderr and run-time files in ``base_dir``.

    Every rewrite must apply exactly as often as expected, so a change in the shipped file's
    shape fails here instead of being tested by accident.
    """
    (base_dir / "chroot").mkdir(exist_ok=True)
    root = os.geteuid() == 0
    counts: dict[str, int] = {}

    def sub(name: str, pattern: str, repl: str | Callable[[re.Match[str]], str]) -> None:
        nonlocal text
        text, n = re.subn(pattern, repl, text, flags=re.MULTILINE)
        counts[name] = n

    sub("log", r"^(\s*)log /dev/log local0$", r"\1log stderr format raw local0 info")
    sub("chroot", r"^(\s*)chroot \S+$", rf"\1chroot {base_dir / 'chroot'}" if root else "")
    sub("user", r"^\s*(?:user|group) haproxy$", r"\g<0>" if root else "")
    sub("stats", r"^(\s*stats socket) /run/haproxy/admin\.sock ", rf"\1 {base_dir}/admin.sock ")
    sub("bind", r"^(\s*)bind :25$", rf"\1bind {bind}")

    def server(match: re.Match[str]) -> str:
        smtp_port, check_port = servers[match.group(2)]
        return f"{match.group(1)}server {match.group(2)} 127.0.0.1:{smtp_port} port {check_port}"

    sub("server", r"^(\s*)server (smtpguard\d) \2:2525$", server)
    expected = {"log": 1, "chroot": 1, "user": 2, "stats": 1, "bind": 1, "server": len(servers)}
    assert counts == expected, f"the shipped haproxy.cfg changed shape: {counts} != {expected}"
    return text


class ShippedHAProxy(HAProxy):
    """peers_tls.HAProxy (foreground, own temp folder, clean stop) running the rewritten
    shipped configuration instead of its own."""

    def __init__(self, servers: dict[str, tuple[int, int]]) -> None:
        super().__init__("127.0.0.1:1", host="127.0.0.1")
        self.servers = servers

    def config(self) -> str:
        return loopback_variant(
            SHIPPED.read_text(),
            bind=f"{self.host}:{self.port}",
            servers=self.servers,
            base_dir=self.base_dir,
        )

    def stats(self) -> dict[str, dict[str, str]]:
        """``show stat`` on the stats socket: one row per server of the backend, by name."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(5)
            sock.connect(str(self.base_dir / "admin.sock"))
            sock.sendall(b"show stat\n")
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        lines = data.decode().lstrip("# ").splitlines()
        rows = csv.DictReader(line for line in lines if line)
        return {
            r["svname"]: r for r in rows if r["pxname"] == BACKEND and r["svname"] in self.servers
        }

    def wait_states(
        self, wanted: dict[str, tuple[str, str]], timeout: float = 30
    ) -> dict[str, dict[str, str]]:
        """Wait until each named server's (status, last check status) is ``wanted[name]``,
        e.g. ("UP", "L7OK"): a transitional "UP 1/3" does not count."""
        deadline = time.monotonic() + timeout
        while True:
            rows = self.stats()
            shown = {name: (r["status"], r["check_status"]) for name, r in rows.items()}
            if all(shown[name] == state for name, state in wanted.items()):
                return rows
            if time.monotonic() > deadline:
                raise AssertionError(f"server states {shown}, wanted {wanted}\n{self.log_text()}")
            time.sleep(0.1)


def proxied_guard(postfix: Postfix) -> Guard:
    """smtpguard in front of ``postfix``, its listener requiring a PROXY header from loopback."""
    port = free_port()
    guard = Guard(
        f"{postfix.host}:{postfix.port}",
        listen=[
            {"address": f"127.0.0.1:{port}", "proxy_protocol": True, "trusted": ["127.0.0.0/8"]}
        ],
    )
    guard.port = port
    return guard


def wait_log(source: Callable[[], str], pattern: str, timeout: float = 10) -> re.Match[str]:
    regex = re.compile(pattern, re.MULTILINE)
    deadline = time.monotonic() + timeout
    while (match := regex.search(source())) is None:
        if time.monotonic() > deadline:
            raise AssertionError(f"no {pattern!r} in:\n{source()[-4000:]}")
        time.sleep(0.05)
    return match


def send_through(haproxy: ShippedHAProxy, postfix: Postfix) -> tuple[int, str]:
    """One message from 127.0.0.7 through HAProxy; returns the client port once Postfix has
    delivered it, and the recipient."""
    rcpt = f"deploy-haproxy-{uuid.uuid4().hex[:12]}@example.org"
    with SMTPClient(haproxy.host, haproxy.port, source_address=CLIENT_ADDRESS) as client:
        host, port = client.local_address
        assert host == CLIENT_ADDRESS
        assert client.banner is not None and client.banner.code == 220, client.banner
        assert client.ehlo().code == 250
        replies = client.send_message(SENDER, [rcpt], b"Subject: via haproxy\r\n\r\nhi\r\n")
        assert replies[-1].code == 250, replies
        client.quit()
    postfix.wait_for_messages(1, where=lambda m: rcpt in m.recipients)
    return port, rcpt


def served_by(guards: dict[str, Guard], port: int) -> str:
    """The name of the smtpguard whose session summary names the client 127.0.0.7:port."""
    pattern = rf"event=disconnect conn=\d+ client={re.escape(CLIENT_ADDRESS)}:{port} .*reason=quit"
    deadline = time.monotonic() + 10
    while True:
        found = [name for name, guard in guards.items() if re.search(pattern, guard.log())]
        if found:
            assert len(found) == 1, found
            return found[0]
        if time.monotonic() > deadline:
            logs = "\n".join(f"--- {n}\n{g.log()[-2000:]}" for n, g in guards.items())
            raise AssertionError(f"no smtpguard logged client {CLIENT_ADDRESS}:{port}\n{logs}")
        time.sleep(0.05)


@pytest.fixture
def fleet(postfix: Postfix) -> Iterator[tuple[ShippedHAProxy, dict[str, Guard]]]:
    """smtpguard1 and smtpguard2 running, smtpguard3 down (nothing on its ports), and the
    shipped HAProxy in front of the three."""
    guards = {"smtpguard1": proxied_guard(postfix), "smtpguard2": proxied_guard(postfix)}
    for guard in guards.values():
        guard.start()
    try:
        servers = {name: (g.port, g.metrics_port) for name, g in guards.items()}
        servers["smtpguard3"] = (free_port(), free_port())
        with ShippedHAProxy(servers) as haproxy:
            yield haproxy, guards
    finally:
        for guard in guards.values():
            guard.stop()


def test_shipped_variant_keeps_the_structure(tmp_path: Path) -> None:
    text = loopback_variant(
        SHIPPED.read_text(),
        bind="127.0.0.1:2500",
        servers={f"smtpguard{i}": (2500 + i, 9300 + i) for i in (1, 2, 3)},
        base_dir=tmp_path,
    )
    assert "option httpchk GET /readyz" in text
    assert re.search(r"^\s*default-server .*\bcheck port 9325\b.*\bsend-proxy-v2\b", text, re.M)
    assert "server smtpguard2 127.0.0.1:2502 port 9302" in text


def test_haproxy_fleet_carries_the_client_to_smtpguard_and_postfix(
    fleet: tuple[ShippedHAProxy, dict[str, Guard]], postfix: Postfix
) -> None:
    haproxy, guards = fleet
    # The /readyz checks on the metrics port: the live ones pass (L7OK: HTTP 200, no PROXY
    # header needed), the dead one fails at connect (L4CON).
    ready, refused = ("UP", "L7OK"), ("DOWN", "L4CON")
    haproxy.wait_states({"smtpguard1": ready, "smtpguard2": ready, "smtpguard3": refused})

    served: dict[str, list[int]] = {name: [] for name in guards}
    for _ in range(4):
        port, _rcpt = send_through(haproxy, postfix)
        name = served_by(guards, port)
        served[name].append(port)
        # HAProxy's own connection log names the same client and the same server.
        wait_log(
            haproxy.log_text,
            rf"^{re.escape(CLIENT_ADDRESS)}:{port} \[[^\]]+\] {FRONTEND} {BACKEND}/{name} ",
        )
    # leastconn: equally loaded servers take turns.
    assert all(served.values()), served
    for guard in guards.values():
        # Sessions arrive from HAProxy (127.0.0.1), yet smtpguard only ever saw the client.
        assert "client=127.0.0.1:" not in guard.log(), guard.log()[-2000:]

    # Stop one instance: its check fails, HAProxy takes it out, mail goes to the other.
    assert guards["smtpguard2"].stop() == 0
    haproxy.wait_states({"smtpguard1": ready, "smtpguard2": refused})
    for _ in range(2):
        port, _rcpt = send_through(haproxy, postfix)
        assert served_by(guards, port) == "smtpguard1"
