"""One Redis round trip per delivery batch: done-flags, parking flags and the rate limiter.

Why: a host's admission for a delivery batch used three calls (the dedup check, the
rate limiter, the parking lot's flag read), each a round trip and a reply to parse.
`BATCH_LUA` does all three in one EVALSHA: (a) which of the asked ids have a done-flag,
(b) which of the batch's users have a parking flag (no envelope is shipped: only a
flagged user's items go to the lot's admit script, a second call made only then), and
(c) the rate limiter (protect/ratelimit.lua, run as a function: ONE source of its Lua)
for the messages that will be first deliveries, skipping any whose done-flag (a) found.

What it decides is what the separate calls decide: the plan (`host_rules.batch_read_plan`)
rates exactly `sort_intake`'s fresh first deliveries, the limiter's arguments and reply
are built and read by the limiter itself (`RateLimiter.plan` / `decide`), and a user's
parking flag read here stands for the lot's own flag read (dlq/parking.py
`AsyncParkingLot.admit`: the same MGET-then-script split): every flag of a user on this
host is set under the host's lane, which the whole ingest holds.

Failures raise (the caller applies `consume.redis_down_policy`: consume/host_intake.py).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Protocol

from qywx_ray.consume.dedup import DONE_KEY
from qywx_ray.consume.host_rules import BatchReadPlan, RateItem
from qywx_ray.dlq.parking import FLAG_PREFIX, AsyncParkingLot
from qywx_ray.protect.ratelimit import LUA as RATELIMIT_LUA
from qywx_ray.protect.ratelimit import RateLimiter

# KEYS: D done-flag keys, then U parking-flag keys.
# ARGV: D, U, H (0: no rate limiting), H x the limiter's head (now .. rules), then
#       N users x (user, group, "done index:time_ms,..." for its messages in order): the
#       numbers packed in one string per user, as each argument costs the client an
#       encode (the limiter's own call takes one argument per message).
# Returns {done indexes, flagged user indexes[, the limiter's reply for the users with
# their kept (not done) messages, in order]}.
BATCH_LUA = (
    "local function ratelimit(ARGV)\n"
    + RATELIMIT_LUA
    + """
end
local nd, nu, nh = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
-- Which of KEYS[first..last] exist (string keys: done-flags, parking flags), by MGET in
-- chunks: one command per 1000 keys costs Redis less than a call per key.
local function present(first, last)
  local out = {}
  for s = first, last, 1000 do
    local e = math.min(s + 999, last)
    local got = redis.call('MGET', unpack(KEYS, s, e))
    for k = 1, e - s + 1 do
      if got[k] then out[#out + 1] = s + k - 1 - first + 1 end
    end
  end
  return out
end
local found = present(1, nd)
local flagged = present(nd + 1, nd + nu)
local done = {}
for _, i in ipairs(found) do done[i] = true end
if nh == 0 then return {found, flagged} end
local args = {}
for k = 1, nh do args[k] = ARGV[3 + k] end
local i = 4 + nh
local nusers = tonumber(ARGV[i])
i = i + 1
local body = {}
for _ = 1, nusers do
  local kept = {}
  for at, t in string.gmatch(ARGV[i + 2], '(%d+):(%d+)') do
    at = tonumber(at)
    if at == 0 or not done[at] then kept[#kept + 1] = t end
  end
  body[#body + 1] = ARGV[i]
  body[#body + 1] = ARGV[i + 1]
  body[#body + 1] = #kept
  body[#body + 1] = #kept
  for _, t in ipairs(kept) do body[#body + 1] = t end
  i = i + 3
end
args[#args + 1] = nusers
for _, v in ipairs(body) do args[#args + 1] = v end
return {found, flagged, ratelimit(args)}
"""
)


@dataclass
class BatchAnswer:
    """What the batch read found: `done` ids (the plan's `known` included), `flagged`
    users (parked), and the denial reason by message id of the rated messages."""

    done: set[str] = field(default_factory=set)
    flagged: set[str] = field(default_factory=set)
    reasons: dict[str, str] = field(default_factory=dict)


class BatchReads(Protocol):
    """The one-call batch read (consume/host_intake.py `Intake.ingest`)."""

    @property
    def rates(self) -> bool:
        """Whether `read` rates the plan's `rate` items (else the host's Admission does)."""
        ...

    async def read(self, plan: BatchReadPlan) -> BatchAnswer:
        """Raises when the store is unreachable (the caller applies its policy)."""
        ...


def _reason(decision: Any) -> str | None:
    return None if decision.allowed else str(decision.deny_reason or "rate_limited")


class RedisBatchReads:
    """BatchReads over Redis: one EVALSHA of BATCH_LUA per call. `limiter` None: the
    host's Admission rates (e.g. protection disabled)."""

    def __init__(self, redis: Any, limiter: RateLimiter | None) -> None:
        self._script = redis.register_script(BATCH_LUA)
        self._limiter = limiter

    @property
    def rates(self) -> bool:
        return self._limiter is not None

    async def read(self, plan: BatchReadPlan) -> BatchAnswer:
        keys = [DONE_KEY.format(m) for m in plan.ask]
        keys += [FLAG_PREFIX + u for u in plan.users]
        per_user: dict[str, list[RateItem]] = defaultdict(list)
        for item in plan.rate:
            per_user[item.user].append(item)
        rate_plan = None
        args: list[Any] = [len(plan.ask), len(plan.users)]
        if self._limiter is not None and per_user:
            rate_plan = await self._limiter.plan(
                [(u, len(ms), [m.time_s for m in ms]) for u, ms in per_user.items()]
            )
        if rate_plan is not None and rate_plan.sent:
            args.append(len(rate_plan.head))
            args += rate_plan.head
            args.append(len(rate_plan.sent))
            for user, group, _, _ in rate_plan.sent:  # times in ms, as the limiter's own
                packed = ",".join(f"{m.done_at}:{round(m.time_s * 1000)}" for m in per_user[user])
                args += [user, group, packed]
        else:
            args.append(0)
        reply = await self._script(keys=keys, args=args)
        answer = BatchAnswer(set(plan.known), {plan.users[int(i) - 1] for i in reply[1]})
        answer.done.update(plan.ask[int(i) - 1] for i in reply[0])
        if rate_plan is None:
            return answer
        kept: dict[str, list[RateItem]] = {
            u: [m for m in per_user[u] if m.message_id not in answer.done] for u in per_user
        }
        sent = [(user, len(kept[user])) for user, _, _, _ in rate_plan.sent]
        decisions = (
            self._limiter.decide(rate_plan, sent, reply[2])  # type: ignore[union-attr]
            if rate_plan.sent
            else rate_plan.out
        )
        for user, items in kept.items():
            for item, decision in zip(items, decisions.get(user, []), strict=False):
                reason = _reason(decision)
                if reason is not None:
                    answer.reasons[item.message_id] = reason
        return answer


def make_batch_reads(redis: Any, admission: Any, retry_order: Any) -> RedisBatchReads | None:
    """The batch read on `redis` (the host's dedup client: done-flags, parking flags and
    the limiter's keys live on the one configured Redis). It rates when `admission` is
    the Redis rate limiter's (protect/admission.py; any other Admission still rates
    itself). None when the parking lot is a plugged-in one whose flags it cannot read."""
    if retry_order is not None and not isinstance(retry_order, AsyncParkingLot):
        return None
    limiter = getattr(admission, "limiter", None)
    return RedisBatchReads(redis, limiter if isinstance(limiter, RateLimiter) else None)
