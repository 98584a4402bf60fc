"""Distributed lock per name (one per open_kfid) in Redis, with fencing tokens.

Works the same on a single Redis and behind Sentinel: plain commands and Lua only.
Acquire = SET NX PX with a random holder token, plus a fence counter so every
acquisition gets a strictly larger fencing token (hybrid with Redis' clock, so it stays
larger even when the counter key is lost). `hold()` extends the lock in the
background while work runs (`run_locked`) and cancels that work when the lock is lost.
A release that fails (Redis down) is remembered and retried at the next acquire of the
same name, so a Redis restart does not leave our own lock blocking us for a whole TTL.
Must never: release or extend a lock held by someone else (compare-and-delete/expire
in Lua), or let work continue once it knows the lock is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from qywx_ray.cancel import cancel_until_done
from qywx_ray.errors import InfraError, QywxError
from qywx_ray.ingest.loops import loop_failed
from qywx_ray.obs import metrics
from qywx_ray.obs.logging import get_logger

log = get_logger(__name__)
T = TypeVar("T")

LOCK_ACQUIRED = metrics.counter("qywx_lock_acquired_total", "Locks acquired", ("lock",))
LOCK_FAILED = metrics.counter(
    "qywx_lock_failed_total", "Lock acquisitions refused (held elsewhere)", ("lock",)
)
LOCK_EXPIRED = metrics.counter(
    "qywx_lock_expired_total", "Locks found lost or expired while held", ("lock",)
)
LOCK_HOLD = metrics.histogram(
    "qywx_lock_hold_seconds",
    "How long a lock was held",
    ("lock",),
    buckets=(0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)

# KEYS[1] lock, KEYS[2] fence counter; ARGV[1] token, ARGV[2] ttl_ms -> fence or 0.
# The fence is max(counter + 1, Redis TIME in microseconds): strictly increasing while the
# counter lives, and still larger than every earlier fence after the counter is lost (an
# operator's `DEL qywx:lock:*`, a restore, an eviction). A plain INCR restarted at 1 and
# every later cursor commit was refused as older than the stored fence, for good. (Lost
# counter plus a failover to a Redis whose clock is behind: refused for the skew only.)
# Already ours (redis-py resent the command after a lost reply or a timeout): the fence
# we got (nobody else can have incremented it while we hold the lock); without this the
# resend would read "busy" and the lock would sit unused until its TTL.
_ACQUIRE = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  local now = redis.call('TIME')
  local floor = tonumber(now[1]) * 1000000 + tonumber(now[2])
  local fence = redis.call('INCR', KEYS[2])
  if fence < floor then
    redis.call('SET', KEYS[2], string.format('%d', floor))
    fence = floor
  end
  return fence
end
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return tonumber(redis.call('GET', KEYS[2]))
end
return 0
"""
# KEYS[1] lock; ARGV[1] token, ARGV[2] ttl_ms -> 1 extended, 0 not ours
_EXTEND = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
# KEYS[1] lock; ARGV[1] token -> 1 released, 0 not ours
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class LockLostError(QywxError):
    """The lock expired or was taken over while work was running under it."""


@dataclass(frozen=True, slots=True)
class LockLease:
    """Proof of one acquisition: `token` identifies the holder, `fence` orders holders."""

    name: str
    key: str
    token: str
    fence: int
    acquired_at: float  # monotonic seconds


def _redis_error(what: str, exc: RedisError) -> InfraError:
    return InfraError(f"redis unavailable while {what}: {exc}")


class LockManager:
    """Acquire / extend / release named locks; `hold()` keeps one alive around work."""

    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        ttl_s: float = 30.0,
        extend_every_s: float = 10.0,
        prefix: str = "qywx:lock:",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if extend_every_s >= ttl_s:
            raise ValueError(f"extend_every_s={extend_every_s} must be < ttl_s={ttl_s}")
        self.redis = redis
        self.ttl_s = ttl_s
        self.extend_every_s = extend_every_s
        self.prefix = prefix
        self.clock = clock
        self._acquire = redis.register_script(_ACQUIRE)
        self._extend = redis.register_script(_EXTEND)
        self._release = redis.register_script(_RELEASE)
        # Leases whose release failed (Redis unreachable): freed before the next acquire.
        self._unreleased: dict[str, LockLease] = {}

    @property
    def _ttl_ms(self) -> int:
        return max(1, int(self.ttl_s * 1000))

    def key(self, name: str) -> str:
        return f"{self.prefix}{name}"

    def fence_key(self, name: str) -> str:
        return f"{self.prefix}{name}:fence"

    async def acquire(self, name: str) -> LockLease | None:
        """Non-blocking: a lease, or None when someone else holds the lock."""
        await self._release_unreleased(name)
        token = secrets.token_hex(16)
        try:
            keys = [self.key(name), self.fence_key(name)]
            fence = int(await self._acquire(keys=keys, args=[token, self._ttl_ms]))
        except RedisError as exc:
            raise _redis_error(f"acquiring lock {name}", exc) from exc
        if not fence:
            LOCK_FAILED.inc(lock=_label(name))
            return None
        LOCK_ACQUIRED.inc(lock=_label(name))
        return LockLease(name, self.key(name), token, fence, self.clock())

    async def _release_unreleased(self, name: str) -> None:
        """Free our own lease of `name` whose release failed earlier (compare-and-delete)."""
        stale = self._unreleased.get(name)
        if stale is None:
            return
        try:
            freed = int(await self._release(keys=[stale.key], args=[stale.token]))
        except RedisError as exc:
            raise _redis_error(f"releasing stale lock {name}", exc) from exc
        del self._unreleased[name]
        if freed:
            log.info("lock.stale_released", lock=name, fence=stale.fence)

    async def extend(self, lease: LockLease) -> bool:
        """Reset the TTL if we still hold it; False means the lock is lost."""
        try:
            ok = int(await self._extend(keys=[lease.key], args=[lease.token, self._ttl_ms]))
        except RedisError as exc:
            raise _redis_error(f"extending lock {lease.name}", exc) from exc
        return ok == 1

    async def release(self, lease: LockLease) -> bool:
        """Compare-and-delete; False when it had already expired or changed hands."""
        LOCK_HOLD.observe(max(0.0, self.clock() - lease.acquired_at), lock=_label(lease.name))
        try:
            ok = int(await self._release(keys=[lease.key], args=[lease.token]))
        except RedisError as exc:
            self._unreleased[lease.name] = lease  # retried before the next acquire
            raise _redis_error(f"releasing lock {lease.name}", exc) from exc
        if not ok:
            LOCK_EXPIRED.inc(lock=_label(lease.name))
            log.warning("lock.expired_before_release", lock=lease.name, fence=lease.fence)
        return ok == 1

    async def run_locked(self, lease: LockLease, work: Callable[[], Awaitable[T]]) -> T:
        """Run `work()` while extending the lease every extend_every_s, then release it.

        If the lease is lost (taken over, expired, or Redis unreachable for a whole TTL)
        the work is cancelled and LockLostError is raised. The work runs as its own task,
        so cancelling it never leaks into the caller's task.
        """
        work_task: asyncio.Task[T] = asyncio.create_task(_as_coro(work))
        lost = asyncio.Event()
        extender = asyncio.create_task(self._keep(lease, work_task, lost))
        try:
            return await work_task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if lost.is_set() and not (current is not None and current.cancelling()):
                raise LockLostError(
                    f"lock {lease.name} (fence {lease.fence}) was lost; work cancelled"
                ) from None
            raise
        finally:
            cancel_until_done(extender)
            with contextlib.suppress(asyncio.CancelledError):
                await extender
            if not work_task.done():
                cancel_until_done(work_task)
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await work_task
            if lost.is_set():
                held_s = max(0.0, self.clock() - lease.acquired_at)
                LOCK_HOLD.observe(held_s, lock=_label(lease.name))
            else:
                try:
                    await self.release(lease)
                except InfraError as err:
                    log.warning("lock.release_failed", lock=lease.name, error=str(err))

    async def _keep(
        self, lease: LockLease, work_task: asyncio.Task[Any], lost: asyncio.Event
    ) -> None:
        last_ok = self.clock()
        while True:
            await asyncio.sleep(self.extend_every_s)
            try:
                if await self.extend(lease):
                    last_ok = self.clock()
                    continue
                reason = "taken_or_expired"
            except Exception as exc:  # noqa: BLE001 - see below: any failure counts as a failed extend
                # Redis trouble (InfraError) or anything else: the lease is ours until its
                # TTL runs out since the last good extend, then it counts as lost. An
                # extender that died instead would let the work run on an expired lease.
                if isinstance(exc, InfraError):
                    log.warning("lock.extend_failed", lock=lease.name, error=str(exc))
                else:
                    loop_failed("lock_extend", exc, lock=lease.name)
                if self.clock() - last_ok < self.ttl_s:
                    continue
                infra = isinstance(exc, InfraError)
                reason = "redis_unreachable_for_ttl" if infra else "extend_failing_for_ttl"
            lost.set()
            LOCK_EXPIRED.inc(lock=_label(lease.name))
            log.warning("lock.lost", lock=lease.name, fence=lease.fence, reason=reason)
            cancel_until_done(work_task)
            return


async def _as_coro(work: Callable[[], Awaitable[T]]) -> T:
    return await work()


def _label(name: str) -> str:
    """Metric label: the lock kind, not the id (keeps cardinality bounded)."""
    return name.split(":", 1)[0]
