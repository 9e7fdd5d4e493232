"""Protection policies, as data: which defence takes which action.

Each defence has an action:

- ``observe``: count and log, carry on as before (forward);
- ``reject``: answer locally, forward nothing;
- ``disconnect``: answer locally, then close the session;
- ``normalize`` (smuggling only): rewrite to one unambiguous message.

A global ``mode: observe`` turns every action into ``observe`` so an
operator can roll out safely; the configuration layer applies it.
Whatever the action, the upstream never receives a message smuggled inside
another (see :mod:`.body`).  Defaults follow Postfix 3.9.
"""

from __future__ import annotations

from dataclasses import dataclass

from .replies import Reply
from .rules import FastEnum


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


ACTIONS = ("observe", "reject", "disconnect", "normalize")

#: Which actions each defence can take (the config layer validates against it).
ALLOWED: dict[Defence, tuple[str, ...]] = {
    Defence.SEQUENCE: ("observe", "reject", "disconnect"),
    Defence.SMUGGLING: ("observe", "normalize", "reject"),
    Defence.PIPELINING: ("observe", "reject", "disconnect"),
    Defence.EARLY_TALK: ("observe", "reject", "disconnect"),
    Defence.NON_SMTP: ("observe", "disconnect"),
}


@dataclass(frozen=True, slots=True)
class Policy:
    """Effective actions and limits for one session (``observe`` mode applied)."""

    sequence: str = "reject"
    #: Postfix 3.9: smtpd_forbid_bare_newline = normalize.
    smuggling: str = "normalize"
    #: Postfix 3.9 disconnects (smtpd_forbid_unauth_pipelining = yes); we
    #: default to observe so that an out-of-order command pipelined after
    #: EHLO still gets its precise 503 (see the README).
    pipelining: str = "observe"
    #: postscreen_greet_action = ignore.
    early_talk: str = "observe"
    #: postscreen_non_smtp_command_action = drop.
    non_smtp: str = "disconnect"
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


#: RFC 2920 3.1 (and RFC 3207, RFC 4954): commands that must end a group.
GROUP_ENDERS = frozenset(
    {"EHLO", "HELO", "DATA", "VRFY", "EXPN", "QUIT", "NOOP", "STARTTLS", "AUTH", "AUTH_RESPONSE"}
)

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
