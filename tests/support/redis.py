"""A private redis-server (Debian's package) on a free loopback port, for the
tests of the shared store: start, stop (kill), pause (SIGSTOP: a store that
hangs), resume, and read its keys with redis-cli."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """``redis-server`` in a child process, no persistence."""

    def __init__(self, replica_of: int | None = None) -> None:
        """``replica_of``: the port of a primary on loopback to replicate."""
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        if not os.path.exists(binary):
            raise RuntimeError("redis-server is not installed (test.sh installs it)")
        self.binary = binary
        self.port = _free_port()
        self.dir = tempfile.mkdtemp(prefix="smtpguard-redis-")
        self.proc: subprocess.Popen[bytes] | None = None
        self.replica_of = replica_of

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10) -> RedisServer:
        self.proc = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self.dir,
                *(["--replicaof", "127.0.0.1", str(self.replica_of)] if self.replica_of else []),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while self.cli("PING") != "PONG":
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"redis-server did not start on port {self.port}")
            time.sleep(0.05)
        return self

    def kill(self) -> None:
        """Gone at once, as a crashed store is."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def pause(self) -> None:
        """Still accepting connections, answering nothing (a hung store)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def cli(self, *args: str) -> str:
        """A command through redis-cli; its output, stripped ("" on failure)."""
        done = subprocess.run(
            ["redis-cli", "-p", str(self.port), *args],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return done.stdout.strip() if done.returncode == 0 else ""

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.resume()
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


class Sentinel:
    """One Redis Sentinel (``redis-server --sentinel``) watching ``primary``
    as service ``name``; it fails over to a replica a second after the
    primary stops answering."""

    def __init__(self, primary: RedisServer, name: str = "smtpguard") -> None:
        self.name = name
        self.port = _free_port()
        self.dir = tempfile.mkdtemp(prefix="smtpguard-sentinel-")
        self.conf = os.path.join(self.dir, "sentinel.conf")
        with open(self.conf, "w") as conf:
            conf.write(
                f"port {self.port}\nbind 127.0.0.1\ndir {self.dir}\n"
                f"sentinel monitor {name} 127.0.0.1 {primary.port} 1\n"
                f"sentinel down-after-milliseconds {name} 1000\n"
                f"sentinel failover-timeout {name} 5000\n"
            )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10) -> Sentinel:
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        self.proc = subprocess.Popen(
            [binary, self.conf, "--sentinel"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while not self.primary_port():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"redis sentinel did not start on port {self.port}")
            time.sleep(0.05)
        return self

    def primary_port(self) -> int:
        """The primary's port as this sentinel sees it now (0: unknown)."""
        done = subprocess.run(
            ["redis-cli", "-p", str(self.port), "SENTINEL", "get-master-addr-by-name", self.name],
            capture_output=True,
            text=True,
            timeout=10,
        )
        lines = done.stdout.split()
        return int(lines[1]) if done.returncode == 0 and len(lines) == 2 else 0

    def __enter__(self) -> Sentinel:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)
