"""What the core needs to know from the configuration."""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from .policy import Policy


class AnnotateMode(enum.StrEnum):
    """``annotate.mode``: when a message gets the header recording violations."""

    #: Never.
    OFF = "off"
    #: Every message.
    ALWAYS = "always"
    #: Only messages of sessions with violations.
    VIOLATIONS = "violations"


@dataclass(frozen=True, slots=True)
class SessionOptions:
    """What the core needs to know from the configuration."""

    hostname: str = "smtpguard"
    #: Answer HELP locally with 214 instead of forwarding it.
    help_local: bool = False
    help_text: tuple[str, ...] = ("smtpguard SMTP proxy",)
    help_topics: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    #: Advertise PIPELINING to clients even if the upstream does not.
    offer_pipelining: bool = True
    #: Pipeline commands to the upstream when it advertises PIPELINING;
    #: False feeds it one command at a time.
    upstream_pipelining: bool = True
    #: Relay BDAT (RFC 3030); False removes CHUNKING from EHLO.
    chunking: bool = True
    #: Extra EHLO keywords to remove (upper case).
    discard_keywords: frozenset[str] = frozenset()
    #: Longest command line, CRLF included (RFC 5321 4.5.3.1.4).
    max_line_bytes: int = 512
    #: Longest AUTH line or SASL response (RFC 4954 4: 12288).
    max_sasl_line_bytes: int = 12288
    #: Most replies owed to the client before we stop reading from it.
    max_pipelined_commands: int = 100
    #: Prepend a header recording the session's violations to each message
    #: (a string is taken as its :class:`AnnotateMode`).
    annotate: AnnotateMode = AnnotateMode.OFF
    annotate_header: str = "X-SMTPGuard"
    #: Protection policies: actions per defence and limits.
    policy: Policy = field(default_factory=Policy)
    #: smtpguard terminates STARTTLS itself (a certificate is configured).
    tls_offered: bool = False
    #: The session is encrypted from the start (implicit TLS listener).
    implicit_tls: bool = False
    #: Postfix's smtpd_tls_auth_only: no AUTH on a plaintext session.
    auth_require_tls: bool = True
    #: Per-client rates (clientrates.py): asked before a MAIL ("message") or
    #: a RCPT ("recipient") goes out; False answers it 450 4.7.1 locally.
    admit: Callable[[str], bool] | None = None
    #: Deferred upstream connect: smtpguard's own greeting (a whole reply,
    #: ``220 ...\r\n``), sent by :meth:`Session.greet`; the upstream's is
    #: then consumed.  None: the upstream's greeting is relayed.
    local_greeting: bytes | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "annotate", AnnotateMode(self.annotate))

    @property
    def command_line_limit(self) -> int:
        """The longest line read as a command (AUTH lines may be SASL-long)."""
        return max(self.max_line_bytes, self.max_sasl_line_bytes)
