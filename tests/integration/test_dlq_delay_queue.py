"""Durable delay queue and per-user parking on a real Redis."""

from __future__ import annotations

import threading

import pytest
import redis

from qywx_ray.dlq.delay_queue import DelayQueue
from qywx_ray.dlq.parking import Parking
from qywx_ray.dlq.settings import DLQSettings
from qywx_ray.reasons import FailureReason

pytestmark = pytest.mark.integration

T0 = 1_800_000_000.0


def test_never_fires_early_and_schedule_is_idempotent(redis_client: redis.Redis) -> None:
    q = DelayQueue(redis_client, "t")
    assert q.schedule_many([("a", T0 + 10, b"A"), ("b", T0 + 20, b"B"), ("a", T0 + 99, b"X")]) == 2
    assert q.schedule_many([("a", T0 + 1, b"Y")]) == 0  # redelivered letter keeps its due time
    assert q.claim_due(T0 + 9.999, 30, 100) == []
    got = q.claim_due(T0 + 10, 30, 100)
    assert [(c.entry_id, c.payload) for c in got] == [("a", b"A")]
    assert q.claim_due(T0 + 19, 30, 100) == []
    assert [c.entry_id for c in q.claim_due(T0 + 25, 30, 100)] == ["b"]
    assert q.counts() == (0, 2)


def test_lease_expiry_requeues_and_ack_deletes(redis_client: redis.Redis) -> None:
    q = DelayQueue(redis_client, "t")
    q.schedule_many([(f"e{i}", T0, f"p{i}".encode()) for i in range(5)])
    first = q.claim_due(T0, lease_s=30, max_n=3)
    assert len(first) == 3
    # the scheduler "crashes" here: nobody acks. Another scheduler sees only the rest …
    second = q.claim_due(T0 + 1, lease_s=30, max_n=10)
    assert {c.entry_id for c in second} == {"e3", "e4"}
    assert q.ack_many([c.entry_id for c in second]) == 2
    assert q.claim_due(T0 + 29, 30, 10) == []  # leases still live: not handed out twice
    # … until the leases expire; then the lost claims come back, payload intact.
    again = q.claim_due(T0 + 31, 30, 10)
    assert sorted((c.entry_id, c.payload) for c in again) == sorted(
        (c.entry_id, c.payload) for c in first
    )
    assert q.ack_many([c.entry_id for c in again]) == 3
    assert q.ack_many(["e0"]) == 0  # double ack harmless
    assert q.counts() == (0, 0)
    assert redis_client.hlen("t:dq:payload") == 0


def test_two_schedulers_never_claim_the_same_entry(
    redis_client: redis.Redis, redis_url: str
) -> None:
    n = 2000
    DelayQueue(redis_client, "t").schedule_many([(f"e{i}", T0, b"x") for i in range(n)])
    claimed: list[list[str]] = [[], []]

    def worker(k: int) -> None:
        client = redis.Redis.from_url(redis_url)
        q = DelayQueue(client, "t")
        while batch := q.claim_due(T0 + 1, 300, 50):
            claimed[k] += [c.entry_id for c in batch]
            q.ack_many([c.entry_id for c in batch])
        client.close()

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    everything = claimed[0] + claimed[1]
    assert len(everything) == n
    assert len(set(everything)) == n


def test_retry_later_and_set_due(redis_client: redis.Redis) -> None:
    q = DelayQueue(redis_client, "t")
    q.schedule_many([("a", T0 + 100, b"A")])
    assert q.set_due("a", T0, b"A")  # admin "retry now"
    [claimed] = q.claim_due(T0, 30, 10)
    assert claimed.entry_id == "a"
    assert not q.set_due("a", T0, b"A")  # in flight: busy
    assert q.retry_later(["a"], T0 + 50) == 1
    assert q.claim_due(T0 + 49, 30, 10) == []
    assert q.due_of("a") == T0 + 50
    assert q.remove(["a"]) == 1
    assert q.counts() == (0, 0)


# ---- parking ------------------------------------------------------------------------------


def test_parking_keeps_order_and_lets_retries_pass(redis_client: redis.Redis) -> None:
    p = Parking(redis_client, DLQSettings())
    assert p.admit_batch([("u1", "m1", b"1", False), ("u2", "n1", b"n1", False)]) == [True, True]
    # m1 failed recoverably; m2 was already in the host's mailbox behind it
    assert p.park("u1", "m1", FailureReason.DOWNSTREAM_ERROR, pending=[b"2"])
    result = p.admit_batch(
        [
            ("u1", "m3", b"3", False),
            ("u2", "n2", b"n2", False),
            ("u1", "m4", b"4", False),
            ("u1", "m1", b"1", True),  # the retry from the DLQ passes
            ("u1", "m1", b"1", False),  # so does a plain redelivery of the waited-on message
        ]
    )
    assert result == [False, True, False, True, True]
    assert p.peek_parked("u1", 10) == [b"2", b"3", b"4"]
    assert p.waiting_on("u1") == "m1"
    assert p.parked_count("u1") == 3


def test_parking_exempt_reasons_and_failures_during_drain(redis_client: redis.Redis) -> None:
    p = Parking(redis_client, DLQSettings())
    assert not p.park("u", "m1", FailureReason.RATE_LIMITED)
    assert not p.park("u", "m1", FailureReason.INVALID_MESSAGE)
    assert not p.is_parked("u")
    assert Parking(redis_client, DLQSettings(park_rate_limited=True)).park(
        "u", "m1", FailureReason.RATE_LIMITED
    )
    p.admit_batch([("u", f"m{i}", str(i).encode(), False) for i in (2, 3)])
    # m3 (say, drained) fails: it takes over only from the blocker it names (the drain
    # owner m1); without saying so, m1 stays the blocker and nothing changes
    assert not p.park("u", "m3", FailureReason.PROCESS_TIMEOUT, pending=[b"4"])
    assert p.waiting_on("u") == "m1"
    assert p.peek_parked("u", 10) == [b"2", b"3"]
    assert p.park("u", "m3", FailureReason.PROCESS_TIMEOUT, pending=[b"4"], replaces=["m1"])
    assert p.waiting_on("u") == "m3"
    assert p.peek_parked("u", 10) == [b"4", b"2", b"3"]


def test_admit_batch_is_atomic_with_concurrent_park(
    redis_client: redis.Redis, redis_url: str
) -> None:
    """Every message admitted after park() is parked, in order: no gap between flag and list."""
    p = Parking(redis_client, DLQSettings())
    admitted_after: list[int] = []
    parked_at = threading.Event()

    def producer() -> None:
        client = redis.Redis.from_url(redis_url)
        pp = Parking(client, DLQSettings())
        for i in range(0, 3000, 50):
            items = [("u", f"m{j}", str(j).encode(), False) for j in range(i, i + 50)]
            started_after_park = parked_at.is_set()
            ok = pp.admit_batch(items)
            if started_after_park:
                admitted_after.extend(j for j, o in zip(range(i, i + 50), ok, strict=True) if o)
        client.close()

    t = threading.Thread(target=producer)
    t.start()
    p.park("u", "m-fail", FailureReason.DOWNSTREAM_ERROR)
    parked_at.set()
    t.join(timeout=60)
    assert admitted_after == []
    parked = [int(x) for x in p.peek_parked("u", 10_000)]
    assert parked == sorted(parked)
    assert not parked or parked[-1] == 2999


async def test_parking_writes_retried_after_an_unknown_outcome_apply_once(
    redis_client: redis.Redis, redis_url: str
) -> None:
    """A park or advance whose reply was lost (Redis killed, a timeout) is retried with
    the same op id: the drop and the push must not happen twice (that would lose parked
    messages or run them twice)."""
    import redis.asyncio as aioredis

    from qywx_ray.consume.types import ParkRequest
    from qywx_ray.dlq.parking import AsyncParkingLot

    client = aioredis.Redis.from_url(redis_url)
    lot = AsyncParkingLot(client, DLQSettings())
    try:
        first_park = ParkRequest("u", "m0", 0, [b"1", b"2"], op_id="park-1")
        await lot.park(first_park)
        await lot.park(first_park)  # the retry
        assert await lot.admit([("u", "m3", b"3", False)]) == [0]
        assert redis_client.lrange("qywx:parked:u", 0, -1) == [b"1", b"2", b"3"]
        first = await lot.advance("u", "m0", 0, 2, op_id="adv-1")
        assert first == (1, [b"1", b"2"])
        assert await lot.advance("u", "m0", 2, 2, op_id="adv-2") == (1, [b"3"])
        assert await lot.advance("u", "m0", 2, 2, op_id="adv-2") == (1, [b"3"])  # retry
        # Re-park mid-drain (drop the chunk the host holds), retried: still one drop.
        repark = ParkRequest("u", "m3", 1, [], op_id="park-2", replaces=["m0"])
        assert await lot.park(repark) == 1
        assert await lot.park(repark) == 1
        assert redis_client.lrange("qywx:parked:u", 0, -1) == []
        assert redis_client.get("qywx:park:u") == b"m3"
        assert await lot.advance("u", "m3", 0, 2, op_id="adv-3") == (2, [])
    finally:
        await client.aclose()
