"""Compare the two runs of each session, and name every difference.

For each step played in both runs, the replies are compared (code and
enhanced code).  A difference gets a class:

- ``same``: nothing differs;
- ``enhanced code only``: same codes, another enhanced code (or none);
- ``both refused``: both 4xx/5xx (e.g. smtpguard's 503 where Postfix says
  ``554 no valid recipients``): the client's outcome is the same;
- ``by design: ...``: a difference listed in ``BY_DESIGN`` (the README's
  table "Differences from the upstream, by design"), each with its RFC;
- ``FALSE POSITIVE``: the upstream accepted, smtpguard refused, and no
  by-design rule explains it: the harness fails;
- ``accepted only through smtpguard``: smtpguard accepted what the upstream
  refused, outside the by-design rules: the harness fails too (smtpguard
  must not let through what the upstream would refuse either).

The deliveries of the two runs must be the same messages with the same
envelopes and bodies, and in each run what was delivered must be exactly
what the client was told was accepted, under the sender the client saw
accepted (one view of the session).
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from runner import CLOSED, Reply, StepResult, Transcript
from scripts import Step

#: Differences smtpguard makes on purpose: name -> RFC reason.
BY_DESIGN: dict[str, str] = {
    "transaction before EHLO/HELO": (
        "RFC 5321 4.1.4: a client MUST issue EHLO or HELO before a mail transaction; "
        "smtpguard answers 503 5.5.1 (Postfix and Exim accept MAIL without it by default)"
    ),
    "HELP answered locally": (
        "RFC 5321 4.1.1.8: HELP gets 214 from smtpguard (help.local: true) whatever the "
        "upstream would say (Postfix: 500 5.5.2)"
    ),
    "upstream's error limit": (
        "RFC 5321 4.1.4 and 2.3.8: commands out of sequence are answered by smtpguard and "
        "never reach the upstream, so an upstream that hangs up after a few errors (Exim: "
        "smtp_max_synprot_errors = 3) does not see them; smtpguard's own hard_error_limit "
        "(20, Postfix's default) applies"
    ),
    "extension verbs need EHLO": (
        "RFC 5321 2.2.1 and 4.1.1.1: a service extension is used only once the server "
        "offered it in its EHLO reply; after HELO smtpguard answers ETRN, BDAT and AUTH "
        "itself (502/503) and never forwards them (Postfix accepts ETRN after HELO)"
    ),
    "a refused BDAT ends the transaction": (
        "RFC 3030 2: after a refused chunk the transaction has failed; smtpguard ends it on "
        "the upstream too (RSET), so the next MAIL is accepted.  Postfix keeps a failed "
        "non-LAST transaction open until BDAT LAST, Exim keeps its sender after "
        "'503 All RCPT commands were rejected' (and then delivers the next message under "
        "that old sender although the client's new MAIL got 503)"
    ),
    "a refused EHLO/HELO changes nothing": (
        "RFC 5321 4.1.4: after refusing an EHLO or HELO the server MUST stay in the state "
        "it was in; smtpguard refuses a malformed one (policy.syntax) and the upstream "
        "never sees it, so its session keeps the last EHLO's extensions.  Exim and the "
        "strict upstream drop back to a non-ESMTP session after a refused HELO, so they "
        "refuse the extension parameters that follow"
    ),
    "unknown command answered locally": (
        "RFC 5321 4.2.4: a verb smtpguard does not know gets 500 5.5.2 from smtpguard; "
        "the upstream's reply would be a 500 as well, possibly with a hang-up (OpenSMTPD "
        "after pipelined input)"
    ),
}

_VERBS_NEEDING_GREETING = frozenset({"MAIL", "RCPT", "DATA", "BDAT", "CLOSE_IN_DATA"})


def final(result: StepResult) -> Reply:
    return result.replies[-1] if result.replies else CLOSED


def _key(replies: Iterable[Reply]) -> list[tuple[int, str]]:
    return [(r.code, r.enhanced) for r in replies]


def classify(
    step: Step,
    direct: StepResult,
    guard: StepResult,
    bdat_refused: bool = False,
    hello_refused: bool = False,
) -> str:
    """The class of the difference between the two runs of one step;
    ``bdat_refused``: smtpguard refused a BDAT earlier in the session;
    ``hello_refused``: both runs refused an EHLO/HELO earlier in it."""
    if _key(direct.replies) == _key(guard.replies):
        return "same"
    if [r.code for r in direct.replies] == [r.code for r in guard.replies]:
        return "enhanced code only"
    d, g = final(direct), final(guard)
    kind = str(step[0])
    if kind == "HELP" and g.code == 214:
        return "by design: HELP answered locally"
    if kind in _VERBS_NEEDING_GREETING and not direct.greeted and g.code == 503:
        return "by design: transaction before EHLO/HELO"
    if kind in ("ETRN", "BDAT", "AUTH") and not direct.esmtp and g.code in (502, 503):
        return "by design: extension verbs need EHLO"
    if d is CLOSED or d.code == 421:
        if g is not CLOSED and g.code != 421:
            return "by design: upstream's error limit"
    if kind == "RAW" and g.code == 500 and (d.code >= 500 or d is CLOSED):
        return "by design: unknown command answered locally"
    d_ok = d is not CLOSED and d.ok
    g_ok = g is not CLOSED and g.ok
    is_mail = kind == "MAIL" or (kind == "RAW" and str(step[1]).upper().startswith("MAIL "))
    if is_mail and bdat_refused and g_ok and d.code == 503:
        return "by design: a refused BDAT ends the transaction"
    if hello_refused and g_ok and not d_ok and (is_mail or kind in ("RCPT", "DATA", "BDAT")):
        return "by design: a refused EHLO/HELO changes nothing"
    if not d_ok and not g_ok:
        return "both refused"
    if d_ok and g_ok:
        return "both accepted"
    if d_ok:
        return "FALSE POSITIVE"
    return "accepted only through smtpguard"


def _is_hello(step: Step) -> bool:
    word = str(step[1]).split(" ", 1)[0] if step[0] == "RAW" else str(step[0])
    return word.upper() in ("EHLO", "HELO")


FAILING = ("FALSE POSITIVE", "accepted only through smtpguard")
#: By-design differences after which the two runs go different ways (the
#: upstream hung up on the direct run, or accepted a transaction smtpguard
#: refuses): later steps and deliveries are not compared.
DIVERGING = (
    "by design: upstream's error limit",
    "by design: unknown command answered locally",
    "by design: transaction before EHLO/HELO",
    "by design: a refused BDAT ends the transaction",
    "by design: a refused EHLO/HELO changes nothing",
)


@dataclass(frozen=True)
class Delivered:
    marker: bytes  #: with the run letter replaced by "R"
    sender: str
    recipients: tuple[str, ...]
    body: str  #: a hash of the content, trace headers removed, line ends normalized


_MARKER = re.compile(rb"X-Marker: (s\d{4})-([dg])-(\d\d)")


def run_of(data: bytes) -> tuple[bytes, str] | None:
    match = _MARKER.search(data)
    if match is None:
        return None
    return match.group(1) + b"-R-" + match.group(3), match.group(2).decode()


def normalized_body(data: bytes) -> str:
    """The content without the upstream's trace headers, in LF line ends, marker neutral."""
    text = data.replace(b"\r\n", b"\n")
    head, _, rest = text.partition(b"X-Marker: ")
    # Everything before the marker is what the upstream prepended (Received: ...).
    rest = re.sub(rb"^(s\d{4})-[dg]-", rb"\1-R-", rest)
    return hashlib.sha256(b"X-Marker: " + rest).hexdigest()[:16]


def delivered(messages: Iterable[tuple[str, Iterable[str], bytes]]) -> dict[str, list[Delivered]]:
    """Deliveries by run ("d", "g"), from (sender, recipients, data) triples."""
    out: dict[str, list[Delivered]] = {"d": [], "g": []}
    for sender, recipients, data in messages:
        found = run_of(data)
        if found is None or not sender:
            continue  # not ours, or a delivery status notification (DSN NOTIFY=SUCCESS)
        mark, run = found
        out[run].append(
            Delivered(mark, sender, tuple(sorted(set(recipients))), normalized_body(data))
        )
    return out


@dataclass
class Report:
    """Everything the differential run found, for the assertions and the note."""

    upstream: str
    sessions: int = 0
    #: Sessions whose runs went different ways at a by-design difference.
    sessions_diverged: int = 0
    classes: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    leaks: list[str] = field(default_factory=list)
    messages: Counter[str] = field(default_factory=Counter)
    #: Sessions where the upstream alone (direct run) broke one view.
    upstream_alone: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [
            f"{self.upstream}: {self.sessions} sessions "
            f"({self.sessions_diverged} diverged at a by-design difference)"
        ]
        lines += [f"  {name}: {count}" for name, count in sorted(self.classes.items())]
        lines += [f"  messages {name}: {count}" for name, count in sorted(self.messages.items())]
        lines += [f"  upstream alone broke one view: {x}" for x in self.upstream_alone[:10]]
        lines += [f"  leak: {leak}" for leak in self.leaks[:20]]
        lines += [f"  FAIL: {failure}" for failure in self.failures[:40]]
        return "\n".join(lines)


def _view(accepted: Iterable[object]) -> list[tuple[bytes, str, tuple[str, ...]]]:
    out = []
    for item in accepted:
        mark = item.marker  # type: ignore[attr-defined]
        out.append(
            (
                re.sub(rb"-[dg]-", b"-R-", mark),
                item.sender,  # type: ignore[attr-defined]
                tuple(sorted(item.recipients)),  # type: ignore[attr-defined]
            )
        )
    return sorted(out)


def compare(
    report: Report,
    scripts: dict[int, list[Step]],
    direct: dict[int, Transcript],
    guard: dict[int, Transcript],
    deliveries: dict[str, list[Delivered]],
) -> None:
    """Fill ``report`` from both runs of every session."""
    by_session: dict[str, dict[bytes, list[Delivered]]] = {"d": {}, "g": {}}
    for run, items in deliveries.items():
        for item in items:
            by_session[run].setdefault(item.marker[:5], []).append(item)
    for number, steps in scripts.items():
        report.sessions += 1
        d, g = direct[number], guard[number]
        greetings = [t.greeting.code if t.greeting else 0 for t in (d, g)]
        if greetings != [220, 220]:
            report.failures.append(
                f"s{number:04d}: greetings {greetings} ({d.greeting}, {g.greeting})"
            )
            continue
        diverged = bdat_refused = hello_refused = False
        for step, rd, rg in zip(steps, d.steps, g.steps, strict=True):
            if step[0] == "GROUP":
                continue
            if diverged:
                report.classes["not compared: the runs diverged by design"] += 1
                continue
            if rd.skipped or rg.skipped:
                report.classes["not played in one run (STARTTLS not offered, or closed)"] += 1
                continue
            verdict = classify(step, rd, rg, bdat_refused, hello_refused)
            report.classes[verdict] += 1
            bdat_refused |= step[0] == "BDAT" and not final(rg).ok
            hello_refused |= _is_hello(step) and not final(rd).ok and not final(rg).ok
            diverged = verdict in DIVERGING
            if verdict in FAILING:
                report.failures.append(
                    f"s{number:04d} step {rd.index} {_show(step)}: {verdict}: "
                    f"direct {[r.code for r in rd.replies]} {final(rd).text[:60]!r}, "
                    f"through smtpguard {[r.code for r in rg.replies]} {final(rg).text[:60]!r}"
                )
        key = b"s%04d" % number
        for run, transcript in (("d", d), ("g", g)):
            got = sorted((x.marker, x.sender, x.recipients) for x in by_session[run].get(key, []))
            told = _view(transcript.accepted)
            report.messages[f"accepted ({'direct' if run == 'd' else 'through smtpguard'})"] += len(
                told
            )
            if got != told and run == "d":
                # The upstream alone broke one view: its own flaw, reported.
                report.upstream_alone.append(
                    f"s{number:04d}: the client was told {told}, the upstream delivered {got}"
                )
            elif got != told:
                report.failures.append(
                    f"s{number:04d} one view ({run}): the client was told {told}, "
                    f"the upstream delivered {got}"
                )
        if diverged:
            report.sessions_diverged += 1
            continue
        bodies_d = sorted((x.marker, x.body) for x in by_session["d"].get(key, []))
        bodies_g = sorted((x.marker, x.body) for x in by_session["g"].get(key, []))
        if bodies_d != bodies_g or _view(d.accepted) != _view(g.accepted):
            report.failures.append(
                f"s{number:04d} deliveries differ: direct {bodies_d}, through smtpguard {bodies_g}"
            )


def _show(step: Step) -> str:
    if step[0] in ("DATA", "CLOSE_IN_DATA"):
        return str(step[0])
    if step[0] == "BDAT":
        chunks = step[1]
        assert isinstance(chunks, list)
        return f"BDAT x{len(chunks)}{' LAST' if step[2] else ''}"
    return " ".join(str(x) for x in step)
