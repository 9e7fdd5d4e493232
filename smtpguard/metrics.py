"""Prometheus metrics: a small facade over prometheus-client, and /metrics over trio.

The facade is created on a registry that is passed in, so tests use a fresh
one.  Labels come from closed sets only (the verb enum, the phase enum,
reply codes, fixed reasons); known combinations are created at start so
their series exist at 0.
"""

from __future__ import annotations

import builtins
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
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
    Normalized,
    PolicyAction,
    SyntaxFinding,
    UpstreamReplied,
    Violation,
)
from .protocol.policy import ALLOWED, LIMIT_ACTIONS, Defence
from .protocol.rules import CLIENT_VERBS, Phase, Verb
from .protocol.syntax import SHAPE_OF, Reason

#: The shared store's calls (store.Op; not imported: the store needs coredis).
STORE_OPS = ("connect", "upstream_slot", "sync", "violations", "ping")

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
DIRECTIONS = ("client_to_upstream", "upstream_to_client")
#: ``smtpguard_upstream_reply_seconds`` buckets.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
SIZE_BUCKETS = (1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864)
QUEUE_WAIT_BUCKETS = (0.001, 0.01, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60)


@dataclass(frozen=True)
class Family:
    """One metric family: its Python attribute on :class:`Metrics`, its
    prometheus-client class, name (counters without ``_total``: the client
    adds it), help text, label names, and the label values whose series
    exist from the start (at 0)."""

    attr: str
    kind: type[Counter] | type[Gauge] | type[Histogram]
    name: str
    doc: str
    labels: tuple[str, ...] = ()
    series: tuple[tuple[str, ...], ...] = ()
    #: Gauges: how the supervisor sums the workers' values (``workers: N``).
    multiprocess_mode: str | None = None
    buckets: tuple[float, ...] | None = None

    def create(self, registry: CollectorRegistry) -> Counter | Gauge | Histogram:
        options: dict[str, Any] = {"registry": registry}
        if self.multiprocess_mode is not None:
            options["multiprocess_mode"] = self.multiprocess_mode
        if self.buckets is not None:
            options["buckets"] = self.buckets
        metric = self.kind(self.name, self.doc, self.labels, **options)
        for values in self.series:
            metric.labels(*values)
        return metric


def _each(values: Iterable[str]) -> tuple[tuple[str, ...], ...]:
    return tuple((value,) for value in values)


#: Every family smtpguard exports, in exposition order.
FAMILIES = (
    Family(
        "build_info",
        Gauge,
        "smtpguard_build_info",
        "smtpguard version",
        ("version",),
        multiprocess_mode="max",
    ),
    Family(
        "violations",
        Counter,
        "smtpguard_sequence_violations",
        "Client commands out of sequence, answered locally and never forwarded",
        ("command", "state"),
        series=tuple((verb.value, phase.value) for verb in CLIENT_VERBS for phase in Phase),
    ),
    Family(
        "local_replies",
        Counter,
        "smtpguard_local_replies",
        "Replies smtpguard sent itself, by reply code",
        ("code",),
        series=_each(LOCAL_CODES),
    ),
    Family("sessions_opened", Counter, "smtpguard_sessions_opened", "Client sessions accepted"),
    Family(
        "sessions_open",
        Gauge,
        "smtpguard_sessions_open",
        "Client sessions open now",
        multiprocess_mode="livesum",
    ),
    Family(
        "sessions_closed",
        Counter,
        "smtpguard_sessions_closed",
        "Client sessions ended, by reason",
        ("reason",),
        series=_each(CLOSE_REASONS),
    ),
    # Upstream admission (upstream_limits): slots per address, the line.
    Family(
        "upstream_sessions_held",
        Gauge,
        "smtpguard_upstream_sessions",
        "Upstream sessions held now under upstream_limits.max_sessions",
        multiprocess_mode="livesum",
    ),
    Family(
        "upstream_session_cap",
        Gauge,
        "smtpguard_upstream_session_cap",
        "Upstream sessions allowed per upstream address (the workers' shares summed)",
        multiprocess_mode="livesum",
    ),
    Family(
        "upstream_queue_depth",
        Gauge,
        "smtpguard_upstream_queue_depth",
        "Clients waiting in line for an upstream slot",
        multiprocess_mode="livesum",
    ),
    Family(
        "upstream_queue_wait",
        Histogram,
        "smtpguard_upstream_queue_wait_seconds",
        "Time a client waited for an upstream slot",
        buckets=QUEUE_WAIT_BUCKETS,
    ),
    # The shared store (store.py): up, failures and the cost of each call.
    Family(
        "store_up",
        Gauge,
        "smtpguard_store_up",
        "1 while the shared store answers, 0 while limits fall back to this process "
        "(no series without a store)",
        ("store",),
        multiprocess_mode="livemin",
    ),
    Family(
        "store_errors",
        Counter,
        "smtpguard_store_errors",
        "Calls to the shared store that failed or timed out (mail flows: fail open)",
        ("op",),
        series=_each(STORE_OPS),
    ),
    Family(
        "store_seconds",
        Histogram,
        "smtpguard_store_call_seconds",
        "Duration of the calls to the shared store that succeeded",
        ("op",),
        series=_each(STORE_OPS),
        buckets=(0.0002, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25),
    ),
    # The syntax guard (protocol/syntax.py, policy.syntax).
    Family(
        "syntax_violations",
        Counter,
        "smtpguard_syntax_violations",
        "Command arguments outside the RFC 5321 grammar, by verb and reason "
        "(refused, or forwarded in observe/normalize mode)",
        ("command", "reason"),
        series=tuple((verb.value, reason.value) for verb in SHAPE_OF for reason in Reason),
    ),
    Family(
        "commands_normalized",
        Counter,
        "smtpguard_commands_normalized",
        "Commands forwarded in their canonical form instead of as the client sent them",
        ("command",),
        series=_each(verb.value for verb in SHAPE_OF),
    ),
    Family(
        "rate_refusals",
        Counter,
        "smtpguard_connection_rate_refusals",
        "Connections refused 421 for going over rates.connections_per_minute",
    ),
    Family(
        "rate_refusals_commands",
        Counter,
        "smtpguard_client_rate_refusals",
        "MAIL and RCPT commands answered 450 4.7.1 for going over a per-client rate",
        ("kind",),
        series=_each(("message", "recipient")),
    ),
    Family(
        "penalty_entries",
        Counter,
        "smtpguard_penalty_box_entries",
        "Clients put in the penalty box (penalty_box.violations reached)",
    ),
    Family(
        "penalty_refusals",
        Counter,
        "smtpguard_penalty_box_refusals",
        "Connections refused at connect because the client is in the penalty box",
    ),
    Family(
        "upstream_busy_refusals",
        Counter,
        "smtpguard_upstream_busy",
        "Clients refused 421 4.3.2 because no upstream slot came free in time",
    ),
    Family(
        "forwarded",
        Counter,
        "smtpguard_commands_forwarded",
        "Commands relayed to the upstream, by verb",
        ("command",),
        series=_each(verb.value for verb in CLIENT_VERBS),
    ),
    Family(
        "upstream_replies",
        Counter,
        "smtpguard_upstream_replies",
        "Replies from the upstream, by the verb they answer and reply class",
        ("command", "class"),
    ),
    Family(
        "upstream_latency",
        Histogram,
        "smtpguard_upstream_reply_seconds",
        "Time from forwarding a command to the upstream's reply",
        ("command",),
        buckets=LATENCY_BUCKETS,
    ),
    Family(
        "connect_failures",
        Counter,
        "smtpguard_upstream_connect_failures",
        "Failed connections to the upstream, by reason",
        ("reason",),
        series=_each(CONNECT_FAILURES),
    ),
    Family(
        "messages",
        Counter,
        "smtpguard_messages",
        "Messages relayed, by outcome",
        ("outcome",),
        series=_each(MESSAGE_OUTCOMES),
    ),
    Family(
        "message_size",
        Histogram,
        "smtpguard_message_size_bytes",
        "Size of message content relayed",
        buckets=SIZE_BUCKETS,
    ),
    Family(
        "bytes",
        Counter,
        "smtpguard_bytes",
        "Bytes relayed, by direction",
        ("direction",),
        series=_each(DIRECTIONS),
    ),
    Family(
        "help",
        Counter,
        "smtpguard_help_requests",
        "HELP commands, by handling",
        ("handling",),
        series=_each(("local", "forwarded")),
    ),
    Family(
        "policy_actions",
        Counter,
        "smtpguard_policy_actions",
        "Protection policy decisions, by defence and the action taken",
        ("defence", "action"),
        series=tuple(
            (defence.value, action)
            for defence in Defence
            for action in ALLOWED.get(defence, LIMIT_ACTIONS)
        ),
    ),
    Family(
        "upstream_up",
        Gauge,
        "smtpguard_upstream_up",
        "1 if the last connection to this upstream (by its index in the config) worked,"
        " 0 if it failed; no series until it is tried",
        ("upstream",),
        multiprocess_mode="livemin",
    ),
    Family(
        "tls_sessions",
        Counter,
        "smtpguard_tls_sessions",
        "Client sessions that negotiated TLS (STARTTLS or implicit), by protocol",
        ("protocol",),
        series=_each(("TLSv1.2", "TLSv1.3")),
    ),
    Family(
        "tls_handshake_failures",
        Counter,
        "smtpguard_tls_handshake_failures",
        "TLS handshakes with clients that failed, by listener kind and reason",
        ("listener", "reason"),
        series=tuple(
            (listener, reason)
            for listener in ("starttls", "implicit")
            for reason in HANDSHAKE_FAILURES
        ),
    ),
    Family(
        "upstream_tls",
        Counter,
        "smtpguard_upstream_tls",
        "STARTTLS from smtpguard to the upstream, by result",
        ("result",),
        series=_each(("established", "plaintext", "failed", "none")),
    ),
    Family(
        "auth_results",
        Counter,
        "smtpguard_auth_results",
        "AUTH exchanges relayed, by the upstream's verdict",
        ("result",),
        series=_each(("success", "failure")),
    ),
    Family(
        "reload_success",
        Gauge,
        "smtpguard_config_last_reload_successful",
        "1 if the last configuration load succeeded, 0 if it was refused",
        multiprocess_mode="livemin",
    ),
    Family(
        "reload_time",
        Gauge,
        "smtpguard_config_last_reload_success_timestamp_seconds",
        "When the configuration in use was loaded",
        multiprocess_mode="livemax",
    ),
    # Counted by the worker the supervisor started in a dead one's place
    # (``workers: N``); summed over workers, dead ones included.
    Family(
        "worker_restarts",
        Counter,
        "smtpguard_worker_restarts",
        "Worker processes started again after one died (workers: N)",
    ),
)


class Metrics:
    """Every counter smtpguard exports, behind methods named for decisions.

    Each family of :data:`FAMILIES` is an attribute of the same name.
    """

    build_info: Gauge
    violations: Counter
    local_replies: Counter
    sessions_opened: Counter
    sessions_open: Gauge
    sessions_closed: Counter
    upstream_sessions_held: Gauge
    upstream_session_cap: Gauge
    upstream_queue_depth: Gauge
    upstream_queue_wait: Histogram
    syntax_violations: Counter
    commands_normalized: Counter
    store_up: Gauge
    store_errors: Counter
    store_seconds: Histogram
    rate_refusals: Counter
    rate_refusals_commands: Counter
    penalty_entries: Counter
    penalty_refusals: Counter
    upstream_busy_refusals: Counter
    forwarded: Counter
    upstream_replies: Counter
    upstream_latency: Histogram
    connect_failures: Counter
    messages: Counter
    message_size: Histogram
    bytes: Counter
    help: Counter
    policy_actions: Counter
    upstream_up: Gauge
    tls_sessions: Counter
    tls_handshake_failures: Counter
    upstream_tls: Counter
    auth_results: Counter
    reload_success: Gauge
    reload_time: Gauge
    worker_restarts: Counter

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        # Per-command counters (commands forwarded, replies, bytes) and
        # latencies are added up here and passed to prometheus-client in
        # batches: its inc() takes a lock (and in a worker writes a shared
        # file), which costs more than the rest of relaying a command.  The
        # batch is flushed before every collection (this collector is
        # registered first, so it runs first: a scrape never misses an
        # increment), and by :meth:`flush_every` in workers (their files are
        # read by the supervisor, not collected here).
        self._pending: dict[Any, float] = {}
        self._observations: list[tuple[Any, float]] = []  # (histogram child, value)
        self.registry.register(_FlushFirst(self))
        for family in FAMILIES:
            setattr(self, family.attr, family.create(self.registry))
        #: The counting step for each event type.
        self.count: dict[type, Callable[[Any], None]] = {
            Forwarded: self.forwarded_command,
            UpstreamReplied: self.upstream_replied,
            LocalReply: self.local_reply,
            Violation: self.violation,
            MessageDone: self.message_done,
            PolicyAction: self.policy_action,
            SyntaxFinding: self.syntax_finding,
            Normalized: self.normalized_command,
        }
        self.build_info.labels(__version__).set(1)
        # Label look-ups cost more than the increments: keep the children.
        # ``BDAT n LAST`` is counted as BDAT: the label set is the client
        # verbs plus DATA_END and AUTH_RESPONSE (the greeting is not sent).
        self._forwarded: dict[Verb, Any] = {
            v: self.forwarded.labels(v.value)
            for v in Verb
            if v is not Verb.BDAT_LAST and v is not Verb.GREETING
        }
        self._forwarded[Verb.BDAT_LAST] = self._forwarded[Verb.BDAT]
        self._latency = {v: self.upstream_latency.labels(v.value) for v in Verb}
        self._bytes = {d: self.bytes.labels(d) for d in DIRECTIONS}
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
        observations = self._observations
        if observations:
            self._observations = []
            for child, value in observations:
                child.observe(value)

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
        self._observations.append((self._latency[step], seconds))

    def observe(self, events: Iterable[Event]) -> None:
        """Count a batch of the core's events (sessions without a relayed
        connection; a relayed one goes through observer.py, one pass)."""
        count = self.count
        for event in events:
            handler = count.get(type(event))
            if handler is not None:
                handler(event)

    def forwarded_command(self, event: Forwarded) -> None:
        fwd = self._forwarded.get(event.step)
        if fwd is not None:
            self._pending[fwd] = self._pending.get(fwd, 0) + 1
        if event.step is Verb.HELP:
            self.help.labels("forwarded").inc()

    def upstream_replied(self, event: UpstreamReplied) -> None:
        key = (event.step, event.code // 100)
        child = self._replies.get(key)
        if child is None:
            child = self._replies[key] = self.upstream_replies.labels(
                event.step.value, f"{event.code // 100}xx"
            )
        self._pending[child] = self._pending.get(child, 0) + 1
        if event.step in (Verb.AUTH, Verb.AUTH_RESPONSE) and event.code != 334:
            self.auth_results.labels("success" if event.code < 400 else "failure").inc()

    def local_reply(self, event: LocalReply) -> None:
        self.local_replies.labels(str(event.code)).inc()
        if event.code == 214:
            self.help.labels("local").inc()

    def violation(self, event: Violation) -> None:
        self.violations.labels(event.verb.value, event.phase.value).inc()

    def message_done(self, event: MessageDone) -> None:
        self.messages.labels(event.outcome).inc()
        self.message_size.observe(event.size_bytes)

    def policy_action(self, event: PolicyAction) -> None:
        self.policy_actions.labels(event.defence.value, event.action).inc()

    def syntax_finding(self, event: SyntaxFinding) -> None:
        self.syntax_violations.labels(event.verb.value, event.reason).inc()

    def normalized_command(self, event: Normalized) -> None:
        self.commands_normalized.labels(event.verb.value).inc()

    def exposition(self) -> builtins.bytes:  # ``bytes`` is a family here
        return builtins.bytes(generate_latest(self.registry))


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
