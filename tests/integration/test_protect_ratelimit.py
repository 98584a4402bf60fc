"""Rate limiter against real Redis with an injected clock: the original design's four scenarios,
each group's numbers, progressive penalty, batch semantics (one EVALSHA per batch)."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from qywx_ray.errors import InfraError
from qywx_ray.obs import metrics
from qywx_ray.protect.decision import MESSAGES_DENIED, Verdict
from qywx_ray.protect.groups import UserGroups
from qywx_ray.protect.ratelimit import RateLimiter
from qywx_ray.protect.settings import ProtectSettings, RateLimitRule
from qywx_ray.reasons import FailureReason
from qywx_ray.settings import Settings
from qywx_ray.store.client import make_async_redis

pytestmark = pytest.mark.integration

T0 = 1_700_000_000.0


class FakeClock:
    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


@pytest.fixture
async def aredis(
    redis_client: redis.Redis, make_settings: Callable[..., Settings]
) -> AsyncIterator[aioredis.Redis]:
    client = make_async_redis(make_settings().redis)
    yield client
    await client.aclose()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def make_limiter(
    aredis: aioredis.Redis, clock: FakeClock, **overrides: Any
) -> tuple[RateLimiter, ProtectSettings]:
    settings = ProtectSettings(**overrides)
    return RateLimiter(aredis, settings, UserGroups(settings, aredis), clock=clock), settings


def verdicts(decisions: list[Any]) -> str:
    return "".join(
        {"allow": "A", "rate_limited": "R", "blocked": "B"}[d.verdict] for d in decisions
    )


async def one(limiter: RateLimiter, user: str) -> Verdict:
    return (await limiter.check_batch([(user, 1)]))[user][0].verdict


async def test_scenario1_normal_user_is_never_limited(
    aredis: aioredis.Redis, redis_client: redis.Redis, clock: FakeClock
) -> None:
    limiter, _ = make_limiter(aredis, clock)
    # 1-2 messages a minute for an hour, bursts of 2 within a few seconds.
    for _minute in range(60):
        assert await one(limiter, "calm") is Verdict.ALLOW
        clock.advance(3)
        assert await one(limiter, "calm") is Verdict.ALLOW
        clock.advance(57)
    status = await limiter.status("calm")
    assert status.violations == 0
    assert not status.blocked
    # Idle users cost nothing: the only key expires one window (+60 s slack) later.
    keys = sorted(k.decode() for k in redis_client.keys("qywx:rl:*"))  # type: ignore[union-attr]  # third-party stubs
    assert keys == ["qywx:rl:{calm}:st"]
    assert 0 < redis_client.pttl(keys[0]) <= 70_000


async def test_scenario2_excited_user_is_limited_then_recovers(
    aredis: aioredis.Redis, clock: FakeClock
) -> None:
    limiter, _ = make_limiter(aredis, clock)
    first = await limiter.check_batch([("excited", 5)])  # T0: messages 1-5
    assert verdicts(first["excited"]) == "AAAAA"
    clock.advance(1)
    d6 = (await limiter.check_batch([("excited", 1)]))["excited"][0]  # T1: message 6
    assert d6.verdict is Verdict.RATE_LIMITED
    assert "violation 1/3" in d6.reason
    assert d6.deny_reason is FailureReason.RATE_LIMITED
    clock.advance(1)
    d7 = (await limiter.check_batch([("excited", 1)]))["excited"][0]  # T2: message 7
    assert d7.verdict is Verdict.RATE_LIMITED
    assert "violation 2/3" in d7.reason
    assert (await limiter.status("excited")).violations == 2
    clock.advance(9)  # T11: the window has slid past T0
    assert await one(limiter, "excited") is Verdict.ALLOW  # message 8
    status = await limiter.status("excited")
    assert status.violations == 0, "violations reset once the window is at half the limit"
    assert not status.blocked


async def test_scenario3_bot_at_100_per_second_blocked_at_third_violation(
    aredis: aioredis.Redis, clock: FakeClock
) -> None:
    limiter, _ = make_limiter(aredis, clock)
    seen: list[Any] = []
    for _ in range(100):  # one second of a 100 msg/s bot, one message per call
        seen += (await limiter.check_batch([("bot", 1)]))["bot"]
        clock.advance(0.01)
    assert verdicts(seen[:8]) == "AAAAARRB"
    assert "violation 1/3" in seen[5].reason
    assert "violation 2/3" in seen[6].reason
    assert "violation 3/3" in seen[7].reason
    assert all(d.verdict is Verdict.BLOCKED for d in seen[7:])
    assert [d.deny_reason for d in seen[7:]] == [FailureReason.USER_BLOCKED] * 93
    until = seen[7].blocked_until
    assert until == pytest.approx(T0 + 0.07 + 3600, abs=1e-6)
    # The block lives in Redis: a new limiter (restart, another host) sees it.
    limiter, _ = make_limiter(aredis, clock)
    status = await limiter.status("bot")
    assert status.blocked
    assert status.blocked_until == pytest.approx(until)
    assert status.blocks_in_history == 1
    # Still denied just before the hour is up, allowed right after.
    clock.t = until - 0.001
    assert await one(limiter, "bot") is Verdict.BLOCKED
    clock.t = until + 0.001
    assert await one(limiter, "bot") is Verdict.ALLOW


async def test_bot_in_one_batch_gets_the_same_decisions(
    aredis: aioredis.Redis, clock: FakeClock
) -> None:
    limiter, _ = make_limiter(aredis, clock)
    before = metrics.snapshot()
    denied_rl = MESSAGES_DENIED.value(reason="rate_limited")
    denied_blk = MESSAGES_DENIED.value(reason="user_blocked")
    out = await limiter.check_batch([("bot", 100)])
    assert verdicts(out["bot"]) == "AAAAARRB" + "B" * 92
    after = metrics.snapshot()
    assert (
        after["qywx_rate_limit_violations_total"]
        - before.get("qywx_rate_limit_violations_total", 0)
        == 3
    )
    assert after["qywx_users_blocked_total"] - before.get("qywx_users_blocked_total", 0) == 1
    assert after["qywx_blocked_users_current"] == 1
    assert MESSAGES_DENIED.value(reason="rate_limited") - denied_rl == 2
    assert MESSAGES_DENIED.value(reason="user_blocked") - denied_blk == 93
    assert limiter.last_stats is not None
    assert limiter.last_stats.violations == 3
    assert limiter.last_stats.blocks == 1
    assert limiter.last_stats.blocked_now == 1


async def test_scenario4_slow_attacker_one_per_two_seconds_is_blocked(
    aredis: aioredis.Redis, clock: FakeClock
) -> None:
    """Exactly 5 per 10 s: the closed window sees the 6th message of each 10 s span.
    Violations at T10, T22, T34 never reset (the window never falls to half) -> blocked."""
    limiter, _ = make_limiter(aredis, clock)
    timeline: dict[int, Verdict] = {}
    for second in range(0, 60, 2):
        clock.t = T0 + second
        timeline[second] = await one(limiter, "slow")
    limited = [s for s, v in timeline.items() if v is Verdict.RATE_LIMITED]
    first_blocked = min(s for s, v in timeline.items() if v is Verdict.BLOCKED)
    assert limited == [10, 22]
    assert first_blocked == 34
    assert all(v is Verdict.ALLOW for s, v in timeline.items() if s < 34 and s not in (10, 22))
    assert all(v is Verdict.BLOCKED for s, v in timeline.items() if s >= 34)


@pytest.mark.parametrize(
    ("group", "allowed", "threshold", "block_s"),
    [
        ("default", 5, 3, 3600),
        ("normal", 5, 3, 3600),
        ("vip", 20, 10, 1800),
        ("suspicious", 3, 1, 86400),
    ],
)
async def test_each_group_numbers(
    aredis: aioredis.Redis,
    clock: FakeClock,
    group: str,
    allowed: int,
    threshold: int,
    block_s: int,
) -> None:
    user_groups = {} if group == "default" else {"u": group}
    limiter, settings = make_limiter(aredis, clock, user_groups=user_groups)
    out = (await limiter.check_batch([("u", allowed + threshold + 5)]))["u"]
    expected = "A" * allowed + "R" * (threshold - 1) + "B" * 6
    assert verdicts(out) == expected
    assert out[allowed + threshold - 1].blocked_until == pytest.approx(T0 + block_s)
    # The window is really N seconds: just after it the user is allowed again (once the
    # block is over); check on a fresh user of the same group, limited but not blocked.
    window = settings.rule_for(group).window_seconds
    fresh = "v"
    limiter2, _ = make_limiter(
        aredis, clock, user_groups={} if group == "default" else {fresh: group}
    )
    assert verdicts((await limiter2.check_batch([(fresh, allowed)]))[fresh]) == "A" * allowed
    clock.advance(window)  # closed window: a message exactly N s later still counts
    assert (await limiter2.check_batch([(fresh, 1)]))[fresh][0].verdict is not Verdict.ALLOW
    await limiter2.unblock(fresh, "test reset", "test")
    assert verdicts((await limiter2.check_batch([(fresh, allowed)]))[fresh]) == "A" * allowed
    clock.advance(window + 0.001)
    assert (await limiter2.check_batch([(fresh, 1)]))[fresh][0].verdict is Verdict.ALLOW


async def test_whitelist_never_limited_and_leaves_no_state(
    aredis: aioredis.Redis, redis_client: redis.Redis, clock: FakeClock
) -> None:
    limiter, settings = make_limiter(aredis, clock, user_groups={"cfg": "whitelist"})
    await UserGroups(settings, aredis).set_override("adm", "whitelist")
    out = await limiter.check_batch([("cfg", 500), ("adm", 500)])
    assert verdicts(out["cfg"]) == "A" * 500
    assert verdicts(out["adm"]) == "A" * 500
    assert redis_client.keys("qywx:rl:{*") == []


async def _repeat_attacks(limiter: RateLimiter, clock: FakeClock, times: int) -> list[float]:
    """Attack again right after each block ends; returns each block's length in hours."""
    durations_h: list[float] = []
    for _ in range(times):
        out = (await limiter.check_batch([("repeat", 8)]))["repeat"]
        assert verdicts(out) == "AAAAARRB"
        until = out[7].blocked_until
        assert until is not None
        durations_h.append(round((until - clock.t) / 3600, 6))
        clock.t = until + 0.001
    return durations_h


async def test_progressive_penalty_sequence_and_cap(
    aredis: aioredis.Redis, clock: FakeClock
) -> None:
    limiter, _ = make_limiter(
        aredis,
        clock,
        progressive_penalty={
            "enabled": True,
            "multiplier": 2.0,
            "max_block_hours": 24.0,
            "history_hours": 168.0,
        },
    )
    assert await _repeat_attacks(limiter, clock, 7) == [1, 2, 4, 8, 16, 24, 24]


async def test_progressive_penalty_counts_only_blocks_within_history(
    aredis: aioredis.Redis, clock: FakeClock
) -> None:
    """With the default 24 h history, back-to-back blocks of 1+2+4+8+16 h span 31 h: when
    the 6th block starts (31 h) only the 5th (15 h) began in the last 24 h -> 1 h x 2."""
    limiter, _ = make_limiter(aredis, clock, progressive_penalty={"enabled": True})
    assert await _repeat_attacks(limiter, clock, 6) == [1, 2, 4, 8, 16, 2]


async def test_progressive_penalty_forgets_blocks_outside_history(
    aredis: aioredis.Redis, clock: FakeClock
) -> None:
    limiter, _ = make_limiter(
        aredis, clock, progressive_penalty={"enabled": True, "history_hours": 24.0}
    )
    out = (await limiter.check_batch([("u", 8)]))["u"]
    first_until = out[7].blocked_until
    assert first_until == pytest.approx(T0 + 3600)
    clock.advance(25 * 3600)  # first block is now older than the 24 h history
    out = (await limiter.check_batch([("u", 8)]))["u"]
    assert out[7].blocked_until == pytest.approx(clock.t + 3600)


async def test_progressive_penalty_off_keeps_base_duration(
    aredis: aioredis.Redis, clock: FakeClock
) -> None:
    limiter, _ = make_limiter(aredis, clock)
    for _ in range(3):
        out = (await limiter.check_batch([("u", 8)]))["u"]
        assert out[7].blocked_until == pytest.approx(clock.t + 3600)
        assert out[7].blocked_until is not None
        clock.t = out[7].blocked_until + 1


async def test_many_users_in_one_batch(aredis: aioredis.Redis, clock: FakeClock) -> None:
    limiter, _ = make_limiter(aredis, clock, user_groups={"w": "whitelist", "v": "vip"})
    counts = [(f"user-{i}", 1 + i % 8) for i in range(300)] + [("w", 50), ("v", 25)]
    out = await limiter.check_batch(counts)
    for user, n in counts[:300]:
        expected = "A" * min(n, 5) + "R" * max(0, min(n - 5, 2)) + "B" * max(0, n - 7)
        assert verdicts(out[user]) == expected, user
    assert verdicts(out["w"]) == "A" * 50
    assert verdicts(out["v"]) == "A" * 20 + "R" * 5
    assert limiter.last_stats is not None
    assert limiter.last_stats.blocks == sum(1 for _, n in counts[:300] if n >= 8)
    # A user listed twice is rated in order, decisions concatenated.
    twice = await limiter.check_batch([("t", 3), ("t", 4)])
    assert verdicts(twice["t"]) == "AAAAARR"


async def test_batch_is_one_evalsha_seen_by_monitor(
    aredis: aioredis.Redis, redis_url: str, clock: FakeClock
) -> None:
    """MONITOR: for a 200-user batch the client sends exactly one command (EVALSHA);
    every per-user read and write happens inside the script."""
    limiter, _ = make_limiter(aredis, clock)
    await limiter.check_batch([("warm", 1)])  # loads the script
    db = int(redis_url.rsplit("/", 1)[1] or 0)
    mon_client = aioredis.Redis.from_url(redis_url)
    client_sent: list[str] = []
    script_sent: list[str] = []
    try:
        async with mon_client.monitor() as mon:
            await limiter.check_batch([(f"m{i}", 3) for i in range(200)])
            await aredis.execute_command("ECHO", "monitor-fence")
            while True:
                info = await asyncio.wait_for(mon.next_command(), timeout=10)
                if info["db"] != db:
                    continue
                if "monitor-fence" in info["command"]:
                    break
                name = info["command"].split(" ", 1)[0].upper()
                (script_sent if info["client_type"] == "lua" else client_sent).append(name)
    finally:
        await mon_client.aclose()
    assert client_sent == ["EVALSHA"]
    assert script_sent.count("GET") >= 200  # the per-user work ran inside the script


async def test_event_times_backlog_is_not_a_flood(aredis: aioredis.Redis, clock: FakeClock) -> None:
    """A user's 30 messages sent one a minute, delivered at once after an outage."""
    limiter, _ = make_limiter(aredis, clock)
    clock.advance(3600)
    times = [T0 + 60 * i for i in range(30)]
    out = await limiter.check_batch_at([("backlog", times)])
    assert verdicts(out["backlog"]) == "A" * 30
    # The same 30 rated at delivery time would be a flood.
    out = await limiter.check_batch([("flood", 30)])
    assert verdicts(out["flood"]).startswith("AAAAARRB")


async def test_disabled_allows_everything_without_redis(
    aredis: aioredis.Redis, redis_client: redis.Redis, clock: FakeClock
) -> None:
    limiter, _ = make_limiter(aredis, clock, enabled=False)
    out = await limiter.check_batch([("x", 100)])
    assert verdicts(out["x"]) == "A" * 100
    assert redis_client.dbsize() == 0


async def test_admin_helpers_roundtrip(
    aredis: aioredis.Redis, redis_client: redis.Redis, clock: FakeClock
) -> None:
    limiter, _ = make_limiter(aredis, clock)
    await limiter.check_batch([("bot", 10)])
    blocked = await limiter.blocked_users()
    assert [b.user for b in blocked] == ["bot"]
    assert not blocked[0].permanent
    assert await limiter.unblock("bot", "false positive", "alice") is True
    assert (await limiter.check_batch([("bot", 1)]))["bot"][0].verdict is Verdict.ALLOW
    assert await limiter.blocked_users() == []

    await limiter.block("evil", "spam", "bob", permanent=True)
    clock.advance(365 * 86400)
    d = (await limiter.check_batch([("evil", 1)]))["evil"][0]
    assert d.verdict is Verdict.BLOCKED
    assert d.blocked_until == math.inf
    assert [(b.user, b.permanent, b.reason) for b in await limiter.blocked_users()] == [
        ("evil", True, "spam")
    ]
    assert redis_client.ttl("qywx:rl:{evil}:st") == -1  # a permanent block never expires

    rule = RateLimitRule(window_seconds=10, max_messages=50, penalty_threshold=5, block_hours=1)
    await limiter.set_override("promo", rule, expires_at=clock.t + 600, actor="carol")
    assert verdicts((await limiter.check_batch([("promo", 52)]))["promo"]) == "A" * 50 + "RR"
    clock.advance(601)  # override expired: back to the default rule
    assert verdicts((await limiter.check_batch([("promo", 8)]))["promo"]) == "AAAAARRB"
    with pytest.raises(ValueError, match="not in the future"):
        await limiter.set_override("promo", rule, expires_at=clock.t - 1)

    actions = [(e.actor, e.action, e.user) for e in await limiter.audit.entries()]
    assert actions == [
        ("carol", "set_limit", "promo"),
        ("bob", "block", "evil"),
        ("alice", "unblock", "bot"),
    ]


async def test_default_clock_is_redis_time(aredis: aioredis.Redis) -> None:
    settings = ProtectSettings()
    limiter = RateLimiter(aredis, settings, UserGroups(settings, aredis))
    sec, usec = await aredis.time()
    out = (await limiter.check_batch([("bot", 8)]))["bot"]
    assert verdicts(out) == "AAAAARRB"
    assert out[7].blocked_until == pytest.approx(sec + usec / 1e6 + 3600, abs=5)
    assert limiter.last_stats is not None
    assert limiter.last_stats.now_s == pytest.approx(sec + usec / 1e6, abs=5)


async def test_redis_down_is_an_infra_error(clock: FakeClock) -> None:
    dead = aioredis.Redis(
        host="127.0.0.1", port=1, socket_connect_timeout=1, retry=Retry(NoBackoff(), 0)
    )
    limiter, _ = make_limiter(dead, clock)
    with pytest.raises(InfraError, match="rate limiter"):
        await limiter.check_batch([("u", 1)])
    await dead.aclose()
