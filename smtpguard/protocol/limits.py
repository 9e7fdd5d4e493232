"""Limits and rates on MAIL and RCPT, decided before the command goes out.

A pure function of the command, the transaction so far and the upstream's
EHLO keywords: the local reply that refuses the command, or None to let it
go on.  Each refusal is reported through :class:`~.defences.Defences` (one
:class:`~.events.PolicyAction`), so in observe mode the limit is logged and
the command still goes out.

- :func:`refusal`: ``body.eight_bit: reject`` for a declared
  ``BODY=8BITMIME``, the declared ``SIZE=`` (RFC 1870) and the recipients
  per transaction; skipped for a command out of sequence that the policy
  only observes (the upstream answers it, not us).
- :func:`rate_refusal`: the per-client rates, injected as ``admit`` (the
  core has no clock); asked once per MAIL or RCPT that may go out.
"""

from __future__ import annotations

from collections.abc import Callable

from . import policy as P
from . import replies as R
from .arguments import parameters
from .defences import Defences
from .policy import Action, Defence, Policy
from .rules import Verb


def refusal(
    verb: Verb, line: bytes, rcpts: int, upstream: frozenset[bytes], defences: Defences
) -> R.Reply | None:
    """The reply refusing ``line`` (MAIL or RCPT, after ``rcpts`` recipients
    in this transaction) for a limit, or None; ``upstream``: the upstream's
    EHLO keywords."""
    if verb is Verb.MAIL:
        if declares_eight_bit(line, upstream, defences.policy):
            defences.report(Defence.EIGHT_BIT, Action.REJECT, "BODY=8BITMIME")
            return P.EIGHT_BIT_REFUSED
        if defences.declared_size_refused(line):
            return P.MESSAGE_TOO_BIG
    elif verb is Verb.RCPT and defences.recipients_refused(rcpts):
        return P.TOO_MANY_RECIPIENTS
    return None


def declares_eight_bit(mail: bytes, upstream: frozenset[bytes], policy: Policy) -> bool:
    """MAIL ... BODY=8BITMIME for an upstream without 8BITMIME, under
    ``body.eight_bit: reject``."""
    return (
        policy.reject_eight_bit
        and b"8BITMIME" not in upstream
        and b"BODY=8BITMIME" in mail.upper()
        and b"BODY=8BITMIME" in parameters(mail)  # a parameter, not text in the path
    )


def rate_refusal(verb: Verb, admit: Callable[[str], bool] | None) -> R.Reply | None:
    """The reply refusing a MAIL or RCPT for the client's rate, or None."""
    if admit is None or admit("message" if verb is Verb.MAIL else "recipient"):
        return None
    return P.TOO_MUCH_MAIL if verb is Verb.MAIL else P.RCPT_RATE
