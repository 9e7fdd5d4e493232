"""The session's parts, each alone: reply queue, transaction, EHLO rewriting,
BDAT and DATA readers, defences, annotation, enums."""

from __future__ import annotations

import pytest

from smtpguard.protocol import annotate, bdat, ehlo
from smtpguard.protocol.body import DataReader
from smtpguard.protocol.defences import Defences
from smtpguard.protocol.events import CloseReason, Event, PolicyAction, Violation
from smtpguard.protocol.options import AnnotateMode, SessionOptions
from smtpguard.protocol.policy import ALLOWED, Action, Defence, Policy
from smtpguard.protocol.queue import ReplyQueue, Slot
from smtpguard.protocol.rules import Phase, Verb
from smtpguard.protocol.transaction import Transaction

UPSTREAM_EHLO = (
    b"250-up.example\r\n",
    b"250-PIPELINING\r\n",
    b"250-SIZE 1000\r\n",
    b"250-XCLIENT NAME\r\n",
    b"250-CHUNKING\r\n",
    b"250-BINARYMIME\r\n",
    b"250-AUTH PLAIN\r\n",
    b"250 ENHANCEDSTATUSCODES\r\n",
)

# ------------------------------------------------------------ reply queue


def test_queue_sends_replies_in_command_order() -> None:
    q = ReplyQueue()
    out = bytearray()
    first = Slot(Verb.MAIL, Verb.MAIL)
    assert not q.push(first)  # unknown yet
    q.expect(first)
    assert not q.push(Slot(Verb.NOOP, Verb.NOOP, b"250 local\r\n"))  # behind MAIL's
    q.flush(out, False)
    assert out == b""
    first.reply = b"250 mail\r\n"
    q.flush(out, False)
    assert out == b"250 mail\r\n250 local\r\n"
    assert q.queued == 2 and not q.owed


def test_queue_renders_local_replies_when_sent() -> None:
    q = ReplyQueue()
    out = bytearray()
    assert q.push(Slot(Verb.RCPT, Verb.RCPT, lambda enhanced: b"E" if enhanced else b"P"))
    q.flush(out, True)
    assert out == b"E"


def test_queue_blocker_is_the_first_group_ender_with_pipelining() -> None:
    q = ReplyQueue()
    q.push(Slot(Verb.GREETING, Verb.GREETING))
    mail = Slot(Verb.MAIL, Verb.MAIL)
    data = Slot(Verb.DATA, Verb.DATA)
    q.push(mail)
    q.push(data)
    assert q.blocker(client_pipelining=True) is data
    assert q.blocker(client_pipelining=False) is mail


def test_queue_awaits() -> None:
    q = ReplyQueue()
    q.expect(Slot(Verb.BDAT, Verb.BDAT_LAST))
    assert q.awaits(Verb.BDAT_LAST) and not q.awaits(Verb.DATA_END)


def test_a_transaction_starts_empty() -> None:
    t = Transaction()
    assert (t.rcpts, t.annotated, t.size_reported, t.content_bytes, t.bdat_tail) == (
        0,
        False,
        False,
        0,
        b"",
    )
    assert t.last_chunk is None and not t.bdat_bare


# ------------------------------------------------------------------ EHLO


def test_ehlo_parse_and_hidden() -> None:
    greeting, texts = ehlo.parse(UPSTREAM_EHLO)
    assert greeting == b"up.example\r\n"
    words = [w for w, _ in texts]
    assert words[:3] == [b"PIPELINING", b"SIZE", b"XCLIENT"]
    hidden = ehlo.hidden(SessionOptions(chunking=False), False, frozenset(words))
    assert {b"AUTH", b"CHUNKING", b"BINARYMIME"} <= hidden


def test_ehlo_rewrite_relays_only_what_smtpguard_mediates() -> None:
    opts = SessionOptions(tls_offered=True, policy=Policy(max_message_bytes=500))
    data, caps = ehlo.rewrite(UPSTREAM_EHLO, opts, tls_active=False)
    assert data == (
        b"250-up.example\r\n250-PIPELINING\r\n250-SIZE 500\r\n250-CHUNKING\r\n"
        b"250-BINARYMIME\r\n250-ENHANCEDSTATUSCODES\r\n250 STARTTLS\r\n"
    )
    assert b"XCLIENT" in caps.upstream and b"XCLIENT" not in caps.offered
    # AUTH is hidden before TLS but usable: it gets 538, not "not enabled".
    assert b"AUTH" not in caps.offered and b"AUTH" in caps.usable
    assert caps.enhanced and caps.upstream_pipelining and caps.client_pipelining
    assert ehlo.rewrite(UPSTREAM_EHLO, opts, tls_active=False) == (data, caps)  # memoized


def test_ehlo_line_limits_and_after_starttls() -> None:
    assert ehlo.line_limits({b"SIZE", b"DSN"}, 512) == {Verb.MAIL: 512 + 126, Verb.RCPT: 1012}
    _, caps = ehlo.rewrite(UPSTREAM_EHLO, SessionOptions(), tls_active=True)
    after = ehlo.after_starttls(caps)
    assert after.upstream == caps.upstream and after.upstream_pipelining
    assert not (after.offered or after.usable or after.enhanced or after.client_pipelining)
    assert ehlo.helo_reply(UPSTREAM_EHLO, "me") == b"250 up.example\r\n"


def test_announce_size() -> None:
    kept, offered = [b"SIZE 10\r\n"], {b"SIZE"}
    ehlo.announce_size(kept, offered, 500)
    assert kept == [b"SIZE 10\r\n"]  # theirs is lower
    kept = [b"SIZE\r\n"]
    ehlo.announce_size(kept, offered, 500)
    assert kept == [b"SIZE 500\r\n"]


# ------------------------------------------------------------ BDAT / DATA


@pytest.mark.parametrize(
    ("line", "want"),
    [
        (b"BDAT 10", bdat.Bdat(10, False)),
        (b"BDAT 0 last", bdat.Bdat(0, True)),
        (b"BDAT x", None),
        (b"BDAT 10 MORE", None),
        (b"BDAT 1234567890123", None),
        (b"BDAT", None),
    ],
)
def test_bdat_parse(line: bytes, want: bdat.Bdat | None) -> None:
    assert bdat.parse(line) == want


def test_bdat_bare_breaks_across_pieces() -> None:
    assert bdat.bare_breaks(b"", b"a\r") == (False, b"\r")
    assert bdat.bare_breaks(b"\r", b"\nb") == (False, b"")
    assert bdat.bare_breaks(b"", b"a\nb")[0]
    assert bdat.bare_breaks(b"", b"a\rb")[0]


def test_data_reader_findings_are_new_once() -> None:
    reader = DataReader("observe")
    reader.filter.feed(bytearray(b"a\nb\r\n"))
    assert reader.new_findings() == ["bare_lf"]
    assert reader.new_findings() == []


def test_data_reader_longest_line() -> None:
    reader = DataReader()
    assert reader.longest_line(b"abc") == 3
    assert reader.longest_line(b"de\r\nxy\r\nz") == 7  # "abcde\r\n"
    assert reader.line_bytes == 1


# -------------------------------------------------------------- defences


def _defences(**policy: object) -> tuple[Defences, list[Event]]:
    events: list[Event] = []
    return Defences(Policy(**policy), events), events  # type: ignore[arg-type]


def test_policy_actions_are_enums() -> None:
    p = Policy(sequence="observe")  # type: ignore[arg-type]
    assert p.sequence is Action.OBSERVE
    assert all(isinstance(a, Action) for allowed in ALLOWED.values() for a in allowed)


def test_defences_limits_observe_or_reject() -> None:
    d, events = _defences(max_recipients=2)
    assert not d.recipients_refused(1)
    assert d.recipients_refused(2)
    assert events == [
        PolicyAction(Defence.RECIPIENTS, Action.REJECT, "recipients in one transaction")
    ]
    d, events = _defences(max_recipients=2, observe_limits=True)
    assert not d.recipients_refused(2)
    assert events[0].action is Action.OBSERVE


def test_defences_declared_size() -> None:
    d, _ = _defences(max_message_bytes=100)
    assert d.declared_size_refused(b"MAIL FROM:<a> SIZE=101")
    assert not d.declared_size_refused(b"MAIL FROM:<a> SIZE=100")
    assert not _defences()[0].declared_size_refused(b"MAIL FROM:<a> SIZE=999999")


def test_defences_error_and_unknown_limits() -> None:
    d, _ = _defences(hard_error_limit=2, max_unknown_commands=1)
    assert not d.error_reply()
    assert d.error_reply()
    assert not d.error_reply()  # reported once
    d.unknown_command()
    assert not d.too_many_unknown()
    d.unknown_command()
    assert d.too_many_unknown()


def test_defences_bare_newlines() -> None:
    d, _ = _defences(smuggling="normalize")
    assert d.bare_command(bare_lf=True, has_cr=False)
    assert not d.bare_command(bare_lf=False, has_cr=True)
    assert not d.bare_sasl()
    assert _defences(smuggling="observe")[0].bare_sasl()
    assert _defences(smuggling="reject")[0].smuggling(["nul"])


def test_defences_report_once() -> None:
    d, events = _defences(pipelining="reject")
    blocker = object()
    assert d.sent_ahead(blocker) is Action.REJECT
    d.sent_ahead(blocker)
    assert d.early_talk() is Action.OBSERVE
    d.early_talk()
    assert [e.defence for e in events if isinstance(e, PolicyAction)] == [
        Defence.PIPELINING,
        Defence.EARLY_TALK,
    ]


def test_defences_violations_remember_kinds() -> None:
    d, events = _defences()
    for _ in range(2):
        d.violation(Verb.RCPT, Phase.READY, "need MAIL before RCPT", Action.REJECT)
    assert d.violations == 2 and d.kinds == {"RCPT@ready"}
    assert isinstance(events[0], Violation)


# ------------------------------------------------------ annotation, enums


def test_annotation_header() -> None:
    assert annotate.header(AnnotateMode.OFF, "X-G", "h", 3, {"A@b"}) == b""
    assert annotate.header(AnnotateMode.VIOLATIONS, "X-G", "h", 0, set()) == b""
    assert annotate.header(AnnotateMode.ALWAYS, "X-G", "h", 0, set()) == (
        b"X-G: h; violations=0\r\n"
    )
    assert annotate.header(AnnotateMode.VIOLATIONS, "X-G", "h", 2, {"b@x", "a@y"}) == (
        b"X-G: h; violations=2; kinds=a@y,b@x\r\n"
    )


def test_enums_are_their_strings() -> None:
    assert CloseReason("quit") is CloseReason.QUIT and CloseReason.QUIT == "quit"
    assert {CloseReason.POLICY: 1}["policy"] == 1
    assert SessionOptions(annotate="always").annotate is AnnotateMode.ALWAYS  # type: ignore[arg-type]


# ------------------------------------------------------------- fast path

_SCRIPT = [
    ("up", b"220 up ESMTP\r\n"),
    ("client", b"EHLO c\r\n"),
    ("up", b"250-up\r\n250-PIPELINING\r\n250 ENHANCEDSTATUSCODES\r\n"),
    ("client", b"RCPT TO:<early@x>\r\n"),  # out of sequence: full path
    ("client", b"MAIL FROM:<a@x>\r\n"),
    ("up", b"250 2.1.0 Ok\r\n"),
    ("client", b"RCPT TO:<b@x>\r\n"),
    ("up", b"250 2.1.5 Ok\r\n"),
    ("client", b"NOOP\r\n"),
    ("up", b"250 2.0.0 Ok\r\n"),
    ("client", b"DATA\r\n"),
    ("up", b"354 go\r\n"),
    ("client", b"Subject: x\r\n\r\nbody\r\n.\r\n"),
    ("up", b"250 2.0.0 queued\r\n"),
    ("client", b"HELP\r\n"),  # may be local: full path
    ("up", b"214 help\r\n"),
    ("client", b"QUIT\r\n"),
    ("up", b"221 Bye\r\n"),
]


def _run(fast: bool, monkeypatch: pytest.MonkeyPatch, **options: object) -> list[object]:
    from smtpguard.protocol.session import Session

    with monkeypatch.context() as m:
        if not fast:
            m.setattr(Session, "_ready_for_fast_path", lambda self: False)
        s = Session(SessionOptions(**options))  # type: ignore[arg-type]
        seen: list[object] = []
        for who, data in _SCRIPT:
            (s.receive_upstream if who == "up" else s.receive_client)(data)
            seen += [s.take_client_bytes(), s.take_upstream_bytes(), s.take_events()]
            seen.append((s.state, s.close_reason, s.commands_seen, s.violations))
        return seen


@pytest.mark.parametrize(
    "options",
    [{}, {"help_local": True}, {"policy": Policy(max_recipients=0)}, {"max_line_bytes": 12}],
    ids=["default", "help_local", "max_recipients", "short_lines"],
)
def test_the_fast_path_decides_as_the_full_path(
    monkeypatch: pytest.MonkeyPatch, options: dict[str, object]
) -> None:
    assert _run(True, monkeypatch, **options) == _run(False, monkeypatch, **options)


def test_the_fast_path_asks_admit_once(monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[str] = []

    def admit(kind: str) -> bool:
        asked.append(kind)
        return kind != "recipient"

    out = _run(True, monkeypatch, admit=admit)
    assert asked == ["message", "recipient"]
    assert any(b"450 4.7.1" in x for x in out if isinstance(x, bytes))
