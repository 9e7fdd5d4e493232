"""What one connection tells the operator: metrics, log lines and the summary.

The pumps hand every batch of the session's events to
:meth:`ConnectionObserver.observe`, which walks it once: each event goes to
one step that feeds the metrics facade, the ``violation``, ``policy`` and
``syntax`` log lines and the :class:`SessionSummary`;
:func:`log_disconnect` writes the session's one summary line.  A new log
line about a session's events goes here; a new metric goes in metrics.py
(``Metrics.observe``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import trio

from .edges import HandshakeFailed
from .logs import fields
from .metrics import Metrics
from .protocol.events import (
    Event,
    Forwarded,
    LocalReply,
    MessageDone,
    Normalized,
    PolicyAction,
    SyntaxFinding,
    UpstreamReplied,
    Violation,
)
from .protocol.policy import Defence
from .protocol.rules import Verb
from .summary import SessionSummary

log = logging.getLogger("smtpguard")


class ConnectionObserver:
    """Metrics, logs and summary of one relayed connection."""

    __slots__ = (
        "metrics",
        "conn_id",
        "peer",
        "summary",
        "tls_info",
        "bytes_from_client",
        "bytes_to_client",
        "_sent_at",
        "_opened_at",
        "_now",
        "_stamping",
        "_steps",
    )

    def __init__(self, metrics: Metrics, conn_id: int, peer: str, tls_info: dict[str, str]) -> None:
        self.metrics = metrics
        self.conn_id = conn_id
        self.peer = peer
        self.summary = SessionSummary()
        #: Negotiated protocol and cipher, read at the handshake (a TLS stream
        #: closed without close_notify no longer reports its version).
        self.tls_info = tls_info
        self.bytes_from_client = 0
        self.bytes_to_client = 0
        # When each forwarded command went (FIFO; a list: short, and smaller
        # than a deque).
        self._sent_at: list[float] = []
        self._opened_at = trio.current_time()
        self._now = -1.0  # the batch's time, read once when first needed
        self._stamping = False
        #: The step of each event type: one dispatch per event.
        self._steps: dict[type, Callable[[Any], None]] = {
            Forwarded: self._forwarded,
            UpstreamReplied: self._replied,
            LocalReply: self._local,
            Violation: self._violation,
            MessageDone: self._message,
            PolicyAction: self._policy,
            SyntaxFinding: self._syntax,
            Normalized: self.metrics.normalized_command,
        }

    def stamp(self, events: list[Event]) -> float:
        """Note when each forwarded command went (for the reply latency);
        returns the time now if a command went or a reply came, else -1."""
        now = -1.0
        for event in events:
            if type(event) is Forwarded:
                if now < 0:
                    now = trio.current_time()
                self._sent_at.append(now)
            elif type(event) is UpstreamReplied and now < 0:
                now = trio.current_time()
        return now

    def observe(self, events: list[Event], now: float | None = None) -> None:
        """Metrics, logs and summary for ``events``, in one pass: each event
        goes to its step, which feeds all three.  ``now``: what :meth:`stamp`
        returned when they were taken (None: they are stamped here)."""
        if now is None:
            now = -1.0
            self._stamping = True
        self._now = now
        steps = self._steps
        for event in events:
            step = steps.get(type(event))
            if step is not None:
                step(event)
        self._stamping = False

    def _time(self) -> float:
        if self._now < 0:
            self._now = trio.current_time()
        return self._now

    def _forwarded(self, event: Forwarded) -> None:
        if self._stamping:
            self._sent_at.append(self._time())
        self.metrics.forwarded_command(event)

    def _replied(self, event: UpstreamReplied) -> None:
        if event.step is Verb.GREETING:
            self.metrics.reply_latency(event.step, self._time() - self._opened_at)
        elif self._sent_at:
            self.metrics.reply_latency(event.step, self._time() - self._sent_at.pop(0))
        self.metrics.upstream_replied(event)
        self.summary.upstream_replied(event)

    def _local(self, event: LocalReply) -> None:
        self.metrics.local_reply(event)
        self.summary.local_reply(event)

    def _violation(self, event: Violation) -> None:
        log.info(
            "violation",
            extra=fields(
                conn=self.conn_id,
                client=self.peer,
                state=event.phase.value,
                command=event.verb.value,
                expected=event.expected,
                action=event.action,
            ),
        )
        self.metrics.violation(event)
        self.summary.violations += 1

    def _message(self, event: MessageDone) -> None:
        self.metrics.message_done(event)
        self.summary.message_done(event)

    def _policy(self, event: PolicyAction) -> None:
        if event.defence is not Defence.SEQUENCE:
            # A sequence violation is logged once, as ``event=violation``.
            log.info(
                "policy",
                extra=fields(
                    conn=self.conn_id,
                    client=self.peer,
                    defence=event.defence.value,
                    action=event.action,
                    detail=event.detail,
                ),
            )
        self.metrics.policy_action(event)

    def _syntax(self, event: SyntaxFinding) -> None:
        # The reason, the length and the octet class: never the argument
        # (addresses are personal data).
        log.info(
            "syntax",
            extra=fields(
                conn=self.conn_id,
                client=self.peer,
                command=event.verb.value,
                reason=event.reason,
                action="refused" if event.refused else "forwarded",
                argument_bytes=event.argument_bytes,
                octet=event.octet or "-",
            ),
        )
        self.metrics.syntax_finding(event)

    def tls_started(self, tls_info: dict[str, str]) -> None:
        """STARTTLS: the client's TLS session is up."""
        self.tls_info = tls_info
        self.metrics.tls_session(tls_info.get("tls_protocol", "unknown"))

    def tls_failed(self, failure: HandshakeFailed) -> None:
        """STARTTLS: the client's handshake failed."""
        self.metrics.tls_handshake_failed("starttls", failure.reason)
        log.info(
            "tls handshake failed",
            extra=fields(
                conn=self.conn_id, client=self.peer, reason=failure.reason, detail=failure.detail
            ),
        )


def log_disconnect(
    observer: ConnectionObserver | None, conn_id: int, peer: str, reason: str, opened: float
) -> None:
    """The session's one summary line (Postfix style counts, bytes, TLS);
    ``observer``: None if the session ended before it was relayed."""
    summary: dict[str, object] = {"conn": conn_id, "client": peer, "reason": reason}
    if observer is not None:
        summary.update(observer.tls_info)
        summary.update(observer.summary.fields())
        summary["bytes_in"] = observer.bytes_from_client
        summary["bytes_out"] = observer.bytes_to_client
    summary["duration_seconds"] = round(trio.current_time() - opened, 3)
    log.info("disconnect", extra=fields(**summary))
