"""The deadline in force on a connection (pure: a fake clock, timer and session)."""

from __future__ import annotations

from dataclasses import dataclass, field

from smtpguard.config import Timeouts
from smtpguard.deadlines import Deadlines, Kind, reply_timeout
from smtpguard.protocol.rules import Verb

T = Timeouts(
    greeting_seconds=10,
    command_reply_seconds=20,
    data_init_seconds=30,
    data_end_seconds=40,
    client_command_seconds=50,
    client_data_seconds=60,
    connect_seconds=5,
)


@dataclass
class FakeSession:
    in_body: bool = False
    awaiting_upstream: bool = True
    upstream_replies: int = 0
    commands_seen: int = 0
    head_step: Verb | None = Verb.GREETING
    closed: bool = False


@dataclass
class FakeTimer:
    entries: list[list[object]] = field(default_factory=list)

    def schedule(self, when: float, target: object) -> list[object]:
        entry: list[object] = [when, len(self.entries), target]
        self.entries.append(entry)
        return entry

    def cancel(self, entry: list[object]) -> None:
        entry[2] = None

    def fire(self, now: float) -> None:
        """What the real timer does at ``now``: pop the due entries, call them."""
        for entry in list(self.entries):
            target = entry[2]
            if target is not None and entry[0] <= now:  # type: ignore[operator]
                entry[2] = None
                target.fired(now)  # type: ignore[attr-defined]

    def live(self) -> list[float]:
        return [e[0] for e in self.entries if e[2] is not None]  # type: ignore[misc]


@dataclass
class FakeWatcher:
    """Acts as the connection does: a timeout closes the session (with a 421)."""

    session: FakeSession
    calls: list[object] = field(default_factory=list)

    def send_expired(self) -> None:
        self.calls.append("send_expired")

    def deadline_passed(self, kind: Kind, sending: bool) -> None:
        self.calls.append((kind, sending))
        self.session.closed = True


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make() -> tuple[Deadlines, FakeSession, FakeTimer, FakeWatcher, Clock]:
    session, timer, clock = FakeSession(), FakeTimer(), Clock()
    watcher = FakeWatcher(session)
    deadlines = Deadlines(session, T, watcher, timer, clock)  # type: ignore[arg-type]
    return deadlines, session, timer, watcher, clock


def test_each_step_has_its_reply_timeout() -> None:
    assert reply_timeout(T, Verb.GREETING) == 10
    assert reply_timeout(T, Verb.DATA) == 30
    for step in (Verb.DATA_END, Verb.BDAT, Verb.BDAT_LAST):
        assert reply_timeout(T, step) == 40
    assert reply_timeout(T, Verb.MAIL) == reply_timeout(T, None) == 20


def test_the_greeting_is_awaited_first() -> None:
    d, _, timer, _, _ = make()
    assert (d.kind, d.at) == (Kind.UPSTREAM_REPLY, 110)
    d.start()
    assert timer.live() == [110]


def test_the_deadline_follows_the_session() -> None:
    d, s, _, _, clock = make()
    s.awaiting_upstream, s.upstream_replies = False, 1
    clock.now = 101
    d.rearm(0)
    assert (d.kind, d.at) == (Kind.CLIENT_COMMAND, 151)
    s.awaiting_upstream, s.commands_seen, s.head_step = True, 1, Verb.DATA
    d.rearm(0)
    assert (d.kind, d.at) == (Kind.UPSTREAM_REPLY, 131)
    s.awaiting_upstream, s.in_body = False, True
    d.rearm(3)
    assert (d.kind, d.at) == (Kind.CLIENT_BODY, 161)


def test_the_same_wait_keeps_its_deadline() -> None:
    d, s, _, _, clock = make()
    s.awaiting_upstream, s.upstream_replies = False, 1
    d.rearm(0)
    first = d.at
    clock.now += 30  # partial bytes of a command: no new deadline
    d.rearm(5)
    assert d.at == first
    s.commands_seen += 1  # a command (answered locally, say): a new one
    d.rearm(5)
    assert d.at == first + 30
    s.in_body = True
    d.rearm(5)
    clock.now += 1
    d.rearm(5)  # no new read of the body: the same deadline
    assert d.at == clock.now - 1 + 60
    d.rearm(6)  # each read of the body moves it
    assert d.at == clock.now + 60


def test_a_later_deadline_costs_no_timer_update_an_earlier_one_does() -> None:
    d, s, timer, _, clock = make()
    d.start()
    s.awaiting_upstream, s.upstream_replies = False, 1
    d.rearm(0)  # 150: later than the greeting's 110
    assert timer.live() == [110]
    s.awaiting_upstream, s.commands_seen, s.head_step = True, 1, Verb.MAIL
    clock.now = 80  # (a clock that went back only to make 100 the earlier)
    d.rearm(0)
    assert timer.live() == [100]


def test_when_it_fires_early_it_wakes_again_at_the_deadline() -> None:
    d, s, timer, watcher, _ = make()
    d.start()
    s.awaiting_upstream, s.upstream_replies = False, 1
    d.rearm(0)
    timer.fire(110)
    assert watcher.calls == [] and timer.live() == [150]


def test_a_passed_deadline_is_reported_once() -> None:
    d, _, timer, watcher, _ = make()
    d.start()
    timer.fire(110)
    assert watcher.calls == [(Kind.UPSTREAM_REPLY, False)]
    assert timer.live() == []
    d.fired(200)  # no longer watching
    assert watcher.calls == [(Kind.UPSTREAM_REPLY, False)]


def test_a_reply_the_client_does_not_take() -> None:
    d, s, timer, watcher, clock = make()
    d.start()
    s.awaiting_upstream, s.upstream_replies = False, 1
    d.rearm(0)  # client command deadline: 150
    clock.now = 105
    d.sending()  # must be taken by 155; the wake-up stays at 110
    assert d.send_since == 105 and timer.live() == [110]
    timer.fire(110)
    assert timer.live() == [150]
    timer.fire(150)  # the command deadline passes while the reply is being sent
    assert watcher.calls == [(Kind.CLIENT_COMMAND, True)]
    assert timer.live() == [155]  # the session is closed: only the send's deadline
    timer.fire(155)
    assert watcher.calls[-1] == "send_expired"


def test_a_sent_reply_needs_no_wake_up() -> None:
    d, s, timer, watcher, clock = make()
    d.start()
    clock.now = 101
    d.sending()
    assert timer.live() == [110]  # the greeting's deadline comes first
    d.sent()
    assert d.send_since is None


def test_stop_cancels_the_wake_up() -> None:
    d, _, timer, watcher, _ = make()
    d.start()
    d.stop()
    assert timer.live() == []
    d.fired(500)
    assert watcher.calls == []
