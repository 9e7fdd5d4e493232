"""The defences' bookkeeping and decisions, without I/O.

:class:`Defences` holds a session's counters (errors, unknown commands,
violations) and turns what the session saw into an :class:`~.policy.Action`
per the :class:`~.policy.Policy`, recording one
:class:`~.events.PolicyAction` event per decision.  The session then does
what the action says (answer, forward, close).
"""

from __future__ import annotations

from .annotate import MAX_KINDS
from .events import Event, PolicyAction, Violation
from .policy import Action, Defence, Policy
from .rules import Phase, Verb

_OBSERVE, _REJECT, _DISCONNECT, _NORMALIZE = (
    Action.OBSERVE,
    Action.REJECT,
    Action.DISCONNECT,
    Action.NORMALIZE,
)


class Defences:
    """One session's defences: counters, and the action each finding gets."""

    __slots__ = (
        "policy",
        "events",
        "errors",
        "unknown",
        "violations",
        "kinds",
        "_early_reported",
        "_sync_reported",
    )

    def __init__(self, policy: Policy, events: list[Event]) -> None:
        self.policy = policy
        self.events = events  #: where the PolicyAction events go
        self.errors = 0
        self.unknown = 0
        self.violations = 0
        self.kinds: set[str] = set()  # "VERB@phase", at most MAX_KINDS
        self._early_reported = False
        self._sync_reported: object = None

    def report(self, defence: Defence, action: Action, detail: str) -> None:
        self.events.append(PolicyAction(defence, action, detail))

    def limit(self, defence: Defence, detail: str) -> bool:
        """Report a limit reached; True if it is enforced (not observe mode)."""
        action = self.policy.limit_action
        self.report(defence, action, detail)
        return action is _REJECT

    def early_talk(self) -> Action:
        """Bytes before the greeting (reported once)."""
        action = self.policy.early_talk
        if not self._early_reported:
            self._early_reported = True
            self.report(Defence.EARLY_TALK, action, "client talked before the greeting")
        return action

    def bare_command(self, bare_lf: bool, has_cr: bool) -> bool:
        """A command line with a bare CR or LF; True if it may go on (with CRLF)."""
        action = self.policy.smuggling
        detail = "bare <LF> ends a command" if bare_lf else "bare <CR> in a command"
        self.report(Defence.SMUGGLING, action, detail)
        return action is _OBSERVE or (action is _NORMALIZE and not has_cr)

    def bare_sasl(self) -> bool:
        """A SASL response with a bare CR or a NUL (never in base64); True if
        it goes on as it is, False if the exchange is cancelled instead: an
        upstream that ends lines at a bare CR would read a second line,
        unchecked, as a command."""
        action = _OBSERVE if self.policy.smuggling is _OBSERVE else _REJECT
        self.report(Defence.SMUGGLING, action, "bare <CR> or NUL in an AUTH response")
        return action is _OBSERVE

    def sent_ahead(self, blocker: object) -> Action:
        """Bytes sent before the reply ``blocker`` they had to wait for
        (RFC 2920 3.1): reported once per owed reply."""
        action = self.policy.pipelining
        if self._sync_reported is not blocker:
            self._sync_reported = blocker
            self.report(Defence.PIPELINING, action, "command sent before the reply it depends on")
        return action

    def non_smtp(self, detail: str) -> bool:
        """Not an SMTP client; True if the session ends here."""
        action = self.policy.non_smtp
        self.report(Defence.NON_SMTP, action, detail)
        return action is _DISCONNECT

    def error_reply(self) -> bool:
        """Postfix's hard error limit; True if this error reply ends the session."""
        self.errors += 1
        return self.errors == self.policy.hard_error_limit and self.limit(
            Defence.ERROR_LIMIT, "error replies"
        )

    def unknown_command(self) -> None:
        self.unknown += 1

    def too_many_unknown(self) -> bool:
        """True (once) when the unknown commands pass the limit and it is enforced."""
        return self.unknown == self.policy.max_unknown_commands + 1 and self.limit(
            Defence.UNKNOWN_COMMANDS, "unknown commands"
        )

    def violation(self, verb: Verb, phase: Phase, expected: str, action: Action) -> None:
        """A command out of sequence (one event, logged once)."""
        self.events.append(Violation(verb, phase, expected, action))
        self.report(Defence.SEQUENCE, action, expected)
        self.violations += 1
        if len(self.kinds) < MAX_KINDS:
            self.kinds.add(f"{verb.value}@{phase.value}")

    def declared_size_refused(self, line: bytes) -> bool:
        """MAIL ... SIZE=n above our limit (RFC 1870); True: answer 552."""
        limit = self.policy.max_message_bytes
        if not limit:
            return False
        upper = line.upper()
        if b"SIZE=" not in upper:
            return False
        for param in upper.split()[2:]:
            if param.startswith(b"SIZE=") and param[5:].isdigit() and int(param[5:]) > limit:
                return self.limit(Defence.MESSAGE_SIZE, "declared SIZE above the limit")
        return False

    def recipients_refused(self, rcpts: int) -> bool:
        """One more RCPT after ``rcpts``; True: answer 452."""
        return rcpts >= self.policy.max_recipients and self.limit(
            Defence.RECIPIENTS, "recipients in one transaction"
        )

    def message_too_big(self) -> bool:
        """Content above the limit (the caller reports it once per message);
        True: refuse."""
        return self.limit(Defence.MESSAGE_SIZE, "message above the limit")

    def text_line_too_long(self) -> bool:
        return self.limit(Defence.TEXT_LINE_LENGTH, "text line above the limit")

    def smuggling(self, findings: list[str]) -> bool:
        """Report new body findings; True if the session ends (reject)."""
        action = self.policy.smuggling
        for finding in findings:
            self.report(Defence.SMUGGLING, action, finding)
        return action is _REJECT
