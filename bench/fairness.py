#!/usr/bin/env python3
"""Does a flooding client slow the others down?  NOOP latency beside a flood.

One client streams a DATA body as fast as it can; another sends NOOPs one at
a time.  The NOOP round trips are timed with no flood, then during it:
straight to the upstream (the reference), then through smtpguard (one
process, ``workers: 1``, so both clients share its loop).  The upstream is
this script's own fair trio server (smtp-sink serves one busy connection at
the expense of the others, which would hide smtpguard's share).

    python3 bench/fairness.py          # prints p50/p99/max per case

Stdlib and trio only; loopback, free ports.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
PROBES = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def serve_upstream(port: int) -> None:
    """A fair SMTP upstream: every reply, and the body discarded in big reads."""
    import trio

    async def handle(stream: trio.SocketStream) -> None:
        await stream.send_all(b"220 fair ESMTP\r\n")
        buf, in_data = b"", False
        while chunk := await stream.receive_some(262144):
            buf += chunk
            while True:
                if in_data:
                    end = buf.find(b"\r\n.\r\n")
                    if end < 0:
                        buf = buf[-4:]
                        break
                    buf, in_data = buf[end + 5 :], False
                    await stream.send_all(b"250 2.0.0 ok\r\n")
                    continue
                end = buf.find(b"\r\n")
                if end < 0:
                    break
                line, buf = buf[:end], buf[end + 2 :]
                verb = line[:4].upper()
                if verb == b"EHLO":
                    await stream.send_all(b"250-fair\r\n250 PIPELINING\r\n")
                elif verb == b"DATA":
                    in_data = True
                    await stream.send_all(b"354 go ahead\r\n")
                elif verb == b"QUIT":
                    await stream.send_all(b"221 2.0.0 bye\r\n")
                    return
                else:
                    await stream.send_all(b"250 2.0.0 ok\r\n")

    trio.run(trio.serve_tcp, handle, port)


def wait_port(port: int) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex((HOST, port)) == 0:
                return
        time.sleep(0.05)
    raise SystemExit(f"nothing listens on {port}")


def session(port: int) -> tuple[socket.socket, object]:
    sock = socket.create_connection((HOST, port), timeout=30)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    reader = sock.makefile("rb")
    reader.readline()
    sock.sendall(b"EHLO bench.example\r\n")
    while not reader.readline().startswith(b"250 "):
        pass
    return sock, reader


def flood(port: int, stop: threading.Event, sent: list[int]) -> None:
    sock, reader = session(port)
    for command in (b"MAIL FROM:<a@bench.example>\r\n", b"RCPT TO:<b@bench.example>\r\n"):
        sock.sendall(command)
        reader.readline()  # type: ignore[attr-defined]
    sock.sendall(b"DATA\r\n")
    reader.readline()  # type: ignore[attr-defined]
    chunk = (b"x" * 998 + b"\r\n") * 256
    while not stop.is_set():
        sock.sendall(chunk)
        sent[0] += len(chunk)
    sock.sendall(b".\r\n")
    reader.readline()  # type: ignore[attr-defined]
    sock.close()


def noops(port: int) -> list[float]:
    sock, reader = session(port)
    times = []
    for _ in range(PROBES):
        started = time.perf_counter()
        sock.sendall(b"NOOP\r\n")
        if not reader.readline().startswith(b"250"):  # type: ignore[attr-defined]
            raise SystemExit("NOOP not answered with 250")
        times.append((time.perf_counter() - started) * 1000)
    sock.close()
    return sorted(times)


def measure(port: int) -> tuple[list[float], list[float], int]:
    idle = noops(port)
    stop, sent = threading.Event(), [0]
    flooder = threading.Thread(target=flood, args=(port, stop, sent))
    flooder.start()
    time.sleep(0.5)
    busy = noops(port)
    stop.set()
    flooder.join(60)
    return idle, busy, sent[0]


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--upstream":
        serve_upstream(int(sys.argv[2]))
        return 0
    up_port, guard_port = free_port(), free_port()
    procs = []
    tmp = Path(tempfile.mkdtemp(prefix="smtpguard-fairness-"))
    try:
        procs.append(
            subprocess.Popen(
                [sys.executable, __file__, "--upstream", str(up_port)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        wait_port(up_port)
        config = tmp / "smtpguard.yaml"
        config.write_text(
            f"listen: {HOST}:{guard_port}\nupstream: {HOST}:{up_port}\n"
            f"metrics:\n  listen: {HOST}:{free_port()}\nworkers: 1\n"
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "smtpguard", "serve", "--config", str(config)]
                + ["--log-level", "warning"],
                cwd=ROOT,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
                stdout=subprocess.DEVNULL,
            )
        )
        wait_port(guard_port)
        print(f"NOOP round trips in ms ({PROBES} each), alone and beside a flooding client:")
        print("| path | alone p50 | during flood p50 | p99 | max | flood MB |")
        print("|---|---|---|---|---|---|")
        for name, port in (("direct", up_port), ("smtpguard", guard_port)):
            idle, busy, sent = measure(port)
            print(
                f"| {name} | {idle[len(idle) // 2]:.2f} | {busy[len(busy) // 2]:.2f} "
                f"| {busy[int(len(busy) * 0.99)]:.2f} | {busy[-1]:.2f} | {sent / 1e6:.0f} |"
            )
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
