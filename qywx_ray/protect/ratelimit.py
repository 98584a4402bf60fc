"""Sliding-window rate limiter with block and progressive penalty, state in Redis.

Decides, for every message of a delivery batch (many users), ALLOW / RATE_LIMITED /
BLOCKED with ONE Redis round trip (one EVALSHA of ratelimit.lua) for the whole batch;
semantics are the original design's Go `RateLimiter.Allow` (see ratelimit.lua), with the window
closed at both ends ([t - N, t]) so that the original design's slow attacker (exactly X messages
per N seconds) is caught, as its scenario 4 says. State survives restarts and
rebalances and is shared by every host; the admin helpers read and change it.

Time: an injected clock (Unix seconds) is sent as ARGV so tests are deterministic;
without one the script reads Redis `TIME` once per batch, so every host shares one
clock at no extra round trip. `check_batch_at` rates messages by their own send times
(e.g. WeCom send_time), so a backlog replayed after an outage is not mistaken for a flood.

Never drops a message: it only decides. Whitelisted users never touch Redis state.
Redis unreachable -> InfraError; the caller chooses (retry the batch, or DLQ), never this
module. Single instance or Sentinel: the script builds per-user key names itself, which
Redis Cluster would reject.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

import redis.asyncio as aioredis
from pydantic import BaseModel
from redis.exceptions import RedisError

from qywx_ray.errors import InfraError
from qywx_ray.obs import metrics
from qywx_ray.obs.logging import get_logger
from qywx_ray.protect.audit import AuditLog
from qywx_ray.protect.decision import ALLOW, Decision, Verdict, record_denied
from qywx_ray.protect.groups import GROUP_OVERRIDES_KEY, GroupResolver
from qywx_ray.protect.settings import DEFAULT_GROUP, WHITELIST, ProtectSettings, RateLimitRule
from qywx_ray.reasons import FailureReason

log = get_logger(__name__)

BLOCKED_KEY = "qywx:rl:blocked"
_HOUR_MS = 3_600_000

VIOLATIONS = metrics.counter(
    "qywx_rate_limit_violations_total", "Messages over their user's rate limit (violations)"
)
USERS_BLOCKED = metrics.counter("qywx_users_blocked_total", "Users blocked (automatic or admin)")
BLOCKED_CURRENT = metrics.gauge("qywx_blocked_users_current", "Users blocked right now")

# The one source of the limiter's Lua: also run, as a function, inside the consume
# path's batch read (consume/batch_reads.py).
LUA = resources.files("qywx_ray.protect").joinpath("ratelimit.lua").read_text(encoding="utf-8")
_LUA = LUA


OVERRIDES_KEY = "qywx:rl:overrides"

# Admin changes to one user's state string, atomically (format: see ratelimit.lua).
# KEYS: state, adm, blocked zset. ARGV: op, user, now_ms, perm, bu_ms, why, by, history_ms.
_ADMIN_LUA = """
local raw = redis.call('GET', KEYS[1])
local f = {}
if raw then
  for part in string.gmatch(raw .. '|', '([^|]*)|') do f[#f + 1] = part end
end
local hist = f[4] or ''
local now, history = tonumber(ARGV[3]), tonumber(ARGV[8])
local last_h = 0
for h in string.gmatch(hist, '[^,]+') do last_h = tonumber(h) end
local function num(x) return string.format('%d', x) end
if ARGV[1] == 'block' then
  local bu = tonumber(ARGV[5])
  local value = '0|' .. ARGV[5] .. '|' .. ARGV[4] .. '|' .. hist .. '|' .. (f[5] or '')
  redis.call('HSET', KEYS[2], 'why', ARGV[6], 'by', ARGV[7])
  if ARGV[4] == '1' then
    redis.call('SET', KEYS[1], value)
    redis.call('PERSIST', KEYS[2])
    redis.call('ZADD', KEYS[3], '+inf', ARGV[2])
  else
    local ttl = math.max(bu - now, last_h + history - now, 0) + 60000
    redis.call('SET', KEYS[1], value, 'PX', num(ttl))
    redis.call('PEXPIRE', KEYS[2], num(bu - now + 60000))
    redis.call('ZADD', KEYS[3], ARGV[5], ARGV[2])
  end
  return 1
end
local was = 0
if raw and (f[3] == '1' or (tonumber(f[2]) or 0) > now) then was = 1 end
if last_h + history > now then
  redis.call('SET', KEYS[1], '0|0|0|' .. hist .. '|', 'PX', num(last_h + history - now + 60000))
else
  redis.call('DEL', KEYS[1])
end
redis.call('DEL', KEYS[2])
redis.call('ZREM', KEYS[3], ARGV[2])
return was
"""


def user_key(user: str, suffix: str) -> str:
    return f"qywx:rl:{{{user}}}:{suffix}"


@dataclass(frozen=True, slots=True)
class _State:
    violations: int = 0
    blocked_until_ms: int = 0
    permanent: bool = False
    history_ms: tuple[int, ...] = ()
    window_ms: tuple[int, ...] = ()

    @classmethod
    def parse(cls, raw: bytes | str | None) -> _State:
        if raw is None:
            return cls()
        f = (_s(raw) or "").split("|")
        f += [""] * (5 - len(f))

        def ints(text: str) -> tuple[int, ...]:
            return tuple(int(x) for x in text.split(",") if x)

        return cls(int(f[0] or 0), int(f[1] or 0), f[2] == "1", ints(f[3]), ints(f[4]))


def _parse_override(raw: bytes | str | None) -> tuple[RateLimitRule, float] | None:
    if raw is None:
        return None
    window_ms, max_messages, threshold, block_ms, exp_ms = (
        int(x) for x in (_s(raw) or "").split(",")
    )
    rule = RateLimitRule(
        window_seconds=window_ms / 1000,
        max_messages=max_messages,
        penalty_threshold=threshold,
        block_hours=block_ms / _HOUR_MS,
    )
    return rule, exp_ms / 1000


def _ms(seconds: float) -> int:
    return round(seconds * 1000)


def _s(value: bytes | str | None) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


def user_args(user: str, group: str, n: int, times: Sequence[float] | None) -> list[Any]:
    """One user's part of the script's ARGV: user, group, n, nt, nt x time_ms."""
    if times is None:
        return [user, group, n, 0]
    return [user, group, n, n, *(_ms(t) for t in times)]


@dataclass(slots=True)
class RatePlan:
    """A batch's rate-limit call before it is made: `out` holds the decisions known
    without Redis (limiter disabled, whitelisted users), `head` the script's ARGV up to
    its users, `sent` the users the script rates: (user, group, n, times or None)."""

    out: dict[str, list[Decision]]
    head: list[Any]
    sent: list[tuple[str, str, int, Sequence[float] | None]]

    def argv(self) -> list[Any]:
        args = [*self.head, len(self.sent)]
        for user, group, n, times in self.sent:
            args += user_args(user, group, n, times)
        return args


@dataclass(frozen=True, slots=True)
class BatchStats:
    """What the last check_batch saw (for tests and introspection)."""

    now_s: float
    blocked_now: int
    violations: int
    blocks: int


class UserStatus(BaseModel):
    user: str
    known: bool
    group: str
    group_source: str  # config | admin | override
    rule: RateLimitRule
    override_expires_at: float | None = None
    messages_in_window: int = 0
    violations: int = 0
    blocked: bool = False
    permanent: bool = False
    blocked_until: float | None = None
    block_reason: str = ""
    blocked_by: str = ""
    blocks_in_history: int = 0


class BlockedUser(BaseModel):
    user: str
    blocked_until: float | None  # None: permanent
    permanent: bool
    reason: str = ""
    blocked_by: str = ""


class RateLimiter:
    def __init__(
        self,
        redis_async: aioredis.Redis,
        settings: ProtectSettings,
        groups: GroupResolver,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self._redis = redis_async
        self._settings = settings
        self._groups = groups
        self._clock = clock
        self._script = redis_async.register_script(_LUA)
        self._admin_script = redis_async.register_script(_ADMIN_LUA)
        self.audit = AuditLog(
            redis_async,
            max_entries=settings.audit_max_entries,
            clock=clock or time.time,
        )
        pp = settings.progressive_penalty
        head: list[Any] = [
            "1" if pp.enabled else "0",
            repr(pp.multiplier),
            _ms(pp.max_block_hours * 3600),
            _ms(pp.history_hours * 3600),
        ]
        rules = {DEFAULT_GROUP: settings.default, **settings.groups}
        head.append(len(rules))
        for name, rule in rules.items():
            head += [name, *self._rule_args(rule)]
        self._head = head
        self.last_stats: BatchStats | None = None

    @staticmethod
    def _rule_args(rule: RateLimitRule) -> list[int]:
        return [
            _ms(rule.window_seconds),
            rule.max_messages,
            rule.penalty_threshold,
            _ms(rule.block_hours * 3600),
        ]

    # --- hot path ---------------------------------------------------------------------

    async def check_batch(self, counts: Sequence[tuple[str, int]]) -> dict[str, list[Decision]]:
        """For each user, one decision per message in order; all users in ONE EVALSHA.

        A user listed twice is rated in list order, its decisions concatenated.
        """
        return await self._check([(user, n, None) for user, n in counts])

    async def check_batch_at(
        self, items: Sequence[tuple[str, Sequence[float]]]
    ) -> dict[str, list[Decision]]:
        """Like check_batch, but each message is rated at its own time (Unix seconds)."""
        return await self._check([(user, len(ts), ts) for user, ts in items])

    async def _check(
        self, items: Sequence[tuple[str, int, Sequence[float] | None]]
    ) -> dict[str, list[Decision]]:
        plan = await self.plan(items)
        if not plan.sent:
            return plan.out
        try:
            reply = await self._script(keys=[], args=plan.argv())
        except RedisError as exc:
            raise InfraError(f"rate limiter: Redis call failed: {exc}") from exc
        return self.decide(plan, [(user, n) for user, _, n, _ in plan.sent], reply)

    async def plan(self, items: Sequence[tuple[str, int, Sequence[float] | None]]) -> RatePlan:
        """The script's arguments for a batch (no Redis): split from `decide` so the
        consume path's one-call batch read (consume/batch_reads.py) can run the same
        script body inside its own call and interpret the answer here."""
        out: dict[str, list[Decision]] = {}
        if not self._settings.enabled:
            for user, n, _ in items:
                out.setdefault(user, []).extend([ALLOW] * n)
            return RatePlan(out, [], [])
        groups = await self._groups.resolve(list({u for u, _, _ in items}))
        head: list[Any] = ["" if self._clock is None else _ms(self._clock()), *self._head]
        sent: list[tuple[str, str, int, Sequence[float] | None]] = []
        for user, n, times in items:
            if n <= 0:
                out.setdefault(user, [])
                continue
            group = groups.get(user, DEFAULT_GROUP)
            if group == WHITELIST:  # never limited: skip entirely
                out.setdefault(user, []).extend([ALLOW] * n)
                continue
            sent.append((user, group, n, times))
        return RatePlan(out, head, sent)

    def decide(
        self, plan: RatePlan, sent: Sequence[tuple[str, int]], reply: Any
    ) -> dict[str, list[Decision]]:
        """Decisions from the script's reply for `sent` (user, n) in the order the script
        rated them; adds them to `plan.out`, records the metrics and returns it."""
        out = plan.out
        now_ms = int(reply[0])
        blocked_now = int(reply[1])
        total_violations = total_blocks = limited = blocked = 0
        for (user, n), result in zip(sent, reply[2], strict=True):
            decisions, stats = self._decode(user, n, result)
            out.setdefault(user, []).extend(decisions)
            total_violations += stats[0]
            total_blocks += stats[1]
            limited += stats[2]
            blocked += stats[3]
        VIOLATIONS.inc(total_violations)
        USERS_BLOCKED.inc(total_blocks)
        BLOCKED_CURRENT.set(blocked_now)
        record_denied(FailureReason.RATE_LIMITED, limited)
        record_denied(FailureReason.USER_BLOCKED, blocked)
        if total_blocks and blocked_now >= self._settings.emergency_blocked_users:
            log.error(
                "ratelimit.mass_block",
                alert_level="EMERGENCY",
                blocked_now=blocked_now,
                hint="many users blocked at once: possible attack, intervene now",
            )
        self.last_stats = BatchStats(now_ms / 1000, blocked_now, total_violations, total_blocks)
        return out

    def _decode(self, user: str, n: int, result: bytes) -> tuple[list[Decision], tuple[int, ...]]:
        if not result:
            return [ALLOW] * n, (0, 0, 0, 0)
        f = result.decode().split("|")
        codes = [int(c) for c in f[0].split(",")]
        bu_ms = int(f[1])
        violations_now = int(f[2])
        permanent = f[3] == "1"
        group = f[4]
        blocks = int(f[5])
        block_ms = int(f[6])
        window_s = int(f[7]) / 1000
        max_messages, threshold = int(f[8]), int(f[9])
        until = math.inf if permanent else bu_ms / 1000
        blocked_dec = Decision(
            Verdict.BLOCKED,
            "user permanently blocked" if permanent else f"user blocked until {until:.3f} (Unix s)",
            until,
        )
        decisions: list[Decision] = []
        viol = lim = blk = 0
        max_v = 0
        for code in codes:
            if code == 0:
                decisions.append(ALLOW)
            elif code > 0:
                viol += 1
                lim += 1
                max_v = max(max_v, code)
                decisions.append(
                    Decision(
                        Verdict.RATE_LIMITED,
                        f"rate limited: {max_messages} messages per {window_s:g}s "
                        f"(violation {code}/{threshold})",
                    )
                )
            elif code == -2:
                viol += 1
                blk += 1
                decisions.append(
                    Decision(
                        Verdict.BLOCKED,
                        f"blocked for {block_ms / 1000:g}s after {threshold} "
                        f"consecutive violations (violation {threshold}/{threshold})",
                        until,
                    )
                )
            else:
                blk += 1
                decisions.append(blocked_dec)
        if lim:
            fields = {"user": user, "group": group, "violations": violations_now}
            if max_v >= 2:
                log.warning("ratelimit.violations", alert_level="WARNING", **fields)
            else:
                log.info("ratelimit.limited", alert_level="INFO", **fields)
        if blocks:
            log.error(
                "ratelimit.blocked",
                alert_level="CRITICAL",
                user=user,
                group=group,
                violations=threshold,
                block_s=block_ms / 1000,
                blocked_until=until,
            )
        return decisions, (viol, blocks, lim, blk)

    # --- admin helpers (not on the hot path) ------------------------------------------

    async def now(self) -> float:
        """Unix seconds on the limiter's clock (the injected one, else Redis TIME)."""
        if self._clock is not None:
            return self._clock()
        sec, usec = await self._redis.time()
        return sec + usec / 1e6

    async def status(self, user: str) -> UserStatus:
        now = await self.now()
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.get(user_key(user, "st"))
            pipe.hmget(user_key(user, "adm"), "why", "by")
            pipe.hget(OVERRIDES_KEY, user)
            pipe.hget(GROUP_OVERRIDES_KEY, user)
            raw, (why, by), raw_override, admin_group = await pipe.execute()
        state = _State.parse(raw)
        configured = (await self._groups.resolve([user])).get(user, DEFAULT_GROUP)
        group, source = configured, "config"
        if admin_group is not None:
            group, source = _s(admin_group) or configured, "admin"
        rule = self._settings.rule_for(group)
        expires_at: float | None = None
        override = _parse_override(raw_override)
        if override is not None and override[1] > now and group != WHITELIST:
            rule, expires_at = override
            source = "override"
        cutoff_ms = _ms(now - rule.window_seconds)
        history_cutoff = _ms(now - self._settings.progressive_penalty.history_hours * 3600)
        blocked = state.permanent or state.blocked_until_ms > _ms(now)
        return UserStatus(
            user=user,
            known=raw is not None
            or override is not None
            or admin_group is not None
            or configured != DEFAULT_GROUP,
            group=group,
            group_source=source,
            rule=rule,
            override_expires_at=expires_at,
            messages_in_window=sum(1 for t in state.window_ms if t >= cutoff_ms),
            violations=state.violations,
            blocked=blocked,
            permanent=state.permanent,
            blocked_until=(
                state.blocked_until_ms / 1000 if blocked and not state.permanent else None
            ),
            block_reason=(_s(why) or "") if blocked else "",
            blocked_by=(_s(by) or "") if blocked else "",
            blocks_in_history=sum(1 for t in state.history_ms if t >= history_cutoff),
        )

    async def _admin(self, op: str, user: str, *args: Any) -> int:
        now = await self.now()
        history_ms = _ms(self._settings.progressive_penalty.history_hours * 3600)
        keys = [user_key(user, "st"), user_key(user, "adm"), BLOCKED_KEY]
        argv = [op, user, _ms(now), *args, history_ms]
        return int(await self._admin_script(keys=keys, args=argv))

    async def unblock(self, user: str, reason: str, actor: str) -> bool:
        """Lift a block (automatic or permanent) and clear the user's window and
        violations; the block history (progressive penalty) is kept. False: not blocked."""
        was = bool(await self._admin("unblock", user, 0, 0, "", ""))
        await self.audit.record(actor, "unblock", user=user, reason=reason, details={"was": was})
        log.warning("ratelimit.unblocked", user=user, actor=actor, reason=reason)
        await self._refresh_gauge()
        return was

    async def block(
        self,
        user: str,
        reason: str,
        actor: str,
        permanent: bool = True,
        duration_s: float | None = None,
    ) -> BlockedUser:
        """Block by hand: permanently, or for `duration_s` seconds."""
        if not permanent and (duration_s is None or duration_s <= 0):
            raise ValueError("a temporary block needs duration_s > 0")
        now = await self.now()
        until = math.inf if permanent else now + float(duration_s or 0)
        bu_ms = 0 if permanent else _ms(until)
        await self._admin("block", user, "1" if permanent else "0", bu_ms, reason, actor)
        USERS_BLOCKED.inc()
        await self.audit.record(
            actor,
            "block",
            user=user,
            reason=reason,
            details={"permanent": permanent, "blocked_until": None if permanent else until},
        )
        log.error("ratelimit.blocked_by_admin", alert_level="CRITICAL", user=user, actor=actor)
        await self._refresh_gauge()
        return BlockedUser(
            user=user,
            blocked_until=None if permanent else until,
            permanent=permanent,
            reason=reason,
            blocked_by=actor,
        )

    async def set_override(
        self,
        user: str,
        rule: RateLimitRule,
        expires_at: float,
        *,
        actor: str = "system",
        reason: str = "",
    ) -> None:
        """A temporary rule for one user (e.g. a campaign) until `expires_at` (Unix s)."""
        now = await self.now()
        if expires_at <= now:
            raise ValueError(f"expires_at {expires_at} is not in the future (now {now:.3f})")
        if expires_at - now > self._settings.max_override_seconds:
            raise ValueError(
                f"override lasts {expires_at - now:.0f}s; the maximum is "
                f"{self._settings.max_override_seconds:.0f}s (protect.max_override_seconds)"
            )
        value = ",".join(str(x) for x in [*self._rule_args(rule), _ms(expires_at)])
        expired = [
            field
            for field, raw in (await self._redis.hgetall(OVERRIDES_KEY)).items()
            if (o := _parse_override(raw)) is not None and o[1] <= now
        ]
        async with self._redis.pipeline(transaction=True) as pipe:
            if expired:
                pipe.hdel(OVERRIDES_KEY, *expired)
            pipe.hset(OVERRIDES_KEY, user, value)
            await pipe.execute()
        await self.audit.record(
            actor,
            "set_limit",
            user=user,
            reason=reason,
            details={"rule": rule.model_dump(), "expires_at": expires_at},
        )

    async def clear_override(self, user: str, *, actor: str = "system", reason: str = "") -> bool:
        removed = bool(await self._redis.hdel(OVERRIDES_KEY, user))
        if removed:
            await self.audit.record(actor, "clear_limit", user=user, reason=reason)
        return removed

    async def blocked_users(self, limit: int = 1000) -> list[BlockedUser]:
        """Users blocked now: permanent ones first, then the longest blocks."""
        now_ms = _ms(await self.now())
        raw: list[Any] = await self._redis.zrevrangebyscore(
            BLOCKED_KEY, "+inf", f"({now_ms}", start=0, num=limit, withscores=True
        )
        details: list[Any] = []
        if raw:
            async with self._redis.pipeline(transaction=False) as pipe:
                for member, _score in raw:
                    pipe.hmget(user_key(_s(member) or "", "adm"), "why", "by")
                details = await pipe.execute()
        out = []
        for (member, score), (why, by) in zip(raw, details, strict=True):
            permanent = math.isinf(score)
            out.append(
                BlockedUser(
                    user=_s(member) or "",
                    blocked_until=None if permanent else score / 1000,
                    permanent=permanent,
                    reason=_s(why) or "",
                    blocked_by=_s(by) or "",
                )
            )
        return out

    async def _refresh_gauge(self) -> None:
        now_ms = _ms(await self.now())
        BLOCKED_CURRENT.set(await self._redis.zcount(BLOCKED_KEY, f"({now_ms}", "+inf"))
