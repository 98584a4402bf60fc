"""The batch read (consume/batch_reads.py) against real Redis: the same answers as the
separate calls it replaces, and one round trip per delivery batch in the common case.

Equivalence: two Redis databases start from the same random state (done-flags, parking
flags, rate-limiter history built by earlier rounds); db 1 answers through the batch
read, db 2 through the standalone paths (RedisDoneStore, the lot's flags, the limiter's
own call on `sort_intake`'s fresh first deliveries), round after round, seeded."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis

from qywx_ray.consume.batch_reads import RedisBatchReads, make_batch_reads
from qywx_ray.consume.dedup import DONE_KEY, Deduplicator, RedisDoneStore
from qywx_ray.consume.handlers import HandlerContext
from qywx_ray.consume.host_io import rate_limit
from qywx_ray.consume.host_rules import BatchReadPlan, batch_read_plan, sort_intake
from qywx_ray.consume.mailbox import Pending
from qywx_ray.consume.types import Delivery
from qywx_ray.consume.user_actor import CoreOptions, HostCore
from qywx_ray.dlq.parking import FLAG_PREFIX, LIST_PREFIX, AsyncParkingLot
from qywx_ray.dlq.settings import DLQSettings
from qywx_ray.envelope import Envelope
from qywx_ray.protect.admission import RateLimitAdmission
from qywx_ray.protect.groups import UserGroups
from qywx_ray.protect.ratelimit import RateLimiter
from qywx_ray.protect.settings import ProtectSettings, RateLimitRule
from tests.helpers.host_fakes import Completions, Letters

pytestmark = pytest.mark.integration

T0 = 1_700_000_000.0
USERS = [f"u{i}" for i in range(6)]  # u5 is whitelisted


def _settings() -> ProtectSettings:
    rule = RateLimitRule(window_seconds=10, max_messages=3, penalty_threshold=2, block_hours=0.01)
    return ProtectSettings(default=rule, user_groups={"u5": "whitelist"})


def _db(url: str, n: int) -> str:
    """`url` on database `n` (a db in the URL's path beats a `db=` argument)."""
    base, _, last = url.rpartition("/")
    return f"{base}/{n}" if last.isdigit() else f"{url.rstrip('/')}/{n}"


@pytest.fixture
async def dbs(redis_client: redis.Redis, redis_url: str) -> AsyncIterator[list[aioredis.Redis]]:
    clients = [aioredis.Redis.from_url(_db(redis_url, n)) for n in (1, 2)]
    for c in clients:
        await c.flushdb()
    yield clients
    for c in clients:
        await c.flushdb()
        await c.aclose()


def _delivery(offset: int, user: str, mid: str, t: float, retry: bool, drain: bool) -> Delivery:
    env = Envelope(
        message_id=mid, open_kfid="kf", external_userid=user, msgtype="text", send_time=int(t)
    )
    return Delivery("t", 0, offset, int(t * 1000), user, env.to_bytes(), mid, "c0", 0, retry, drain)


async def _policy(what: str, call: Any, n: int) -> Any:
    return await call()


async def test_batch_read_answers_equal_the_separate_calls(dbs: list[aioredis.Redis]) -> None:
    one, two = dbs
    clock_t = [T0]
    settings = _settings()
    limiters = [
        RateLimiter(c, settings, UserGroups(settings, c), clock=lambda: clock_t[0]) for c in dbs
    ]
    reads = RedisBatchReads(one, limiters[0])
    store = RedisDoneStore(two, 3600)
    admission = RateLimitAdmission(limiters[1])
    rng = random.Random(20)
    offset = 0
    compared = denied = 0
    for _round in range(60):
        clock_t[0] += rng.uniform(0, 4)
        state = random.Random(rng.random())
        done_ids = [f"m{n}" for n in range(max(0, offset - 30), offset) if state.random() < 0.2]
        flags = [u for u in USERS if state.random() < 0.2]
        for c in dbs:
            await c.delete(*[FLAG_PREFIX + u for u in USERS])
            for m in done_ids:
                await c.set(DONE_KEY.format(m), "1")
            for u in flags:
                await c.set(FLAG_PREFIX + u, "blocker")
        parsed: list[tuple[Delivery, Envelope]] = []
        for _ in range(rng.randint(0, 25)):
            user = rng.choice(USERS)
            n = offset - rng.randint(1, 30) if offset and rng.random() < 0.2 else offset
            mid = f"m{n}"
            t = clock_t[0] + rng.uniform(-1, 1)
            d = _delivery(offset, user, mid, t, rng.random() < 0.1, rng.random() < 0.05)
            parsed.append((d, Envelope.from_bytes(d.value)))
            offset += 1
        recent = {e.message_id for _, e in parsed if rng.random() < 0.1}
        pending: dict[str, Pending] = {
            e.message_id: Pending(d, e, [d]) for d, e in parsed if rng.random() < 0.1
        }
        ask = [e.message_id for _, e in parsed if e.message_id not in pending]
        plan = batch_read_plan(parsed, ask, recent, True, True)
        answer = await reads.read(plan)
        # the separate calls on the twin database
        done = plan.known | await store.done_among(plan.ask)
        got_flags = await two.mget([FLAG_PREFIX + u for u in plan.users])
        flagged = {u for u, f in zip(plan.users, got_flags, strict=True) if f is not None}
        intake = sort_intake(parsed, pending, done, recent, True)
        firsts = [p for p in intake.fresh if not p.delivery.is_retry]
        reasons = await rate_limit(admission, firsts, _policy)
        assert answer.done == done
        assert answer.flagged == flagged
        assert answer.reasons == reasons
        assert {r.message_id for r in plan.rate} - done == {p.envelope.message_id for p in firsts}
        compared += len(firsts)
        denied += len(reasons)
    # the limiter's state is the same in both databases after every round
    for u in USERS:
        key = f"qywx:rl:{{{u}}}:st"
        assert await one.get(key) == await two.get(key)
    assert compared > 200  # the rounds did exercise limits
    assert denied > 20


async def test_one_round_trip_per_batch_unless_a_user_is_parked(redis_url: str) -> None:
    client = aioredis.Redis.from_url(_db(redis_url, 3))
    await client.flushdb()
    calls: list[str] = []  # every command the host sends: one per round trip here
    send = client.execute_command

    async def counted(*args: Any, **options: Any) -> Any:
        calls.append(str(args[0]).lower())
        return await send(*args, **options)

    client.execute_command = counted  # type: ignore[method-assign]
    gate = asyncio.Event()

    async def held(message: Any, ctx: HandlerContext) -> None:
        await gate.wait()  # no done-flag writes while round trips are counted

    settings = _settings().model_copy(
        update={
            "default": RateLimitRule(
                window_seconds=10, max_messages=100, penalty_threshold=2, block_hours=0.01
            )
        }
    )
    admission = RateLimitAdmission(RateLimiter(client, settings, UserGroups(settings, client)))
    lot = AsyncParkingLot(client, DLQSettings())
    core = HostCore(
        name="rt",
        handler=held,
        dedup=Deduplicator(RedisDoneStore(client, 3600)),
        completions=Completions(),
        dead_letters=Letters(),
        admission=admission,
        retry_order=lot,
        batch_reads=make_batch_reads(client, admission, lot),
        options=CoreOptions(completion_flush_ms=5.0),
    )
    offset = 0

    async def batch(users: Sequence[str]) -> None:
        nonlocal offset
        items = []
        for u in users:
            items.append(_delivery(offset, u, f"rt{offset}", T0, False, False))
            offset += 1
        core.accept(items)
        assert core._ingest_task is not None
        await core._ingest_task

    try:
        await batch(USERS)  # loads the scripts (NOSCRIPT, SCRIPT LOAD) outside the count
        await client.set(FLAG_PREFIX + "u1", "blocker")
        await batch(["u1"])
        await client.delete(FLAG_PREFIX + "u1")
        calls.clear()
        for _ in range(10):
            await batch(USERS * 5)
        assert calls == ["evalsha"] * 10  # done-flags, parking flags, rate limit: one call
        await client.set(FLAG_PREFIX + "u1", "blocker")
        calls.clear()
        await batch(USERS)
        assert calls == ["evalsha"] * 2  # the parked user's items: the lot's admit script
        assert await client.llen(LIST_PREFIX + "u1") == 2  # both u1 messages parked
    finally:
        gate.set()
        for w in core._workers:
            w.cancel()
        await client.flushdb()
        await client.aclose()


async def test_batch_read_over_many_keys_reads_every_chunk(dbs: list[aioredis.Redis]) -> None:
    """More done-flags and users than one MGET chunk (1000 keys) of the script."""
    client = dbs[0]
    ids = [f"big{i}" for i in range(2500)]
    users = [f"user{i}" for i in range(1200)]
    done = set(ids[::7]) | {ids[999], ids[1000], ids[-1]}
    flagged = set(users[::11]) | {users[999], users[1000], users[-1]}
    for m in done:
        await client.set(DONE_KEY.format(m), "1")
    for u in flagged:
        await client.set(FLAG_PREFIX + u, "blocker")
    plan = BatchReadPlan(ask=ids, users=users)
    answer = await RedisBatchReads(client, None).read(plan)
    assert answer.done == done
    assert answer.flagged == flagged
    assert answer.reasons == {}
