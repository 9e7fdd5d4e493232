"""The limits shared through a real redis-server (store.redis): two smtpguard
instances (one with two workers) in front of one real Postfix, as a fleet
behind a load balancer.  Each limit must hold for the fleet, not per
process; and when Redis dies or hangs, mail keeps flowing and the failure is
counted (fail open)."""

from __future__ import annotations

import smtplib
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from guard import Guard, RawClient
from peers import Postfix
from support.redis import RedisServer, Sentinel
from test_shield import established, wait_for

GuardFactory = Callable[..., Guard]

#: Refusals at connect (protocol/policy.py, replies.py), with the test hostname.
TOO_MANY_CONNECTIONS = b"421 4.7.0 guard.test Error: too many connections\r\n"


@pytest.fixture
def redis() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


def fleet(
    factory: GuardFactory, postfix: Postfix, redis: RedisServer, **config: Any
) -> tuple[Guard, Guard]:
    """Two instances sharing ``redis``: A with two workers, B with one."""
    host, port = postfix.address
    shared = {"store": {"redis": redis.url, "timeout_seconds": 0.25, "retry_seconds": 0.5}}
    a = factory(f"{host}:{port}", workers=2, **shared, **config)
    b = factory(f"{host}:{port}", workers=1, **shared, **config)
    return a, b


def client(guard: Guard, source: str = "127.0.0.1") -> RawClient:
    """A raw client from ``source`` (any 127.x address)."""
    return RawClient(guard.port, source=source)


def send(guard: Guard, sender: str, rcpt: str, source: str = "127.0.0.1") -> None:
    with smtplib.SMTP("127.0.0.1", guard.port, timeout=30, source_address=(source, 0)) as smtp:
        smtp.ehlo("fleet.client.test")
        assert smtp.sendmail(sender, [rcpt], b"Subject: fleet\r\n\r\nhello\r\n") == {}


def test_concurrent_sessions_per_client_are_exact_across_workers_and_instances(
    guard_factory: GuardFactory, postfix: Postfix, redis: RedisServer
) -> None:
    a, b = fleet(guard_factory, postfix, redis, limits={"max_connections_per_client": 3})
    held = [client(a, "127.0.7.1"), client(a, "127.0.7.1"), client(b, "127.0.7.1")]
    try:
        for raw in held:
            assert raw.reply().startswith(b"220 ")
        # Each process alone holds at most two of them; the fleet holds three.
        for guard in (a, b):
            with client(guard, "127.0.7.1") as extra:
                assert extra.read_to_eof() == TOO_MANY_CONNECTIONS
        # Another client is not counted with this one.
        with client(b, "127.0.7.2") as other:
            assert other.reply().startswith(b"220 ")
        held.pop(0).close()
        # The slot comes back (released by A's worker), and B sees it.
        deadline = time.monotonic() + 10
        while True:
            with client(b, "127.0.7.1") as again:
                first = again.reply()
            if first.startswith(b"220 "):
                break
            assert time.monotonic() < deadline, first
            time.sleep(0.1)
        assert a.metric("smtpguard_store_errors_total", op="connect") == 0
        assert b.metric("smtpguard_store_up", store="redis") == 1
    finally:
        for raw in held:
            raw.close()


def test_the_connection_rate_is_the_fleets(
    guard_factory: GuardFactory, postfix: Postfix, redis: RedisServer
) -> None:
    a, b = fleet(guard_factory, postfix, redis, rates={"connections_per_minute": 4})
    for guard in (a, b, a, b):
        with client(guard, "127.0.8.1") as raw:
            assert raw.reply().startswith(b"220 ")
            raw.send(b"QUIT\r\n")
            raw.read_to_eof()
    for guard in (a, b):
        with client(guard, "127.0.8.1") as raw:
            assert raw.read_to_eof().startswith(b"421 4.7.0 ")
    assert a.metric("smtpguard_connection_rate_refusals_total") == 1
    assert b.metric("smtpguard_connection_rate_refusals_total") == 1
    with client(a, "127.0.8.2") as raw:  # another client has its own rate
        assert raw.reply().startswith(b"220 ")


def test_the_message_rate_is_the_fleets(
    guard_factory: GuardFactory, postfix: Postfix, redis: RedisServer
) -> None:
    a, b = fleet(guard_factory, postfix, redis, rates={"messages_per_minute": 2})
    rcpt = f"rate-{uuid.uuid4().hex[:8]}@example.org"
    messages = "smtpguard:{127.0.9.1}:message"
    send(a, "one@fleet.test", rcpt, "127.0.9.1")
    wait_for(lambda: redis.cli("ZCARD", messages) == "1", 10)  # pushed within one batch
    send(b, "two@fleet.test", rcpt, "127.0.9.1")
    wait_for(lambda: redis.cli("ZCARD", messages) == "2", 10)
    for guard in (a, b):
        with pytest.raises(smtplib.SMTPSenderRefused) as refused:
            send(guard, "three@fleet.test", rcpt, "127.0.9.1")
        assert refused.value.smtp_code == 450
        assert refused.value.smtp_error.startswith(b"4.7.1 ")
    postfix.wait_for_messages(2, where=lambda m: rcpt in m.recipients, timeout=30)
    time.sleep(0.5)
    assert len([m for m in postfix.messages() if rcpt in m.recipients]) == 2


def test_the_recipient_rate_is_the_fleets(
    guard_factory: GuardFactory, postfix: Postfix, redis: RedisServer
) -> None:
    a, b = fleet(guard_factory, postfix, redis, rates={"recipients_per_minute": 3})
    tag = uuid.uuid4().hex[:8]
    first = [f"r1-{tag}@example.org", f"r2-{tag}@example.org"]
    with smtplib.SMTP("127.0.0.1", a.port, timeout=30, source_address=("127.0.14.1", 0)) as smtp:
        smtp.ehlo("fleet.client.test")
        assert smtp.sendmail("one@fleet.test", first, b"Subject: r\r\n\r\nhi\r\n") == {}
    # Once A's counts have reached Redis (pushed within one batch), B knows
    # them from its connect call: one recipient is left.
    wait_for(lambda: redis.cli("ZCARD", "smtpguard:{127.0.14.1}:recipient") == "2", 10)
    second = [f"r3-{tag}@example.org", f"r4-{tag}@example.org"]
    with smtplib.SMTP("127.0.0.1", b.port, timeout=30, source_address=("127.0.14.1", 0)) as smtp:
        smtp.ehlo("fleet.client.test")
        refused = smtp.sendmail("two@fleet.test", second, b"Subject: r\r\n\r\nhi\r\n")
    assert refused == {
        second[1]: (450, b"4.7.1 Error: too many recipients from you, try again later")
    }
    assert b.metric("smtpguard_client_rate_refusals_total", kind="recipient") == 1
    delivered = postfix.wait_for_messages(2, where=lambda m: tag in " ".join(m.recipients))
    assert sorted(r for m in delivered for r in m.recipients) == sorted([*first, second[0]])


def test_the_penalty_box_is_shared_and_logged_once(
    guard_factory: GuardFactory, postfix: Postfix, redis: RedisServer
) -> None:
    a, b = fleet(
        guard_factory,
        postfix,
        redis,
        penalty_box={"violations": 3, "window_seconds": 60, "seconds": 60, "reply": 554},
    )
    # Two violations through A, one through B: the fleet's window fills.
    for guard, commands in ((a, (b"RCPT TO:<a@example.org>", b"DATA")), (b, (b"DATA",))):
        with client(guard, "127.0.10.1") as bad:
            bad.reply()
            bad.send(b"EHLO bad.test\r\n")
            bad.reply()
            for command in commands:
                bad.send(command + b"\r\n")
                assert bad.reply().startswith(b"503 ")
            bad.send(b"QUIT\r\n")
            bad.read_to_eof()
    wait_for(lambda: b.metric("smtpguard_penalty_box_entries_total") == 1, 10)
    for guard in (a, b, a):
        with client(guard, "127.0.10.1") as again:
            assert again.read_to_eof() == (
                b"554 5.7.1 guard.test Error: access denied: too many protocol violations\r\n"
            )
    assert a.metric("smtpguard_penalty_box_entries_total") == 0
    assert a.metric("smtpguard_penalty_box_refusals_total") == 2
    assert b.metric("smtpguard_penalty_box_refusals_total") == 1
    # Logged once for the fleet: by the process that boxed the client.
    assert a.log().count('event="penalty box"') + b.log().count('event="penalty box"') == 1


def test_the_upstream_cap_is_the_fleets(
    guard_factory: GuardFactory, postfix: Postfix, redis: RedisServer
) -> None:
    a, b = fleet(
        guard_factory,
        postfix,
        redis,
        upstream_limits={"max_sessions": 2, "queue_seconds": 3},
    )
    baseline = established(postfix.port)
    holders = [client(a, "127.0.11.1"), client(b, "127.0.11.2")]
    try:
        for raw in holders:
            assert raw.reply().startswith(b"220 ")

        def busy() -> float:
            return sum(g.metric("smtpguard_upstream_busy_total") for g in (a, b))

        before = busy()
        for guard in (a, b):  # each instance alone would have a free slot
            with client(guard, "127.0.11.3") as late:
                assert late.read_to_eof().startswith(b"421 4.3.2 ")
        assert established(postfix.port) - baseline == 2
        # The two late clients (a readiness probe of the test kit, still in
        # line on a loaded machine, may be refused busy too).
        assert busy() - before >= 2
        # A slot freed on B is taken by a client waiting in A's line.
        waiting = client(a, "127.0.11.4")
        holders.append(waiting)
        time.sleep(0.3)
        holders[1].send(b"QUIT\r\n")
        holders[1].read_to_eof()
        assert waiting.reply().startswith(b"220 ")
    finally:
        for raw in holders:
            raw.close()


def test_mail_keeps_flowing_when_redis_dies_and_the_failure_is_counted(
    guard_factory: GuardFactory, postfix: Postfix, redis: RedisServer
) -> None:
    a, b = fleet(
        guard_factory,
        postfix,
        redis,
        rates={"connections_per_minute": 1000, "messages_per_minute": 1000},
        limits={"max_connections_per_client": 10},
        upstream_limits={"max_sessions": 10, "queue_seconds": 5},
    )
    rcpt = f"outage-{uuid.uuid4().hex[:8]}@example.org"
    send(a, "before@fleet.test", rcpt)
    # Both workers have reached Redis (a call over 0.25 s on a loaded machine
    # marks it down for 0.5 s: wait for the gauge rather than read it once).
    wait_for(lambda: a.metric("smtpguard_store_up", store="redis") == 1, 10)
    redis.kill()
    for guard in (a, b, a, b):
        started = time.monotonic()
        send(guard, "during@fleet.test", rcpt)
        assert time.monotonic() - started < 5  # nobody waits on the store
    postfix.wait_for_messages(5, where=lambda m: rcpt in m.recipients, timeout=30)
    for guard in (a, b):
        assert guard.metric("smtpguard_store_up", store="redis") == 0
        errors = sum(
            guard.metric("smtpguard_store_errors_total", op=op)
            for op in ("connect", "upstream_slot", "sync", "violations", "ping")
        )
        assert errors >= 1
    assert 'event="store down"' in a.log()
    # Back on the same port: the store comes back without a restart.
    redis.start()
    wait_for(lambda: a.metric("smtpguard_store_up", store="redis") == 1, 15)
    wait_for(lambda: b.metric("smtpguard_store_up", store="redis") == 1, 15)
    calls = b.metric("smtpguard_store_call_seconds_count", op="connect")
    send(b, "after@fleet.test", rcpt)
    assert b.metric("smtpguard_store_call_seconds_count", op="connect") == calls + 1
    postfix.wait_for_messages(6, where=lambda m: rcpt in m.recipients, timeout=30)


def test_a_hung_redis_holds_no_session_longer_than_its_timeout(
    guard_factory: GuardFactory, postfix: Postfix, redis: RedisServer
) -> None:
    (a, _b) = fleet(guard_factory, postfix, redis, limits={"max_connections_per_client": 10})
    rcpt = f"hung-{uuid.uuid4().hex[:8]}@example.org"
    redis.pause()
    try:
        started = time.monotonic()
        with client(a, "127.0.12.1") as raw:
            assert raw.reply().startswith(b"220 ")
        greeted = time.monotonic() - started
        send(a, "hung@fleet.test", rcpt)
        assert greeted < 3, greeted  # timeout_seconds is 0.25
        assert a.metric("smtpguard_store_errors_total", op="connect") >= 1
        assert a.metric("smtpguard_store_up", store="redis") == 0
    finally:
        redis.resume()
    postfix.wait_for_messages(1, where=lambda m: rcpt in m.recipients, timeout=30)


def test_through_sentinel_the_store_follows_a_failover(
    guard_factory: GuardFactory, postfix: Postfix
) -> None:
    """store.sentinel: smtpguard asks the sentinels for the primary; when it
    dies, mail flows meanwhile (fail open) and the limits go on in the
    replica that the sentinel promoted, without a restart."""
    with (
        RedisServer() as primary,
        RedisServer(replica_of=primary.port) as replica,
        Sentinel(primary) as sentinel,
    ):
        host, port = postfix.address
        guard = guard_factory(
            f"{host}:{port}",
            store={
                "sentinel": {"service": sentinel.name, "nodes": [f"127.0.0.1:{sentinel.port}"]},
                "timeout_seconds": 0.25,
                "retry_seconds": 0.5,
            },
            limits={"max_connections_per_client": 10},
        )
        rcpt = f"sentinel-{uuid.uuid4().hex[:8]}@example.org"
        with client(guard, "127.0.13.1") as held:  # its session is in the primary
            assert held.reply().startswith(b"220 ")
            wait_for(lambda: primary.cli("ZCARD", "smtpguard:{127.0.13.1}:sessions") == "1", 10)
        send(guard, "before@fleet.test", rcpt, "127.0.13.1")
        primary.kill()
        send(guard, "during@fleet.test", rcpt, "127.0.13.1")  # fails open meanwhile
        wait_for(lambda: sentinel.primary_port() == replica.port, 30)
        # The promoted replica takes the calls: the client's session set is there.
        deadline = time.monotonic() + 20
        while True:
            with client(guard, "127.0.13.2") as held:
                assert held.reply().startswith(b"220 ")
                if replica.cli("ZCARD", "smtpguard:{127.0.13.2}:sessions") == "1":
                    break
            assert time.monotonic() < deadline, "the store never reached the new primary"
            time.sleep(0.5)
        wait_for(lambda: guard.metric("smtpguard_store_up", store="redis") == 1, 15)
        send(guard, "after@fleet.test", rcpt, "127.0.13.1")
        postfix.wait_for_messages(3, where=lambda m: rcpt in m.recipients, timeout=30)
