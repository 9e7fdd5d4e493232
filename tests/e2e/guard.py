"""Run the real smtpguard (``python -m smtpguard serve``) as a subprocess for e2e tests."""

from __future__ import annotations

import os
import pathlib
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from typing import Any

import yaml
from peers import free_port


class Guard:
    """smtpguard in a child process, on free loopback ports."""

    def __init__(self, upstream: str | None, **extra: Any) -> None:
        """``extra``: config keys.  ``workers`` is 1 unless given (one process,
        as most tests assume: per-client limits, one log); ``workers=None``
        leaves it out, so the default (one per core) applies.
        ``upstream_connect`` is ``on_accept`` unless given."""
        self.dir = pathlib.Path(tempfile.mkdtemp(prefix="smtpguard-e2e-"))
        self.port = free_port()
        self.metrics_port = free_port()
        self.config: dict[str, Any] = {
            "hostname": "guard.test",
            "listen": f"127.0.0.1:{self.port}",
            "metrics": {"listen": f"127.0.0.1:{self.metrics_port}"},
            "sink": {"directory": str(self.dir / "mail")},
            "workers": 1,
            # The upstream's own greeting is relayed at once (most tests read
            # it); deferred connect, the default, is tested on its own and by
            # the conformance runs.
            "upstream_connect": "on_accept",
            **extra,
        }
        if self.config["workers"] is None:
            del self.config["workers"]
        if upstream is not None:
            self.config["upstream"] = upstream
        self.config_path = self.dir / "smtpguard.yaml"
        self.config_path.write_text(yaml.safe_dump(self.config))
        self.log_path = self.dir / "smtpguard.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 15) -> Guard:
        log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "smtpguard", "serve", "--config", str(self.config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.dir,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"smtpguard exited: {self.log()}")
            try:
                # One process opens its metrics port after its listeners; with
                # workers the supervisor's comes first: then wait for the
                # workers' SMTP port too.
                ports = [self.metrics_port]
                if self.config.get("workers") != 1:
                    ports.append(self.port)
                for port in ports:
                    with socket.create_connection(("127.0.0.1", port), timeout=1):
                        pass
                return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"smtpguard did not start: {self.log()}")

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode

    def __enter__(self) -> Guard:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def metrics(self) -> str:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            return str(response.read().decode())

    def metric(self, name: str, **labels: str) -> float:
        """One sample's value from a live scrape (0 if absent)."""
        wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        key = f"{name}{{{wanted}}}" if labels else name
        for line in self.metrics().splitlines():
            if line.startswith("#"):
                continue
            series, _, value = line.rpartition(" ")
            if _normalise(series) == key:
                return float(value)
        return 0.0


def _normalise(series: str) -> str:
    if "{" not in series:
        return series
    name, _, rest = series.partition("{")
    labels = sorted(p for p in rest.rstrip("}").split(",") if p)
    return f"{name}{{{','.join(labels)}}}"


class RawClient:
    """A raw SMTP client that can send anything, in any order."""

    def __init__(self, port: int, host: str = "127.0.0.1", source: str | None = None) -> None:
        """``source``: the local address to connect from (any 127.x)."""
        bind = (source, 0) if source is not None else None
        self.sock = socket.create_connection((host, port), timeout=15, source_address=bind)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def replies(self, n: int) -> list[bytes]:
        """Read ``n`` complete replies (multi-line joined)."""
        out: list[bytes] = []
        current = b""
        while len(out) < n:
            while b"\r\n" not in self.buf:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise AssertionError(f"connection closed after {out!r} + {current!r}")
                self.buf += chunk
            line, self.buf = self.buf.split(b"\r\n", 1)
            current += line + b"\r\n"
            if line[3:4] != b"-":
                out.append(current)
                current = b""
        return out

    def reply(self) -> bytes:
        return self.replies(1)[0]

    def read_to_eof(self) -> bytes:
        data = self.buf
        self.buf = b""
        while chunk := self.sock.recv(65536):
            data += chunk
        return data

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
