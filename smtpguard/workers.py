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
from .service import notify, start_embedded_sink, start_metrics_endpoint, upstream_reachable

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


def _bind_all(config: Config) -> list[socket.socket]:
    """The listening sockets, one per configured listener (all or none)."""
    sockets: list[socket.socket] = []
    try:
        for spec in listener_specs(config):
            sockets.append(bind_listener(spec.address))
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


class _Workers:
    """The worker processes: started, restarted when they die, signalled."""

    def __init__(self, argv: list[str], env: dict[str, str], fds: list[int], folder: str) -> None:
        self.argv = argv
        self.env = env
        self.fds = fds
        self.folder = folder
        self.procs: dict[int, trio.Process] = {}
        self.stopping = False

    async def keep(self, index: int) -> None:
        """Run worker ``index``, and again after each death, until stopping."""
        restarted: dict[str, str] = {}
        while not self.stopping:
            proc = await trio.lowlevel.open_process(
                [sys.executable, "-m", "smtpguard", *self.argv],
                env={**self.env, **restarted, WORKER_ENV: str(index)},
                pass_fds=self.fds,
            )
            self.procs[index] = proc
            if self.stopping:  # the stop came while it started
                proc.send_signal(signal.SIGTERM)
            log.info("worker started", extra=fields(worker=index, pid=proc.pid))
            code = await proc.wait()
            multiprocess.mark_process_dead(proc.pid, self.folder)  # type: ignore[no-untyped-call]
            if self.stopping:
                return
            log.error(
                "worker died, restarting",
                extra=fields(worker=index, pid=proc.pid, exit_code=code),
            )
            restarted = {RESTARTED_ENV: "1"}
            await trio.sleep(RESTART_DELAY_SECONDS)

    def send(self, signum: int) -> None:
        """Pass ``signum`` on to every worker still running."""
        for proc in list(self.procs.values()):
            if proc.returncode is None:
                proc.send_signal(signum)

    async def stop(self, grace_seconds: float) -> None:
        """Wait up to ``grace_seconds`` for the workers to stop, then kill the rest."""
        log.info("stopping workers", extra=fields(workers=len(self.procs)))
        with trio.move_on_after(grace_seconds):
            for proc in list(self.procs.values()):
                await proc.wait()
        for proc in self.procs.values():
            if proc.returncode is None:
                proc.kill()


def _worker_env(folder: str, fds: list[int]) -> dict[str, str]:
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
    return env


async def supervise(config: Config, argv: list[str]) -> None:
    """Run ``config.workers`` worker processes until SIGTERM/SIGINT."""
    # The supervisor binds (privileged ports included) and the workers
    # inherit the sockets: one accept queue per address, shared.
    sockets = _bind_all(config)
    fds = [sock.fileno() for sock in sockets]
    folder = tempfile.mkdtemp(prefix="smtpguard-metrics-")
    workers = _Workers(argv, _worker_env(folder, fds), fds, folder)
    # Signals are ours from the start: a SIGTERM while the workers start
    # stops them gracefully instead of killing the supervisor alone.
    signals_cm = trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    try:
        with signals_cm as signals:
            async with trio.open_nursery() as nursery:
                upstream = config.upstream
                if upstream is None:
                    upstream = await start_embedded_sink(nursery, config)
                    workers.env[UPSTREAM_ENV] = str(upstream)
                for index in range(config.workers):
                    nursery.start_soon(workers.keep, index)
                if config.metrics_listen is not None:
                    reachable = upstream

                    async def ready() -> bool:
                        return bool(workers.procs) and await upstream_reachable(reachable)

                    await start_metrics_endpoint(
                        nursery, AggregatedMetrics(folder), config.metrics_listen, ready
                    )
                # The sockets listen already: connections queue until a
                # worker takes them, so the service is ready now.
                listening = ", ".join(str(spec.address) for spec in listener_specs(config))
                print(f"smtpguard: {config.workers} workers listening on {listening}", flush=True)
                notify(b"READY=1")
                async for signum in signals:
                    if signum == signal.SIGHUP:
                        # Passed on: each worker reloads (or refuses a bad
                        # config and keeps its own), as a single process does.
                        notify(b"RELOADING=1")
                        workers.send(signal.SIGHUP)
                        notify(b"READY=1")
                        continue
                    workers.stopping = True  # before signalling: no worker is restarted
                    # Our copies go now: once the workers close theirs,
                    # new connections are refused, not left queued.
                    for sock in sockets:
                        sock.close()
                    workers.send(signum)
                    notify(b"STOPPING=1")
                    await workers.stop(config.shutdown_grace_seconds + 20)
                    nursery.cancel_scope.cancel()
                    break
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        for sock in sockets:
            sock.close()
