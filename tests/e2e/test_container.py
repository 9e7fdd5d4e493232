"""deploy/container/Containerfile built and run with podman, in front of a real Postfix.

The image is built from this checkout (see container.py for the offline base image and what
this sandbox needs of podman) and run as deploy/compose.yaml runs it: read-only root, a tmpfs
/tmp, every capability dropped, no new privileges. Its config is the shipped container config
with only the addresses changed (loopback ports picked now, the upstream the session's
Postfix; the container shares the host's network). The test shows that:

- the image runs unprivileged (uid 10025, every process) and carries its health check;
- the health check passes, a message goes through to Postfix byte for byte, a command out of
  order gets 503 5.5.1 and is counted on /metrics;
- SIGHUP reloads the mounted config; SIGTERM stops it with exit code 0 and no traceback.
"""

from __future__ import annotations

import smtplib
import socket
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from container import Podman, ulimit_flags
from peers import PeerError, Postfix, body_matches, free_port

ROOT = Path(__file__).resolve().parents[2]
CONTAINERFILE = ROOT / "deploy" / "container" / "Containerfile"
SHIPPED_CONFIG = ROOT / "deploy" / "container" / "smtpguard.yaml"
TAG = "localhost/smtpguard:e2e"
UID = "10025"


@pytest.fixture(scope="module")
def podman() -> Podman:
    podman = Podman()
    podman.ensure_base_image()
    podman.build(ROOT, CONTAINERFILE, TAG)
    return podman


class Running:
    def __init__(self, podman: Podman, name: str, smtp_port: int, metrics_port: int) -> None:
        self.podman, self.name = podman, name
        self.smtp_port, self.metrics_port = smtp_port, metrics_port

    def http(self, path: str) -> str:
        url = f"http://127.0.0.1:{self.metrics_port}{path}"
        with urllib.request.urlopen(url, timeout=5) as answer:
            return str(answer.read().decode())

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.http("/readyz").startswith("ready"):
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise PeerError(f"not ready within {timeout}s:\n{self.podman.logs(self.name)}")
            time.sleep(0.2)


@pytest.fixture
def running(podman: Podman, postfix: Postfix, tmp_path: Path) -> Iterator[Running]:
    config = yaml.safe_load(SHIPPED_CONFIG.read_text())
    smtp_port, metrics_port = free_port(), free_port()
    host, port = postfix.address
    config["listen"] = [f"127.0.0.1:{smtp_port}"]
    config["metrics"]["listen"] = f"127.0.0.1:{metrics_port}"
    config["upstream"] = f"{host}:{port}"
    config["workers"] = 2
    path = tmp_path / "smtpguard.yaml"
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o644)  # read by uid 10025 in the container
    tmp_path.chmod(0o755)
    name = f"smtpguard-e2e-{uuid.uuid4().hex[:8]}"
    podman.run(
        "run",
        "--detach",
        "--name",
        name,
        "--network",
        "host",
        "--read-only",
        "--tmpfs",
        "/tmp",
        "--cap-drop",
        "ALL",
        "--security-opt",
        "no-new-privileges",
        *ulimit_flags(),
        "-v",
        f"{path}:/etc/smtpguard/smtpguard.yaml:ro",
        TAG,
    )
    container = Running(podman, name, smtp_port, metrics_port)
    try:
        container.wait_ready()
        yield container
    finally:
        podman.run("rm", "--force", "--time", "5", name, check=False)


def test_image_runs_unprivileged_with_its_health_check(podman: Podman) -> None:
    assert podman.inspect("image", TAG, "{{.Config.User}}") == f"{UID}:{UID}"
    healthcheck = podman.inspect("image", TAG, "{{.Config.Healthcheck.Test}}")
    assert healthcheck == "[CMD smtpguard health --config /etc/smtpguard/smtpguard.yaml]"
    entrypoint = podman.inspect("image", TAG, "{{.Config.Entrypoint}}")
    assert "serve" in entrypoint and "/etc/smtpguard/smtpguard.yaml" in entrypoint


def test_container_guards_postfix_reloads_and_stops_cleanly(
    running: Running, postfix: Postfix
) -> None:
    podman, name = running.podman, running.name

    # Every process (supervisor and both workers) runs as the image's user.  A
    # worker still starting shows as "?" for a moment (seen under load): ask again.
    deadline = time.monotonic() + 15
    while True:
        users = podman.run("top", name, "huser", "args").stdout.splitlines()[1:]
        owners = [line.split()[0] for line in users]
        if len(users) >= 3 and "?" not in owners or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert len(users) >= 3, users
    assert all(owner in {UID, "smtpguard"} for owner in owners), users
    assert podman.run("exec", name, "id", "-u").stdout.strip() == UID

    assert podman.run("healthcheck", "run", name, check=False).returncode == 0

    # A message through the container reaches Postfix unchanged.
    rcpt = f"container-{uuid.uuid4().hex[:8]}@example.org"
    body = b"Subject: through the container\r\n\r\nline one\r\n.dot-stuffed line\r\n"
    with smtplib.SMTP("127.0.0.1", running.smtp_port, timeout=20) as client:
        client.ehlo("client.example")
        refused = client.sendmail("sender@example.org", [rcpt], body)
    assert refused == {}
    captured = postfix.wait_for_messages(1, where=lambda m: rcpt in m.recipients)
    assert body_matches(body, captured[0].data)

    # A command out of order is answered by smtpguard and counted.
    with socket.create_connection(("127.0.0.1", running.smtp_port), timeout=20) as raw:
        reader = raw.makefile("rb")
        assert reader.readline().startswith(b"220")
        raw.sendall(b"EHLO client.example\r\n")
        while not reader.readline().startswith(b"250 "):
            pass
        raw.sendall(b"RCPT TO:<a@example.org>\r\n")
        assert reader.readline().startswith(b"503 5.5.1")
        raw.sendall(b"QUIT\r\n")
        assert reader.readline().startswith(b"221")
    violation = 'smtpguard_sequence_violations_total{command="RCPT",state="ready"} 1.0'
    deadline = time.monotonic() + 10
    while violation not in (metrics := running.http("/metrics")):
        assert time.monotonic() < deadline, metrics
        time.sleep(0.2)

    # SIGHUP: the mounted config is read again (by both workers).
    podman.run("kill", "--signal", "HUP", name)
    deadline = time.monotonic() + 20
    while podman.logs(name).count("event=reloaded") < 2:
        assert time.monotonic() < deadline, podman.logs(name)
        time.sleep(0.2)

    # SIGTERM (the image's STOPSIGNAL): exit code 0, nothing but log lines on the way.
    podman.run("stop", "--time", "30", name)
    assert podman.inspect("container", name, "{{.State.ExitCode}}") == "0"
    logs = podman.logs(name)
    assert "Traceback" not in logs, logs
    assert "event=stopping" in logs, logs
