"""Durable due-time queue in Redis for DLQ retries.

Keys (prefix p): `p:ready` zset id→due_s, `p:inflight` zset id→lease_expiry_s,
`p:payload` hash id→bytes. Every operation is one Lua call (atomic, one round trip
per batch). A claim moves entries from ready to inflight with a lease; ack deletes;
an expired lease is claimable again, so a scheduler crashing between claim and
re-produce loses nothing. It never hands out an entry whose due time (compared with
the caller's injected clock) has not come, and two schedulers never hold the same
entry under a live lease.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import redis

_SCHEDULE = """
-- KEYS: ready, inflight, payload; ARGV: n, then (id, due, payload) * n
local added = 0
local n = tonumber(ARGV[1])
for i = 0, n - 1 do
  local id = ARGV[2 + i * 3]
  if redis.call('HEXISTS', KEYS[3], id) == 0 then
    redis.call('HSET', KEYS[3], id, ARGV[4 + i * 3])
    redis.call('ZADD', KEYS[1], ARGV[3 + i * 3], id)
    added = added + 1
  end
end
return added
"""

_CLAIM = """
-- KEYS: ready, inflight, payload; ARGV: now, lease_until, max_n
local now = ARGV[1]
local out = {}
local expired = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, ARGV[3])
for _, id in ipairs(expired) do
  redis.call('ZADD', KEYS[2], ARGV[2], id)
  table.insert(out, id)
  table.insert(out, redis.call('HGET', KEYS[3], id) or '')
end
local room = tonumber(ARGV[3]) - #expired
if room > 0 then
  local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, room)
  for _, id in ipairs(due) do
    redis.call('ZREM', KEYS[1], id)
    redis.call('ZADD', KEYS[2], ARGV[2], id)
    table.insert(out, id)
    table.insert(out, redis.call('HGET', KEYS[3], id) or '')
  end
end
return out
"""

_ACK = """
-- KEYS: ready, inflight, payload; ARGV: ids (only entries still inflight are deleted)
local n = 0
for _, id in ipairs(ARGV) do
  if redis.call('ZREM', KEYS[2], id) == 1 then
    redis.call('HDEL', KEYS[3], id)
    n = n + 1
  end
end
return n
"""

_RETRY_LATER = """
-- KEYS: ready, inflight, payload; ARGV: due, ids
local n = 0
for i = 2, #ARGV do
  if redis.call('ZREM', KEYS[2], ARGV[i]) == 1 then
    redis.call('ZADD', KEYS[1], ARGV[1], ARGV[i])
    n = n + 1
  end
end
return n
"""

_SET_DUE = """
-- KEYS: ready, inflight, payload; ARGV: due, id, payload (payload used if absent)
if redis.call('ZSCORE', KEYS[2], ARGV[2]) then return 0 end
redis.call('HSET', KEYS[3], ARGV[2], ARGV[3])
redis.call('ZADD', KEYS[1], ARGV[1], ARGV[2])
return 1
"""

_REMOVE = """
-- KEYS: ready, inflight, payload; ARGV: ids (ready entries only; inflight ones are busy)
local n = 0
for _, id in ipairs(ARGV) do
  if redis.call('ZREM', KEYS[1], id) == 1 then
    redis.call('HDEL', KEYS[3], id)
    n = n + 1
  end
end
return n
"""


@dataclass(frozen=True)
class Claimed:
    entry_id: str
    payload: bytes


class DelayQueue:
    def __init__(self, client: redis.Redis, prefix: str = "qywx:dlq") -> None:
        self._r = client
        self.keys = [f"{prefix}:dq:ready", f"{prefix}:dq:inflight", f"{prefix}:dq:payload"]
        self._schedule = client.register_script(_SCHEDULE)
        self._claim = client.register_script(_CLAIM)
        self._ack = client.register_script(_ACK)
        self._retry_later = client.register_script(_RETRY_LATER)
        self._set_due = client.register_script(_SET_DUE)
        self._remove = client.register_script(_REMOVE)

    def schedule_many(self, entries: Sequence[tuple[str, float, bytes]]) -> int:
        """Add (id, due_s, payload); an id already queued or in flight keeps its due time."""
        if not entries:
            return 0
        argv: list[Any] = [len(entries)]
        for entry_id, due_s, payload in entries:
            argv += [entry_id, repr(float(due_s)), payload]
        return int(cast(int, self._schedule(keys=self.keys, args=argv)))

    def claim_due(self, now_s: float, lease_s: float, max_n: int) -> list[Claimed]:
        """Entries due at `now_s` (and expired leases), leased until now_s + lease_s."""
        flat = cast(
            list[bytes],
            self._claim(keys=self.keys, args=[repr(now_s), repr(now_s + lease_s), max_n]),
        )
        return [
            Claimed(flat[i].decode(), flat[i + 1]) for i in range(0, len(flat), 2) if flat[i + 1]
        ]

    def ack_many(self, entry_ids: Sequence[str]) -> int:
        if not entry_ids:
            return 0
        return int(cast(int, self._ack(keys=self.keys, args=list(entry_ids))))

    def retry_later(self, entry_ids: Sequence[str], due_s: float) -> int:
        """Give claimed entries back (e.g. the main topic refused them) with a new due time."""
        if not entry_ids:
            return 0
        return int(cast(int, self._retry_later(keys=self.keys, args=[repr(due_s), *entry_ids])))

    def set_due(self, entry_id: str, due_s: float, payload: bytes) -> bool:
        """Admin retry: (re)queue at `due_s`; False while the entry is being re-produced."""
        return bool(self._set_due(keys=self.keys, args=[repr(due_s), entry_id, payload]))

    def remove(self, entry_ids: Sequence[str]) -> int:
        if not entry_ids:
            return 0
        return int(cast(int, self._remove(keys=self.keys, args=list(entry_ids))))

    def due_of(self, entry_id: str) -> float | None:
        score = self._r.zscore(self.keys[0], entry_id)
        return None if score is None else float(score)

    def counts(self) -> tuple[int, int]:
        """(waiting, in flight)."""
        pipe = self._r.pipeline(transaction=False)
        pipe.zcard(self.keys[0])
        pipe.zcard(self.keys[1])
        ready, inflight = pipe.execute()
        return int(ready), int(inflight)
