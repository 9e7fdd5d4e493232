"""The session's syntax guard: each forwarded command's argument judged by
:mod:`.syntax`, with the extensions this session's client may use.

``policy.syntax`` picks the mode (observe, normalize, strict).  What the
client may use is what it was shown *and* the upstream advertised, plus
``SIZE`` when smtpguard announces it for an upstream that did not (its
parameter is then smtpguard's to judge, and is taken off the line: the
upstream never sees a parameter of an extension it did not advertise).
"""

from __future__ import annotations

from . import ehlo
from .events import Event, Normalized, SyntaxFinding
from .policy import Action
from .rules import Verb
from .syntax import (
    ARGUMENT_REQUIRED,
    PARAMETERS,
    SHAPE_OF,
    VALUE_EXTENSION,
    Mode,
    Offered,
    Shape,
    Verdict,
    check,
    words,
)

#: ``policy.syntax`` action -> syntax mode.
MODE_OF = {
    Action.OBSERVE: Mode.OBSERVE,
    Action.NORMALIZE: Mode.NORMALIZE,
    Action.STRICT: Mode.STRICT,
}
_NOTHING = Offered()
#: After HELO (no extension was advertised to this session): every parameter
#: extension, so that outside strict mode a known parameter is only checked
#: for its value and then left to the upstream (Postfix accepts them after
#: HELO); strict mode refuses them (RFC 5321 4.1.1.11 and 2.2.1: extensions
#: only after EHLO).
_AFTER_HELO = Offered(
    frozenset(p.extension for p in PARAMETERS.values()) | frozenset(VALUE_EXTENSION.values())
)
#: A verb alone, as written by every client (``DATA``, ``QUIT``...): canonical
#: in every mode, so the grammar is not asked (the common case, per message).
BARE = frozenset(
    verb.value.encode()
    for verb, shape in SHAPE_OF.items()
    if shape in (Shape.NO_ARGUMENT, Shape.FREE) and verb not in ARGUMENT_REQUIRED
)


class ArgumentGuard:
    """Judges command lines for one session; reports findings as events."""

    __slots__ = ("mode", "offered", "strip_size", "_events")

    def __init__(self, action: Action, events: list[Event]) -> None:
        self.mode = MODE_OF[action]
        self.offered = _NOTHING
        #: SIZE is smtpguard's own (the upstream did not advertise it).
        self.strip_size = False
        self._events = events

    def capabilities(self, caps: ehlo.Capabilities) -> None:
        """The client was shown ``caps`` (after EHLO; NO_EXTENSIONS after HELO)."""
        if caps is ehlo.NO_EXTENSIONS:
            self.strip_size = False
            self.offered = _NOTHING if self.mode is Mode.STRICT else _AFTER_HELO
            return
        ours = caps.offered - caps.upstream
        self.strip_size = b"SIZE" in ours
        self.offered = Offered((caps.offered & caps.upstream) | (ours & {b"SIZE"}))

    def judge(self, verb: Verb, line: bytes, smtputf8: bool) -> Verdict:
        """The verdict on ``line`` (``smtputf8``: the transaction's MAIL had SMTPUTF8)."""
        if line in BARE:
            return Verdict(line, line, False)
        verdict = check(
            verb, line, mode=self.mode, offered=self.offered, smtputf8_transaction=smtputf8
        )
        if verdict.reason is not None:
            self._events.append(
                SyntaxFinding(
                    verb,
                    verdict.reason.value,
                    verdict.refused,
                    verdict.argument_bytes,
                    verdict.octet.value if verdict.octet is not None else "",
                )
            )
        return verdict

    def outgoing(self, verb: Verb, sent: bytes, line: bytes) -> bytes:
        """What goes to the upstream for ``line`` (judged from the client's
        ``sent``): without smtpguard's own SIZE parameter; counted as
        normalized if it differs from what the client sent."""
        if self.strip_size and verb is Verb.MAIL and b"SIZE=" in line.upper():
            line = _without_size(line)
        if line != sent:
            self._events.append(Normalized(verb))
        return line


def parameters(mail: bytes) -> list[bytes]:
    """A MAIL line's ESMTP parameters, upper case: the words after its path,
    cut as :func:`.syntax.words` does (a quoted local part is one word)."""
    _head, colon, rest = mail.partition(b":")
    return [word.upper() for word, _ in words(rest)[1:]] if colon else []


def _without_size(mail: bytes) -> bytes:
    """``mail`` without its SIZE parameter (smtpguard's own extension)."""
    head, colon, rest = mail.partition(b":")
    found = words(rest)
    if not colon or not found:
        return mail
    kept = [word for word, _ in found[1:] if not word.upper().startswith(b"SIZE=")]
    return head + colon + found[0][0] + b"".join(b" " + word for word in kept)
