"""Per-session counts for the summary log line, in the spirit of Postfix's

``disconnect from ... ehlo=1 mail=1 rcpt=0/2 data=1 quit=1 commands=4/6``:
``n`` when every command of a kind succeeded, ``ok/total`` when some failed
(a local 503/500 is a failure of that command).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from .protocol.events import (
    Event,
    LocalReply,
    MessageDone,
    MessageOutcome,
    UpstreamReplied,
    Violation,
)
from .protocol.rules import Verb

# Replies to these steps are not commands of their own (they continue one).
_NOT_COMMANDS = frozenset({Verb.GREETING, Verb.DATA_END, Verb.AUTH_RESPONSE})
#: The summary's name for the command a reply answers (None: not a command).
_COMMAND_NAME: dict[Verb, str | None] = {
    verb: None
    if verb in _NOT_COMMANDS
    else "bdat"
    if verb is Verb.BDAT_LAST
    else verb.value.lower()
    for verb in Verb
}


class SessionSummary:
    """Accumulates a session's events into the summary line's fields."""

    __slots__ = ("ok", "total", "violations", "messages")

    def __init__(self) -> None:
        self.ok: Counter[str] = Counter()
        self.total: Counter[str] = Counter()
        self.violations = 0
        self.messages: Counter[str] = Counter()

    def observe(self, events: Iterable[Event]) -> None:
        """A batch of events (the tests; a connection goes through observer.py)."""
        for event in events:
            if type(event) is UpstreamReplied:
                self.upstream_replied(event)
            elif type(event) is LocalReply:
                self.local_reply(event)
            elif type(event) is Violation:
                self.violations += 1
            elif type(event) is MessageDone:
                self.message_done(event)

    def upstream_replied(self, event: UpstreamReplied) -> None:
        name = _COMMAND_NAME[event.step]
        if name is None:
            return
        self.total[name] += 1
        if event.code < 400:
            self.ok[name] += 1

    def local_reply(self, event: LocalReply) -> None:
        if event.code != 421:  # a 421 ends the session, it answers no command
            local = event.verb.value.lower()
            self.total[local] += 1
            if event.code < 400:
                self.ok[local] += 1

    def message_done(self, event: MessageDone) -> None:
        self.messages[event.outcome] += 1

    def fields(self) -> dict[str, str | int]:
        """Ordered fields for the log line: per-verb counts, then commands."""
        out: dict[str, str | int] = {}
        for name in sorted(self.total, key=_position):
            out[name] = _count(self.ok[name], self.total[name])
        out["commands"] = _count(sum(self.ok.values()), sum(self.total.values()))
        out["violations"] = self.violations
        for outcome in MessageOutcome:
            if self.messages[outcome]:
                out[f"messages_{outcome}"] = self.messages[outcome]
        return out


def _count(ok: int, total: int) -> str:
    return str(total) if ok == total else f"{ok}/{total}"


# Postfix's order: greeting-time commands first, QUIT last.
_ORDER = {
    name: i
    for i, name in enumerate(
        "helo ehlo starttls auth mail rcpt data bdat rset noop vrfy expn etrn help "
        "xclient xforward unknown quit".split()
    )
}


def _position(name: str) -> int:
    # A verb added to rules.Verb and not listed above goes last but one:
    # the summary line must never fail (it is written as the session ends).
    return _ORDER.get(name, len(_ORDER))
