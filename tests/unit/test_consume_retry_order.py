"""HostCore with protection and the parking lot wired in (in-memory fakes, no Redis/Ray).

The fake RetryOrder follows dlq/parking.py's Lua semantics exactly (flag per user, list
of parked values); integration tests run the real scripts.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from qywx_ray.consume.dedup import Deduplicator, MemoryDoneStore
from qywx_ray.consume.types import ADMITTED, PARKED, WAITED_ON, Delivery
from qywx_ray.consume.user_actor import CoreOptions, HostCore
from qywx_ray.errors import InfraError
from qywx_ray.protect.settings import BreakerSettings
from tests.unit.test_consume_user_actor import Completions, Letters, delivery, recording, until


class MemoryRetryOrder:
    def __init__(self, exempt: frozenset[str] = frozenset({"rate_limited", "user_blocked"})):
        self.flag: dict[str, str] = {}
        self.at: dict[str, tuple[int, int]] = {}  # a hold's blocker position
        self.lots: dict[str, list[bytes]] = {}
        self.exempt = exempt
        self.calls = 0

    def parks(self, reason: str) -> bool:
        return reason != "invalid_message" and reason not in self.exempt

    async def admit(self, items: Sequence[tuple[Any, ...]]) -> list[int]:
        self.calls += 1
        out = []
        for user, mid, value, is_retry, *position in items:
            waiting = self.flag.get(user)
            at = self.at.get(user)
            older = bool(position) and at is not None and position[0] == at[0]
            older = older and at is not None and 0 <= position[1] < at[1]
            if waiting == mid:
                out.append(WAITED_ON)
            elif waiting is not None and not is_retry and not older:
                self.lots.setdefault(user, []).append(value)
                out.append(PARKED)
            else:
                out.append(ADMITTED)
        return out

    async def park(
        self,
        user: str,
        mid: str,
        drop_first: int,
        pending: Sequence[bytes],
        op_id: str = "",
        replaces: Sequence[str] = (),
    ) -> int:
        current = self.flag.get(user)
        if current is not None and current != mid and current not in replaces:
            return 2
        self.flag[user] = mid
        self.at.pop(user, None)
        lot = self.lots.setdefault(user, [])[drop_first:]
        self.lots[user] = [*pending, *lot]
        return 1

    async def hold(
        self,
        user: str,
        mid: str,
        values: Sequence[bytes],
        op_id: str = "",
        position: tuple[int, int] = (-1, -1),
    ) -> None:
        if user not in self.flag:
            self.flag[user] = mid
            self.at[user] = position
        self.lots.setdefault(user, []).extend(values)

    async def advance(
        self, user: str, mid: str, drop_n: int, max_n: int, op_id: str = ""
    ) -> tuple[int, list[bytes]]:
        if self.flag.get(user) != mid:
            return 0, []
        lot = self.lots.setdefault(user, [])
        del lot[:drop_n]
        if not lot:
            del self.flag[user]
            self.at.pop(user, None)
            return 2, []
        return 1, lot[:max_n]


class Limiter:
    """Admission that allows `allow` messages per user, then rate_limited; can be down."""

    def __init__(self, allow: int) -> None:
        self.allow = allow
        self.seen: dict[str, int] = {}
        self.down = False
        self.times: list[float] = []

    async def admit(self, requests: Sequence[tuple[str, int]]) -> dict[str, list[str | None]]:
        raise AssertionError("the host must use admit_at")

    async def admit_at(
        self, requests: Sequence[tuple[str, Sequence[float]]]
    ) -> dict[str, list[str | None]]:
        if self.down:
            raise InfraError("redis down")
        out: dict[str, list[str | None]] = {}
        for user, times in requests:
            self.times.extend(times)
            for _ in times:
                n = self.seen[user] = self.seen.get(user, 0) + 1
                out.setdefault(user, []).append(None if n <= self.allow else "rate_limited")
        return out

    def on_success(self, user: str) -> None:
        return None

    def on_failure(self, user: str) -> None:
        return None


def make(
    order: MemoryRetryOrder | None = None, admission: Any = None, **opts: Any
) -> tuple[HostCore, Completions, Letters, dict[str, Any]]:
    handler_options: dict[str, Any] = {"calls": [], "started": [], "gates": {}}
    completions, letters = Completions(), Letters()
    core = HostCore(
        name="h0",
        handler=recording,
        dedup=Deduplicator(MemoryDoneStore(), retry_max_s=0.05),
        completions=completions,
        dead_letters=letters,
        admission=admission,
        retry_order=order,
        options=CoreOptions(
            completion_flush_ms=1.0, handler_options=handler_options, redis_retry_max_s=0.05, **opts
        ),
    )
    return core, completions, letters, handler_options


def retry_of(user: str, n: int, retry_count: int = 1, **raw: Any) -> Delivery:
    """What the DLQ recovery re-produces: same message, new offset, retry headers."""
    again = delivery(user, n, 1000 + n, **raw)
    return again._replace(retry_count=retry_count, is_retry=True)


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
