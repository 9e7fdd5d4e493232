"""Command line: ``smtpguard serve``, ``smtpguard check`` and ``smtpguard health``."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator

import trio

from . import __version__, logs
from .config import Address, Config, ConfigError, load, load_file, parse_address
from .logs import fields
from .metrics import Metrics
from .proxy import Proxy
from .service import notify, start_embedded_sink, start_metrics_endpoint, upstream_reachable
from .workers import (
    LISTEN_FDS_ENV,
    RESTARTED_ENV,
    UPSTREAM_ENV,
    WORKER_ENV,
    supervise,
    supervisor_alive,
    watch_supervisor,
)

log = logging.getLogger("smtpguard")

#: How often a worker writes its batched counters to its metrics file.
WORKER_FLUSH_SECONDS = 0.25

EXIT_CONFIG = 2
EXIT_RUNTIME = 1


def _load(path: str | None) -> Config:
    return load_file(path) if path else load({})


async def serve(config: Config, path: str | None = None) -> None:
    """Run smtpguard until SIGINT/SIGTERM; SIGHUP reloads ``path``.

    In a worker (``workers: N``) the listening sockets are the supervisor's,
    shared with the other workers, and the supervisor serves the metrics.
    """
    worker = os.environ.get(WORKER_ENV)
    metrics = Metrics()
    metrics.config_loaded(True)
    if worker is not None and os.environ.get(RESTARTED_ENV):
        metrics.worker_restarts.inc()
    # Signals are ours from the start (a SIGTERM while starting is a clean stop).
    signals_cm = trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    try:
        with signals_cm as signals:
            await _serve(config, path, worker, metrics, signals)
    finally:
        metrics.flush()  # a worker's last increments reach its metrics file


async def _upstream(config: Config, nursery: trio.Nursery) -> Address:
    """The configured upstream, the supervisor's embedded sink, or one of our own."""
    if config.upstream is not None:
        return config.upstream
    if os.environ.get(UPSTREAM_ENV):
        return parse_address(UPSTREAM_ENV, os.environ[UPSTREAM_ENV])
    return await start_embedded_sink(nursery, config)


async def _serve(
    config: Config,
    path: str | None,
    worker: str | None,
    metrics: Metrics,
    signals: AsyncIterator[int],
) -> None:
    async with trio.open_nursery() as nursery:
        upstream = await _upstream(config, nursery)
        if worker is not None:
            nursery.start_soon(metrics.flush_every, WORKER_FLUSH_SECONDS)
            nursery.start_soon(watch_supervisor)
        fds = [int(fd) for fd in os.environ.get(LISTEN_FDS_ENV, "").split(",") if fd]
        proxy = Proxy(config, metrics, upstream, listen_fds=fds if worker is not None else ())
        listeners = await nursery.start(proxy.serve)
        for listener in listeners:
            host, port = listener.socket.getsockname()[:2]
            shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            print(f"smtpguard: listening on {shown}, relaying to {upstream}", flush=True)
        if config.metrics_listen is not None and worker is None:
            await start_metrics_endpoint(
                nursery, metrics, config.metrics_listen, lambda: upstream_reachable(upstream)
            )
        notify(b"READY=1")
        async for signum in signals:
            if signum == signal.SIGHUP:
                _reload(proxy, metrics, config, path)
                continue
            log.info(
                "stopping",
                extra=fields(
                    signal=signal.Signals(signum).name,
                    grace_seconds=config.shutdown_grace_seconds,
                ),
            )
            notify(b"STOPPING=1")
            with trio.move_on_after(config.shutdown_grace_seconds + 15):
                await proxy.stop(config.shutdown_grace_seconds)
            nursery.cancel_scope.cancel()
            break


def _reload(proxy: Proxy, metrics: Metrics, old: Config, path: str | None) -> None:
    """SIGHUP: load the config file again; a bad one is refused and the old one stays."""
    if path is None:
        log.warning("reload ignored", extra=fields(reason="no --config file"))
        return
    try:
        new = load_file(path)
    except ConfigError as exc:
        metrics.config_loaded(False)
        log.error("reload refused", extra=fields(key=exc.key, problem=exc.problem))
        return
    if new.listen != old.listen or new.metrics_listen != old.metrics_listen:
        log.warning("reload: listen addresses change only on restart")
    notify(b"RELOADING=1")
    proxy.reload(new)
    metrics.config_loaded(True)
    notify(b"READY=1")
    log.info("reloaded", extra=fields(path=path))


def health(config: Config, path: str, timeout: float = 4) -> int:
    """``smtpguard health``: GET ``path`` from the metrics listener the config names (a
    wildcard address is asked on loopback); 0 when it answers 200. For container health
    checks and exec probes: it follows the config, wherever its metrics port is."""
    address = config.metrics_listen
    if address is None:
        print("smtpguard: health: no metrics listener (metrics.enabled is false)", file=sys.stderr)
        return EXIT_CONFIG
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(address.host, address.host)
    request = f"GET {path} HTTP/1.0\r\nHost: smtpguard\r\n\r\n".encode()
    try:
        with socket.create_connection((host, address.port), timeout=timeout) as conn:
            conn.sendall(request)
            answer = b""
            while chunk := conn.recv(4096):
                answer += chunk
    except OSError as exc:
        print(f"smtpguard: health: {Address(host, address.port)}{path}: {exc}", file=sys.stderr)
        return EXIT_RUNTIME
    status, _, rest = answer.partition(b"\r\n")
    body = rest.partition(b"\r\n\r\n")[2].decode(errors="replace").strip()
    print(f"smtpguard: health: {path}: {status.decode(errors='replace')} {body}".rstrip())
    return 0 if status.split(b" ")[1:2] == [b"200"] else EXIT_RUNTIME


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="smtpguard", description=__doc__)
    parser.add_argument("--version", action="version", version=f"smtpguard {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p_serve = sub.add_parser("serve", help="run the proxy")
    p_serve.add_argument(
        "--config", help="YAML config file (default: built-in quick-start settings)"
    )
    p_serve.add_argument("--log-level", help="debug, info, warning or error (overrides log.level)")
    p_check = sub.add_parser("check", help="validate a config file and exit")
    p_check.add_argument("--config", required=True, help="YAML config file")
    p_health = sub.add_parser(
        "health",
        help="ask the running smtpguard's metrics listener (from the config) whether it is up",
    )
    p_health.add_argument("--config", help="YAML config file (default: built-in settings)")
    p_health.add_argument(
        "--ready", action="store_true", help="ask /readyz (ready for new sessions), not /healthz"
    )
    return parser


def _check(config: Config) -> int:
    """``smtpguard check``: the config loaded, so say what it runs."""
    upstream = config.upstream or "embedded sink"
    listen = ", ".join(str(a) for a in config.listen)
    print(f"smtpguard: config OK (listen {listen}; upstream {upstream})")
    return 0


def _run(config: Config, args: argparse.Namespace, argv: list[str] | None) -> int:
    """``smtpguard serve``: one process, a worker, or the supervisor of workers."""
    level = (args.log_level or config.log_level).lower()
    if level not in ("debug", "info", "warning", "error"):
        print(f"smtpguard: --log-level: unknown level {args.log_level!r}", file=sys.stderr)
        return EXIT_CONFIG
    worker = os.environ.get(WORKER_ENV)
    if worker is not None and not supervisor_alive():
        print("smtpguard: worker: the supervisor is gone, exiting", file=sys.stderr)
        return EXIT_RUNTIME
    logs.setup(level, config.log_format, worker=worker)
    try:
        if config.workers > 1 and worker is None:
            trio.run(supervise, config, list(argv if argv is not None else sys.argv[1:]))
        else:
            trio.run(serve, config, args.config)
    except OSError as exc:
        print(f"smtpguard: cannot start: {exc}", file=sys.stderr)
        return EXIT_RUNTIME
    except KeyboardInterrupt:
        pass
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        config = _load(args.config)
    except ConfigError as exc:
        print(f"smtpguard: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if args.command == "check":
        return _check(config)
    if args.command == "health":
        return health(config, "/readyz" if args.ready else "/healthz")
    return _run(config, args, argv)


if __name__ == "__main__":
    sys.exit(main())
