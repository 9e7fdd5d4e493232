#!/usr/bin/env python3
"""Benchmark smtpguard against a plain TCP relay (HAProxy ``mode tcp``).

Both relays forward to the same Postfix ``smtp-sink``; Postfix's ``smtp-source``
generates the load.  For every scenario the two paths are run alternately
(paired runs), and the result is the median of the per-pair time ratios
smtpguard / HAProxy: 1.0 means "as fast as HAProxy", lower is better.

Stdlib only.  Run from the repository root::

    python3 bench/run.py            # full run (5 pairs per scenario)
    python3 bench/run.py --quick    # 2 pairs, smaller counts

Results (Markdown and raw JSON) go to ``bench/results/``.  See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import re
import resource
import selectors
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
SMTP_SINK = "/usr/sbin/smtp-sink"
SMTP_SOURCE = "/usr/sbin/smtp-source"
HOST = "127.0.0.1"

# Upper bounds for every wait, in seconds.
START_TIMEOUT = 20.0
RUN_TIMEOUT = 300.0
COUNTER_TIMEOUT = 15.0
STOP_TIMEOUT = 5.0
IDLE_TIMEOUT = 60.0


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    sessions: int
    messages: int
    body_bytes: int
    keep_connection: bool

    @property
    def expected_sessions(self) -> int:
        return min(self.sessions, self.messages) if self.keep_connection else self.messages


def scenarios(quick: bool) -> list[Scenario]:
    if quick:
        return [
            Scenario("small-parallel", "20 sessions, 1 KiB, -d", 20, 1000, 1024, True),
            Scenario("large", "1 session, 10 MiB, -d", 1, 4, 10 * 1024 * 1024, True),
            Scenario("churn", "10 sessions, 1 KiB, 1 msg/conn", 10, 300, 1024, False),
            Scenario("small-serial", "1 session, 1 KiB, -d", 1, 300, 1024, True),
        ]
    return [
        Scenario("small-parallel", "20 sessions, 1 KiB, -d", 20, 5000, 1024, True),
        Scenario("large", "1 session, 10 MiB, -d", 1, 20, 10 * 1024 * 1024, True),
        Scenario("churn", "10 sessions, 1 KiB, 1 msg/conn", 10, 1000, 1024, False),
        Scenario("small-serial", "1 session, 1 KiB, -d", 1, 1000, 1024, True),
    ]


#: The optional third path (--trio-relay): bench/trio_relay.py.
TRIO_RELAY = "trio-relay"


class BenchError(Exception):
    """A failed precondition or a failed run: the benchmark stops."""


# --------------------------------------------------------------------------- processes


class Children:
    """Every child process we start; :meth:`stop_all` ends each of them by pid."""

    def __init__(self) -> None:
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, argv: list[str], out: Path, err: Path) -> subprocess.Popen[bytes]:
        with out.open("wb") as stdout, err.open("wb") as stderr:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=stderr,
                cwd=ROOT,
                start_new_session=True,  # Ctrl-C reaches us only; we stop them in order
            )
        self.procs[name] = proc
        return proc

    def check_alive(self, name: str) -> None:
        proc = self.procs[name]
        if proc.poll() is not None:
            raise BenchError(f"{name} (pid {proc.pid}) exited with status {proc.returncode}")

    def stop(self, name: str) -> int | None:
        proc = self.procs.pop(name, None)
        if proc is None:
            return None
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait(STOP_TIMEOUT)
        return proc.returncode

    def stop_all(self) -> None:
        for name in list(self.procs):
            with contextlib.suppress(Exception):
                self.stop(name)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, children: Children, name: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        children.check_alive(name)
        with socket.socket() as s:
            s.settimeout(1.0)
            if s.connect_ex((HOST, port)) == 0:
                return
        time.sleep(0.05)
    raise BenchError(f"{name} did not listen on {HOST}:{port} within {START_TIMEOUT:g}s")


def wait_for_text(path: Path, text: str, children: Children, name: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        children.check_alive(name)
        if text in path.read_text(errors="replace"):
            return
        time.sleep(0.05)
    raise BenchError(f"{name} did not print {text!r} within {START_TIMEOUT:g}s")


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (smtpguard with ``workers`` is a supervisor
    and one process per worker)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rpartition(")")[2].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(children.get(p, ()))
    return tree


def _status_one(pid: int) -> dict[str, int]:
    values: dict[str, int] = {}
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return values  # gone
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key.startswith("Vm") and rest.strip().endswith("kB"):
            values[key] = int(rest.split()[0])
    return values


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM etc. in KiB, summed over ``pid`` and its descendants."""
    total: dict[str, int] = {}
    for p in process_tree(pid):
        for key, value in _status_one(p).items():
            total[key] = total.get(key, 0) + value
    return total


def _cpu_one(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    # After "pid (comm)": state is field 3, utime field 14, stime field 15.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time ``pid`` and its descendants have used so far."""
    return sum(_cpu_one(p) for p in process_tree(pid))


def tool_version(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return (out.stdout or out.stderr).strip().splitlines()[0] if (out.stdout or out.stderr) else ""


# --------------------------------------------------------------------------- the sink


class Sink:
    """``smtp-sink -c``: its counters are a stream of ``sess=N quit=N mesg=N\\r``."""

    COUNTERS = re.compile(rb"sess=(\d+) quit=(\d+) mesg=(\d+)")

    def __init__(self, counter_file: Path) -> None:
        self.counter_file = counter_file

    def counters(self) -> tuple[int, int, int]:
        data = self.counter_file.read_bytes()
        tail = data[-200:]
        matches = self.COUNTERS.findall(tail)
        if not matches:
            return (0, 0, 0)
        sess, quit_, mesg = matches[-1]
        return int(sess), int(quit_), int(mesg)

    def wait_for(self, sessions: int, messages: int) -> tuple[int, int, int]:
        """Poll until ``sess >= sessions`` and ``mesg >= messages`` (bounded).

        A session is counted when it ends, which can be a moment after
        smtp-source has exited.  Returns the last counters seen.
        """
        deadline = time.monotonic() + COUNTER_TIMEOUT
        counters = self.counters()
        while (counters[0] < sessions or counters[2] < messages) and time.monotonic() < deadline:
            time.sleep(0.02)
            counters = self.counters()
        return counters


# --------------------------------------------------------------------------- runs


@dataclass
class Run:
    scenario: str
    path: str
    pair: int
    seconds: float
    exit_status: int
    sink_messages: int
    sink_sessions: int
    ok: bool
    sessions_ok: bool
    relay_cpu_s: float = 0.0
    stderr: str = ""


@dataclass
class ScenarioResult:
    scenario: Scenario
    runs: list[Run] = field(default_factory=list)

    def times(self, path: str) -> list[float]:
        return [r.seconds for r in self.runs if r.path == path]

    def ratios(self, path: str = "smtpguard") -> list[float]:
        """Per pair: ``path``'s time / HAProxy's."""
        by_pair: dict[int, dict[str, float]] = {}
        for r in self.runs:
            by_pair.setdefault(r.pair, {})[r.path] = r.seconds
        return [
            p[path] / p["haproxy"]
            for _, p in sorted(by_pair.items())
            if path in p and "haproxy" in p and p["haproxy"] > 0
        ]

    def complete(self) -> bool:
        return bool(self.ratios()) and all(r.ok for r in self.runs)

    def summary(self) -> dict[str, Any]:
        sc = self.scenario
        out: dict[str, Any] = {"scenario": sc.name, "pairs": len(self.ratios())}
        for path in ("haproxy", "smtpguard"):
            times = self.times(path)
            med = statistics.median(times)
            out[path] = {
                "median_s": med,
                "median_cpu_s": statistics.median(
                    r.relay_cpu_s for r in self.runs if r.path == path
                ),
                "min_s": min(times),
                "max_s": max(times),
                "msgs_per_s": sc.messages / med,
                "mb_per_s": sc.messages * sc.body_bytes / med / 1e6,
            }
        ratios = self.ratios()
        out["ratio_median"] = statistics.median(ratios)
        out["ratio_min"] = min(ratios)
        out["ratio_max"] = max(ratios)
        relay = self.ratios(TRIO_RELAY)
        if relay:
            out["trio_relay_ratio_median"] = statistics.median(relay)
            out["trio_relay_cpu_s"] = statistics.median(
                r.relay_cpu_s for r in self.runs if r.path == TRIO_RELAY
            )
        return out


def source_argv(sc: Scenario, port: int) -> list[str]:
    argv = [SMTP_SOURCE, "-s", str(sc.sessions), "-m", str(sc.messages), "-l", str(sc.body_bytes)]
    if sc.keep_connection:
        argv.append("-d")
    argv += ["-M", "bench.example", "-f", "sender@bench.example", "-t", "rcpt@bench.example"]
    return argv + [f"{HOST}:{port}"]


def run_source(
    sc: Scenario, port: int, path: str, pair: int, sink: Sink, children: Children, relay_pid: int
) -> Run:
    """One timed smtp-source run through the relay listening on ``port``."""
    before = sink.counters()
    cpu_before = cpu_seconds(relay_pid)
    started = time.perf_counter()
    proc = subprocess.Popen(
        source_argv(sc, port),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    children.procs["smtp-source"] = proc
    try:
        _, err = proc.communicate(timeout=RUN_TIMEOUT)
        seconds = time.perf_counter() - started
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate(timeout=STOP_TIMEOUT)
        seconds = float("inf")
    except BaseException:  # Ctrl-C, SIGTERM: do not leave it running or unreaped
        proc.kill()
        proc.wait(STOP_TIMEOUT)
        raise
    finally:
        children.procs.pop("smtp-source", None)
    relay_cpu = cpu_seconds(relay_pid) - cpu_before
    after = sink.wait_for(before[0] + sc.expected_sessions, before[2] + sc.messages)
    messages = after[2] - before[2]
    sessions = after[0] - before[0]
    ok = proc.returncode == 0 and messages == sc.messages and seconds != float("inf")
    return Run(
        scenario=sc.name,
        path=path,
        pair=pair,
        seconds=seconds,
        exit_status=proc.returncode,
        sink_messages=messages,
        sink_sessions=sessions,
        ok=ok,
        sessions_ok=sessions == sc.expected_sessions,
        relay_cpu_s=relay_cpu,
        stderr=err.decode(errors="replace")[-2000:],
    )


# --------------------------------------------------------------------------- command latency

#: Commands per latency run: one session, each sent after the last reply.
LATENCY_COMMANDS = 2000


def command_latency(port: int, commands: int) -> list[float]:
    """Round-trip times (microseconds) of ``commands`` commands sent one at a
    time in one session (after the greeting and EHLO): a transaction's
    commands in turn (MAIL, RCPT, RSET), which the relay forwards and the
    sink answers.  Raises BenchError on any unexpected reply."""
    script = (b"MAIL FROM:<s@bench.example>\r\n", b"RCPT TO:<r@bench.example>\r\n", b"RSET\r\n")
    times: list[float] = []
    with socket.create_connection((HOST, port), timeout=10) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        reader = sock.makefile("rb")

        def reply() -> bytes:
            while True:
                line = reader.readline()
                if not line.startswith((b"2", b"3")) or len(line) < 4:
                    raise BenchError(f"latency run: unexpected reply {line!r}")
                if line[3:4] != b"-":
                    return line

        reply()
        sock.sendall(b"EHLO bench.example\r\n")
        reply()
        for i in range(commands):
            command = script[i % len(script)]
            started = time.perf_counter_ns()
            sock.sendall(command)
            reply()
            times.append((time.perf_counter_ns() - started) / 1000)
        sock.sendall(b"QUIT\r\n")
        reply()
    return times


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# --------------------------------------------------------------------------- idle connections


def idle_connections(port: int, pid: int, count: int) -> dict[str, Any]:
    """Open ``count`` idle SMTP connections, wait for every greeting, measure RSS growth."""
    time.sleep(0.5)
    base = proc_status(pid).get("VmRSS", 0)
    socks: list[socket.socket] = []
    greeted = 0
    sel = selectors.DefaultSelector()
    try:
        deadline = time.monotonic() + IDLE_TIMEOUT
        for _ in range(count):
            if time.monotonic() > deadline:
                break
            s = socket.socket()
            s.settimeout(5.0)
            try:
                s.connect((HOST, port))
            except OSError:
                s.close()
                break
            s.setblocking(False)
            socks.append(s)
            sel.register(s, selectors.EVENT_READ, bytearray())
        pending = len(socks)
        while pending and time.monotonic() < deadline:
            for key, _ in sel.select(timeout=1.0):
                buf: bytearray = key.data
                try:
                    chunk = key.fileobj.recv(4096)  # type: ignore[union-attr]
                except BlockingIOError:
                    continue
                except OSError:
                    chunk = b""
                buf += chunk
                if not chunk or b"\r\n" in buf:
                    sel.unregister(key.fileobj)
                    pending -= 1
                    if chunk and buf.startswith(b"220"):
                        greeted += 1
        time.sleep(1.0)
        loaded = proc_status(pid)
    finally:
        sel.close()
        for s in socks:
            s.close()
    time.sleep(2.0)
    closed = proc_status(pid)
    delta_kib = loaded.get("VmRSS", 0) - base
    return {
        "requested": count,
        "opened": len(socks),
        "greeted": greeted,
        "rss_before_kib": base,
        "rss_loaded_kib": loaded.get("VmRSS", 0),
        "hwm_kib": loaded.get("VmHWM", 0),
        "rss_after_close_kib": closed.get("VmRSS", 0),
        "kib_per_connection": delta_kib / greeted if greeted else None,
    }


# --------------------------------------------------------------------------- setup


def haproxy_maxconn() -> int:
    """As many connections as HAProxy's descriptor limit allows (two each)."""
    return max(100, (resource.getrlimit(resource.RLIMIT_NOFILE)[0] - 400) // 2)


def raise_fd_limit() -> int:
    """Soft limit up to the hard one; as root, both up to 65536 if lower (one
    smtpguard process holds two descriptors per idle connection: 10,000 idle
    connections need more than 20,000)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 65536 and os.geteuid() == 0:
        with contextlib.suppress(OSError, ValueError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (65536, 65536))
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 65536
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


HAPROXY_CFG = """\
global
    maxconn {maxconn}

defaults
    mode tcp
    timeout connect 5s
    timeout client 300s
    timeout server 300s

frontend bench
    bind {host}:{port}
    default_backend sink

backend sink
    server sink {host}:{sink_port}
"""

WORKERS: int | None = None  # smtpguard's `workers:` (--workers; None: its default)

SMTPGUARD_CFG = """\
listen: {host}:{port}
upstream: {host}:{sink_port}
metrics:
  listen: {host}:{metrics_port}
limits:
  # Every bench client comes from one loopback address: lift the per-client
  # cap (50 by default, like Postfix) for the idle-connection test.
  max_connections: 100000
  max_connections_per_client: 100000
{workers}{store}"""

#: --config: appended to smtpguard's config.
EXTRA_CFG = ""

#: With --redis: the shared store, and limits high enough never to refuse a
#: bench client but present, so that every check of the store runs (the
#: connect script, an upstream slot, message and recipient counts).
STORE_CFG = """\
store:
  redis: redis://{host}:{redis_port}/0
rates:
  connections_per_minute: 10000000
  messages_per_minute: 10000000
  recipients_per_minute: 10000000
upstream_limits:
  max_sessions: 100000
"""


@dataclass
class Setup:
    tmp: Path
    sink: Sink
    sink_port: int
    haproxy_port: int
    smtpguard_port: int
    metrics_port: int
    smtpguard_pid: int
    haproxy_pid: int


def start_redis(children: Children, tmp: Path) -> tuple[int, int]:
    """A private redis-server (no persistence): its port and pid."""
    if shutil.which("redis-server") is None:
        raise BenchError("redis-server not found (apt-get install redis-server)")
    port = free_port()
    argv = ["redis-server", "--port", str(port), "--bind", HOST, "--save", "", "--appendonly"]
    redis = children.start("redis", [*argv, "no"], tmp / "redis.out", tmp / "redis.err")
    wait_for_port(port, children, "redis")
    return port, redis.pid


def start_all(children: Children, tmp: Path, idle: int, redis_port: int | None = None) -> Setup:
    for tool in (SMTP_SINK, SMTP_SOURCE):
        if not os.access(tool, os.X_OK):
            raise BenchError(f"{tool} not found (install postfix)")
    if shutil.which("haproxy") is None:
        raise BenchError("haproxy not found on PATH")
    sink_port, haproxy_port, smtpguard_port, metrics_port = (free_port() for _ in range(4))

    # -a -C -F: no AUTH/XCLIENT/XFORWARD, like an ordinary MTA facing strangers.
    # -m: room for the idle-connection test; -t: do not drop idle sessions early.
    sink_argv = [SMTP_SINK, "-c", "-a", "-C", "-F", "-m", str(max(512, idle + 256)), "-t", "300"]
    if os.geteuid() == 0:
        sink_argv += ["-u", "nobody"]
    sink_argv += [f"{HOST}:{sink_port}", "4096"]
    children.start("smtp-sink", sink_argv, tmp / "sink.counters", tmp / "sink.stderr")
    wait_for_port(sink_port, children, "smtp-sink")

    cfg = tmp / "haproxy.cfg"
    cfg.write_text(
        HAPROXY_CFG.format(
            host=HOST, port=haproxy_port, sink_port=sink_port, maxconn=haproxy_maxconn()
        ),
    )
    haproxy = children.start(
        "haproxy", ["haproxy", "-f", str(cfg), "-db"], tmp / "haproxy.out", tmp / "haproxy.err"
    )
    wait_for_port(haproxy_port, children, "haproxy")

    cfg = tmp / "smtpguard.yaml"
    cfg.write_text(
        SMTPGUARD_CFG.format(
            host=HOST,
            port=smtpguard_port,
            sink_port=sink_port,
            metrics_port=metrics_port,
            workers="" if WORKERS is None else f"workers: {WORKERS}\n",
            store="" if redis_port is None else STORE_CFG.format(host=HOST, redis_port=redis_port),
        )
        + EXTRA_CFG
    )
    guard = children.start(
        "smtpguard",
        [
            sys.executable,
            "-m",
            "smtpguard",
            "serve",
            "--config",
            str(cfg),
            "--log-level",
            "WARNING",
        ],
        tmp / "smtpguard.out",
        tmp / "smtpguard.err",
    )
    wait_for_text(tmp / "smtpguard.out", "smtpguard: listening on", children, "smtpguard")
    # The probe connection to HAProxy reached smtp-sink: let that session end
    # (and be counted) before the warm-up counts sessions.
    Sink(tmp / "sink.counters").wait_for(1, 0)
    return Setup(
        tmp=tmp,
        sink=Sink(tmp / "sink.counters"),
        sink_port=sink_port,
        haproxy_port=haproxy_port,
        smtpguard_port=smtpguard_port,
        metrics_port=metrics_port,
        smtpguard_pid=guard.pid,
        haproxy_pid=haproxy.pid,
    )


def scrape_metrics(port: int) -> dict[str, float]:
    """Non-zero smtpguard_* samples (no histograms) from the metrics endpoint."""
    try:
        with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
    except OSError:
        return {}
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith("smtpguard_") or "_bucket" in line or "_created" in line:
            continue
        name, _, value = line.rpartition(" ")
        with contextlib.suppress(ValueError):
            if float(value) != 0:
                samples[name] = float(value)
    return samples


# --------------------------------------------------------------------------- report


def latency_summary(latency: dict[str, list[list[float]]]) -> dict[str, Any] | None:
    """Medians over the runs of each run's p50 and p99, per path, and the
    paired ratios (smtpguard / haproxy) of p50 and p99."""
    runs_h, runs_g = latency.get("haproxy", []), latency.get("smtpguard", [])
    pairs = list(zip(runs_h, runs_g, strict=False))  # a run cut short: fewer
    if not pairs:
        return None
    out: dict[str, Any] = {"pairs": len(pairs), "commands": len(pairs[0][0])}
    for q, name in ((0.5, "p50"), (0.99, "p99")):
        hs = [percentile(h, q) for h, _ in pairs]
        gs = [percentile(g, q) for _, g in pairs]
        out[name] = {
            "haproxy_us": statistics.median(hs),
            "smtpguard_us": statistics.median(gs),
            "added_us": statistics.median(g - h for h, g in zip(hs, gs, strict=True)),
            "ratio": statistics.median(g / h for h, g in zip(hs, gs, strict=True) if h > 0),
        }
    return out


def markdown(results: list[ScenarioResult], extra: dict[str, Any]) -> str:
    lines = (
        []
        if not results
        else [
            "| scenario | pairs | haproxy median s | smtpguard median s | ratio sg/hap (min-max) "
            "| haproxy msg/s, MB/s | smtpguard msg/s, MB/s | relay CPU s haproxy / smtpguard |",
            "|---|---|---|---|---|---|---|---|",
        ]
    )
    for res in results:
        sc = res.scenario
        if not res.complete():
            lines.append(f"| {sc.name} | incomplete: failed runs, see below | | | | | | |")
            continue
        s = res.summary()
        h, g = s["haproxy"], s["smtpguard"]
        label = f"{sc.name} ({sc.description}, {sc.messages} msgs)"
        lines.append(
            f"| {label} | {s['pairs']} | {h['median_s']:.3f} | {g['median_s']:.3f} "
            f"| **{s['ratio_median']:.2f}** ({s['ratio_min']:.2f}-{s['ratio_max']:.2f}) "
            f"| {h['msgs_per_s']:.0f}, {h['mb_per_s']:.1f} "
            f"| {g['msgs_per_s']:.0f}, {g['mb_per_s']:.1f} "
            f"| {h['median_cpu_s']:.2f} / {g['median_cpu_s']:.2f} |"
        )
    relay = [
        (res.scenario.name, res.summary())
        for res in results
        if res.complete() and res.ratios(TRIO_RELAY)
    ]
    if relay:
        lines += [
            "",
            "For scale, bench/trio_relay.py (a trio relay that parses nothing, same pairs, "
            f"{guard_processes()} process(es) sharing the listening socket like smtpguard's "
            "workers): "
            + "; ".join(
                f"{name} **{s['trio_relay_ratio_median']:.2f}** (CPU {s['trio_relay_cpu_s']:.2f} s)"
                for name, s in relay
            )
            + ".",
        ]
    lat = extra.get("latency")
    if lat:
        lines += [
            "",
            f"Added latency per command (one session, {lat['commands']} commands sent one at "
            f"a time: MAIL, RCPT, RSET in turn; {lat['pairs']} pairs; medians over the runs):",
            "",
            "| percentile | haproxy us | smtpguard us | added us | ratio sg/hap |",
            "|---|---|---|---|---|",
        ]
        for name in ("p50", "p99"):
            q = lat[name]
            lines.append(
                f"| {name} | {q['haproxy_us']:.0f} | {q['smtpguard_us']:.0f} "
                f"| {q['added_us']:.0f} | **{q['ratio']:.2f}** |"
            )
    mem = extra["memory"]
    lines.append("")
    lines.append(
        f"smtpguard memory: VmRSS at start {mem['start_rss_kib'] / 1024:.1f} MiB, "
        f"after the runs {mem['after_rss_kib'] / 1024:.1f} MiB, "
        f"peak (VmHWM) {mem['after_hwm_kib'] / 1024:.1f} MiB."
    )
    for path in ("smtpguard", "haproxy"):
        idle = extra.get("idle", {}).get(path)
        if not idle:
            continue
        per = idle["kib_per_connection"]
        per_text = f"{per:.1f} KiB" if per is not None else "n/a"
        lines.append(
            f"{path} idle connections: {idle['greeted']}/{idle['requested']} greeted, "
            f"VmRSS {idle['rss_before_kib'] / 1024:.1f} -> {idle['rss_loaded_kib'] / 1024:.1f}"
            f" MiB ({idle['rss_after_close_kib'] / 1024:.1f} MiB 2 s after closing them), "
            f"{per_text} per idle client connection (incl. its upstream connection)."
        )
    lines.append("")
    lines.append(
        "ratio = median over pairs of (smtpguard time / haproxy time); 1.0 = as fast as "
        "HAProxy, lower is better. MB = 10^6 bytes of message body. Relay CPU = median "
        "user+system CPU seconds the relay used during a run, summed over its processes "
        "(each smtpguard worker is one Python thread: CPU close to workers x wall time "
        "means it is CPU-bound)."
    )
    return "\n".join(lines) + "\n"


def checks_text(
    results: list[ScenarioResult],
    failures: list[Run],
    warnings: list[str],
    aborted: str,
    sent: dict[str, int],
    sink_total: int,
) -> str:
    runs = sum(len(r.runs) for r in results)
    total = sum(sent.values())
    lines = ["", "Checks:", ""]
    lines.append(
        f"- timed runs: {runs}, failed: {len(failures)} "
        "(a run fails unless smtp-source exits 0 and smtp-sink counts every message)"
    )
    lines.append(
        "- messages sent: "
        + " + ".join(f"{n} via {path}" for path, n in sent.items())
        + f" = {total}; smtp-sink counted {sink_total} "
        f"({'all arrived' if sink_total == total else 'MISMATCH'})"
    )
    for run in failures:
        lines.append(
            f"- FAILED: {run.scenario} pair {run.pair} via {run.path}: exit {run.exit_status}, "
            f"{run.sink_messages} messages arrived, {run.seconds:.3f}s; "
            f"smtp-source stderr: {run.stderr.strip()[-300:]!r}"
        )
    lines += [f"- warning: {w}" for w in warnings]
    if aborted:
        lines.append(f"- ABORTED: {aborted}")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- main


def guard_processes() -> int:
    """smtpguard's worker processes (its default: one per usable core); the
    trio relay runs as many."""
    return WORKERS if WORKERS is not None else len(os.sched_getaffinity(0))


def bench(args: argparse.Namespace, children: Children, tmp: Path) -> int:
    fd_limit = raise_fd_limit()
    # A relay process holds two descriptors per idle connection; smtpguard's
    # connections are spread over its workers, HAProxy's are all in one.
    per_process = max(0, (fd_limit - 200) // 2)
    guard_procs = guard_processes()
    idle_counts = {
        "smtpguard": min(
            args.idle,
            per_process * guard_procs * 9 // 10 if guard_procs > 1 else per_process,
            fd_limit - 500,
        ),
        "haproxy": min(args.idle, haproxy_maxconn() - 100),
    }
    idle_count = max(idle_counts.values())
    redis_port: int | None = None
    redis_pid: int | None = None
    redis_cpu_start = 0.0
    if args.redis:
        redis_port, redis_pid = start_redis(children, tmp)
        redis_cpu_start = cpu_seconds(redis_pid)
    setup = start_all(children, tmp, idle_count, redis_port)
    sink = setup.sink
    ports = {"haproxy": setup.haproxy_port, "smtpguard": setup.smtpguard_port}
    pids = {"haproxy": setup.haproxy_pid, "smtpguard": setup.smtpguard_pid}
    if args.trio_relay:
        port = free_port()
        relay = children.start(
            TRIO_RELAY,
            [
                sys.executable,
                str(ROOT / "bench" / "trio_relay.py"),
                str(port),
                str(setup.sink_port),
                str(guard_procs),
            ],
            tmp / "trio-relay.out",
            tmp / "trio-relay.err",
        )
        wait_for_text(tmp / "trio-relay.out", "listening on", children, TRIO_RELAY)
        ports[TRIO_RELAY], pids[TRIO_RELAY] = port, relay.pid
    start_status = proc_status(setup.smtpguard_pid)
    print(
        f"smtp-sink :{setup.sink_port}  haproxy :{setup.haproxy_port}  "
        f"smtpguard :{setup.smtpguard_port} (pid {setup.smtpguard_pid})  fd limit {fd_limit}",
        flush=True,
    )

    results: list[ScenarioResult] = []
    failures: list[Run] = []
    warnings: list[str] = []
    sent = dict.fromkeys(ports, 0)
    aborted = ""
    latency: dict[str, list[list[float]]] = {}  # per path: each run's round trips (us)

    def one_run(sc: Scenario, path: str, pair: int) -> Run:
        run = run_source(sc, ports[path], path, pair, sink, children, pids[path])
        sent[path] += sc.messages
        status = "ok" if run.ok else "FAILED"
        print(
            f"  {sc.name:15} pair {pair} {path:9} {run.seconds:8.3f}s "
            f"exit={run.exit_status} sink +{run.sink_messages}/{sc.messages} msgs "
            f"+{run.sink_sessions}/{sc.expected_sessions} sess {status}",
            flush=True,
        )
        if not run.ok:
            failures.append(run)
            print(f"    smtp-source stderr: {run.stderr.strip()[-500:]}", flush=True)
        if not run.sessions_ok:
            warnings.append(
                f"{sc.name} pair {pair} via {path}: smtp-sink counted {run.sink_sessions} "
                f"sessions, expected {sc.expected_sessions}"
            )
        for name in ("smtp-sink", *ports):
            children.check_alive(name)
        return run

    try:
        # Warm-up: one untimed small run on each path.
        warm = Scenario("warmup", "", 5, 100, 1024, True)
        for path in ports:
            one_run(warm, path, 0)  # (the trio relay too, if it runs)
        if failures:
            raise BenchError("warm-up failed")
        for sc in scenarios(args.quick):
            if args.only and sc.name not in args.only:
                continue
            res = ScenarioResult(sc)
            results.append(res)
            for pair in range(args.repeats):
                order = ["haproxy", "smtpguard"] if pair % 2 == 0 else ["smtpguard", "haproxy"]
                if TRIO_RELAY in ports:
                    order.append(TRIO_RELAY)
                for path in order:
                    res.runs.append(one_run(sc, path, pair))
            if failures:
                raise BenchError(f"{sc.name}: failed run(s); the ratios would be meaningless")
        if not args.only or "latency" in args.only:
            commands = LATENCY_COMMANDS // 4 if args.quick else LATENCY_COMMANDS
            for pair in range(args.repeats):
                order = ["haproxy", "smtpguard"] if pair % 2 == 0 else ["smtpguard", "haproxy"]
                for path in order:
                    times = command_latency(ports[path], commands)
                    latency.setdefault(path, []).append(times)
                    print(
                        f"  latency         pair {pair} {path:9} "
                        f"p50 {percentile(times, 0.5):7.0f} us  "
                        f"p99 {percentile(times, 0.99):7.0f} us  ({commands} commands)",
                        flush=True,
                    )
    except BenchError as exc:
        aborted = str(exc)
        print(f"bench: stopping early: {aborted}", flush=True)

    after_status = proc_status(setup.smtpguard_pid)
    extra: dict[str, Any] = {
        "latency": latency_summary(latency),
        "memory": {
            "start_rss_kib": start_status.get("VmRSS", 0),
            "after_rss_kib": after_status.get("VmRSS", 0),
            "after_hwm_kib": after_status.get("VmHWM", 0),
        },
    }

    if idle_count and not aborted:
        extra["idle"] = {}
        try:
            for path in ("smtpguard", "haproxy"):
                sink_sessions = sink.counters()[0]
                idle = idle_connections(ports[path], pids[path], idle_counts[path])
                extra["idle"][path] = idle
                # Every upstream connection must end once its client has gone.
                ended = sink.wait_for(sink_sessions + idle["greeted"], 0)[0] - sink_sessions
                idle["upstream_sessions_ended"] = ended
                print(
                    f"  idle {path}: {idle['greeted']}/{idle['requested']} greeted, "
                    f"{idle['kib_per_connection']} KiB/conn, {ended} upstream sessions ended",
                    flush=True,
                )
                if idle["greeted"] != idle["requested"] or ended != idle["greeted"]:
                    warnings.append(
                        f"idle test via {path}: {idle['opened']} opened, {idle['greeted']} "
                        f"greeted, {ended} upstream sessions ended after closing"
                    )
                children.check_alive(path)
            open_now = scrape_metrics(setup.metrics_port).get("smtpguard_sessions_open", 0.0)
            extra["idle"]["smtpguard_sessions_open_after"] = open_now
            if open_now:
                warnings.append(f"smtpguard_sessions_open = {open_now:g} after the idle test")
            # Still serving after the idle connections were dropped?
            check = one_run(Scenario("post-idle", "", 2, 20, 1024, True), "smtpguard", 0)
            extra["post_idle_check_ok"] = check.ok
            extra["smtpguard_status_after_idle"] = proc_status(setup.smtpguard_pid)
        except BenchError as exc:
            aborted = f"during/after the idle test: {exc}"

    metrics = scrape_metrics(setup.metrics_port)
    accepted = metrics.get('smtpguard_messages_total{outcome="accepted"}')
    if accepted != sent["smtpguard"]:
        warnings.append(
            f"smtpguard_messages_total{{outcome=accepted}} is {accepted}, "
            f"but {sent['smtpguard']} messages were sent through smtpguard"
        )
    unexpected = ("_sequence_violations", "_upstream_connect_failures", "_local_replies")
    for name, value in metrics.items():
        expected_close = 'reason="quit"' in name or 'reason="client_closed"' in name
        if name.startswith(tuple("smtpguard" + u for u in unexpected)) or (
            "reason=" in name and not expected_close
        ):
            warnings.append(f"smtpguard metric {name} = {value:g}")

    if redis_pid is not None:
        # Redis's own CPU over the whole run (every path's messages; only
        # smtpguard's touch it).
        extra["redis_cpu_seconds"] = round(cpu_seconds(redis_pid) - redis_cpu_start, 3)
        extra["redis_cpu_us_per_smtpguard_message"] = round(
            extra["redis_cpu_seconds"] * 1e6 / max(1, sent["smtpguard"]), 1
        )
    extra["smtpguard_metrics"] = metrics
    extra["messages_sent"] = sent
    extra["warnings"] = warnings
    extra["aborted"] = aborted
    extra["sink_counters_final"] = dict(zip(("sess", "quit", "mesg"), sink.counters(), strict=True))
    guard_err = (tmp / "smtpguard.err").read_text(errors="replace")
    extra["smtpguard_stderr_tail"] = guard_err[-4000:]

    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    mode = "quick" if args.quick else "full"
    store_text = "none"
    if args.redis:
        per_message = extra["redis_cpu_us_per_smtpguard_message"]
        store_text = f"Redis ({per_message} us of Redis CPU per smtpguard message)"
    header = (
        f"# smtpguard vs HAProxy (mode tcp) -> smtp-sink, {mode} run {stamp}\n\n"
        f"{platform.node()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"{tool_version(['haproxy', '-v'])}\n\n"
        f"smtpguard workers: {WORKERS if WORKERS is not None else 'default (one per core)'}; "
        f"shared store: {store_text}; extra config: {args.config or 'none'}; "
        f"its CPU and memory are summed over its processes (supervisor and workers).\n\n"
    )
    table = markdown(results, extra)
    table += checks_text(results, failures, warnings, aborted, sent, sink.counters()[2])
    if guard_err.strip():
        table += "\nsmtpguard wrote to stderr (tail):\n\n```\n" + guard_err[-1500:] + "\n```\n"
    print()
    print(header + table)

    RESULTS.mkdir(parents=True, exist_ok=True)
    md_path = RESULTS / f"bench-{mode}-{stamp}.md"
    json_path = RESULTS / f"bench-{mode}-{stamp}.json"
    md_path.write_text(header + table)
    raw = {
        "mode": mode,
        "stamp": stamp,
        "repeats": args.repeats,
        "smtpguard_workers": WORKERS,
        "host": {"node": platform.node(), "cpus": os.cpu_count(), "fd_limit": fd_limit},
        "versions": {
            "python": platform.python_version(),
            "haproxy": tool_version(["haproxy", "-v"]),
        },
        "scenarios": [
            {
                "definition": asdict(r.scenario),
                "summary": r.summary() if r.complete() else None,
                "runs": [asdict(run) for run in r.runs],
            }
            for r in results
        ],
        "failures": [asdict(f) for f in failures],
        **extra,
    }
    json_path.write_text(json.dumps(raw, indent=2, default=str) + "\n")
    print(f"written: {md_path.relative_to(ROOT)}, {json_path.relative_to(ROOT)}")
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 pairs, smaller message counts")
    parser.add_argument("--repeats", type=int, help="pairs per scenario (default 5, quick 2)")
    parser.add_argument(
        "--idle", type=int, help="idle connections for the memory test, 0 = skip (default 2000)"
    )
    parser.add_argument(
        "--only",
        action="append",
        help="run only this scenario (repeatable; 'latency': the per-command latency runs)",
    )
    parser.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (logs)")
    parser.add_argument(
        "--trio-relay",
        action="store_true",
        help="also run bench/trio_relay.py (a trio relay that parses nothing) in every pair",
    )
    parser.add_argument(
        "--config",
        metavar="YAML",
        default="",
        help="more smtpguard config, e.g. 'policy: {syntax: observe}' (top-level keys "
        "other than listen, upstream, metrics, limits, workers, store)",
    )
    parser.add_argument(
        "--redis",
        action="store_true",
        help="give smtpguard a shared store (a private redis-server) and limits that use it",
    )
    parser.add_argument(
        "--workers",
        type=int,
        help="smtpguard worker processes (default: smtpguard's own, one per core)",
    )
    args = parser.parse_args(argv)
    if args.repeats is None:
        args.repeats = 2 if args.quick else 5
    global WORKERS, EXTRA_CFG
    WORKERS = args.workers
    EXTRA_CFG = args.config + "\n" if args.config else ""
    if args.idle is None:
        args.idle = 500 if args.quick else 10000
    if not 1 <= args.repeats <= 50:
        parser.error("--repeats must be 1-50")
    if not 0 <= args.idle <= 10000:
        parser.error("--idle must be 0-10000")

    # SIGTERM/SIGHUP behave like Ctrl-C so the finally block below always runs.
    def interrupt(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupt)

    children = Children()
    tmp = Path(tempfile.mkdtemp(prefix="smtpguard-bench-"))
    try:
        return bench(args, children, tmp)
    except BenchError as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        err = tmp / "smtpguard.err"
        if err.exists() and err.read_text(errors="replace").strip():
            print("smtpguard stderr (tail):", file=sys.stderr)
            print(err.read_text(errors="replace")[-3000:], file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 130
    finally:
        children.stop_all()
        if args.keep_tmp:
            print(f"temp dir kept: {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
