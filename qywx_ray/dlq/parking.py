"""Per-user order for retries: park a user's later messages behind a message in the retry path.

Keys per user: flag `qywx:park:{user}` (value = message_id being retried) and list
`qywx:parked:{user}` (envelope bytes, in arrival order). Every call is one Lua script:
one round trip per batch, atomic. Never lets a non-retry message of a parked user pass
(except the redelivery of the very message being waited on), and never clears the flag
while parked messages remain.

Host protocol (consume side):
  1. before dispatching a batch: `admit_batch`; False = parked durably, count it processed.
  2. on a recoverable failure: `park(user, message_id, reason, pending=<later messages of
     that user still in its mailbox>)` BEFORE the dead letter is sent.
  3. when a retried message (or the waited-on message) of a parked user succeeds:
     `peek_parked` → process in order before anything new → `drop_parked(n)`; repeat
     until empty; then `try_unpark` (False: more arrived meanwhile, keep draining).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import redis

from qywx_ray.dlq.message import FailureReason, is_recoverable
from qywx_ray.dlq.settings import DLQSettings

FLAG_PREFIX = "qywx:park:"
LIST_PREFIX = "qywx:parked:"

_ADMIT = """
-- KEYS: (flag, list) per item; ARGV: (message_id, envelope, is_retry) per item
local out = {}
for i = 1, #KEYS / 2 do
  local flag = KEYS[2 * i - 1]
  local mid = ARGV[3 * i - 2]
  local ok = 1
  if ARGV[3 * i] ~= '1' then
    local waiting = redis.call('GET', flag)
    if waiting and waiting ~= mid then
      redis.call('RPUSH', KEYS[2 * i], ARGV[3 * i - 1])
      ok = 0
    end
  end
  out[i] = ok
end
return out
"""

_PARK = """
-- KEYS: flag, list; ARGV: message_id, pending envelopes...
redis.call('SET', KEYS[1], ARGV[1])
-- pending mailbox items precede everything parked: they go to the FRONT, in order.
for i = #ARGV, 2, -1 do
  redis.call('LPUSH', KEYS[2], ARGV[i])
end
return 1
"""

_TAKE = """
-- KEYS: list; ARGV: max_n
local items = redis.call('LRANGE', KEYS[1], 0, tonumber(ARGV[1]) - 1)
if #items > 0 then redis.call('LTRIM', KEYS[1], #items, -1) end
return items
"""

_UNPARK = """
-- KEYS: flag, list
if redis.call('LLEN', KEYS[2]) == 0 then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
"""

AdmitItem = tuple[str, str, bytes, bool]  # (user, message_id, envelope_bytes, is_retry)


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
        self._take = client.register_script(_TAKE)
        self._unpark = client.register_script(_UNPARK)

    def admit_batch(self, items: Sequence[AdmitItem]) -> list[bool]:
        """True = process now; False = parked (durably appended behind the user's retry)."""
        if not items:
            return []
        keys: list[str] = []
        args: list[str | bytes] = []
        for user, message_id, envelope, is_retry in items:
            keys += [FLAG_PREFIX + user, LIST_PREFIX + user]
            args += [message_id, envelope, "1" if is_retry else "0"]
        result = cast(list[int], self._admit(keys=keys, args=args))
        return [bool(x) for x in result]

    def park(
        self,
        user: str,
        message_id: str,
        reason: FailureReason | None = None,
        pending: Sequence[bytes] = (),
    ) -> bool:
        """Park `user` behind `message_id` (unless the reason is exempt); False if exempt.

        `pending` = that user's later messages the host already holds (its mailbox, or
        parked messages it took but has not processed), in order; they are put in FRONT
        of the parked list, since they precede everything parked so far.
        """
        if reason is not None and not parks_for(reason, self._settings):
            return False
        self._park(keys=[FLAG_PREFIX + user, LIST_PREFIX + user], args=[message_id, *pending])
        return True

    def is_parked(self, user: str) -> bool:
        return bool(self._r.exists(FLAG_PREFIX + user))

    def waiting_on(self, user: str) -> str | None:
        value = cast(bytes | None, self._r.get(FLAG_PREFIX + user))
        return value.decode() if value is not None else None

    def peek_parked(self, user: str, max_n: int) -> list[bytes]:
        """The first `max_n` parked messages, left in place (crash-safe drain)."""
        return cast(list[bytes], self._r.lrange(LIST_PREFIX + user, 0, max_n - 1))

    def drop_parked(self, user: str, n: int) -> None:
        """Remove the first `n` (after they were processed or durably handed on)."""
        if n > 0:
            self._r.ltrim(LIST_PREFIX + user, n, -1)

    def take_parked(self, user: str, max_n: int) -> list[bytes]:
        """Pop the first `max_n` atomically. Only for callers that make them durable
        elsewhere before acknowledging; otherwise use peek_parked + drop_parked."""
        return cast(list[bytes], self._take(keys=[LIST_PREFIX + user], args=[max_n]))

    def try_unpark(self, user: str) -> bool:
        """Clear the flag only if nothing is parked (atomic); True if the user is free."""
        return bool(self._unpark(keys=[FLAG_PREFIX + user, LIST_PREFIX + user]))

    def parked_count(self, user: str) -> int:
        return int(cast(int, self._r.llen(LIST_PREFIX + user)))
