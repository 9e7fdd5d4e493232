"""``workers: N``: N processes share the listening sockets, one supervisor.

The supervisor binds the listening sockets and starts N copies of
``smtpguard serve`` (each its own trio loop) that inherit them and all
accept from them: the kernel hands each new connection to a worker waiting
in accept, so a busy worker takes fewer (with SO_REUSEPORT the kernel hashes
connections over per-worker queues: measured here, 20 sessions split 14/6 as
often as not, and the busier worker set the pace), and a worker that dies
loses no queued connection.  Their metrics go to prometheus-client's
multiprocess files in a private folder; the supervisor serves ``/metrics``
(summed over workers), ``/healthz`` and ``/readyz``.  A worker that dies is
restarted; SIGHUP is passed on (each worker reloads); SIGTERM is passed on
and the supervisor waits for the workers' graceful stop.

Per-client connection limits are per worker.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import sys
import tempfile

import trio
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest, multiprocess

from . import tlsctx
from .config import Address, Config, listener_specs
from .logs import fields

log = logging.getLogger("smtpguard")

#: Set in a worker's environment: its index.
WORKER_ENV = "SMTPGUARD_WORKER"
#: Set in a worker's environment: the supervisor's pid (see :func:`watch_supervisor`).
SUPERVISOR_ENV = "SMTPGUARD_SUPERVISOR_PID"
#: Set in a worker's environment: the listening sockets' descriptors, one per
#: configured listener, in order (made by the supervisor, inherited).
LISTEN_FDS_ENV = "SMTPGUARD_LISTEN_FDS"
#: Set in a worker's environment when it replaces one that died (it counts
#: itself in ``smtpguard_worker_restarts_total``).
RESTARTED_ENV = "SMTPGUARD_WORKER_RESTARTED"
#: Set in a worker's environment when the supervisor runs the embedded sink.
UPSTREAM_ENV = "SMTPGUARD_UPSTREAM"
RESTART_DELAY_SECONDS = 1.0


class AggregatedMetrics:
    """What ``serve_http`` needs: the exposition summed over every worker."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, path: str) -> None:
        self.registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(self.registry, path=path)  # type: ignore[no-untyped-call]

    def exposition(self) -> bytes:
        return bytes(generate_latest(self.registry))


def supervisor_alive() -> bool:
    """In a worker: is the supervisor that started us still our parent?"""
    expected = os.environ.get(SUPERVISOR_ENV)
    return expected is None or os.getppid() == int(expected)


async def watch_supervisor(period_seconds: float = 1.0) -> None:
    """In a worker: stop (as on SIGTERM, gracefully) once the supervisor is
    gone, however it went (a SIGKILL included), so no worker serves on alone.

    (Linux's PR_SET_PDEATHSIG would not do: trio starts processes from a
    worker thread, and the signal follows the thread, not the process.)
    """
    while supervisor_alive():
        await trio.sleep(period_seconds)
    log.warning("supervisor gone, stopping", extra=fields(worker=os.environ.get(WORKER_ENV)))
    os.kill(os.getpid(), signal.SIGTERM)


def bind_listener(address: Address) -> socket.socket:
    """A listening socket on ``address`` (plain socket module: the worker
    supervisor binds before any trio loop runs, and hands it to the workers)."""
    infos = socket.getaddrinfo(
        address.host, address.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    family, kind, proto, _, sockaddr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(sockaddr)
        sock.listen(4096)
    except BaseException:
        sock.close()
        raise
    return sock


async def supervise(config: Config, argv: list[str]) -> None:
    """Run ``config.workers`` worker processes until SIGTERM/SIGINT."""
    from .cli import _notify, _upstream_reachable
    from .metrics import serve_http
    from .sink import serve_sink

    # The supervisor binds (privileged ports included) and the workers
    # inherit the sockets: one accept queue per address, shared.
    sockets = []
    try:
        for spec in listener_specs(config):
            sockets.append(bind_listener(spec.address))
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    fds = [sock.fileno() for sock in sockets]
    folder = tempfile.mkdtemp(prefix="smtpguard-metrics-")
    env = {
        **os.environ,
        "PROMETHEUS_MULTIPROC_DIR": folder,
        SUPERVISOR_ENV: str(os.getpid()),
        LISTEN_FDS_ENV: ",".join(str(fd) for fd in fds),
        # One session-ticket key for every worker: a client resumes its TLS
        # session whichever worker accepts its next connection.
        tlsctx.TICKET_KEYS_ENV: tlsctx.ticket_keys().hex(),
    }
    env.pop("NOTIFY_SOCKET", None)  # only the supervisor talks to systemd
    procs: dict[int, trio.Process] = {}
    stopping = False
    # Signals are ours from the start: a SIGTERM while the workers start
    # stops them gracefully instead of killing the supervisor alone.
    signals_cm = trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    try:
        with signals_cm as signals:
            async with trio.open_nursery() as nursery:
                upstream = config.upstream
                if upstream is None:
                    host, port = await nursery.start(
                        serve_sink, config.sink_directory, "127.0.0.1", 0
                    )
                    upstream = Address(host, port)
                    env[UPSTREAM_ENV] = str(upstream)
                    print(
                        f"smtpguard: messages will be stored in {config.sink_directory}",
                        flush=True,
                    )

                async def worker(index: int) -> None:
                    restarted: dict[str, str] = {}
                    while not stopping:
                        proc = await trio.lowlevel.open_process(
                            [sys.executable, "-m", "smtpguard", *argv],
                            env={**env, **restarted, WORKER_ENV: str(index)},
                            pass_fds=fds,
                        )
                        procs[index] = proc
                        if stopping:  # the stop came while it started
                            proc.send_signal(signal.SIGTERM)
                        log.info("worker started", extra=fields(worker=index, pid=proc.pid))
                        code = await proc.wait()
                        multiprocess.mark_process_dead(proc.pid, folder)  # type: ignore[no-untyped-call]
                        if stopping:
                            return
                        log.error(
                            "worker died, restarting",
                            extra=fields(worker=index, pid=proc.pid, exit_code=code),
                        )
                        restarted = {RESTARTED_ENV: "1"}
                        await trio.sleep(RESTART_DELAY_SECONDS)

                for index in range(config.workers):
                    nursery.start_soon(worker, index)
                if config.metrics_listen is not None:
                    address = config.metrics_listen
                    reachable = upstream

                    async def ready() -> bool:
                        return bool(procs) and await _upstream_reachable(reachable)

                    port = await nursery.start(
                        serve_http, AggregatedMetrics(folder), address.host, address.port, ready
                    )
                    print(
                        f"smtpguard: metrics on http://{Address(address.host, port)}/metrics",
                        flush=True,
                    )
                # The sockets listen already: connections queue until a
                # worker takes them, so the service is ready now.
                listening = ", ".join(str(spec.address) for spec in listener_specs(config))
                print(f"smtpguard: {config.workers} workers listening on {listening}", flush=True)
                _notify(b"READY=1")
                async for signum in signals:
                    if signum != signal.SIGHUP:
                        stopping = True  # before signalling: no worker is restarted
                        # Our copies go now: once the workers close theirs,
                        # new connections are refused, not left queued.
                        for sock in sockets:
                            sock.close()
                    if signum == signal.SIGHUP:
                        _notify(b"RELOADING=1")
                    for proc in list(procs.values()):
                        if proc.returncode is None:
                            proc.send_signal(signal.SIGHUP if signum == signal.SIGHUP else signum)
                    if signum == signal.SIGHUP:
                        # Passed on: each worker reloads (or refuses a bad
                        # config and keeps its own), as a single process does.
                        _notify(b"READY=1")
                        continue
                    _notify(b"STOPPING=1")
                    log.info("stopping workers", extra=fields(workers=len(procs)))
                    with trio.move_on_after(config.shutdown_grace_seconds + 20):
                        for proc in list(procs.values()):
                            await proc.wait()
                    for proc in procs.values():
                        if proc.returncode is None:
                            proc.kill()
                    nursery.cancel_scope.cancel()
                    break
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        for sock in sockets:
            sock.close()
