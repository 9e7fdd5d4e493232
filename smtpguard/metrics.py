"""Prometheus metrics: a small facade over prometheus-client, and /metrics over trio.

The facade is created on a registry that is passed in, so tests use a fresh
one.  Labels come from closed sets only (the verb enum, the phase enum,
reply codes, fixed reasons); known combinations are created at start so
their series exist at 0.
"""

from __future__ import annotations

import bisect
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Protocol

import trio
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from . import __version__
from .edges import HANDSHAKE_FAILURES
from .protocol.events import (
    CloseReason,
    Event,
    Forwarded,
    LocalReply,
    MessageDone,
    MessageOutcome,
    PolicyAction,
    UpstreamReplied,
    Violation,
)
from .protocol.policy import ALLOWED, LIMIT_ACTIONS, Defence
from .protocol.rules import CLIENT_VERBS, Phase, Verb

#: Codes smtpguard can answer with on its own.
LOCAL_CODES = (
    "214",
    "220",
    "221",
    "250",
    "421",
    "450",
    "452",
    "500",
    "501",
    "502",
    "503",
    "521",
    "538",
    "550",
    "552",
    "554",
)
#: Why a session ended (see ``Session.close_reason``).
CLOSE_REASONS = tuple(CloseReason)
CONNECT_FAILURES = ("refused", "timeout", "unreachable", "error")
MESSAGE_OUTCOMES = tuple(MessageOutcome)


class Metrics:
    """Every counter smtpguard exports, behind methods named for decisions."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        # Per-command counters (commands forwarded, replies, bytes) are added
        # up here and passed to prometheus-client in batches: its inc() takes
        # a lock (and in a worker writes a shared file), which costs more
        # than the rest of relaying a command.  The batch is flushed before
        # every collection (this collector is registered first, so it runs
        # first: a scrape never misses an increment), and by
        # :meth:`flush_every` in workers (their files are read by the
        # supervisor, not collected here).
        self._pending: dict[Any, float] = {}
        r.register(_FlushFirst(self))
        self.build_info = Gauge(
            "smtpguard_build_info",
            "smtpguard version",
            ["version"],
            registry=r,
            multiprocess_mode="max",
        )
        self.build_info.labels(__version__).set(1)
        self.violations = Counter(
            "smtpguard_sequence_violations",
            "Client commands out of sequence, answered locally and never forwarded",
            ["command", "state"],
            registry=r,
        )
        self.local_replies = Counter(
            "smtpguard_local_replies",
            "Replies smtpguard sent itself, by reply code",
            ["code"],
            registry=r,
        )
        self.sessions_opened = Counter(
            "smtpguard_sessions_opened", "Client sessions accepted", registry=r
        )
        # multiprocess_mode only matters with workers (summed by the supervisor).
        self.sessions_open = Gauge(
            "smtpguard_sessions_open",
            "Client sessions open now",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.sessions_closed = Counter(
            "smtpguard_sessions_closed", "Client sessions ended, by reason", ["reason"], registry=r
        )
        # Upstream admission (upstream_limits): slots per address, the line.
        self.upstream_sessions_held = Gauge(
            "smtpguard_upstream_sessions",
            "Upstream sessions held now under upstream_limits.max_sessions",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.upstream_session_cap = Gauge(
            "smtpguard_upstream_session_cap",
            "Upstream sessions allowed per upstream address (the workers' shares summed)",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.upstream_queue_depth = Gauge(
            "smtpguard_upstream_queue_depth",
            "Clients waiting in line for an upstream slot",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.upstream_queue_wait = Histogram(
            "smtpguard_upstream_queue_wait_seconds",
            "Time a client waited for an upstream slot",
            buckets=(0.001, 0.01, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=r,
        )
        self.rate_refusals = Counter(
            "smtpguard_connection_rate_refusals",
            "Connections refused 421 for going over rates.connections_per_minute",
            registry=r,
        )
        self.rate_refusals_commands = Counter(
            "smtpguard_client_rate_refusals",
            "MAIL and RCPT commands answered 450 4.7.1 for going over a per-client rate",
            ["kind"],
            registry=r,
        )
        for kind in ("message", "recipient"):
            self.rate_refusals_commands.labels(kind)
        self.penalty_entries = Counter(
            "smtpguard_penalty_box_entries",
            "Clients put in the penalty box (penalty_box.violations reached)",
            registry=r,
        )
        self.penalty_refusals = Counter(
            "smtpguard_penalty_box_refusals",
            "Connections refused at connect because the client is in the penalty box",
            registry=r,
        )
        self.upstream_busy_refusals = Counter(
            "smtpguard_upstream_busy",
            "Clients refused 421 4.3.2 because no upstream slot came free in time",
            registry=r,
        )
        self.forwarded = Counter(
            "smtpguard_commands_forwarded",
            "Commands relayed to the upstream, by verb",
            ["command"],
            registry=r,
        )
        self.upstream_replies = Counter(
            "smtpguard_upstream_replies",
            "Replies from the upstream, by the verb they answer and reply class",
            ["command", "class"],
            registry=r,
        )
        self.upstream_latency = Histogram(
            "smtpguard_upstream_reply_seconds",
            "Time from forwarding a command to the upstream's reply",
            ["command"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )
        self.connect_failures = Counter(
            "smtpguard_upstream_connect_failures",
            "Failed connections to the upstream, by reason",
            ["reason"],
            registry=r,
        )
        self.messages = Counter(
            "smtpguard_messages", "Messages relayed, by outcome", ["outcome"], registry=r
        )
        self.message_size = Histogram(
            "smtpguard_message_size_bytes",
            "Size of message content relayed",
            buckets=(1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864),
            registry=r,
        )
        self.bytes = Counter(
            "smtpguard_bytes", "Bytes relayed, by direction", ["direction"], registry=r
        )
        self.help = Counter(
            "smtpguard_help_requests", "HELP commands, by handling", ["handling"], registry=r
        )
        self.policy_actions = Counter(
            "smtpguard_policy_actions",
            "Protection policy decisions, by defence and the action taken",
            ["defence", "action"],
            registry=r,
        )
        for defence in Defence:
            for action in ALLOWED.get(defence, LIMIT_ACTIONS):
                self.policy_actions.labels(defence.value, action)
        self.upstream_up = Gauge(
            "smtpguard_upstream_up",
            "1 if the last connection to this upstream (by its index in the config) worked,"
            " 0 if it failed; no series until it is tried",
            ["upstream"],
            registry=r,
            multiprocess_mode="livemin",
        )
        self.tls_sessions = Counter(
            "smtpguard_tls_sessions",
            "Client sessions that negotiated TLS (STARTTLS or implicit), by protocol",
            ["protocol"],
            registry=r,
        )
        for protocol in ("TLSv1.2", "TLSv1.3"):
            self.tls_sessions.labels(protocol)
        self.tls_handshake_failures = Counter(
            "smtpguard_tls_handshake_failures",
            "TLS handshakes with clients that failed, by listener kind and reason",
            ["listener", "reason"],
            registry=r,
        )
        for listener in ("starttls", "implicit"):
            for reason in HANDSHAKE_FAILURES:
                self.tls_handshake_failures.labels(listener, reason)
        self.upstream_tls = Counter(
            "smtpguard_upstream_tls",
            "STARTTLS from smtpguard to the upstream, by result",
            ["result"],
            registry=r,
        )
        for result in ("established", "plaintext", "failed", "none"):
            self.upstream_tls.labels(result)
        self.auth_results = Counter(
            "smtpguard_auth_results",
            "AUTH exchanges relayed, by the upstream's verdict",
            ["result"],
            registry=r,
        )
        for result in ("success", "failure"):
            self.auth_results.labels(result)
        self.reload_success = Gauge(
            "smtpguard_config_last_reload_successful",
            "1 if the last configuration load succeeded, 0 if it was refused",
            registry=r,
            multiprocess_mode="livemin",
        )
        self.reload_time = Gauge(
            "smtpguard_config_last_reload_success_timestamp_seconds",
            "When the configuration in use was loaded",
            registry=r,
            multiprocess_mode="livemax",
        )
        # Counted by the worker the supervisor started in a dead one's place
        # (``workers: N``); summed over workers, dead ones included.
        self.worker_restarts = Counter(
            "smtpguard_worker_restarts",
            "Worker processes started again after one died (workers: N)",
            registry=r,
        )
        for verb in CLIENT_VERBS:
            self.forwarded.labels(verb.value)
            for phase in Phase:
                self.violations.labels(verb.value, phase.value)
        for code in LOCAL_CODES:
            self.local_replies.labels(code)
        for reason in CLOSE_REASONS:
            self.sessions_closed.labels(reason)
        for reason in CONNECT_FAILURES:
            self.connect_failures.labels(reason)
        for outcome in MESSAGE_OUTCOMES:
            self.messages.labels(outcome)
        for direction in ("client_to_upstream", "upstream_to_client"):
            self.bytes.labels(direction)
        for handling in ("local", "forwarded"):
            self.help.labels(handling)
        # Label look-ups cost more than the increments: keep the children.
        # ``BDAT n LAST`` is counted as BDAT: the label set is the client
        # verbs plus DATA_END and AUTH_RESPONSE (the greeting is not sent).
        self._forwarded: dict[Verb, Any] = {
            v: self.forwarded.labels(v.value)
            for v in Verb
            if v is not Verb.BDAT_LAST and v is not Verb.GREETING
        }
        self._forwarded[Verb.BDAT_LAST] = self._forwarded[Verb.BDAT]
        self._latency = {v: _Batch.of(self.upstream_latency.labels(v.value)) for v in Verb}
        self._batches: list[_Batch] = []  # histograms with observations to flush
        self._bytes = {
            d: self.bytes.labels(d) for d in ("client_to_upstream", "upstream_to_client")
        }
        self._replies: dict[tuple[Verb, int], Any] = {}
        # Keyed by the reason's string (a CloseReason is one: same hash).
        self._closed: dict[str, Any] = {
            reason.value: self.sessions_closed.labels(reason) for reason in CLOSE_REASONS
        }

    def config_loaded(self, ok: bool) -> None:
        """Record a configuration (re)load: at start, and on every SIGHUP."""
        self.reload_success.set(1 if ok else 0)
        if ok:
            self.reload_time.set_to_current_time()

    def tls_session(self, protocol: str) -> None:
        self.tls_sessions.labels(protocol).inc()

    def tls_handshake_failed(self, listener: str, reason: str) -> None:
        """``listener``: "starttls" or "implicit"; ``reason``: see HANDSHAKE_FAILURES."""
        self.tls_handshake_failures.labels(listener, reason).inc()

    def session_opened(self) -> None:
        self.sessions_opened.inc()
        self.sessions_open.inc()

    def upstream_cap(self, slots: int) -> None:
        self.upstream_session_cap.set(slots)

    def upstream_queue(self, delta: int) -> None:
        self.upstream_queue_depth.inc(delta)

    def upstream_waited(self, seconds: float) -> None:
        self.upstream_queue_wait.observe(seconds)

    def upstream_sessions(self, delta: int) -> None:
        self.upstream_sessions_held.inc(delta)

    def upstream_busy(self) -> None:
        self.upstream_busy_refusals.inc()

    def session_closed(self, reason: str) -> None:
        self.sessions_open.dec()
        child = self._closed.get(reason) or self._closed[CloseReason.INTERNAL_ERROR]
        child.inc()

    def connect_failed(self, reason: str) -> None:
        self.connect_failures.labels(reason).inc()

    def flush(self) -> None:
        """Pass the batched increments and observations on to prometheus-client."""
        pending = self._pending
        if pending:
            self._pending = {}
            for child, amount in pending.items():
                child.inc(amount)
        batches = self._batches
        if batches:
            self._batches = []
            for batch in batches:
                batch.flush()

    async def flush_every(self, seconds: float) -> None:
        """Flush periodically (workers: the supervisor reads their files)."""
        try:
            while True:
                await trio.sleep(seconds)
                self.flush()
        finally:
            self.flush()

    def relayed_bytes(self, direction: str, n: int) -> None:
        child = self._bytes[direction]
        pending = self._pending
        pending[child] = pending.get(child, 0) + n

    def reply_latency(self, step: Verb, seconds: float) -> None:
        batch = self._latency[step]
        if batch.add(seconds):
            self._batches.append(batch)

    def observe(self, events: Iterable[Event]) -> None:
        """Count what the core decided (children cached: this runs per command)."""
        pending = self._pending
        for event in events:
            if type(event) is Forwarded:
                fwd = self._forwarded.get(event.step)
                if fwd is not None:
                    pending[fwd] = pending.get(fwd, 0) + 1
                if event.step is Verb.HELP:
                    self.help.labels("forwarded").inc()
            elif type(event) is UpstreamReplied:
                key = (event.step, event.code // 100)
                child = self._replies.get(key)
                if child is None:
                    child = self._replies[key] = self.upstream_replies.labels(
                        event.step.value, f"{event.code // 100}xx"
                    )
                pending[child] = pending.get(child, 0) + 1
                if event.step in (Verb.AUTH, Verb.AUTH_RESPONSE) and event.code != 334:
                    self.auth_results.labels("success" if event.code < 400 else "failure").inc()
            elif type(event) is LocalReply:
                self.local_replies.labels(str(event.code)).inc()
                if event.code == 214:
                    self.help.labels("local").inc()
            elif type(event) is Violation:
                self.violations.labels(event.verb.value, event.phase.value).inc()
            elif type(event) is MessageDone:
                self.messages.labels(event.outcome).inc()
                self.message_size.observe(event.size_bytes)
            elif type(event) is PolicyAction:
                self.policy_actions.labels(event.defence.value, event.action).inc()

    def exposition(self) -> bytes:
        return bytes(generate_latest(self.registry))


class _Batch:
    """Observations of one histogram child, added up until the next flush.

    A histogram's ``observe`` walks its bounds in Python and takes two locks
    (the sum's and a bucket's); in a worker it writes both to a shared file.
    Here an observation is a bisection and two additions; the flush adds
    each bucket's count and the sum to the child's own values, which is what
    ``observe`` does one at a time.  That uses the
    child's ``_upper_bounds``, ``_buckets`` and ``_sum`` (as in
    prometheus-client 0.26, tested); a child without them gets plain
    ``observe`` calls at the flush instead (:meth:`of` checks).
    """

    __slots__ = ("child", "bounds", "counts", "total", "values", "pending")

    def __init__(self, child: Any, bounds: list[float] | None) -> None:
        self.child = child
        self.bounds = bounds
        self.counts = [0] * len(bounds) if bounds is not None else []
        self.total = 0.0
        self.values: list[float] = []  # without bounds: kept for observe()
        self.pending = False

    @classmethod
    def of(cls, child: Any) -> _Batch:
        bounds = getattr(child, "_upper_bounds", None)
        buckets = getattr(child, "_buckets", None)
        usable = (
            isinstance(bounds, list)
            and isinstance(buckets, list)
            and len(bounds) == len(buckets)
            and hasattr(child, "_sum")
            and all(hasattr(b, "inc") for b in buckets)
        )
        return cls(child, list(bounds) if usable else None)  # type: ignore[arg-type]

    def add(self, value: float) -> bool:
        """Record ``value``; True if this batch was empty (so: list it)."""
        if self.bounds is None:
            self.values.append(value)
        else:
            self.counts[bisect.bisect_left(self.bounds, value)] += 1
            self.total += value
        was_empty = not self.pending
        self.pending = True
        return was_empty

    def flush(self) -> None:
        child = self.child
        if self.bounds is None:
            values, self.values = self.values, []
            for value in values:
                child.observe(value)
        else:
            for i, count in enumerate(self.counts):
                if count:
                    child._buckets[i].inc(count)
                    self.counts[i] = 0
            child._sum.inc(self.total)
            self.total = 0.0
        self.pending = False


class _FlushFirst:
    """A collector that yields nothing: collecting it flushes the batch."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> list[Any]:
        self._metrics.flush()
        return []


_STATUS = {200: b"200 OK", 404: b"404 Not Found", 405: b"405 Method Not Allowed"}
_STATUS[503] = b"503 Service Unavailable"
_STATUS[400] = b"400 Bad Request"


async def _http_reply(stream: trio.abc.Stream, status: int, ctype: str, body: bytes) -> None:
    head = (
        b"HTTP/1.1 "
        + _STATUS[status]
        + b"\r\nContent-Type: "
        + ctype.encode()
        + b"\r\nContent-Length: "
        + str(len(body)).encode()
        + b"\r\nConnection: close\r\n\r\n"
    )
    await stream.send_all(head + body)


class Exposition(Protocol):
    """Anything that renders a /metrics page (one process, or all workers)."""

    def exposition(self) -> bytes: ...


async def serve_http(
    metrics: Exposition,
    host: str,
    port: int,
    ready: Callable[[], Awaitable[bool]] | None = None,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``/metrics``, ``/healthz`` and ``/readyz`` on ``host:port``.

    One request per connection, bounded in size and time: this endpoint is
    for a scraper on a trusted network, not a general web server.
    """

    async def handler(stream: trio.SocketStream) -> None:
        try:
            with trio.move_on_after(10):
                request = bytearray()
                while b"\r\n\r\n" not in request and len(request) < 8192:
                    chunk = await stream.receive_some(4096)
                    if not chunk:
                        break
                    request += chunk
                parts = bytes(request).split(b"\r\n", 1)[0].split()
                if len(parts) != 3:
                    await _http_reply(stream, 400, "text/plain", b"bad request\n")
                    return
                method, target = parts[0], parts[1].split(b"?", 1)[0]
                if method != b"GET":
                    await _http_reply(stream, 405, "text/plain", b"GET only\n")
                elif target == b"/metrics":
                    await _http_reply(stream, 200, CONTENT_TYPE_LATEST, metrics.exposition())
                elif target == b"/healthz":
                    await _http_reply(stream, 200, "text/plain", b"ok\n")
                elif target == b"/readyz":
                    ok = await ready() if ready is not None else True
                    await _http_reply(
                        stream,
                        200 if ok else 503,
                        "text/plain",
                        b"ready\n" if ok else b"not ready\n",
                    )
                else:
                    await _http_reply(stream, 404, "text/plain", b"not found\n")
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            await trio.aclose_forcefully(stream)

    listeners = await trio.open_tcp_listeners(port, host=host)
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(handler, listeners)
