"""``workers: 2``: processes share the port, metrics add up, a dead worker comes back."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import time

from guard import Guard, RawClient
from peers import Postfix


def session(port: int) -> None:
    with RawClient(port) as client:
        assert client.reply().startswith(b"220 ")
        client.send(b"EHLO c\r\nRCPT TO:<a@example.org>\r\nQUIT\r\n")
        replies = client.replies(3)
        assert replies[1] == b"503 5.5.1 Error: need MAIL before RCPT\r\n"


def wait_serving(guard: Guard, workers: set[str]) -> None:
    """Until each of ``workers`` logged that it is listening."""
    deadline = time.monotonic() + 15
    while {m for m in re.findall(r"event=listening .*worker=(\d+)", guard.log())} != workers:
        assert time.monotonic() < deadline, guard.log()
        time.sleep(0.1)


def wait_metric(guard: Guard, value: float, name: str, **labels: str) -> None:
    """Until the summed sample is ``value`` (workers count a session once they
    have closed it, a moment after the client read the 221)."""
    deadline = time.monotonic() + 10
    while guard.metric(name, **labels) != value:
        assert time.monotonic() < deadline, (name, labels, guard.metric(name, **labels))
        time.sleep(0.1)


def worker_pids(log: str) -> dict[str, int]:
    pids: dict[str, int] = {}
    for m in re.finditer(r'event="worker started" worker=(\d+) pid=(\d+)', log):
        pids[m.group(1)] = int(m.group(2))
    return pids


def test_workers_share_the_port_and_metrics_are_summed(postfix: Postfix) -> None:
    with Guard(f"{postfix.host}:{postfix.port}", workers=2) as guard:
        wait_serving(guard, {"0", "1"})
        before = guard.metric("smtpguard_sequence_violations_total", command="RCPT", state="ready")
        for _ in range(30):
            session(guard.port)
        wait_metric(guard, 30, "smtpguard_sessions_closed_total", reason="quit")
        served = {
            m.group(1)
            for m in re.finditer(r"event=disconnect .*reason=quit .*worker=(\d+)", guard.log())
        }
        assert served == {"0", "1"}  # the sessions went to both workers
        after = guard.metric("smtpguard_sequence_violations_total", command="RCPT", state="ready")
        assert after - before == 30  # one endpoint, summed over the workers
        assert guard.metric("smtpguard_sessions_open") == 0

        # A worker that dies is restarted, and service goes on meanwhile.
        old = worker_pids(guard.log())
        os.kill(old["0"], signal.SIGKILL)
        deadline = time.monotonic() + 15
        while worker_pids(guard.log()).get("0") == old["0"]:
            assert time.monotonic() < deadline, guard.log()
            # A connection queued on the dead worker's socket is lost with it
            # (reset); SMTP clients retry.
            with contextlib.suppress(ConnectionResetError):
                session(guard.port)
            time.sleep(0.1)
        time.sleep(1)  # the new worker binds its socket
        assert "worker died, restarting" in guard.log()
        for _ in range(10):
            session(guard.port)
        wait_metric(guard, 1, "smtpguard_worker_restarts_total")

        assert guard.proc is not None
        guard.proc.send_signal(signal.SIGTERM)
        assert guard.proc.wait(30) == 0
        for pid in worker_pids(guard.log()).values():
            deadline = time.monotonic() + 5
            while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not os.path.exists(f"/proc/{pid}") or _zombie(pid)


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True


def test_default_is_one_worker_per_core(postfix: Postfix) -> None:
    """No ``workers`` key: one worker per core this process may use, all serving."""
    want = len(os.sched_getaffinity(0))
    with Guard(f"{postfix.host}:{postfix.port}", workers=None) as guard:
        assert "workers" not in guard.config
        deadline = time.monotonic() + 15
        while len(worker_pids(guard.log())) < want:
            assert time.monotonic() < deadline, guard.log()
            time.sleep(0.1)
        time.sleep(0.5)
        pids = worker_pids(guard.log())
        assert sorted(pids) == [str(i) for i in range(want)]
        for pid in pids.values():
            assert os.path.exists(f"/proc/{pid}")
        for _ in range(5):
            session(guard.port)
        wait_metric(guard, 5, "smtpguard_sessions_closed_total", reason="quit")


def test_workers_stop_when_the_supervisor_is_killed(postfix: Postfix) -> None:
    """A supervisor killed with SIGKILL (no chance to pass anything on) leaves
    no worker serving on its own: each notices and stops gracefully."""
    with Guard(f"{postfix.host}:{postfix.port}", workers=2) as guard:
        wait_serving(guard, {"0", "1"})
        session(guard.port)
        pids = worker_pids(guard.log()).values()
        assert guard.proc is not None
        guard.proc.kill()
        guard.proc.wait(10)
        deadline = time.monotonic() + 15
        try:
            while any(os.path.exists(f"/proc/{pid}") and not _zombie(pid) for pid in pids):
                assert time.monotonic() < deadline, guard.log()
                time.sleep(0.1)
        finally:  # never leave a worker behind for the next tests
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        assert guard.log().count('event="supervisor gone, stopping"') == 2
        try:
            with RawClient(guard.port) as client:
                data = client.reply()
        except (OSError, AssertionError):  # refused, or closed at once
            data = b""
        assert not data.startswith(b"220"), "a worker still serves"
