"""HostCore with protection and the parking lot wired in (in-memory fakes, no Redis/Ray).

The fake RetryOrder follows dlq/parking.py's Lua semantics exactly (flag per user, list
of parked values); integration tests run the real scripts.
"""

from __future__ import annotations

import asyncio

from qywx_ray.protect.settings import BreakerSettings
from tests.helpers.host_fakes import (
    Limiter,
    MemoryRetryOrder,
    delivery,
    make,
    retry_of,
    until,
)


async def test_failure_parks_later_messages_and_retry_success_drains_them_in_order() -> None:
    order = MemoryRetryOrder()
    core, done, letters, opts = make(order)
    opts["gates"]["A-m0"] = gate = asyncio.Event()
    first = [delivery("A", 0, 0, fail="retryable")] + [delivery("A", i, i) for i in (1, 2)]
    core.accept([*first, delivery("B", 0, 3)])
    await until(lambda: len(opts["started"]) == 2)
    core.accept([delivery("A", 3, 4), delivery("B", 1, 5)])  # A-m3 waits in the mailbox
    await until(lambda: ("B", "B-m1") in opts["calls"])
    gate.set()
    await until(lambda: len(done.done) == 6)  # parked ones count as processed
    assert [x.message_id for x in letters.letters] == ["A-m0"]
    assert letters.letters[0].attempt == 1
    assert order.flag == {"A": "A-m0"}
    assert len(order.lots["A"]) == 3  # m1, m2, m3 in order
    assert [m for u, m in opts["calls"] if u == "A"] == []
    core.accept([delivery("A", 4, 6)])  # new while parked: straight to the lot
    await until(lambda: len(done.done) == 7)
    assert len(order.lots["A"]) == 4
    # The DLQ brings A-m0 back (retry_count 1) and the downstream works now.
    core.accept([retry_of("A", 0)])
    await until(lambda: "A" not in order.flag)
    await until(lambda: len(done.done) == 8)
    assert [m for u, m in opts["calls"] if u == "A"] == [f"A-m{i}" for i in range(5)]
    assert order.lots["A"] == []


async def test_retry_failing_again_is_dead_lettered_with_next_attempt_and_user_stays_parked() -> (
    None
):
    order = MemoryRetryOrder()
    core, done, letters, opts = make(order)
    d0 = delivery("A", 0, 0, fail="retryable")
    core.accept([d0, delivery("A", 1, 1)])
    await until(lambda: len(done.done) == 2)
    core.accept([retry_of("A", 0, retry_count=2, fail="retryable")])
    await until(lambda: len(letters.letters) == 2)
    assert [x.attempt for x in letters.letters] == [1, 3]
    assert order.flag == {"A": "A-m0"}
    assert len(order.lots["A"]) == 1
    assert opts["calls"] == []


async def test_drained_message_failing_reparks_the_rest_behind_it() -> None:
    order = MemoryRetryOrder()
    core, done, letters, opts = make(order, park_drain_chunk=2)
    d0 = delivery("A", 0, 0, fail="retryable")
    core.accept([d0, delivery("A", 1, 1), delivery("A", 2, 2, fail="retryable")])
    core.accept([delivery("A", i, i) for i in (3, 4, 5)])
    await until(lambda: len(done.done) == 6)
    core.accept([retry_of("A", 0)])
    await until(lambda: len(letters.letters) == 2)  # A-m2 failed while draining
    await until(lambda: order.flag.get("A") == "A-m2")
    assert [m for u, m in opts["calls"] if u == "A"] == ["A-m0", "A-m1"]
    assert len(order.lots["A"]) == 3  # m3, m4, m5: nothing lost, nothing twice
    core.accept([retry_of("A", 2)])
    await until(lambda: "A" not in order.flag)
    await until(lambda: len([c for c in opts["calls"] if c[0] == "A"]) == 6)
    assert [m for u, m in opts["calls"] if u == "A"] == [f"A-m{i}" for i in range(6)]


async def test_rate_limited_is_not_parked_and_retries_skip_the_limiter() -> None:
    order = MemoryRetryOrder()
    limiter = Limiter(allow=2)
    core, done, letters, opts = make(order, admission=limiter)
    batch = [delivery("A", i, i) for i in range(4)]
    core.accept(batch)
    await until(lambda: len(done.done) == 4)
    assert [x.reason for x in letters.letters] == ["rate_limited", "rate_limited"]
    assert order.flag == {}  # exempt: not parked
    assert len(limiter.times) == 4
    core.accept([retry_of("A", 2), retry_of("A", 3)])
    await until(lambda: len(done.done) == 6)
    assert len(limiter.times) == 4  # retries were counted once already
    assert [m for _, m in opts["calls"]] == ["A-m0", "A-m1", "A-m2", "A-m3"]


async def test_admission_redis_down_policy_stop_holds_and_process_admits() -> None:
    limiter = Limiter(allow=100)
    limiter.down = True
    core, done, _, opts = make(admission=limiter)
    core.accept([delivery("A", 0, 0)])
    await asyncio.sleep(0.2)
    assert done.done == []
    assert opts["calls"] == []
    limiter.down = False
    await until(lambda: len(done.done) == 1)

    limiter2 = Limiter(allow=100)
    limiter2.down = True
    core2, done2, _, opts2 = make(admission=limiter2, redis_down_policy="process")
    core2.accept([delivery("B", 0, 0)])
    await until(lambda: len(done2.done) == 1)
    assert opts2["calls"] == [("B", "B-m0")]
    assert core2.counts["admission_bypassed"] == 1


async def test_queue_full_opens_the_breaker_then_circuit_open_at_the_head() -> None:
    """Without a lot (no retry order) the overflow is dead-lettered queue_full; those
    events open the breaker, which then denies the user's next head: circuit_open."""
    breaker = BreakerSettings(failure_threshold=2, open_seconds=60, success_threshold=1)
    core, done, letters, opts = make(None, mailbox_size=1, breaker=breaker)
    opts["gates"]["A-m0"] = gate = asyncio.Event()
    core.accept([delivery("A", 0, 0)])
    await until(lambda: len(opts["started"]) == 1)
    core.accept([delivery("A", i, i) for i in range(1, 5)])
    await until(lambda: len(letters.letters) == 4)
    assert {x.reason for x in letters.letters} == {"queue_full"}
    gate.set()
    await until(lambda: len(done.done) == 5)
    core.accept([delivery("A", 5, 5)])
    await until(lambda: len(letters.letters) == 5)
    assert letters.letters[-1].reason == "circuit_open"
    assert [m for _, m in opts["calls"]] == ["A-m0"]


async def test_a_copy_parked_behind_its_original_runs_once() -> None:
    """A re-pulled copy (same msgid, later offset) lands in the lot behind the original:
    both come back in one drain chunk, and the handler must run once, in order."""
    order = MemoryRetryOrder()
    core, done, _letters, opts = make(order)
    core.accept([delivery("A", 0, 0, fail="retryable"), delivery("A", 1, 1)])
    await until(lambda: len(done.done) == 2)
    core.accept([delivery("A", 1, 2), delivery("A", 2, 3)])  # the copy, then a new one
    await until(lambda: len(done.done) == 4)
    assert len(order.lots["A"]) == 3
    core.accept([retry_of("A", 0)])
    await until(lambda: "A" not in order.flag)
    await until(lambda: len(done.done) == 5)
    assert [m for u, m in opts["calls"] if u == "A"] == ["A-m0", "A-m1", "A-m2"]
