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
from smtpguard.store import RedisStore

UPSTREAM = Address("10.0.0.1", 25)
SLOTS = "smtpguard:{10.0.0.1:25}:slots"


@pytest.fixture
def redis() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture
async def store(redis: RedisServer) -> AsyncIterator[RedisStore]:
    settings = StoreSettings(redis=redis.url, timeout_seconds=0.5, retry_seconds=0.3)
    instance = RedisStore(settings, Metrics(CollectorRegistry()), lambda kind, key: 0)
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
