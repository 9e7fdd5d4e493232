"""Protection policies, as data: which defence takes which action.

Each defence has an :class:`Action`: observe, reject, disconnect, or
(smuggling only) normalize.

A global ``mode: observe`` turns every action into ``observe`` so an
operator can roll out safely; the configuration layer applies it.
Whatever the action, the upstream never receives a message smuggled inside
another (see :mod:`.body`).  Defaults follow Postfix 3.9.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, fields

from .replies import Reply
from .rules import FastEnum, Verb


class Defence(FastEnum):
    """A defence: the closed label set of ``smtpguard_policy_actions_total``."""

    #: Commands out of sequence (the core's rule tables).
    SEQUENCE = "sequence"
    #: Bare CR/LF, NUL and end-of-data look-alikes (SMTP smuggling).
    SMUGGLING = "smuggling"
    #: Sending ahead without PIPELINING, or past a group-ending command.
    PIPELINING = "pipelining"
    #: Bytes before the greeting.
    EARLY_TALK = "early_talk"
    #: HTTP requests, header lines as commands, TLS on a plaintext port.
    NON_SMTP = "non_smtp"
    #: Message larger than the limit (SIZE).
    MESSAGE_SIZE = "message_size"
    #: Too many recipients in one transaction.
    RECIPIENTS = "recipients"
    #: Too many unknown commands in one session.
    UNKNOWN_COMMANDS = "unknown_commands"
    #: Too many error replies in one session.
    ERROR_LIMIT = "error_limit"
    #: A DATA text line longer than the limit.
    TEXT_LINE_LENGTH = "text_line_length"
    #: Too many connections (per client address or in all).
    CONNECTIONS = "connections"
    #: Plaintext sent after STARTTLS, before the TLS handshake (CVE-2011-0411).
    STARTTLS_INJECTION = "starttls_injection"
    #: A listener that requires a PROXY header got none, a bad one, or one
    #: from an untrusted address.
    PROXY_PROTOCOL = "proxy_protocol"
    #: A command argument outside the RFC 5321 grammar (protocol/syntax.py).
    SYNTAX = "syntax"
    #: A verb the configuration refuses (``commands.refuse``).
    REFUSED_COMMAND = "refused_command"
    #: An 8-bit message body for an upstream without 8BITMIME (``body.eight_bit``).
    EIGHT_BIT = "eight_bit"


class Action(enum.StrEnum):
    """What a defence does (the ``action`` label of ``smtpguard_policy_actions_total``).

    A ``str`` enum: configuration values and metric labels are its values.
    """

    #: Count and log, carry on as before (forward).
    OBSERVE = "observe"
    #: Answer locally, forward nothing.
    REJECT = "reject"
    #: Answer locally, then close the session.
    DISCONNECT = "disconnect"
    #: Rewrite to one unambiguous form (smuggling, syntax).
    NORMALIZE = "normalize"
    #: As normalize, and refuse what is outside the RFC grammar and limits (syntax).
    STRICT = "strict"


class PolicyMode(enum.StrEnum):
    """``policy.mode``: ``observe`` turns every action into observe."""

    #: Every defence acts as configured.
    ENFORCE = "enforce"
    #: Every defence only counts and logs (a safe roll-out).
    OBSERVE = "observe"


_OBSERVE, _REJECT, _DISCONNECT, _NORMALIZE, _STRICT = (
    Action.OBSERVE,
    Action.REJECT,
    Action.DISCONNECT,
    Action.NORMALIZE,
    Action.STRICT,
)

#: Which actions each defence can take (the config layer validates against
#: it); a defence not listed can observe or reject.
ALLOWED: dict[Defence, tuple[Action, ...]] = {
    Defence.SEQUENCE: (_OBSERVE, _REJECT, _DISCONNECT),
    Defence.SMUGGLING: (_OBSERVE, _NORMALIZE, _REJECT),
    Defence.PIPELINING: (_OBSERVE, _REJECT, _DISCONNECT),
    Defence.EARLY_TALK: (_OBSERVE, _REJECT, _DISCONNECT),
    Defence.NON_SMTP: (_OBSERVE, _DISCONNECT),
    Defence.SYNTAX: (_OBSERVE, _NORMALIZE, _STRICT),
}
#: The actions of a defence not in ``ALLOWED``: limits only count or refuse.
LIMIT_ACTIONS: tuple[Action, ...] = (_OBSERVE, _REJECT)


@dataclass(frozen=True, slots=True)
class Policy:
    """Effective actions and limits for one session (``observe`` mode applied).

    Actions may be given as their strings; they are stored as :class:`Action`.
    """

    sequence: Action = _REJECT
    #: Postfix 3.9: smtpd_forbid_bare_newline = normalize.
    smuggling: Action = _NORMALIZE
    #: Postfix 3.9 disconnects (smtpd_forbid_unauth_pipelining = yes); we
    #: default to observe so that an out-of-order command pipelined after
    #: EHLO still gets its precise 503 (see the README).
    pipelining: Action = _OBSERVE
    #: postscreen_greet_action = ignore.
    early_talk: Action = _OBSERVE
    #: postscreen_non_smtp_command_action = drop.
    non_smtp: Action = _DISCONNECT
    #: Canonical commands to the upstream, refusing only the unparseable
    #: (never what Postfix accepts with its defaults).
    syntax: Action = _NORMALIZE
    #: Verbs (upper case) answered ``502 5.5.1`` locally (``commands.refuse``).
    refused_commands: frozenset[bytes] = frozenset()
    #: An 8-bit body for an upstream without 8BITMIME gets 554 5.6.1
    #: (``body.eight_bit: reject``); False passes it.
    reject_eight_bit: bool = False
    #: 0 = no limit of our own (the upstream's SIZE still applies upstream).
    max_message_bytes: int = 0
    #: Longest text line in a DATA body, CRLF included (RFC 5321 4.5.3.1.6:
    #: 1000); 0 = no check (Postfix splits at line_length_limit instead).
    max_text_line_bytes: int = 0
    #: smtpd_recipient_limit = 1000.
    max_recipients: int = 1000
    #: smtpd_junk_command_limit = 100.
    max_unknown_commands: int = 100
    #: smtpd_hard_error_limit = 20.
    hard_error_limit: int = 20
    #: Every limit above only counts (``mode: observe``).
    observe_limits: bool = False
    #: The known verbs among ``refused_commands`` (the fast path skips them).
    refused_verbs: frozenset[Verb] = field(init=False, default=frozenset())

    def __post_init__(self) -> None:
        for f in fields(self):
            if f.type == "Action":
                # Identity comparisons in the core: always the enum member.
                object.__setattr__(self, f.name, Action(getattr(self, f.name)))
        refused = frozenset(v for v in Verb if v.value.encode() in self.refused_commands)
        object.__setattr__(self, "refused_verbs", refused)

    @property
    def limit_action(self) -> Action:
        """What a limit does when it is reached: reject, or only observe."""
        return _OBSERVE if self.observe_limits else _REJECT


#: Words that mark a client that does not speak SMTP at all.
NON_SMTP_WORDS = frozenset(
    {b"GET", b"POST", b"HEAD", b"PUT", b"DELETE", b"OPTIONS", b"CONNECT", b"PATCH", b"TRACE"}
)
#: A TLS record (handshake, TLS 1.x) where a command should be.
TLS_HANDSHAKE_PREFIX = b"\x16\x03"

SYNC_ERROR = Reply(554, "5.5.0", "Error: SMTP protocol synchronization")
EARLY_TALKER = Reply(521, "5.5.1", "{hostname} Error: protocol error: talked before the greeting")
NON_SMTP_COMMAND = Reply(521, "5.7.0", "{hostname} Error: non-SMTP command")
BARE_NEWLINE = Reply(550, "5.5.2", "Error: bare <CR> or <LF> received")
BARE_NEWLINE_COMMAND = Reply(500, "5.5.2", "Error: bare <CR> or <LF> in command")
TEXT_LINE_TOO_LONG = Reply(500, "5.5.2", "Error: message text line too long")
MESSAGE_TOO_BIG = Reply(552, "5.3.4", "Error: message file too big")
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Error: too many recipients")
TOO_MANY_ERRORS = Reply(421, "4.7.0", "{hostname} Error: too many errors")
TOO_MANY_CONNECTIONS = Reply(421, "4.7.0", "{hostname} Error: too many connections")
#: ``commands.refuse`` (Postfix's disable_vrfy_command text, for any verb).
COMMAND_DISABLED = Reply(502, "5.5.1", "{verb} command is disabled")
#: ``body.eight_bit: reject``: 8-bit content for an upstream without 8BITMIME
#: (RFC 6152 3; RFC 3463 5.6.1 "media not supported").
EIGHT_BIT_REFUSED = Reply(554, "5.6.1", "Error: 8-bit content is not accepted here")
#: Over rates.connections_per_minute (Postfix's anvil says the same).
CONNECTION_RATE = Reply(421, "4.7.0", "{hostname} Error: too many connections from you")
#: Over rates.messages_per_minute / recipients_per_minute (Postfix's texts).
TOO_MUCH_MAIL = Reply(450, "4.7.1", "Error: too much mail from you, try again later")
RCPT_RATE = Reply(450, "4.7.1", "Error: too many recipients from you, try again later")
#: In the penalty box (penalty_box.reply: 421 or 554).
PENALTY_TRY_LATER = Reply(
    421, "4.7.0", "{hostname} Error: too many protocol violations, try again later"
)
PENALTY_DENIED = Reply(
    554, "5.7.1", "{hostname} Error: access denied: too many protocol violations"
)
