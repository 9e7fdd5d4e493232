"""The shared store against a real redis-server (started by the fixture), in
process: what Redis holds after a session stopped waiting, after an outage
and after a restart.  A slot or a session's member that nobody owns would
close the upstream (or the client) to the whole fleet until its lease ends."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
import trio
from prometheus_client import CollectorRegistry
from support.redis import RedisServer

from smtpguard.admission import UpstreamBusy, UpstreamLimiter
from smtpguard.config import Address, StoreSettings
from smtpguard.metrics import Metrics
from smtpguard.store import RedisStore, Refusal

UPSTREAM = Address("10.0.0.1", 25)
SLOTS = "smtpguard:{10.0.0.1:25}:slots"


@pytest.fixture
def redis() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
async def store(redis: RedisServer, registry: CollectorRegistry) -> AsyncIterator[RedisStore]:
    settings = StoreSettings(redis=redis.url, timeout_seconds=0.5, retry_seconds=0.3)
    instance = RedisStore(settings, Metrics(registry), lambda kind, key: 0)
    async with trio.open_nursery() as nursery:
        await nursery.start(instance.run)
        yield instance
        nursery.cancel_scope.cancel()


def limiter(store: RedisStore, queue_seconds: float = 5.0) -> UpstreamLimiter:
    return UpstreamLimiter(1, 1, queue_seconds, Metrics(CollectorRegistry()), store)


async def wait_for(predicate: object, seconds: float = 5.0) -> None:
    with trio.fail_after(seconds):
        while not predicate():  # type: ignore[operator]
            await trio.sleep(0.02)


def commandstats(redis: RedisServer) -> dict[str, dict[str, int]]:
    """Redis's count of each command since ``CONFIG RESETSTAT``: name ->
    {"calls": ..., "failed_calls": ...} (INFO commandstats)."""
    stats: dict[str, dict[str, int]] = {}
    for line in redis.cli("INFO", "commandstats").splitlines():
        if line.startswith("cmdstat_"):
            name, values = line.removeprefix("cmdstat_").split(":", 1)
            pairs = (item.split("=") for item in values.split(","))
            stats[name] = {k: int(float(v)) for k, v in pairs}
    return stats


def store_errors(registry: CollectorRegistry) -> float:
    return sum(
        registry.get_sample_value("smtpguard_store_errors_total", {"op": op}) or 0
        for op in ("connect", "upstream_slot", "sync", "violations", "ping")
    )


async def test_a_batch_calls_its_scripts_by_sha_without_asking_redis_which_it_has(
    store: RedisStore, redis: RedisServer, registry: CollectorRegistry
) -> None:
    assert await store.connect("198.51.100.2", 10, 5, False) is not None  # the scripts are in
    redis.cli("CONFIG", "RESETSTAT")
    for _ in range(3):  # three batches, one after the other
        verdict = await store.connect("198.51.100.2", 10, 5, False)
        assert verdict is not None and verdict.refusal is None
    store.count("message", "198.51.100.2")  # pushed by the background task
    await wait_for(lambda: redis.cli("ZCARD", "smtpguard:{198.51.100.2}:message") == "1")
    stats = commandstats(redis)
    assert stats["evalsha"]["calls"] == 4
    assert stats["evalsha"]["failed_calls"] == 0
    assert "script|exists" not in stats  # coredis's Script asked before every pipeline
    assert "script|load" not in stats  # loaded once, before
    assert "eval" not in stats  # not the source either
    assert store_errors(registry) == 0


async def test_after_script_flush_a_batch_loads_them_again_and_loses_nothing(
    store: RedisStore, redis: RedisServer, registry: CollectorRegistry
) -> None:
    slots = limiter(store)
    permit = await slots.acquire(UPSTREAM)
    assert redis.cli("ZCARD", SLOTS) == "1"
    assert redis.cli("SCRIPT", "FLUSH") == "OK"
    redis.cli("CONFIG", "RESETSTAT")
    permit.release()  # a release, a session's call and counts, while Redis has no script
    store.count("message", "198.51.100.3")
    store.count("message", "198.51.100.3")
    verdict = await store.connect("198.51.100.3", 10, 1, False)
    assert verdict is not None and verdict.refusal is None
    await wait_for(lambda: redis.cli("ZCARD", "smtpguard:{198.51.100.3}:message") == "2")
    assert redis.cli("ZCARD", SLOTS) == "0"
    assert redis.cli("ZCARD", "smtpguard:{198.51.100.3}:sessions") == "1"
    assert redis.cli("ZCARD", "smtpguard:{198.51.100.3}:connections") == "1"
    stats = commandstats(redis)
    assert stats["evalsha"]["failed_calls"] >= 1  # NOSCRIPT: the calls were refused once
    assert stats["script|load"]["calls"] >= 1
    assert store.up and store_errors(registry) == 0  # no failure, no outage
    # The slot released is there to take, and the concurrency cap holds.
    permit = await slots.acquire(UPSTREAM, trio.current_time() + 2)
    permit.release()
    second = await store.connect("198.51.100.3", 10, 1, False)
    assert second is not None and second.refusal is Refusal.CONCURRENCY


async def test_a_violation_call_refused_noscript_runs_once(
    store: RedisStore, redis: RedisServer
) -> None:
    """Sent twice, the call that boxed the key would answer 0 the second
    time, and no process would log the penalty."""
    redis.cli("SCRIPT", "FLUSH")
    assert await store.violations("198.51.100.4", 3, 3, 60.0, 60.0) is True
    assert int(redis.cli("PTTL", "smtpguard:{198.51.100.4}:penalty")) > 0


async def test_a_batch_whose_scripts_cannot_be_loaded_again_fails_open_and_recovers(
    store: RedisStore, redis: RedisServer, registry: CollectorRegistry
) -> None:
    slots = limiter(store, queue_seconds=0.5)
    permit = await slots.acquire(UPSTREAM)
    redis.cli("SCRIPT", "FLUSH")
    redis.cli("ACL", "SETUSER", "default", "-script|load")  # NOSCRIPT, and no way back
    try:
        permit.release()
        assert await store.connect("198.51.100.5", 0, 5, False) is None  # the batch failed
        assert not store.up
        assert redis.cli("ZCARD", SLOTS) == "0"  # the ZREM went before the calls
        assert registry.get_sample_value("smtpguard_store_errors_total", {"op": "connect"}) == 1
        # The probe's PING alone brings it back (its SCRIPT LOAD is refused).
        up = {"store": "redis"}
        await wait_for(lambda: registry.get_sample_value("smtpguard_store_up", up) == 1)
    finally:
        redis.cli("ACL", "SETUSER", "default", "+script|load")
    verdict = await store.connect("198.51.100.5", 0, 5, False)
    assert verdict is not None and verdict.refusal is None
    assert redis.cli("ZCARD", "smtpguard:{198.51.100.5}:sessions") == "1"


async def test_after_a_restart_the_scripts_come_back_and_renewal_and_releases_hold(
    store: RedisStore, redis: RedisServer
) -> None:
    slots = limiter(store, queue_seconds=0.5)
    permit = await slots.acquire(UPSTREAM)
    held = await store.connect("198.51.100.6", 0, 1, False)
    assert held is not None and held.refusal is None
    redis.kill()
    redis.start()  # the same port: no keys, no scripts
    redis.cli("CONFIG", "RESETSTAT")
    permit.release()  # its session ended: not to be put back by the renewal
    sessions = "smtpguard:{198.51.100.6}:sessions"
    with trio.fail_after(10):
        while redis.cli("ZCARD", sessions) != "1":  # the live session is put back
            store._renew_due = True  # the periodic renewal (every LEASE_SECONDS / 3)
            store._queued.set()
            await trio.sleep(0.05)
    assert redis.cli("ZCARD", SLOTS) == "0"
    again = await store.connect("198.51.100.6", 0, 1, False)
    assert again is not None and again.refusal is Refusal.CONCURRENCY  # the cap holds
    permit = await slots.acquire(UPSTREAM, trio.current_time() + 2)
    permit.release()
    stats = commandstats(redis)
    assert stats["evalsha"]["calls"] >= 3
    assert "script|exists" not in stats


async def test_a_slot_granted_after_its_session_stopped_waiting_is_given_back(
    store: RedisStore, redis: RedisServer
) -> None:
    slots = limiter(store)
    redis.pause()  # slow, not dead: the answer comes after the session left
    with pytest.raises(UpstreamBusy):
        await slots.acquire(UPSTREAM, trio.current_time() + 0.05)
    await trio.sleep(0.1)
    redis.resume()
    await wait_for(lambda: redis.cli("ZCARD", SLOTS) == "0")
    permit = await slots.acquire(UPSTREAM, trio.current_time() + 2)  # the one slot is free
    permit.release()


async def test_a_client_member_granted_after_its_session_stopped_waiting_is_given_back(
    store: RedisStore, redis: RedisServer
) -> None:
    redis.pause()
    with trio.move_on_after(0.05):  # the session gives up (its own deadline)
        await store.connect("198.51.100.1", 0, 1, False)
    await trio.sleep(0.1)
    redis.resume()
    members = "smtpguard:{198.51.100.1}:sessions"
    await wait_for(lambda: redis.cli("ZCARD", members) == "0")
    verdict = await store.connect("198.51.100.1", 0, 1, False)
    assert verdict is not None and verdict.refusal is None  # not refused for a ghost


async def test_a_release_during_an_outage_reaches_redis_when_it_is_back(
    store: RedisStore, redis: RedisServer
) -> None:
    slots = limiter(store, queue_seconds=1.0)
    permit = await slots.acquire(UPSTREAM)
    assert redis.cli("ZCARD", SLOTS) == "1"
    redis.pause()
    assert await store.connect("203.0.113.9", 0, 5, False) is None  # times out: down
    assert not store.up
    permit.release()  # the session ends while the store is down
    await trio.sleep(0.2)
    redis.resume()
    await wait_for(lambda: redis.cli("ZCARD", SLOTS) == "0")


async def test_renewal_puts_back_the_live_members_a_restart_lost(
    store: RedisStore, redis: RedisServer
) -> None:
    slots = limiter(store, queue_seconds=0.5)
    permit = await slots.acquire(UPSTREAM)
    redis.kill()
    redis.start()  # the same port, empty
    assert redis.cli("ZCARD", SLOTS) == "0"
    store._renew_due = True  # the periodic renewal (every LEASE_SECONDS / 3)
    store._queued.set()
    await wait_for(lambda: redis.cli("ZCARD", SLOTS) == "1")
    with pytest.raises(UpstreamBusy):  # the cap holds again
        await slots.acquire(UPSTREAM, trio.current_time() + 0.3)
    permit.release()
