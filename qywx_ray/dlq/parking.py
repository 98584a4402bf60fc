"""Per-user order for retries: park a user's later messages behind a message in the retry path.

Keys per user: flag `qywx:park:{user}` (value = message_id being retried) and list
`qywx:parked:{user}` (envelope bytes, in arrival order). Every call is one Lua script:
one round trip per batch, atomic. Never lets a non-retry message of a parked user pass
(except the redelivery of the very message being waited on), and never clears the flag
while parked messages remain.

Host protocol (consume side; `AsyncParkingLot`, consume.types.RetryOrder), one host's
calls in order (its parking lane), each resend-safe by op key:
  1. `admit` each batch: PARKED (durably in the lot: count it processed), ADMITTED, or
     WAITED_ON (the very message the user waits on).
  2. a failing mailbox head: `park` BEFORE its dead letter (a drained message: after it);
     it takes the flag over only from its drain owner or a held tail.
  3. a full mailbox: `hold` the overflow behind the newest queued message.
  4. a settled blocker (retry ok, failed for good, or a drain token from the recovery):
     `advance` = drop the previous chunk + read the next, or unpark when empty.
`Parking` is the synchronous form of admit/park for tools and tests.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any, cast

import redis
import redis.asyncio as aioredis

from qywx_ray.consume.types import HoldRequest, ParkRequest
from qywx_ray.dlq.message import is_recoverable
from qywx_ray.dlq.settings import DLQSettings
from qywx_ray.reasons import FailureReason
from qywx_ray.settings import Settings
from qywx_ray.store.client import make_async_redis

FLAG_PREFIX = "qywx:park:"
LIST_PREFIX = "qywx:parked:"
OP_PREFIX = "qywx:park-op:"  # one key per applied park/hold/advance (24 h): resends no-op
AT_PREFIX = "qywx:park-at:"  # "partition:offset" of a hold's blocker (a host's queued tail)
ADMITTED = 1  # _ADMIT's "process" (consume.types.ADMITTED)


def new_op_id() -> str:
    """Idempotency key of one park/advance: created once, reused by every retry of it."""
    return uuid.uuid4().hex


_ADMIT = """
-- KEYS: (flag, list, at) per item; ARGV: (message_id, envelope, is_retry, partition,
-- offset) per item. 1 = process, 0 = parked, 2 = process: the very message waited on.
-- `at` ("partition:offset") marks a hold behind a host's newest queued message: a record
-- of that partition below that offset is OLDER than the blocker (redelivered after the
-- host died before running it): it is processed, not parked behind a newer message.
local out = {}
for i = 1, #KEYS / 3 do
  local flag = KEYS[3 * i - 2]
  local mid = ARGV[5 * i - 4]
  local ok = 1
  local waiting = redis.call('GET', flag)
  if waiting and waiting == mid then
    ok = 2
  elseif waiting and ARGV[5 * i - 2] ~= '1' then
    local older = false
    local at = redis.call('GET', KEYS[3 * i])
    local offset = tonumber(ARGV[5 * i])
    if at and offset >= 0 then
      local p, o = string.match(at, '^(-?%d+):(-?%d+)$')
      older = p == ARGV[5 * i - 1] and offset < tonumber(o)
    end
    if not older then
      redis.call('RPUSH', KEYS[3 * i - 1], ARGV[5 * i - 3])
      ok = 0
    end
  end
  out[i] = ok
end
return out
"""

_PARK = """
-- KEYS: flag, list, op; ARGV: message_id, drop_first, n, replaces (n ids), pending...
-- Applied once per op key: a retry after a lost reply (or a timeout) must not drop or
-- push twice (a resend returns the first answer). The flag is taken over only when
-- absent, already ours, or one of the `replaces` ids; another blocker is older than this
-- message (an exempt one failed while its user was parked): nothing changes (2).
local done = redis.call('GET', KEYS[3])
if done then return tonumber(done) end
local n = tonumber(ARGV[3])
local first = 4 + n
local current = redis.call('GET', KEYS[1])
if current and current ~= ARGV[1] then
  local ours = false
  for i = 4, 3 + n do
    if ARGV[i] == current then ours = true end
  end
  if not ours then
    redis.call('SET', KEYS[3], '2', 'EX', 86400)
    return 2
  end
end
redis.call('SET', KEYS[3], '1', 'EX', 86400)
redis.call('SET', KEYS[1], ARGV[1])
redis.call('DEL', KEYS[4])
local drop = tonumber(ARGV[2])
if drop > 0 then redis.call('LTRIM', KEYS[2], drop, -1) end
-- pending mailbox items precede everything parked: they go to the FRONT, in order.
for i = #ARGV, first, -1 do
  redis.call('LPUSH', KEYS[2], ARGV[i])
end
return 1
"""

_ADVANCE = """
-- KEYS: flag, list, op, at; ARGV: message_id, drop_n, max_n
-- {0} not waiting on it; {2} drained and unparked; {1, items...} next items (left in place)
-- The drop is applied once per op key (a retried call reads the same items again).
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return {0} end
local drop = tonumber(ARGV[2])
if redis.call('SET', KEYS[3], '1', 'NX', 'EX', 86400) and drop > 0 then
  redis.call('LTRIM', KEYS[2], drop, -1)
end
local items = redis.call('LRANGE', KEYS[2], 0, tonumber(ARGV[3]) - 1)
if #items == 0 then
  redis.call('DEL', KEYS[1], KEYS[4])
  return {2}
end
local out = {1}
for i = 1, #items do out[i + 1] = items[i] end
return out
"""

_HOLD = """
-- KEYS: flag, list, op, at; ARGV: message_id, "partition:offset", envelopes...
-- A full mailbox overflows into the lot: append (once per op key) and, unless the user
-- already waits on a message, wait on the host's newest queued one (ARGV[1]) at its
-- Kafka position (ARGV[2]: older records of that partition are not parked behind it).
if not redis.call('SET', KEYS[3], '1', 'NX', 'EX', 86400) then return 0 end
if not redis.call('GET', KEYS[1]) then
  redis.call('SET', KEYS[1], ARGV[1])
  redis.call('SET', KEYS[4], ARGV[2])
end
for i = 3, #ARGV do redis.call('RPUSH', KEYS[2], ARGV[i]) end
return 1
"""

# (user, message_id, envelope_bytes, is_retry[, partition, offset]); -1 = no position
AdmitItem = tuple[str, str, bytes, bool] | tuple[str, str, bytes, bool, int, int]


def _admit_call(items: Sequence[AdmitItem]) -> tuple[list[str], list[str | bytes]]:
    """KEYS and ARGV of the _ADMIT script for a batch."""
    keys: list[str] = []
    args: list[str | bytes] = []
    for item in items:
        user, message_id, envelope, is_retry = item[:4]
        partition, offset = (item[4], item[5]) if len(item) == 6 else (-1, -1)
        keys += [FLAG_PREFIX + user, LIST_PREFIX + user, AT_PREFIX + user]
        args += [message_id, envelope, "1" if is_retry else "0", str(partition), str(offset)]
    return keys, args


def _op_keys(user: str, op_id: str) -> list[str]:
    """KEYS of _PARK / _HOLD / _ADVANCE: flag, list, the op key that makes a resend a
    no-op, and the hold position."""
    return [
        FLAG_PREFIX + user,
        LIST_PREFIX + user,
        OP_PREFIX + (op_id or new_op_id()),
        AT_PREFIX + user,
    ]


def parks_for(reason: FailureReason, settings: DLQSettings) -> bool:
    """Whether a failure for this reason parks the user's later messages."""
    if not is_recoverable(reason):
        return False
    if reason in (FailureReason.RATE_LIMITED, FailureReason.USER_BLOCKED):
        return settings.park_rate_limited
    return True


class Parking:
    def __init__(self, client: redis.Redis, settings: DLQSettings) -> None:
        self._r = client
        self._settings = settings
        self._admit = client.register_script(_ADMIT)
        self._park = client.register_script(_PARK)

    def admit_batch(self, items: Sequence[AdmitItem]) -> list[bool]:
        """True = process now; False = parked (durably appended behind the user's retry)."""
        if not items:
            return []
        keys, args = _admit_call(items)
        result = cast(list[int], self._admit(keys=keys, args=args))
        return [bool(x) for x in result]

    def park(
        self,
        user: str,
        message_id: str,
        reason: FailureReason | None = None,
        pending: Sequence[bytes] = (),
        replaces: Sequence[str] = (),
    ) -> bool:
        """Park `user` behind `message_id` (unless the reason is exempt or another blocker
        not in `replaces` holds the user); False if not parked.

        `pending` = that user's later messages the host already holds (its mailbox, or
        parked messages it took but has not processed), in order; they are put in FRONT
        of the parked list, since they precede everything parked so far.
        """
        if reason is not None and not parks_for(reason, self._settings):
            return False
        args: list[str | int | bytes] = [message_id, 0, len(replaces), *replaces]
        args.extend(pending)
        return int(self._park(keys=_op_keys(user, ""), args=args)) == 1

    def is_parked(self, user: str) -> bool:
        return bool(self._r.exists(FLAG_PREFIX + user))

    def waiting_on(self, user: str) -> str | None:
        value = cast(bytes | None, self._r.get(FLAG_PREFIX + user))
        return value.decode() if value is not None else None

    def peek_parked(self, user: str, max_n: int) -> list[bytes]:
        """The first `max_n` parked messages, left in place (crash-safe drain)."""
        return cast(list[bytes], self._r.lrange(LIST_PREFIX + user, 0, max_n - 1))

    def parked_count(self, user: str) -> int:
        return int(self._r.llen(LIST_PREFIX + user))


def _reason(reason: str) -> FailureReason:
    try:
        return FailureReason(reason)
    except ValueError:
        return FailureReason.DOWNSTREAM_ERROR


class AsyncParkingLot:
    """consume.types.RetryOrder over Redis (asyncio client); every call one round trip,
    except an admit whose batch has a parked user (two)."""

    def __init__(self, client: aioredis.Redis, settings: DLQSettings) -> None:
        self._settings = settings
        self._r = client
        self._admit = client.register_script(_ADMIT)
        self._park = client.register_script(_PARK)
        self._advance = client.register_script(_ADVANCE)
        self._hold = client.register_script(_HOLD)

    def parks(self, reason: str) -> bool:
        return parks_for(_reason(reason), self._settings)

    async def admit(self, items: Sequence[AdmitItem]) -> list[int]:
        """One MGET of the batch's users' flags, then the _ADMIT script for the items of
        the users that are parked (usually none).

        Why not the script for the whole batch: it ships every envelope and five
        arguments per item, and packing those was ~15 % of a host's CPU in the trivial
        drain. Why this is the same decision: _ADMIT decides each item from its own
        user's keys only, so admitting the unparked users at the MGET and the parked
        ones at the script is the script run per user at one instant each, all inside
        this call's await: the unparked users' answers are exactly what the script
        would have answered at the MGET, and a flag set after it is ordered after this
        admit, as in any interleaving of the one-script admit with that park."""
        if not items:
            return []
        users = list(dict.fromkeys(item[0] for item in items))
        flags = await self._r.mget([FLAG_PREFIX + user for user in users])
        parked = {user for user, flag in zip(users, flags, strict=True) if flag is not None}
        codes = [ADMITTED] * len(items)
        if parked:
            at = [i for i, item in enumerate(items) if item[0] in parked]
            answers = await self.admit_flagged([items[i] for i in at])
            for i, code in zip(at, answers, strict=True):
                codes[i] = code
        return codes

    async def admit_flagged(self, items: Sequence[AdmitItem]) -> list[int]:
        """The _ADMIT script for `items`, whose users' flags the caller already read
        (consume/batch_reads.py reads them in its one call per batch): one round trip."""
        if not items:
            return []
        keys, args = _admit_call(items)
        return [int(code) for code in await self._admit(keys=keys, args=args)]

    async def park(self, request: ParkRequest) -> int:
        r = request
        args: list[str | int | bytes] = [r.message_id, r.drop_first, len(r.replaces), *r.replaces]
        args.extend(r.pending)
        return int(await self._park(keys=_op_keys(r.user, r.op_id), args=args))

    async def advance(
        self, user: str, message_id: str, drop_n: int, max_n: int, op_id: str = ""
    ) -> tuple[int, list[bytes]]:
        reply: Any = await self._advance(
            keys=_op_keys(user, op_id), args=[message_id, drop_n, max_n]
        )
        return int(reply[0]), list(reply[1:])

    async def hold(self, request: HoldRequest) -> None:
        r = request
        at = f"{r.position[0]}:{r.position[1]}"
        await self._hold(keys=_op_keys(r.user, r.op_id), args=[r.message_id, at, *r.values])


def make_async_parking(settings: Settings) -> AsyncParkingLot:
    """Hook factory (`consume.retry_order`): the parking lot on the configured Redis."""
    return AsyncParkingLot(make_async_redis(settings.redis), settings.dlq)
