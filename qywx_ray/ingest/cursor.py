"""The kf/sync_msg cursor per open_kfid, in Redis: our checkpoint into WeCom's 3-day log.

A cursor is written only by a fenced compare-and-set: it succeeds only while the lock
key still holds this holder's token and no newer holder (larger fence) has written.
Must never: move a cursor on behalf of a holder that lost its lock, or move it before
the page it skips past is acked by Kafka or durably spooled (the syncer's rule).
"""

from __future__ import annotations

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from qywx_ray.errors import InfraError
from qywx_ray.ingest.locks import LockLease

# KEYS[1] lock key, KEYS[2] cursor hash; ARGV[1] token, ARGV[2] fence, ARGV[3] cursor
# -> 1 written, 0 lock not held by this token, -1 a newer holder already wrote
_COMMIT = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
local stored = tonumber(redis.call('HGET', KEYS[2], 'fence') or '0')
if stored > tonumber(ARGV[2]) then
  return -1
end
redis.call('HSET', KEYS[2], 'cursor', ARGV[3], 'fence', ARGV[2])
return 1
"""


class CursorStore:
    """get / fenced commit of the sync cursor of each open_kfid."""

    def __init__(self, redis: aioredis.Redis, *, prefix: str = "qywx:cursor:") -> None:
        self.redis = redis
        self.prefix = prefix
        self._commit = redis.register_script(_COMMIT)

    def key(self, open_kfid: str) -> str:
        return f"{self.prefix}{open_kfid}"

    async def get(self, open_kfid: str) -> str:
        """The stored cursor, or "" (start of WeCom's retained history)."""
        try:
            value = await self.redis.hget(self.key(open_kfid), "cursor")
        except RedisError as exc:
            raise InfraError(f"redis unavailable while reading cursor {open_kfid}: {exc}") from exc
        if value is None:
            return ""
        return value.decode() if isinstance(value, bytes) else str(value)

    async def commit_cursor(self, open_kfid: str, cursor: str, lock: LockLease) -> bool:
        """Fenced compare-and-set; False when `lock` is no longer (or never was) current."""
        try:
            result = int(
                await self._commit(
                    keys=[lock.key, self.key(open_kfid)], args=[lock.token, lock.fence, cursor]
                )
            )
        except RedisError as exc:
            msg = f"redis unavailable while committing cursor {open_kfid}: {exc}"
            raise InfraError(msg) from exc
        return result == 1
