"""Dedicated mode: which target (own actor or shared host) runs a user, shared by all consumers.

A user's messages must run in exactly one place at a time, or two actors process the
same user concurrently and its order is lost. The choice used to live in one consumer's
memory (with a per-consumer share of the cap), so after a consumer restart or a partition
move another consumer could decide differently for the same user
(tests/unit/test_consume_placement.py).
Now the decision is a durable record per user, written once (first writer wins) and
read by every consumer, and the cap on dedicated actors is counted cluster-wide.

- `decide` is the rule (pure); `MemoryPlacementStore` applies it in a dict (unit tests)
  and `RedisPlacementStore` in one Lua script per poll batch for all its new users.
- `Placement` is the consumer's cache in front of a store: known users cost nothing,
  the misses of a batch cost one round trip.
- A record is removed only by the consumer that owns the user's partition, when it holds
  nothing of the user (and, for a dedicated actor, after that actor ended), and only if
  it still says what that consumer used (compare-and-delete). Keeping a record too long
  costs a cap slot; removing it too early could split a user, so removal is conservative.
  (A record whose owner died before removing it stays until the user is seen and then
  idles again under the next owner.)

A new dedicated user first takes a pre-started spare actor from the warm pool
(consume/dedicated_pool.py), in the same script that decides it: its record then names
the spare (`user:~pool:...`) and its first message waits for a Ray call, not a process
start. With no spare left it gets its own named actor, started on demand, as before.

Redis keys (single instance / Sentinel), `{prefix}` = `qywx:placement:{name_prefix}`:
  {prefix}:u:{user}         string: target key (`user:{open_kfid}:{user}`, a spare's
                            name, or a host name)
  {prefix}:dedicated        set of users holding a dedicated slot (SCARD = slots in use)
  {prefix}:pool:spares      set of started spare actors nobody has claimed yet
  {prefix}:pool:starting    set of spares being started (the pool keeper's intent)
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple, Protocol

import redis

from qywx_ray.consume.tracker import DEDICATED_PREFIX


class Want(NamedTuple):
    """A user to place, with the two targets it could get."""

    user: str
    dedicated: str  # its own actor's key
    hosted: str  # its shared host's key


def decide(
    current: str | None, dedicated_in_use: int, cap: int, want: Want, spare: str | None = None
) -> str:
    """The first decision sticks; a new user gets its own actor while slots are free: a
    spare from the warm pool if one is offered, else one named after the user."""
    if current is not None:
        return current
    if dedicated_in_use >= cap:
        return want.hosted
    return spare if spare is not None else want.dedicated


def pool_spares_key(prefix: str) -> str:
    return f"{prefix}:pool:spares"


def pool_starting_key(prefix: str) -> str:
    return f"{prefix}:pool:starting"


def is_dedicated(key: str) -> bool:
    return key.startswith(DEDICATED_PREFIX)


class PlacementStore(Protocol):
    def resolve(self, wants: Sequence[Want], cap: int) -> list[str]:
        """Target key of each user (the recorded one, else a new decision, recorded)."""
        ...

    def release(self, items: Sequence[tuple[str, str]]) -> None:
        """Remove the records of (user, key) pairs that still say `key`."""
        ...


class MemoryPlacementStore:
    """The store in a dict; shared by several `Placement`s it stands for a shared Redis."""

    def __init__(self) -> None:
        self.records: dict[str, str] = {}
        self.dedicated: set[str] = set()
        self.spares: list[str] = []  # the warm pool's unclaimed actors
        self.calls = 0  # round trips a real store would make

    def resolve(self, wants: Sequence[Want], cap: int) -> list[str]:
        self.calls += 1
        out = []
        for want in wants:
            current = self.records.get(want.user)
            spare = self.spares[0] if self.spares else None
            key = decide(current, len(self.dedicated), cap, want, spare)
            if current is None and key == spare:  # taken only by the decision that uses it
                self.spares.pop(0)
            if current is None:
                self.records[want.user] = key
                if is_dedicated(key):
                    self.dedicated.add(want.user)
            out.append(key)
        return out

    def release(self, items: Sequence[tuple[str, str]]) -> None:
        self.calls += 1
        for user, key in items:
            if self.records.get(user) == key:
                del self.records[user]
                self.dedicated.discard(user)


# `decide` for a batch. KEYS[1] = the dedicated set, KEYS[2] = the pool's spares,
# KEYS[2 + i] = user i's record. ARGV[1] = cap, then per user: user, dedicated key,
# hosted key. Returns the keys. A spare is taken (SPOP) only by the decision that uses it.
_RESOLVE = """
local cap = tonumber(ARGV[1])
local used = redis.call('SCARD', KEYS[1])
local out = {}
for i = 1, #KEYS - 2 do
  local user, ded, host = ARGV[3 * i - 1], ARGV[3 * i], ARGV[3 * i + 1]
  local cur = redis.call('GET', KEYS[i + 2])
  if not cur then
    if used < cap then
      cur = redis.call('SPOP', KEYS[2]) or ded
      used = used + redis.call('SADD', KEYS[1], user)
    else
      cur = host
    end
    redis.call('SET', KEYS[i + 2], cur)
  end
  out[i] = cur
end
return out
"""

# Compare-and-delete. KEYS as above; ARGV = user, expected key per record.
_RELEASE = """
local n = 0
for i = 1, #KEYS - 1 do
  local user, key = ARGV[2 * i - 1], ARGV[2 * i]
  if redis.call('GET', KEYS[i + 1]) == key then
    redis.call('DEL', KEYS[i + 1])
    redis.call('SREM', KEYS[1], user)
    n = n + 1
  end
end
return n
"""


class RedisPlacementStore:
    """One script call (one round trip) per `resolve` or `release`, whatever the batch."""

    def __init__(self, client: redis.Redis, prefix: str) -> None:
        self._prefix = prefix
        self._set = f"{prefix}:dedicated"
        self._spares = pool_spares_key(prefix)
        self._resolve = client.register_script(_RESOLVE)
        self._release = client.register_script(_RELEASE)

    def record_key(self, user: str) -> str:
        return f"{self._prefix}:u:{user}"

    def resolve(self, wants: Sequence[Want], cap: int) -> list[str]:
        if not wants:
            return []
        keys = [self._set, self._spares, *(self.record_key(w.user) for w in wants)]
        args: list[Any] = [cap]
        for w in wants:
            args += [w.user, w.dedicated, w.hosted]
        got = self._resolve(keys=keys, args=args)
        return [k.decode() if isinstance(k, bytes) else str(k) for k in got]

    def release(self, items: Sequence[tuple[str, str]]) -> None:
        if not items:
            return
        keys = [self._set, *(self.record_key(user) for user, _ in items)]
        args = [x for pair in items for x in pair]
        self._release(keys=keys, args=args)


def placement_prefix(name_prefix: str) -> str:
    return f"qywx:placement:{name_prefix}"


class Placement:
    """A consumer's view of the shared placement: a cache plus batched misses.

    The cache is cleared at every rebalance (a user whose partition moved may since have
    been released and placed again by its new owner) and per user when it is forgotten.
    """

    def __init__(self, store: PlacementStore, cap: int) -> None:
        self.store = store
        self.cap = max(0, cap)
        self._cache: dict[str, str] = {}

    def known(self, user: str) -> bool:
        return user in self._cache

    def resolve(self, wants: Iterable[Want]) -> None:
        """Look up (or decide) every user not cached, in one store call."""
        missing = [w for w in wants if w.user not in self._cache]
        if not missing:
            return
        for want, key in zip(missing, self.store.resolve(missing, self.cap), strict=True):
            self._cache[want.user] = key

    def route(self, user: str) -> str:
        """The target of a resolved user (KeyError if `resolve` did not see it)."""
        return self._cache[user]

    def forget(self, users: Iterable[str]) -> None:
        for user in users:
            self._cache.pop(user, None)

    def clear(self) -> None:
        self._cache.clear()
