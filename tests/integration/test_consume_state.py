"""Per-user state on real Redis, Kafka and Ray: the commit script's semantics, state that
survives host kill -9 and idle expiry, and a crash between a handler's end and its state
commit (re-run, applied once)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import Callable
from typing import Any

import pytest
import ray
import redis as redis_lib
import redis.asyncio as aioredis

from qywx_ray.consume.dedup import DONE_KEY, RedisDoneStore
from qywx_ray.consume.hosts import host_index
from qywx_ray.consume.pipeline import ConsumePipeline, start_consumers
from qywx_ray.consume.state import (
    LOAD_LUA,
    STATE_KEY,
    RedisStateStore,
    StateSlot,
    StateWrite,
    pack_state,
    parse_loaded,
)
from qywx_ray.envelope import Envelope
from qywx_ray.settings import Settings
from qywx_ray.testing.consume import committed_offsets, ensure_topics, envelopes, produce, wait_for
from tests.helpers.consume import RECORD, consume_test_settings

pytestmark = pytest.mark.integration

HANDLER = "qywx_ray.testing.handlers:state_recording_handler"


def test_commit_script_chains_refuses_stale_and_answers_a_resend(
    redis_url: str, redis_client: redis_lib.Redis
) -> None:
    async def run() -> None:
        r = aioredis.Redis.from_url(redis_url)
        done = RedisDoneStore(r, ttl_s=500, state_ttl_s=1000)
        states = RedisStateStore(r)
        assert await states.load(["A", "B"]) == {"A": StateSlot(0, b""), "B": StateSlot(0, b"")}
        a1, a2 = StateWrite("A", 0, b'{"n":1}'), StateWrite("A", 1, b'{"n":2}')
        b1 = StateWrite("B", 0, b'{"n":1}')
        assert await done.commit(["p0"], [("a1", a1), ("b1", b1), ("a2", a2)], "op1") == set()
        got = await states.load(["A", "B"])
        assert got == {"A": StateSlot(2, b'{"n":2}'), "B": StateSlot(1, b'{"n":1}')}
        assert redis_client.exists(*[DONE_KEY.format(m) for m in ("p0", "a1", "b1", "a2")]) == 4
        assert 900 < redis_client.ttl(STATE_KEY.format("A")) <= 1000
        assert 400 < redis_client.ttl(DONE_KEY.format("a2")) <= 500
        # A lost reply, resent with the same op id: the first answer, applied once.
        assert await done.commit(["p0"], [("a1", a1), ("b1", b1), ("a2", a2)], "op1") == set()
        assert (await states.load(["A"]))["A"].version == 2
        # A stale writer (derived from version 1) is refused, and so is everything of A
        # after it in the same call, even at the right version; B is not affected.
        stale, after = StateWrite("A", 1, b'{"n":9}'), StateWrite("A", 2, b'{"n":3}')
        unchanged_b = StateWrite("B", 1, None)
        refused = await done.commit([], [("x1", stale), ("x2", after), ("b2", unchanged_b)], "op2")
        assert refused == {"x1", "x2"}
        resent = [("x1", stale), ("x2", after), ("b2", unchanged_b)]
        assert await done.commit([], resent, "op2") == {"x1", "x2"}  # the first answer
        assert redis_client.exists(DONE_KEY.format("x1"), DONE_KEY.format("x2")) == 0
        assert redis_client.exists(DONE_KEY.format("b2")) == 1  # unchanged: flag, no bump
        assert await states.load(["A", "B"]) == got
        # Already done (a run without a dedup check) is refused, not applied twice.
        assert await done.commit([], [("a1", StateWrite("A", 2, b'{"n":4}'))], "op3") == {"a1"}
        await r.aclose()

    asyncio.run(run())


def test_an_old_layout_hash_is_read_checked_and_migrated_on_write(
    redis_url: str, redis_client: redis_lib.Redis
) -> None:
    """States written before the string layout (a hash: v, data) stay readable: the load
    and the commit's version check read the hash, the first commit rewrites it as the
    string layout; a stale writer is refused against the hash as against the string."""

    async def run() -> None:
        r = aioredis.Redis.from_url(redis_url)
        done, states = RedisDoneStore(r, ttl_s=500, state_ttl_s=1000), RedisStateStore(r)
        key = STATE_KEY.format("old")
        redis_client.hset(key, mapping={"v": 7, "data": b'{"n":7}'})
        assert await states.load(["old"]) == {"old": StateSlot(7, b'{"n":7}')}
        assert await done.commit([], [("s1", StateWrite("old", 6, b'{"n":0}'))], "o1") == {"s1"}
        assert redis_client.type(key) == b"hash"  # refused: nothing written
        unchanged = StateWrite("old", 7, None)  # checked against the hash, no write
        assert await done.commit([], [("u1", unchanged)], "o2") == set()
        assert redis_client.type(key) == b"hash"
        assert await done.commit([], [("m1", StateWrite("old", 7, b'{"n":8}'))], "o3") == set()
        assert redis_client.type(key) == b"string"
        assert redis_client.get(key) == pack_state(8, b'{"n":8}')
        assert 900 < redis_client.ttl(key) <= 1000
        assert await states.load(["old"]) == {"old": StateSlot(8, b'{"n":8}')}
        await r.aclose()

    asyncio.run(run())


def _state(redis_client: redis_lib.Redis, user: str) -> list[str]:
    raw = parse_loaded([user], redis_client.eval(LOAD_LUA, 1, STATE_KEY.format(user)))[user].raw
    return list(json.loads(raw)["seen"]) if raw else []


def _list(redis_client: redis_lib.Redis, key: str) -> list[str]:
    got: list[bytes] = redis_client.lrange(key, 0, -1)  # type: ignore[assignment]
    return [x.decode() for x in got]


def _calls(redis_client: redis_lib.Redis) -> list[str]:
    return _list(redis_client, f"{RECORD}:calls")


def _by_user(msgs: list[Envelope]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for e in msgs:
        out.setdefault(e.external_userid, []).append(e.message_id)
    return out


def _all_committed(s: Settings, n: int) -> bool:
    return sum(max(0, o) for o in committed_offsets(s, 4)) == n


def _live_users(p: ConsumePipeline) -> int:
    return sum(int(ray.get(h.snapshot.remote(), timeout=10)["users"]) for h in p.hosts)


@pytest.mark.timeout(300)
def test_state_survives_host_kill_9_and_idle_expiry(
    make_settings: Callable[..., Settings],
    unique: str,
    redis_client: redis_lib.Redis,
    started: list[ConsumePipeline],
) -> None:
    s = consume_test_settings(
        make_settings,
        unique,
        kafka_consumer={"poll_batch_max": 200},
        handler=HANDLER,
        idle_lifetime_s=2.0,
        idle_sweep_interval_s=0.2,
    )
    ensure_topics(s)
    first = envelopes(100, 20)
    produce(s, first)
    p = start_consumers(s)
    started.append(p)
    assert wait_for(lambda: redis_client.llen(f"{RECORD}:calls") >= 600, 90)
    pid = ray.get(p.hosts[0].pid.remote(), timeout=10)
    os.kill(pid, signal.SIGKILL)
    assert wait_for(lambda: _all_committed(s, len(first)), 120)
    expected = _by_user(first)
    for user, ids in expected.items():
        assert _state(redis_client, user) == ids, user  # each applied once, in order
    reruns = len(_calls(redis_client)) - len(first)
    # Every mailbox idles out: the state leaves memory, Redis keeps it.
    assert wait_for(lambda: _live_users(p) == 0, 60)
    second = envelopes(100, 5, seed=3)
    for i, e in enumerate(second):
        second[i] = e.model_copy(update={"message_id": f"{e.external_userid}-{100000 + i:06d}"})
    produce(s, second)
    assert wait_for(lambda: _all_committed(s, len(first) + len(second)), 120)
    for user, ids in _by_user(first + second).items():
        assert _state(redis_client, user) == ids, user  # reloaded on activation
    print(f"state kill -9: handler re-runs={reruns}, each user's state applied once")


@pytest.mark.timeout(240)
def test_crash_between_handler_end_and_commit_reruns_and_applies_once(
    make_settings: Callable[..., Settings],
    unique: str,
    redis_client: redis_lib.Redis,
    started: list[ConsumePipeline],
) -> None:
    s = consume_test_settings(make_settings, unique, handler=HANDLER)
    ensure_topics(s)
    user = "crashy"
    msgs = [
        Envelope(
            message_id=f"{user}-{n}",
            open_kfid="kf-test",
            external_userid=user,
            msgtype="text",
            raw={"pause_writes_ms": 60_000} if n == 1 else {},
        )
        for n in range(3)
    ]
    produce(s, msgs)
    p = start_consumers(s)
    started.append(p)
    host = p.hosts[host_index(user, s.consume.num_hosts)]
    # m1's handler ended (its last step paused Redis writes): its commit cannot happen.
    assert wait_for(lambda: redis_client.exists(f"{RECORD}:paused:{user}-1") == 1, 90)
    pid = ray.get(host.pid.remote(), timeout=10)
    try:
        os.kill(pid, signal.SIGKILL)
        assert wait_for(lambda: _pid(host) not in (None, pid), 60)  # restarted
    finally:
        redis_client.execute_command("CLIENT", "UNPAUSE")
    assert wait_for(lambda: _all_committed(s, len(msgs)), 90)
    calls = _calls(redis_client)
    runs = {m.message_id: calls.count(f"{user}|{m.message_id}") for m in msgs}
    assert runs[f"{user}-1"] == 2  # the handler ran again after the crash ...
    assert _state(redis_client, user) == [m.message_id for m in msgs]  # ... applied once
    print(f"crash before commit: runs={runs}")


def _pid(actor: Any) -> int | None:
    try:
        return int(ray.get(actor.pid.remote(), timeout=10))
    except (ray.exceptions.RayError, TimeoutError):
        return None


@pytest.mark.timeout(240)
def test_a_dlq_retry_sees_the_state_as_it_was_when_it_failed_and_applies_once(
    make_settings: Callable[..., Settings],
    unique: str,
    redis_client: redis_lib.Redis,
    started: list[ConsumePipeline],
) -> None:
    from qywx_ray.dlq.actor import start_recovery_actor

    s = consume_test_settings(make_settings, unique, handler=HANDLER)
    s = s.model_copy(
        update={
            "dlq": s.dlq.model_copy(
                update={
                    "backoff_base_s": 1.0,
                    "backoff_max_s": 4.0,
                    "scheduler_interval_s": 0.1,
                    "recovery_group_id": f"rec-{unique}",
                    "recovery_actor_name": f"rec-{unique}",
                }
            )
        }
    )
    ensure_topics(s)
    user = "retried"
    msgs = [
        Envelope(
            message_id=f"{user}-{n}",
            open_kfid="kf-test",
            external_userid=user,
            msgtype="text",
            raw={"fail": "retryable"} if n == 1 else {},  # fails on attempt 1, after mutating
        )
        for n in range(4)
    ]
    recovery = start_recovery_actor(s)
    try:
        produce(s, msgs)
        p = start_consumers(s)
        started.append(p)
        assert wait_for(lambda: _state(redis_client, user) == [m.message_id for m in msgs], 120)
        saw = _list(redis_client, f"{RECORD}:saw")
        assert saw == [
            f"{user}-0|1|",
            f"{user}-1|1|{user}-0",  # failed after appending itself ...
            f"{user}-1|2|{user}-0",  # ... the retry sees the state as it was then
            f"{user}-2|1|{user}-0,{user}-1",  # later messages waited (parked), in order
            f"{user}-3|1|{user}-0,{user}-1,{user}-2",
        ]
    finally:
        ray.get(recovery.stop.remote(), timeout=30)
        ray.kill(recovery, no_restart=True)


@pytest.mark.timeout(180)
def test_dedicated_mode_keeps_the_same_state(
    make_settings: Callable[..., Settings],
    unique: str,
    redis_client: redis_lib.Redis,
    started: list[ConsumePipeline],
) -> None:
    """The same `ctx.state` when each user is its own Ray actor (dedicated mode)."""
    s = consume_test_settings(make_settings, unique, handler=HANDLER, mode="dedicated")
    ensure_topics(s)
    msgs = envelopes(3, 4)
    produce(s, msgs)
    p = start_consumers(s)
    started.append(p)
    assert wait_for(lambda: _all_committed(s, len(msgs)), 120)
    for user, ids in _by_user(msgs).items():
        assert _state(redis_client, user) == ids, user
