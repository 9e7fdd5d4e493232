"""The shared store: limits as wide as the fleet, kept in Redis (through coredis).

Without a store every limit is per process (see clientrates.py and
admission.py).  With ``store.redis`` set, every worker of every instance reads
and writes the same Redis, so the limits hold for the fleet:

- **At connect, one script call** decides the penalty box, the connection
  rate and the client's concurrent sessions (a sorted set of its live
  sessions, each a member scored by when its lease ends): exact across
  workers and instances, because the script runs atomically in Redis.
- **Upstream slots**: a sorted set per upstream address, one member per
  session holding a slot.  A client beyond ``max_sessions`` waits in this
  process's FIFO line; the head of the line asks Redis again whenever a slot
  of this process comes free, and every ``SLOT_POLL_SECONDS`` otherwise.
- **Messages and recipients** are never looked up on the command path: each
  process counts its own (clientrates.py) and a background task pushes the
  new counts and reads the fleet's totals in one pipelined call per batch
  (at most every ``SYNC_SECONDS``); the connect script reads them too.  A
  session's ``admit`` adds the other processes' counts as last read.  So a
  fleet-wide message or recipient rate can be exceeded by what the other
  processes admitted since this one last synchronised (about 0.1 s).
- **Violations** are pushed at a session's end; the push that fills the
  window puts the key in the penalty box (``SET ... NX``), and only that
  process logs it: once per period for the whole fleet.
- **Leases**: a member for a session (a client's concurrent session, an
  upstream slot) ends ``LEASE_SECONDS`` after it was last renewed; the
  background task renews those of live sessions.  A worker killed with its
  sessions frees their slots when the lease ends.

**Failure.** Every call is bounded by ``store.timeout_seconds``.  A failed
call marks the store down for ``store.retry_seconds``: meanwhile no session
asks it (none waits on it), each process decides from its own state as it
would with no store, ``smtpguard_store_up`` is 0 and
``smtpguard_store_errors_total{op}`` counts the failure.  The background task
pings Redis to bring it back.  This is failing open: mail flows.

**Scripts** are called by their SHA1 (``EVALSHA``) in the pipelines, so a
batch is one round trip.  They are loaded (``SCRIPT LOAD``) with the first
PING and with every PING that brings the store back; if Redis lost them
meanwhile (``SCRIPT FLUSH``, a restart or a failover between two batches),
the calls it refused with NOSCRIPT did not run: the scripts are loaded and
those calls sent again once, within the same timeout.

Time in Redis is Redis's own (``TIME`` in the scripts), so the instances'
clocks do not need to agree.  Keys carry a hash tag (``{...}``) so that a
script's keys share one slot (Redis Cluster).
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import itertools
import logging
import math
import os
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import coredis
import trio
from coredis.exceptions import NoScriptError
from coredis.retry import NoRetryPolicy

from .config import StoreSettings
from .logs import fields
from .metrics import Metrics

log = logging.getLogger("smtpguard")

#: How long a session's member (concurrent session, upstream slot) lives
#: without renewal; the background task renews live ones every third of it.
LEASE_SECONDS = 300.0
#: The head of an upstream line asks Redis again at least this often.
SLOT_POLL_SECONDS = 0.05
#: The background task's longest sleep when it has nothing to push.
IDLE_SECONDS = 1.0
#: Message and recipient counts are pushed at most this often (releases at once).
SYNC_SECONDS = 0.1
#: Releases kept at most (a long outage: the oldest leases end on their own).
MAX_RELEASES = 100_000
#: Releases alone wait this long for a session's call to share its round trip.
RELEASE_COALESCE_SECONDS = 0.005
#: While idle, the store is pinged this often (so that ``store_up`` is true).
PING_SECONDS = 5.0

T = TypeVar("T")


class Op(enum.Enum):
    """The store's calls, a closed set (the ``op`` label of its metrics)."""

    CONNECT = "connect"  #: the connect script: penalty box, rate, concurrency
    UPSTREAM_SLOT = "upstream_slot"  #: taking an upstream slot
    SYNC = "sync"  #: the background batch: counts, releases, renewals
    VIOLATIONS = "violations"  #: a session's violations, towards the penalty box
    PING = "ping"  #: the probe while the store is down


class Refusal(enum.Enum):
    """What the connect script refused (None: admitted)."""

    PENALTY = 1  #: the key is in the penalty box
    RATE = 2  #: over the connection rate
    CONCURRENCY = 3  #: over the concurrent sessions per client


@dataclass(frozen=True, slots=True)
class _Lua:
    """A Lua script, called by its SHA1 (``EVALSHA``, inside the pipelines):
    Redis keeps it once loaded (``SCRIPT LOAD``), until a restart, a failover
    to a replica that never saw it, or ``SCRIPT FLUSH``.  coredis's own
    ``Script`` asks ``SCRIPT EXISTS`` before every pipeline that calls one: a
    second round trip per batch."""

    source: str
    #: What Redis names it by: the SHA1 of the source (``SCRIPT LOAD``
    #: answers the same).
    sha: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sha", hashlib.sha1(self.source.encode()).hexdigest())


#: A script call: the script, its keys, its arguments.
_Call = tuple[_Lua, list[str], list[str | int]]


# KEYS: penalty, connection log, sessions, message log, recipient log.
# ARGV: rate limit, concurrency limit, member, lease ms, observe (1: record
# everything, refuse nothing).  Returns {refusal (0: none), penalty ms left,
# the fleet's messages and recipients of the last minute}.
_CONNECT = _Lua("""
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local observe = ARGV[5] == '1'
local verdict = 0
local left = redis.call('PTTL', KEYS[1])
if left > 0 then
  if not observe then return {1, left, 0, 0} end
  verdict = 1
end
local rate = tonumber(ARGV[1])
if rate > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - 60000)
  if redis.call('ZCARD', KEYS[2]) >= rate then
    if not observe then return {2, 0, 0, 0} end
    if verdict == 0 then verdict = 2 end
  end
  redis.call('ZADD', KEYS[2], now, ARGV[3])
  redis.call('PEXPIRE', KEYS[2], 60000)
end
local most = tonumber(ARGV[2])
if most > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
  if redis.call('ZCARD', KEYS[3]) >= most then
    if not observe then return {3, 0, 0, 0} end
    if verdict == 0 then verdict = 3 end
  end
  redis.call('ZADD', KEYS[3], now + tonumber(ARGV[4]), ARGV[3])
  redis.call('PEXPIRE', KEYS[3], tonumber(ARGV[4]))
end
local counts = {}
for i = 4, 5 do
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now - 60000)
  counts[i - 3] = redis.call('ZCARD', KEYS[i])
end
return {verdict, math.max(left, 0), counts[1], counts[2]}
""")

# KEYS: the upstream's slots.  ARGV: max sessions, member, lease ms.
_SLOT = _Lua("""
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[2])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]))
return 1
""")

# KEYS: a rate log.  ARGV: new events, member prefix.  Returns the fleet's
# count within the last 60 s.
_COUNT = _Lua("""
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - 60000)
for i = 1, tonumber(ARGV[1]) do
  redis.call('ZADD', KEYS[1], now, ARGV[2] .. ':' .. i)
end
redis.call('PEXPIRE', KEYS[1], 60000)
return redis.call('ZCARD', KEYS[1])
""")

# KEYS: violations log, penalty.  ARGV: count, needed, window ms, penalty
# ms, member prefix.  Returns 1 when this call put the key in the box.
_VIOLATIONS = _Lua("""
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local needed = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[3]))
for i = 1, math.min(tonumber(ARGV[1]), needed) do
  redis.call('ZADD', KEYS[1], now, ARGV[5] .. ':' .. i)
end
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]))
if redis.call('ZCARD', KEYS[1]) < needed then return 0 end
redis.call('DEL', KEYS[1])
if redis.call('SET', KEYS[2], '1', 'PX', tonumber(ARGV[4]), 'NX') then return 1 end
return 0
""")


# KEYS: a sorted set of leases.  ARGV: member, lease ms.  Adds the member
# again if Redis lost it (a restart, a failover): it is still live here.
_RENEW = _Lua("""
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]))
return 1
""")

#: Every script, loaded again together when Redis has lost them.
_SCRIPTS = (_CONNECT, _SLOT, _COUNT, _VIOLATIONS, _RENEW)


@dataclass(frozen=True, slots=True)
class ConnectVerdict:
    refusal: Refusal | None
    #: The member naming this session in the client's set (to release).
    member: str


class _Request:
    """A session's script call, waiting in the queue for its batch."""

    __slots__ = ("script", "keys", "args", "claim", "done", "answer", "failure", "abandoned")

    def __init__(
        self,
        script: _Lua,
        keys: list[str],
        args: list[str | int],
        claim: tuple[str, str] | None,
    ) -> None:
        self.script = script
        self.keys = keys
        self.args = args
        #: The member (sorted set, name) the script may add for this session:
        #: released again if nobody takes it (its session stopped waiting).
        self.claim = claim
        self.done = trio.Event()
        self.answer: Any = None
        self.failure: BaseException | None = None
        #: The session stopped waiting (timeout, cancellation): the answer is
        #: nobody's, and what it granted must be given back.
        self.abandoned = False


class RedisStore:
    """One process's connection to the shared store."""

    def __init__(
        self,
        settings: StoreSettings,
        metrics: Metrics,
        local_counts: Callable[[str, str], int],
        *,
        client: coredis.Redis[bytes] | None = None,
    ) -> None:
        assert settings.configured
        self.settings = settings
        self._metrics = metrics
        #: This process's own count of a kind for a key (clientrates.py), to
        #: tell the other processes' part of the fleet's count.
        self._local_counts = local_counts
        self._sentinel: coredis.Sentinel[bytes] | None = None
        self._client = client or self._new_client(settings)
        #: This process, fleet-wide unique: members are "<process>:<n>".
        self.process = f"{socket.gethostname()}:{os.getpid()}:{time.monotonic_ns() % 10**6}"
        self._numbers = itertools.count(1)
        self._down_until = -math.inf
        self._up = True  # sessions may try it; the gauge waits for an answer
        #: Live members to renew, and members to release at the next batch.
        self._live: set[tuple[str, str]] = set()  # (sorted set, member)
        self._release: list[tuple[str, str]] = []
        #: Per-client counts to push: (kind, key) -> new events.
        self._pending: dict[tuple[str, str], int] = {}
        #: The other processes' counts as last read: (kind, key) -> (count, when).
        self._others: dict[tuple[str, str], tuple[int, float]] = {}
        self._wake = trio.Event()
        self._renew_due = False
        self._synced = trio.Event()
        #: Sessions' script calls waiting for the next pipeline.
        self._queue: list[_Request] = []
        self._queued = trio.Event()
        #: False until :meth:`run` has opened the client (then calls may go).
        self._open = False
        metrics.store_up.labels("redis").set(0)  # until it first answers

    def _new_client(self, settings: StoreSettings) -> coredis.Redis[bytes]:
        timeouts: dict[str, Any] = {
            "connect_timeout": settings.timeout_seconds,
            "stream_timeout": settings.timeout_seconds,
        }
        if settings.redis is not None:
            return coredis.Redis.from_url(settings.redis, retry_policy=NoRetryPolicy(), **timeouts)
        assert settings.sentinel_service is not None
        self._sentinel = coredis.Sentinel(
            [(node.host, node.port) for node in settings.sentinel_nodes],
            sentinel_kwargs=timeouts,
            **timeouts,
        )
        primary: coredis.Redis[bytes] = self._sentinel.primary_for(
            settings.sentinel_service, db=settings.sentinel_db
        )
        return primary

    # -- state ---------------------------------------------------------------

    @property
    def up(self) -> bool:
        """Whether sessions may ask the store now."""
        return self._open and (self._up or trio.current_time() >= self._down_until)

    def next_sync(self) -> trio.Event:
        """Set when the next batch (releases, counts) has reached the store."""
        return self._synced

    def _failed(self, op: Op, exc: BaseException | None) -> None:
        self._metrics.store_errors.labels(op.value).inc()
        if self._up:
            log.warning(
                "store down",
                extra=fields(
                    op=op.value,
                    error=type(exc).__name__ if exc else "timeout",
                    retry_seconds=self.settings.retry_seconds,
                ),
            )
        self._up = False
        self._down_until = trio.current_time() + self.settings.retry_seconds
        self._metrics.store_up.labels("redis").set(0)

    def _recovered(self) -> None:
        if not self._up:
            log.warning("store up", extra=fields())
            if self._release:
                self._queued.set()  # the releases of the outage
        self._up = True
        self._metrics.store_up.labels("redis").set(1)

    async def _call(self, op: Op, call: Callable[[], Awaitable[T]]) -> T | None:
        """``call()`` within the timeout; None (and the store marked down) if
        it failed.  Never raises but Cancelled."""
        if not self.up:
            return None
        started = trio.current_time()
        failure: BaseException | None = None
        with trio.move_on_after(self.settings.timeout_seconds):
            try:
                result = await call()
            except (coredis.exceptions.RedisError, OSError) as exc:
                failure = exc
            except Exception as exc:  # our bug or the client's: still fail open
                log.exception("store call failed", extra=fields(op=op.value))
                failure = exc
            else:
                self._succeeded(op, started)
                return result
        self._failed(op, failure)
        return None

    def _succeeded(self, op: Op, started: float) -> None:
        self._metrics.store_seconds.labels(op.value).observe(trio.current_time() - started)
        if started >= self._down_until:  # not a call begun before a failure
            self._recovered()

    async def _script(
        self,
        op: Op,
        script: _Lua,
        keys: list[str],
        args: list[str | int],
        claim: tuple[str, str] | None = None,
    ) -> Any:
        """One script call for a session, sent in one pipeline with the others
        queued meanwhile (a burst of connections costs one round trip, not one
        each); within the timeout.  None: it failed (the store is marked down)."""
        if not self.up:
            return None
        request = _Request(script, keys, args, claim)
        self._queue.append(request)
        self._queued.set()
        started = trio.current_time()
        taken = False
        try:
            with trio.move_on_after(self.settings.timeout_seconds):
                await request.done.wait()
            taken = request.done.is_set()
        finally:
            if not taken:
                self._abandon(request)
        if request.failure is not None or not taken:
            self._failed(op, request.failure)
            return None
        self._succeeded(op, started)
        return request.answer

    def _abandon(self, request: _Request) -> None:
        """Its session stopped waiting: a request not sent yet is dropped; one
        in flight gives back, once answered, the member it may have added."""
        request.abandoned = True
        if request in self._queue:
            self._queue.remove(request)
        elif request.claim is not None and request.done.is_set():
            self._give_back(request.claim)  # answered after all: nobody owns it

    def _give_back(self, claim: tuple[str, str]) -> None:
        """Release ``claim`` at the next batch (ZREM: harmless if it is not there)."""
        if len(self._release) < MAX_RELEASES:
            self._release.append(claim)
        self._queued.set()

    async def _send_batches(self) -> None:
        """Send the queued script calls and the releases, each batch in one
        pipeline: under load a connection's calls and the releases of the
        sessions that ended meanwhile share a round trip."""
        while True:
            await self._queued.wait()
            self._queued = trio.Event()
            if not self._queue and self._release:
                # Releases alone wait a moment for a session's call to ride with.
                with trio.move_on_after(RELEASE_COALESCE_SECONDS):
                    await self._queued.wait()
                self._queued = trio.Event()
            batch, self._queue = self._queue, []
            release, self._release = self._release, []
            # Leases are renewed in the same ordered stream as the releases:
            # a member is either live (renewed) or released, never both.
            renew = list(self._live) if self._renew_due else []
            self._renew_due = False
            if batch or release or renew:
                # New counts go along (a session's end pushes its own).
                counts, self._pending = self._pending, {}
                await self._send(batch, release, counts, renew)
            if release:
                self._synced.set()
                self._synced = trio.Event()

    async def _send(
        self,
        batch: list[_Request],
        release: list[tuple[str, str]],
        counts: dict[tuple[str, str], int],
        renew: list[tuple[str, str]] = [],  # noqa: B006 - never mutated
    ) -> None:
        lease_ms = int(LEASE_SECONDS * 1000)

        calls: list[_Call] = [(_RENEW, [set_key], [name, lease_ms]) for set_key, name in renew]
        calls += [(r.script, r.keys, r.args) for r in batch]
        calls += self._count_calls(counts)

        async def send() -> list[Any]:
            return (await self._pipeline(release, calls))[len(renew) :]

        failure: BaseException | None = None
        answers: list[Any] = []
        with trio.move_on_after(self.settings.timeout_seconds) as scope:
            try:
                answers = await send()
            except (coredis.exceptions.RedisError, OSError) as exc:
                failure = exc
            except Exception as exc:  # our bug or the client's: still fail open
                log.exception("store call failed", extra=fields(op="batch"))
                failure = exc
        if scope.cancelled_caught and failure is None:
            failure = TimeoutError("store batch timed out")
        if failure is not None:
            # Sent again once the store is back (ZREM is idempotent); a claim
            # the failed batch may have granted goes too.
            for claim in release + [r.claim for r in batch if r.claim is not None]:
                if len(self._release) < MAX_RELEASES:
                    self._release.append(claim)
            if not batch:
                self._failed(Op.SYNC, failure)
        for index, request in enumerate(batch):
            if failure is None:
                request.answer = answers[index]
            request.failure = failure
            request.done.set()
            if request.abandoned and request.claim is not None and failure is None:
                self._give_back(request.claim)
        if failure is None:
            for (kind, key), total in zip(counts, answers[len(batch) :], strict=True):
                self._fleet(kind, key, int(total))

    async def _pipeline(self, release: list[tuple[str, str]], calls: list[_Call]) -> list[Any]:
        """``release`` (ZREM) then ``calls`` (EVALSHA) in one pipeline: the
        calls' answers.  Raises the first error but NOSCRIPT: a call refused
        NOSCRIPT did not run (Redis lost the scripts: a restart, a failover,
        ``SCRIPT FLUSH``), so the scripts are loaded again and those calls
        alone are sent once more.  Calls that ran are not sent twice (a count
        would be pushed twice, a penalty logged by nobody)."""
        async with self._client.pipeline(transaction=False, raise_on_error=False) as pipe:
            # Releases first: a slot freed is there for the calls after it.
            for set_key, name in release:
                pipe.zrem(set_key, [name])
            for script, keys, args in calls:
                pipe.evalsha(script.sha, keys=keys, args=args)
        results = list(pipe.results or ())
        for result in results:
            if isinstance(result, Exception) and not isinstance(result, NoScriptError):
                raise result
        answers = results[len(release) :]
        lost = [i for i, answer in enumerate(answers) if isinstance(answer, NoScriptError)]
        if lost:
            log.info("store scripts loaded again", extra=fields(calls=len(lost)))
            async with self._client.pipeline(transaction=False) as pipe:
                _load_scripts(pipe)  # before the calls: one connection, in order
                again = [
                    pipe.evalsha(calls[i][0].sha, keys=calls[i][1], args=calls[i][2]) for i in lost
                ]
            for i, request in zip(lost, again, strict=True):
                answers[i] = await request
        return answers

    def _count_calls(self, counts: dict[tuple[str, str], int]) -> list[_Call]:
        """The calls pushing ``counts`` (new events per kind and key)."""
        return [
            (_COUNT, [self._key(kind, key)], [n, self._member()])
            for (kind, key), n in counts.items()
        ]

    def _key(self, kind: str, key: str) -> str:
        return f"{self.settings.key_prefix}{{{key}}}:{kind}"

    def _member(self) -> str:
        return f"{self.process}:{next(self._numbers)}"

    # -- connect -------------------------------------------------------------

    async def connect(self, key: str, rate: int, most: int, observe: bool) -> ConnectVerdict | None:
        """The penalty box, the connection rate (``rate`` per minute, 0: none)
        and the concurrent sessions (``most``, 0: none) of client ``key``, in
        one call.  None: the store is down (decide locally)."""
        member = self._member()
        names = ("penalty", "connections", "sessions", "message", "recipient")
        keys = [self._key(k, key) for k in names]
        args: list[str | int] = [rate, most, member, int(LEASE_SECONDS * 1000), int(observe)]
        claim = (keys[2], member) if most else None
        answer = await self._script(Op.CONNECT, _CONNECT, keys, args, claim)
        if answer is None:
            return None
        verdict = int(answer[0])
        if not verdict or observe:
            self._fleet("message", key, int(answer[2]))
            self._fleet("recipient", key, int(answer[3]))
        if most and (not verdict or observe):
            self._live.add((keys[2], member))
        return ConnectVerdict(Refusal(verdict) if verdict else None, member)

    def disconnect(self, key: str, member: str) -> None:
        """The session ``member`` of client ``key`` ended (released at the
        next batch)."""
        self._forget(self._key("sessions", key), member)

    def _forget(self, set_key: str, name: str) -> None:
        if (set_key, name) in self._live:
            self._live.discard((set_key, name))
            if len(self._release) < MAX_RELEASES:
                self._release.append((set_key, name))  # kept while the store is down
            if self.up:
                self._queued.set()

    # -- upstream slots ------------------------------------------------------

    async def take_slot(self, upstream: str, max_sessions: int) -> str | None | bool:
        """A slot of ``upstream`` (one of ``max_sessions``): its member name,
        False if all are taken, None if the store is down."""
        member = self._member()
        key = self._key("slots", upstream)
        args: list[str | int] = [max_sessions, member, int(LEASE_SECONDS * 1000)]
        answer = await self._script(Op.UPSTREAM_SLOT, _SLOT, [key], args, (key, member))
        if answer is None:
            return None
        if not answer:
            return False
        self._live.add((key, member))
        return member

    def give_slot(self, upstream: str, member: str) -> None:
        self._forget(self._key("slots", upstream), member)

    # -- messages and recipients ----------------------------------------------

    def count(self, kind: str, key: str) -> None:
        """One more ``kind`` ("message", "recipient") admitted for ``key``
        here: pushed with the next batch."""
        slot = (kind, key)
        if not self._pending:
            self._wake.set()  # the first count of a batch wakes the background task
        self._pending[slot] = self._pending.get(slot, 0) + 1

    def _fleet(self, kind: str, key: str, total: int) -> None:
        """The fleet's count of ``kind`` for ``key``, as just read."""
        others = max(0, total - self._local_counts(kind, key))
        if others or (kind, key) in self._others:
            if len(self._others) >= 100_000:
                self._others.clear()
            self._others[(kind, key)] = (others, trio.current_time())

    def others(self, kind: str, key: str) -> int:
        """The other processes' ``kind`` count for ``key`` in the last minute,
        as last read (0 when the store is down or it is older than that)."""
        seen = self._others.get((kind, key))
        if seen is None or not self._up or trio.current_time() - seen[1] > 60.0:
            return 0
        return seen[0]

    # -- violations -----------------------------------------------------------

    async def violations(
        self, key: str, count: int, needed: int, window: float, seconds: float
    ) -> bool | None:
        """``count`` violations by ``key``: True if that put it in the penalty
        box (this process logs it), None if the store is down."""
        keys = [self._key("violations", key), self._key("penalty", key)]
        args: list[str | int] = [
            count,
            needed,
            int(window * 1000),
            int(seconds * 1000),
            self._member(),
        ]
        answer = await self._script(Op.VIOLATIONS, _VIOLATIONS, keys, args)
        if answer is None:
            return None
        return bool(answer)

    # -- the background task ----------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Push counts and releases, renew leases, probe while down: for the
        process's life."""
        async with contextlib.AsyncExitStack() as stack:
            if self._sentinel is not None:
                await stack.enter_async_context(self._sentinel)
            await stack.enter_async_context(self._client)
            self._open = True
            task_status.started()
            renewed = trio.current_time()
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._send_batches)
                    await self._loop(renewed)
            finally:
                self._open = False

    async def _loop(self, renewed: float) -> None:
        synced = -math.inf
        contacted = trio.current_time()
        await self._call(Op.PING, self._greet)  # smtpguard_store_up from the start
        while True:
            with trio.move_on_after(IDLE_SECONDS):
                await self._wake.wait()
            self._wake = trio.Event()
            if not self._up:
                self._pending.clear()  # counts of an outage stay local (fail open)
                await self._probe()
                continue
            now = trio.current_time()
            if self._pending and now - synced < SYNC_SECONDS:
                await trio.sleep_until(synced + SYNC_SECONDS)  # counts wait for the batch
                now = trio.current_time()
            if now - renewed >= LEASE_SECONDS / 3:
                renewed = contacted = now
                self._renew_due = True
                self._queued.set()  # the batcher renews, in order with releases
            if self._pending:
                synced = contacted = now
                await self._sync()
            elif now - contacted >= PING_SECONDS:
                # Idle: make sure smtpguard_store_up still tells the truth.
                contacted = now
                await self._call(Op.PING, self._client.ping)

    async def _probe(self) -> None:
        if trio.current_time() < self._down_until:
            await trio.sleep_until(self._down_until)
        await self._call(Op.PING, self._greet)  # brings it back if it answers

    async def _greet(self) -> None:
        """PING, and load the scripts (this Redis may be new, or back from a
        restart that lost them), in one round trip: the batches then call
        them by SHA1 without a NOSCRIPT first.  The PING alone decides: a
        load refused here (an ACL) is tried again on NOSCRIPT."""
        async with self._client.pipeline(transaction=False, raise_on_error=False) as pipe:
            pong = pipe.ping()
            _load_scripts(pipe)
        await pong

    async def _sync(self) -> None:
        pending, self._pending = self._pending, {}
        if not pending:
            return

        calls = self._count_calls(pending)
        totals = await self._call(Op.SYNC, lambda: self._pipeline([], calls))
        if totals is None:
            return
        for (kind, key), total in zip(pending, totals, strict=True):
            self._fleet(kind, key, int(total))


def _load_scripts(pipe: coredis.patterns.pipeline.Pipeline[bytes]) -> None:
    """Queue ``SCRIPT LOAD`` of every script on ``pipe`` (Redis answers each
    with the SHA1 that :class:`_Lua` computed)."""
    for script in _SCRIPTS:
        pipe.script_load(script.source)
