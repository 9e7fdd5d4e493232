"""What one connection tells the operator: metrics, log lines and the summary.

The pumps hand every batch of the session's events to
:meth:`ConnectionObserver.observe`, which feeds the metrics facade, the
``violation`` and ``policy`` log lines and the :class:`SessionSummary`;
:func:`log_disconnect` writes the session's one summary line.  A new log
line about a session's events goes here; a new metric goes in metrics.py
(``Metrics.observe``).
"""

from __future__ import annotations

import logging

import trio

from .edges import HandshakeFailed
from .logs import fields
from .metrics import Metrics
from .protocol.policy import Defence
from .protocol.rules import Verb
from .protocol.session import Event, Forwarded, PolicyAction, UpstreamReplied, Violation
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
        """Metrics, logs and summary for ``events``; ``now``: what :meth:`stamp`
        returned when they were taken (None: stamp them now)."""
        if now is None:
            now = self.stamp(events)
        for event in events:
            if type(event) is UpstreamReplied:
                if event.step is Verb.GREETING:
                    self.metrics.reply_latency(event.step, now - self._opened_at)
                elif self._sent_at:
                    self.metrics.reply_latency(event.step, now - self._sent_at.pop(0))
            elif type(event) is Violation:
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
            elif type(event) is PolicyAction and event.defence is not Defence.SEQUENCE:
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
        self.metrics.observe(events)
        self.summary.observe(events)

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
