"""What the core tells the metrics and logs layer: events and close reasons.

Events are small immutable tuples; the per-command ones (:class:`Forwarded`,
:class:`UpstreamReplied`) are made once and shared, so relaying a command
allocates none.  :class:`CloseReason`, :class:`MessageOutcome` and
:class:`~.policy.Action` are the closed label sets of the metrics: defined
here once, used by the metrics, the logs and the configuration.
"""

from __future__ import annotations

import enum
from typing import NamedTuple

from .policy import Action, Defence
from .rules import Phase, Verb


class CloseReason(enum.StrEnum):
    """Why a session ended (``Session.close_reason``, a metric label)."""

    #: QUIT was answered (by the upstream, or locally before it existed).
    QUIT = "quit"
    #: The client closed or vanished.
    CLIENT_CLOSED = "client_closed"
    #: The client sent no complete command in time.
    CLIENT_TIMEOUT = "client_timeout"
    #: The upstream closed (or sent 421).
    UPSTREAM_CLOSED = "upstream_closed"
    #: The upstream did not answer in time.
    UPSTREAM_TIMEOUT = "upstream_timeout"
    #: The upstream broke the protocol.
    UPSTREAM_ERROR = "upstream_error"
    #: The upstream could not be reached.
    UPSTREAM_REFUSED = "upstream_refused"
    #: No upstream slot came free in time.
    UPSTREAM_BUSY = "upstream_busy"
    #: The service is stopping.
    SHUTDOWN = "shutdown"
    #: A defence ended the session.
    POLICY = "policy"
    #: The TLS handshake with the client failed.
    TLS_FAILED = "tls_failed"
    #: smtpguard's own bug (the I/O layer's fallback).
    INTERNAL_ERROR = "internal_error"


class MessageOutcome(enum.StrEnum):
    """How a message ended (a metric label)."""

    #: The upstream accepted it (2xx to the final dot or to BDAT LAST).
    ACCEPTED = "accepted"
    #: The upstream refused it.
    REJECTED = "rejected"
    #: The client, the upstream or a defence ended it before its end.
    ABORTED = "aborted"


class Violation(NamedTuple):
    verb: Verb
    phase: Phase
    expected: str
    action: Action = Action.REJECT  #: what was done: observe, reject or disconnect


class LocalReply(NamedTuple):
    verb: Verb
    code: int


class Forwarded(NamedTuple):
    step: Verb  #: the verb, or DATA_END / BDAT_LAST / AUTH_RESPONSE


class UpstreamReplied(NamedTuple):
    step: Verb  #: the verb, or GREETING / DATA_END / BDAT_LAST / AUTH_RESPONSE
    code: int


class MessageDone(NamedTuple):
    outcome: MessageOutcome
    size_bytes: int


class PolicyAction(NamedTuple):
    defence: Defence
    action: Action  #: what was done: observe, reject, disconnect or normalize
    detail: str  #: for the log line (never client data)


class SyntaxFinding(NamedTuple):
    """A command argument outside the grammar (protocol/syntax.py).  The log
    line gets its reason, length and octet class: never the argument."""

    verb: Verb
    reason: str  #: a ``syntax.Reason`` value
    refused: bool  #: answered locally (else forwarded: observed or normalized)
    argument_bytes: int
    octet: str  #: the class of the offending octet ("" if none)


class Normalized(NamedTuple):
    """A command forwarded in its canonical form, not as the client sent it."""

    verb: Verb


Event = (
    Violation
    | LocalReply
    | Forwarded
    | UpstreamReplied
    | MessageDone
    | PolicyAction
    | SyntaxFinding
    | Normalized
)

#: One shared event per step (no allocation per command).
FORWARDED: dict[Verb, Forwarded] = {verb: Forwarded(verb) for verb in Verb}
_REPLIED: dict[tuple[Verb, int], UpstreamReplied] = {}


def replied(step: Verb, code: int) -> UpstreamReplied:
    """The shared :class:`UpstreamReplied` for ``step`` and ``code``."""
    key = (step, code)
    event = _REPLIED.get(key)
    if event is None:  # at most one per step and reply code (200-599)
        event = _REPLIED[key] = UpstreamReplied(step, code)
    return event
