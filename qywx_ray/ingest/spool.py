"""Per-user durable spool in Redis: where messages wait, in order, while Kafka cannot take them.

Replaces the original design's local-channel fallback (which reordered and lost on crash). Per user
(the Kafka key, external_userid) a Redis list `{prefix}:spool:{user}` holds envelopes in
arrival order; an index set lists users with a non-empty spool. While a user has spooled
messages, that user's new messages are appended behind them (atomic check-and-append in
Lua, one round trip per page), and the SpoolReplayer drains each user head-first:
produce confirmed, then trim exactly the acknowledged prefix. A crash between produce
and trim re-sends (a duplicate, deduplicated by message_id downstream), never loses.
Must never: let a user's new message overtake a spooled one, or remove an entry
before Kafka acknowledged it.

Keys are built inside Lua from a prefix, which is fine for a single Redis or Sentinel
(the only modes we support) but would not be for Redis Cluster.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import redis.asyncio as aioredis
from confluent_kafka import KafkaError
from redis.exceptions import RedisError

from qywx_ray.envelope import Envelope
from qywx_ray.errors import EnvelopeError, InfraError
from qywx_ray.ingest.breaker import BreakerState, ProducerBreaker
from qywx_ray.ingest.locks import LockLease, LockLostError, LockManager
from qywx_ray.ingest.loops import LoopBackoff, loop_failed, wait_set
from qywx_ray.ingest.producer import BatchProducer, BatchResult, HeldBehind
from qywx_ray.obs import metrics
from qywx_ray.obs.logging import get_logger

log = get_logger(__name__)

DEGRADED_MESSAGES = metrics.counter(
    "qywx_degraded_messages_total", "Messages written to the Redis spool instead of Kafka"
)
DEGRADED_USERS = metrics.gauge("qywx_degraded_users", "Users with a non-empty spool")
KAFKA_FAILURES = metrics.counter(
    "qywx_kafka_failures_total", "Produce attempts that left messages for the spool"
)
LAST_DEGRADATION = metrics.gauge(
    "qywx_last_degradation_timestamp_seconds", "Wall-clock time of the last spool write"
)
SPOOL_DEPTH = metrics.gauge("qywx_spool_depth", "Messages waiting in the spool (all users)")
SPOOL_REPLAYED = metrics.counter(
    "qywx_spool_replayed_total", "Spooled messages acknowledged by Kafka and trimmed"
)
SPOOL_BURIED = metrics.counter(
    "qywx_spool_set_aside_total", "Spool entries Kafka can never take, moved to the dead list"
)

SPOOL_TRIM_REFUSED = metrics.counter(
    "qywx_spool_trim_refused_total",
    "Spool trims refused (replay lock lost) or that kept a head that was not the one produced",
)

# Errors a retry cannot fix: the record itself is unacceptable to the broker.
_PERMANENT_CODES = frozenset({KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.INVALID_RECORD})


def is_permanent(error: Exception) -> bool:
    kafka_error = getattr(error, "kafka_error", None)
    return kafka_error is not None and kafka_error.code() in _PERMANENT_CODES


# KEYS[1] index set, KEYS[2] depth counter; ARGV[1] key prefix, ARGV[2] mode
# ("force" appends for every user, "ifspooled" only where the list is non-empty), then
# groups: user, n, item_1..item_n. -> {users appended, depth, users with spool}
_APPEND = """
local prefix = ARGV[1]
local force = ARGV[2] == 'force'
local appended = {}
local added = 0
local i = 3
while i <= #ARGV do
  local user = ARGV[i]
  local n = tonumber(ARGV[i + 1])
  local key = prefix .. user
  if force or redis.call('LLEN', key) > 0 then
    for j = i + 2, i + 1 + n do
      redis.call('RPUSH', key, ARGV[j])
    end
    redis.call('SADD', KEYS[1], user)
    appended[#appended + 1] = user
    added = added + n
  end
  i = i + 2 + n
end
local depth = redis.call('INCRBY', KEYS[2], added)
return {appended, depth, redis.call('SCARD', KEYS[1])}
"""

# KEYS[1] index set, KEYS[2] depth counter, KEYS[3] op key, KEYS[4] replay lock;
# ARGV[1] key prefix, ARGV[2] lock token, then groups: user, n, sha1_1..sha1_n. Drops the
# longest prefix of each user's list whose entries match the given SHA-1s (at most n).
# -> {status, depth, users with spool, entries that did not match}; status 1 trimmed (or
# a resend of a trim already applied), 0 the lock is not held by this token (nothing
# removed). Fenced by the lock in the same script: a replayer whose lease expired while
# it was paused would otherwise remove entries appended after another replayer drained
# what it had peeked - messages that were never produced. The match is a second guard:
# only what was produced can leave. Applied once per op key: redis-py resends a command
# after a lost reply or a timeout, and a second drop would lose spooled messages.
_TRIM = """
if redis.call('EXISTS', KEYS[3]) == 1 then
  return {1, tonumber(redis.call('GET', KEYS[2]) or '0'), redis.call('SCARD', KEYS[1]), 0}
end
if redis.call('GET', KEYS[4]) ~= ARGV[2] then
  return {0, tonumber(redis.call('GET', KEYS[2]) or '0'), redis.call('SCARD', KEYS[1]), 0}
end
redis.call('SET', KEYS[3], '1', 'EX', 86400)
local prefix = ARGV[1]
local removed = 0
local mismatched = 0
local i = 3
while i <= #ARGV do
  local user = ARGV[i]
  local n = tonumber(ARGV[i + 1])
  local key = prefix .. user
  local head = redis.call('LRANGE', key, 0, n - 1)
  local matched = 0
  while matched < #head and redis.sha1hex(head[matched + 1]) == ARGV[i + 2 + matched] do
    matched = matched + 1
  end
  mismatched = mismatched + (n - matched)
  if matched > 0 then
    redis.call('LTRIM', key, matched, -1)
    removed = removed + matched
  end
  if redis.call('LLEN', key) == 0 then
    redis.call('DEL', key)
    redis.call('SREM', KEYS[1], user)
  end
  i = i + 2 + n
end
local depth = redis.call('DECRBY', KEYS[2], removed)
if depth < 0 then
  redis.call('SET', KEYS[2], 0)
  depth = 0
end
return {1, depth, redis.call('SCARD', KEYS[1]), mismatched}
"""


def _redis_error(what: str, exc: RedisError) -> InfraError:
    return InfraError(f"redis unavailable while {what}: {exc}")


def group_by_user(envelopes: Iterable[Envelope]) -> dict[str, list[Envelope]]:
    """Per user, in the given order (dicts keep first-seen user order)."""
    groups: dict[str, list[Envelope]] = {}
    for env in envelopes:
        groups.setdefault(env.external_userid, []).append(env)
    return groups


class Spool:
    """Redis-backed per-user FIFO of envelopes; every method is one round trip."""

    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        prefix: str = "qywx",
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.redis = redis
        self.list_prefix = f"{prefix}:spool:"
        self.index_key = f"{prefix}:spool-index"
        self.depth_key = f"{prefix}:spool-depth"
        self.op_prefix = f"{prefix}:spool-op:"
        self.dead_key = f"{prefix}:spool-dead"
        self.wall_clock = wall_clock
        self._append = redis.register_script(_APPEND)
        self._trim = redis.register_script(_TRIM)

    def key(self, user: str) -> str:
        return f"{self.list_prefix}{user}"

    async def _run_append(self, envelopes: Sequence[Envelope], mode: str) -> set[str]:
        groups = group_by_user(envelopes)
        args: list[str | bytes | int] = [self.list_prefix, mode]
        for user, envs in groups.items():
            args.append(user)
            args.append(len(envs))
            args.extend(e.to_bytes() for e in envs)
        try:
            appended, depth, users = await self._append(
                keys=[self.index_key, self.depth_key], args=args
            )
        except RedisError as exc:
            raise _redis_error("appending to the spool", exc) from exc
        done = {u.decode() if isinstance(u, bytes) else str(u) for u in appended}
        count = sum(len(groups[u]) for u in done)
        SPOOL_DEPTH.set(int(depth))
        DEGRADED_USERS.set(int(users))
        if count:
            DEGRADED_MESSAGES.inc(count)
            LAST_DEGRADATION.set(self.wall_clock())
        return done

    async def spooled_users(self, users: Sequence[str]) -> set[str]:
        """Which of these users currently have a spool (cheap pre-check, one SMISMEMBER)."""
        if not users:
            return set()
        try:
            flags = await self.redis.smismember(self.index_key, list(users))
        except RedisError as exc:
            raise _redis_error("checking the spool index", exc) from exc
        return {u for u, f in zip(users, flags, strict=True) if f}

    async def append_if_spooled(self, envelopes: Sequence[Envelope]) -> set[str]:
        """Atomically append the messages of every user whose spool is non-empty.

        Returns the users whose messages were appended; the caller sends the others to
        Kafka. One round trip for the page, zero when no user of the page is spooled.
        """
        if not envelopes:
            return set()
        candidates = await self.spooled_users(list(group_by_user(envelopes)))
        if not candidates:
            return set()
        return await self._run_append(
            [e for e in envelopes if e.external_userid in candidates], "ifspooled"
        )

    async def append(
        self, envelopes: Sequence[Envelope], *, reason: str = "", open_kfid: str = ""
    ) -> None:
        """Unconditionally append (Kafka failed for these); one round trip. Logs a WARN."""
        if not envelopes:
            return
        users = await self._run_append(envelopes, "force")
        log.warning(
            "spool.degraded",
            open_kfid=open_kfid,
            messages=len(envelopes),
            users=len(users),
            reason=reason[:300],
        )

    async def users(self) -> list[str]:
        try:
            members = await self.redis.smembers(self.index_key)
        except RedisError as exc:
            raise _redis_error("listing spooled users", exc) from exc
        return sorted(m.decode() if isinstance(m, bytes) else str(m) for m in members)

    async def peek(self, users: Sequence[str], max_per_user: int) -> dict[str, list[bytes]]:
        """The first max_per_user entries of each user's spool (one pipelined round trip)."""
        if not users:
            return {}
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for user in users:
                    pipe.lrange(self.key(user), 0, max_per_user - 1)
                rows = await pipe.execute()
        except RedisError as exc:
            raise _redis_error("reading the spool", exc) from exc
        return {user: list(row) for user, row in zip(users, rows, strict=True)}

    async def trim(self, produced: Mapping[str, Sequence[bytes]], lease: LockLease) -> int:
        """Drop each user's head entries that are exactly `produced[user]` (as peeked),
        only while `lease` still holds the replay lock; returns the remaining depth.

        Raises LockLostError (nothing removed) when the lease is gone: whoever holds the
        lock now may have drained those entries and others may have been appended since.
        """
        args: list[str | int] = [self.list_prefix, lease.token]
        for user, rows in produced.items():
            args += [user, len(rows)]
            args += [hashlib.sha1(raw, usedforsecurity=False).hexdigest() for raw in rows]
        try:
            op_key = f"{self.op_prefix}{uuid.uuid4().hex}"
            keys = [self.index_key, self.depth_key, op_key, lease.key]
            status, depth, users, mismatched = await self._trim(keys=keys, args=args)
        except RedisError as exc:
            raise _redis_error("trimming the spool", exc) from exc
        SPOOL_DEPTH.set(int(depth))
        DEGRADED_USERS.set(int(users))
        if not int(status):
            SPOOL_TRIM_REFUSED.inc()
            log.warning("spool.trim_refused_lock_lost", lock=lease.name, fence=lease.fence)
            raise LockLostError(f"spool trim refused: lock {lease.name} (fence {lease.fence}) lost")
        if int(mismatched):
            SPOOL_TRIM_REFUSED.inc()
            log.error("spool.trim_head_changed", kept=int(mismatched), fence=lease.fence)
        return int(depth)

    async def bury(self, user: str, raw: bytes, *, reason: str) -> None:
        """Set an entry Kafka can never take aside for an operator (kept, not dropped),
        instead of blocking the user forever. Call before trimming it from the spool."""
        try:
            await self.redis.rpush(self.dead_key, raw)
        except RedisError as exc:
            raise _redis_error("setting a spool entry aside", exc) from exc
        SPOOL_BURIED.inc()
        log.error(
            "spool.entry_set_aside",
            user=user,
            dead_key=self.dead_key,
            size=len(raw),
            reason=reason[:300],
        )

    async def depth(self) -> int:
        """Messages spooled across all users; also refreshes the depth/users gauges."""
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.get(self.depth_key)
                pipe.scard(self.index_key)
                value, users = await pipe.execute()
        except RedisError as exc:
            raise _redis_error("reading the spool depth", exc) from exc
        SPOOL_DEPTH.set(int(value or 0))
        DEGRADED_USERS.set(int(users))
        return int(value or 0)

    async def entries(self, user: str) -> list[Envelope]:
        """Everything spooled for one user, in order (for admin views and tests)."""
        try:
            rows = await self.redis.lrange(self.key(user), 0, -1)
        except RedisError as exc:
            raise _redis_error("reading the spool", exc) from exc
        return [Envelope.from_bytes(r if isinstance(r, bytes) else r.encode()) for r in rows]


@dataclass
class ReplayResult:
    skipped: bool = False  # another replayer holds the lock, or the breaker is open
    produced: int = 0
    failed: int = 0
    remaining_depth: int = 0


@dataclass
class RoundOutcome:
    produced: int = 0
    failed: int = 0  # records Kafka refused (held-behind ones not counted)
    failed_users: set[str] = field(default_factory=set)  # users whose head stayed


class FailingUsers:
    """Which spooled users' heads keep failing, so they are tried after everyone else.

    Pure bookkeeping, no I/O. Kafka can refuse one user's record (its partition's
    leader is gone, a record rejected for a reason a retry may fix) while it takes
    everyone else's: a replay that stops at the first failure, or that always probes the
    same user first, would then move ~one round of users per interval. Users whose head
    failed go last in the replay order and are never the breaker's probe; one success
    clears the user.
    """

    def __init__(self, max_tracked: int = 100_000) -> None:
        self.max_tracked = max_tracked
        self._failures: dict[str, int] = {}  # user -> consecutive failed replays

    def __contains__(self, user: object) -> bool:
        return user in self._failures

    def __len__(self) -> int:
        return len(self._failures)

    def order(self, users: Sequence[str]) -> list[str]:
        """Healthy users first (in the given order), then the failing ones, fewest
        failures first (stable)."""
        healthy = [u for u in users if u not in self._failures]
        failing = sorted((u for u in users if u in self._failures), key=self._failures.__getitem__)
        return healthy + failing

    def failed(self, user: str) -> None:
        if user not in self._failures and len(self._failures) >= self.max_tracked:
            return  # bounded memory; an untracked user is merely not deprioritised
        self._failures[user] = self._failures.get(user, 0) + 1

    def succeeded(self, user: str) -> None:
        self._failures.pop(user, None)

    def forget_except(self, users: Iterable[str]) -> None:
        """Drop users no longer spooled (drained by another replayer, say)."""
        keep = set(users)
        for user in [u for u in self._failures if u not in keep]:
            del self._failures[user]


def keep_going_after(outcome: RoundOutcome) -> bool:
    """After a round with failures: go on with the other users only if Kafka took
    something in that round (it is up; the failures belong to particular users). A round
    where nothing was acked says Kafka itself is failing: stop and leave it to the
    breaker rather than wait out a delivery timeout per round."""
    return not outcome.failed or outcome.produced > 0


class SpoolReplayer:
    """Drains every user's spool in order once Kafka takes messages again.

    One replayer at a time cluster-wide (a lock named `spool-replay`). Per round: read
    the head of up to max_batch/max_per_user users (one round trip), produce them as one
    confirmed batch, then trim each user's acknowledged prefix (one Lua call, fenced by
    the lock). A user whose head failed keeps it at the head; it is not retried in the
    same replay, and later replays try it after every other user (FailingUsers), so one
    user's failing record never holds the others back.
    While the breaker is not closed, a pass starts with a one-message probe: a failed
    attempt leaves its messages queued in librdkafka (delivered again once Kafka is back),
    so a whole batch per trial would multiply duplicates over a long outage. The probe
    (the breaker's one half-open trial) is taken only once the lock is held and the spool
    has something to send, so a trial is never spent on nothing.
    """

    LOCK_NAME = "spool-replay"

    def __init__(
        self,
        spool: Spool,
        producer: BatchProducer,
        locks: LockManager,
        *,
        breaker: ProducerBreaker | None = None,
        max_per_user: int = 200,
        max_batch: int = 2000,
    ) -> None:
        self.spool = spool
        self.producer = producer
        self.locks = locks
        self.breaker = breaker
        self.max_per_user = max_per_user
        self.users_per_round = max(1, max_batch // max(1, max_per_user))
        self.max_passes = 100  # bounds one replay_once while syncers keep appending
        self.failing = FailingUsers()

    async def replay_once(self) -> ReplayResult:
        """Drain until empty or until Kafka fails; bounded by what is spooled now."""
        if self.breaker is not None and self.breaker.state is BreakerState.OPEN:
            return ReplayResult(skipped=True)  # cheap: reading the state takes no trial
        lease = await self.locks.acquire(self.LOCK_NAME)
        if lease is None:
            return ReplayResult(skipped=True)
        try:
            return await self.locks.run_locked(lease, lambda: self._drain(lease))
        except LockLostError:
            log.warning("spool.replay_lock_lost")
            return ReplayResult(skipped=True)

    async def _drain(self, lease: LockLease) -> ReplayResult:  # noqa: C901 - the half-open probe, then the passes: one sequence with early exits
        result = ReplayResult()
        users = await self.spool.users()
        self.failing.forget_except(users)
        if not users:
            return result
        probe = False
        if self.breaker is not None:  # the lock is ours and there is work: now ask
            probe = self.breaker.state is not BreakerState.CLOSED
            if not self.breaker.allow():
                result.skipped = True
                result.remaining_depth = await self.spool.depth()
                return result
        tried_failed: set[str] = set()  # heads that failed in this replay: not again
        if probe:  # one message first, from a user not known to fail: is Kafka back?
            outcome = await self._round(lease, self.failing.order(users)[:1], per_user=1)
            result.produced += outcome.produced
            result.failed += outcome.failed
            tried_failed |= outcome.failed_users
            if outcome.failed:
                result.remaining_depth = await self.spool.depth()
                return result
        for _ in range(self.max_passes):
            users = [u for u in await self.spool.users() if u not in tried_failed]
            if not users:
                break
            progressed = False
            ordered = self.failing.order(users)
            for start in range(0, len(ordered), self.users_per_round):
                chunk = ordered[start : start + self.users_per_round]
                outcome = await self._round(lease, chunk)
                result.produced += outcome.produced
                result.failed += outcome.failed
                tried_failed |= outcome.failed_users
                progressed = progressed or outcome.produced > 0
                if not keep_going_after(outcome):
                    result.remaining_depth = await self.spool.depth()
                    return result
            if not progressed:
                break
        result.remaining_depth = await self.spool.depth()
        return result

    async def _settle_user(
        self,
        user: str,
        entries: list[tuple[bytes, int | None]],
        outcome: BatchResult | None,
        result: RoundOutcome,
    ) -> list[bytes]:
        """The user's head entries this round consumed, in order, up to the first that
        must stay (a retryable failure, or held behind one); undecodable and permanently
        refused entries are set aside (buried) and count as consumed."""
        consumed: list[bytes] = []
        for raw, idx in entries:
            if idx is None:
                await self.spool.bury(user, raw, reason="undecodable entry")
            else:
                assert outcome is not None
                error = outcome.deliveries[idx].error
                if error is None:
                    result.produced += 1
                elif is_permanent(error):
                    await self.spool.bury(user, raw, reason=str(error))
                else:  # stays at the head
                    # Held behind a record of this batch that was set aside: retried
                    # in the next pass. A real failure: after the others, next replay.
                    if not isinstance(error, HeldBehind):
                        result.failed += 1
                        result.failed_users.add(user)
                    break
            consumed.append(raw)
        return consumed

    async def _round(
        self, lease: LockLease, users: Sequence[str], per_user: int | None = None
    ) -> RoundOutcome:
        """One batch over the heads of `users`. The trim names the entries it consumed
        and is fenced by `lease` (LockLostError if it is gone)."""
        heads = await self.spool.peek(users, per_user or self.max_per_user)
        batch, slots = _decode_heads(heads)
        outcome = await self.producer.produce_batch(batch) if batch else None
        consumed_rows: dict[str, list[bytes]] = {}
        result = RoundOutcome()
        for user, entries in slots.items():
            consumed = await self._settle_user(user, entries, outcome, result)
            if consumed:
                consumed_rows[user] = consumed
            if user in result.failed_users:
                self.failing.failed(user)
            else:
                self.failing.succeeded(user)
        if self.breaker is not None and batch:
            self.breaker.record(result.produced, result.failed)
        if consumed_rows:
            depth = await self.spool.trim(consumed_rows, lease)
        else:
            depth = await self.spool.depth()
        SPOOL_REPLAYED.inc(result.produced)
        if result.failed:
            KAFKA_FAILURES.inc()
            log.warning(
                "spool.replay_failed",
                failed=result.failed,
                produced=result.produced,
                failing_users=len(result.failed_users),
                depth=depth,
            )
        elif result.produced:
            log.info("spool.replayed", produced=result.produced, users=len(users), depth=depth)
        return result

    async def run(
        self, interval_s: float, stop: asyncio.Event, max_backoff_s: float = 60.0
    ) -> None:
        """Replay every interval_s until `stop` is set. Nothing else ends it: Redis or Kafka
        trouble (InfraError) is logged and retried at the interval; any other exception
        (a bug, a corrupt reply) is logged, counted in qywx_ingest_loop_errors_total and
        retried after a backoff that doubles up to max_backoff_s while it keeps failing."""
        backoff = LoopBackoff(interval_s, max(interval_s, max_backoff_s))
        while not stop.is_set():
            delay_s = interval_s
            try:
                await self.replay_once()
                backoff.succeeded()
            except InfraError as exc:
                log.warning("spool.replay_error", error=str(exc))
            except Exception as exc:  # noqa: BLE001 - the replay loop survives anything (counted, backed off)
                loop_failed("spool_replay", exc)
                delay_s = backoff.failed()
            await wait_set(stop, delay_s)


def _decode_heads(
    heads: dict[str, list[bytes]],
) -> tuple[list[Envelope], dict[str, list[tuple[bytes, int | None]]]]:
    """The batch to produce and, per user, its head entries in order with their index in
    the batch (None: undecodable, to be set aside)."""
    batch: list[Envelope] = []
    slots: dict[str, list[tuple[bytes, int | None]]] = {}
    for user, rows in heads.items():
        for raw in rows:
            try:
                env = Envelope.from_bytes(raw)
            except EnvelopeError:
                slots.setdefault(user, []).append((raw, None))
                continue
            slots.setdefault(user, []).append((raw, len(batch)))
            batch.append(env)
    return batch, slots
